"""GRUB: a menu entry on trial, its tries counted down in `grubenv`.

GRUB has no boot counting of its own, so `install` writes `grub/reup.cfg` (which grub.cfg
sources: the NixOS module adds the line) and sets `reup_trial` = N and `reup_tries` = T in
`grub/grubenv`. At each boot the script counts `reup_tries` down (GRUB has no arithmetic: one
branch per value) and saves it before booting the new entry; at 0 it leaves grub.cfg's own
default, the previous generation, in place. Blessing clears the counter and makes the entry the
default; discarding empties reup.cfg. `grubenv` is GRUB's 1024-byte environment block, written
here directly (no grub-editenv on the device). Used by boot/counted.py.
"""

from __future__ import annotations

import os

from reup_receiver.boot.entry import BootEntry, EntryState, copy_into
from reup_receiver.device import Device, write_atomic

ENV_HEADER = b"# GRUB Environment Block\n"
ENV_SIZE = 1024


def read_grubenv(path: str) -> dict[str, str]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return {}
    if not data.startswith(ENV_HEADER):
        raise ValueError(f"{path}: not a GRUB environment block")
    env = {}
    for line in data[len(ENV_HEADER):].decode().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key] = value
    return env


def encode_grubenv(env: dict[str, str]) -> bytes:
    body = ENV_HEADER + b"".join(f"{k}={v}\n".encode() for k, v in sorted(env.items()))
    if len(body) > ENV_SIZE:
        raise ValueError("GRUB environment block overflows 1024 bytes")
    return body + b"#" * (ENV_SIZE - len(body))


def menuentry(entry: BootEntry, kernel: str, initrd: str | None, boot_dir: str) -> str:
    lines = [f'menuentry "reup generation {entry.generation}" --id reup-{entry.generation} {{',
             f"  linux {boot_dir}/reup/{kernel} {entry.options}"]
    if initrd:
        lines.append(f"  initrd {boot_dir}/reup/{initrd}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def trial_script(entry: BootEntry, tries: int, body: str) -> str:
    n = entry.generation
    steps = "\n".join(f'  {"if" if t == tries else "elif"} [ "$reup_tries" = "{t}" ]; then '
                      f'set reup_tries="{t - 1}"; save_env reup_tries; set default="reup-{n}"'
                      for t in range(tries, 0, -1))
    return (f"# reup: generation {n} on trial, {tries} boots counted in grubenv (reup_tries); at 0 the\n"
            "# default of grub.cfg (the previous generation) boots.\n"
            "load_env reup_trial reup_tries\n"
            f'if [ "$reup_trial" = "{n}" ]; then\n{steps}\n  fi\nfi\n' + body)


class Grub:
    name = "grub"

    def __init__(self, device: Device, boot_dir: str) -> None:
        self.device = device
        self.boot_dir = boot_dir.rstrip("/") or ""
        self.boot = device.host(boot_dir)
        self.cfg = os.path.join(self.boot, "grub", "reup.cfg")
        self.env = os.path.join(self.boot, "grub", "grubenv")

    def install(self, entry: BootEntry, fallback: BootEntry | None, tries: int) -> list[str]:
        if tries < 1:
            raise ValueError("tries must be at least 1")
        target = os.path.join(self.boot, "reup")
        kernel = copy_into(self.device, entry.kernel, target)
        initrd = copy_into(self.device, entry.initrd, target) if entry.initrd else None
        os.makedirs(os.path.dirname(self.cfg), exist_ok=True)
        write_atomic(self.cfg, trial_script(entry, tries, menuentry(entry, kernel, initrd, self.boot_dir)).encode())
        env = read_grubenv(self.env)
        env.update({"reup_trial": str(entry.generation), "reup_tries": str(tries), "reup_limit": str(tries)})
        write_atomic(self.env, encode_grubenv(env))
        return [os.path.relpath(self.cfg, self.boot), os.path.relpath(self.env, self.boot)]

    def state(self, generation: int) -> EntryState:
        env = read_grubenv(self.env)
        if env.get("reup_trial") != str(generation):
            return EntryState.BLESSED if env.get("reup_blessed") == str(generation) else EntryState.ABSENT
        left = int(env.get("reup_tries", "0"))
        if left == 0:
            return EntryState.EXHAUSTED
        return EntryState.UNTRIED if left == int(env.get("reup_limit", str(left))) else EntryState.TRYING

    def bless(self, generation: int) -> None:
        env = read_grubenv(self.env)
        if env.get("reup_trial") != str(generation):
            raise FileNotFoundError(f"generation {generation} is not on trial in {self.env}")
        with open(self.cfg) as fh:
            entry = fh.read().split("\nfi\n", 1)[-1]
        write_atomic(self.cfg, (f'# reup: generation {generation}, blessed\nset default="reup-{generation}"\n'
                                + entry).encode())
        env = {k: v for k, v in env.items() if k not in ("reup_trial", "reup_tries", "reup_limit")}
        write_atomic(self.env, encode_grubenv({**env, "reup_blessed": str(generation)}))

    def discard(self, generation: int) -> None:
        env = read_grubenv(self.env)
        if env.get("reup_trial") == str(generation):
            env = {k: v for k, v in env.items() if k not in ("reup_trial", "reup_tries", "reup_limit")}
            write_atomic(self.env, encode_grubenv(env))
            write_atomic(self.cfg, b"# reup: no generation on trial\n")
