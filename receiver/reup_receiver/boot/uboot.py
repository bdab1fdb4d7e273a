"""U-Boot boards (the template's Raspberry Pi): extlinux plus U-Boot's bootcount, bootlimit, altbootcmd.

U-Boot built with CONFIG_BOOTCOUNT_LIMIT and CONFIG_BOOTCOUNT_ENV counts boots in the `bootcount`
variable while `upgrade_available` is 1 and, once it passes `bootlimit`, runs `altbootcmd`
instead of `bootcmd`. `install` writes `extlinux/extlinux.conf` with the new generation as
DEFAULT, keeps the loader's previous file as `extlinux/reup-fallback.conf`, and sets the
environment: `bootlimit` = tries, `bootcount` = 0, `upgrade_available` = 1 and an `altbootcmd`
that stops counting and boots the fallback file with `sysboot`. Blessing stops the counting;
discarding restores the previous extlinux.conf.

The environment is U-Boot's own file format (CONFIG_ENV_IS_IN_FAT, as the Raspberry Pi builds
use: `uboot.env` on the firmware partition): a CRC-32 of the data, then `name=value` strings each
ended by a NUL, padded to the environment size. It must exist (booted once with `saveenv`): a
new file would replace U-Boot's built-in defaults, bootcmd included. Used by boot/counted.py.
"""

from __future__ import annotations

import os
import struct
import zlib

from reup_receiver.boot.entry import BootEntry, EntryState, copy_into
from reup_receiver.device import Device, write_atomic

ENV_SIZE = 0x4000  # the Raspberry Pi defconfigs' CONFIG_ENV_SIZE
FALLBACK = "reup-fallback.conf"


def read_env(path: str) -> dict[str, str]:
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 5:
        raise ValueError(f"{path}: too short for a U-Boot environment")
    (crc,) = struct.unpack("<I", data[:4])
    body = data[4:]
    if zlib.crc32(body) != crc:
        raise ValueError(f"{path}: CRC mismatch, not a U-Boot environment of {len(data)} bytes")
    env: dict[str, str] = {}
    for item in body.split(b"\0"):
        if not item:
            break
        key, _, value = item.decode().partition("=")
        env[key] = value
    return env


def encode_env(env: dict[str, str], size: int = ENV_SIZE) -> bytes:
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(env.items())) + b"\0"
    if len(body) > size - 4:
        raise ValueError(f"U-Boot environment of {len(body)} bytes does not fit {size}")
    body += b"\0" * (size - 4 - len(body))
    return struct.pack("<I", zlib.crc32(body)) + body


def extlinux_label(entry: BootEntry, kernel: str, initrd: str | None, dtbs: str | None) -> str:
    lines = [f"LABEL reup-{entry.generation}",
             f"  MENU LABEL reup generation {entry.generation}",
             f"  LINUX ../reup/{kernel}"]
    if initrd:
        lines.append(f"  INITRD ../reup/{initrd}")
    if dtbs:
        lines.append(f"  FDTDIR ../reup/{dtbs}")
    lines.append(f"  APPEND {entry.options}")
    return "\n".join(lines) + "\n"


class UBoot:
    name = "uboot"

    def __init__(self, device: Device, boot_dir: str, env_file: str, bootdev: str) -> None:
        self.device = device
        self.boot = device.host(boot_dir)
        self.boot_dir = boot_dir
        self.env_file = device.host(env_file)
        self.bootdev = bootdev  # `sysboot` interface and partition of boot_dir, e.g. "mmc 0:2"
        self.conf = os.path.join(self.boot, "extlinux", "extlinux.conf")
        self.fallback = os.path.join(self.boot, "extlinux", FALLBACK)

    def _copy(self, entry: BootEntry) -> tuple[str, str | None, str | None]:
        target = os.path.join(self.boot, "reup")
        kernel = copy_into(self.device, entry.kernel, target)
        initrd = copy_into(self.device, entry.initrd, target) if entry.initrd else None
        dtbs = None
        if entry.dtbs:
            dtbs = os.path.basename(entry.dtbs)
            dest = os.path.join(target, dtbs)
            if not os.path.exists(dest):
                _copy_tree(self.device.host(entry.dtbs), dest)
        return kernel, initrd, dtbs

    def install(self, entry: BootEntry, fallback: BootEntry | None, tries: int) -> list[str]:
        if tries < 1:
            raise ValueError("tries must be at least 1")
        env = read_env(self.env_file)  # first: no environment, no boot counting, nothing written
        label = extlinux_label(entry, *self._copy(entry))
        os.makedirs(os.path.dirname(self.conf), exist_ok=True)
        if not os.path.exists(self.fallback):  # a leftover fallback is the original: keep it
            if os.path.exists(self.conf):
                with open(self.conf, "rb") as fh:
                    write_atomic(self.fallback, fh.read())
            elif fallback is not None:
                text = f"DEFAULT reup-{fallback.generation}\n" + extlinux_label(fallback, *self._copy(fallback))
                write_atomic(self.fallback, text.encode())
            else:
                raise ValueError("no previous boot entry to fall back to")
        head = (f"# reup: generation {entry.generation} on trial ({tries} boots, U-Boot bootcount); "
                f"the previous entries are in {FALLBACK}\nDEFAULT reup-{entry.generation}\nTIMEOUT 10\n")
        write_atomic(self.conf, (head + label).encode())
        fallback_path = os.path.join(self.boot_dir, "extlinux", FALLBACK)
        env.update({"bootlimit": str(tries), "bootcount": "0", "upgrade_available": "1",
                    "reup_trial": str(entry.generation), "reup_bootdev": self.bootdev,
                    "altbootcmd": ("setenv upgrade_available 0; saveenv; "
                                   f"sysboot ${{reup_bootdev}} any ${{scriptaddr}} {fallback_path}")})
        write_atomic(self.env_file, encode_env(env))
        return [os.path.relpath(self.conf, self.boot), os.path.relpath(self.fallback, self.boot),
                os.path.relpath(self.env_file, self.device.root)]

    def state(self, generation: int) -> EntryState:
        try:
            env = read_env(self.env_file)
        except FileNotFoundError:
            return EntryState.ABSENT
        if env.get("reup_trial") != str(generation):
            return EntryState.BLESSED if env.get("reup_blessed") == str(generation) else EntryState.ABSENT
        count, limit = int(env.get("bootcount", "0")), int(env.get("bootlimit", "1"))
        if count > limit:
            return EntryState.EXHAUSTED
        return EntryState.TRYING if count > 0 else EntryState.UNTRIED

    def _clear(self, env: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in env.items() if k not in ("reup_trial", "altbootcmd", "bootlimit")}
        env.update({"upgrade_available": "0", "bootcount": "0"})
        return env

    def bless(self, generation: int) -> None:
        env = read_env(self.env_file)
        if env.get("reup_trial") != str(generation):
            raise FileNotFoundError(f"generation {generation} is not on trial in {self.env_file}")
        write_atomic(self.env_file, encode_env({**self._clear(env), "reup_blessed": str(generation)}))
        if os.path.exists(self.fallback):
            os.unlink(self.fallback)

    def discard(self, generation: int) -> None:
        env = read_env(self.env_file)
        if env.get("reup_trial") == str(generation):
            write_atomic(self.env_file, encode_env(self._clear(env)))
        if os.path.exists(self.fallback):
            os.rename(self.fallback, self.conf)


def _copy_tree(src: str, dest: str) -> None:
    tmp = dest + ".reup-tmp"
    for dirpath, _, files in os.walk(src, followlinks=True):
        out = os.path.join(tmp, os.path.relpath(dirpath, src))
        os.makedirs(out, exist_ok=True)
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as a, open(os.path.join(out, f), "wb") as b:
                b.write(a.read())
    os.rename(tmp, dest)
