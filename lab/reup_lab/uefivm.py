"""A UEFI virtual machine as a device's boot path: OVMF, systemd-boot and Linux under qemu (TCG).

The VM test (tests/vm/, `make vm-test`) uses it to show boot counting for real: the firmware,
systemd-boot's renaming of `+TRIES` entries and its fallback to the previous entry, and a Linux
kernel whose initramfs either comes up or panics. Why a host-side driver and not a receiver inside
the VM: the device's persistent state that boot counting touches is the EFI system partition, and
a Python receiver inside a busybox initramfs would need a Python runtime, block and FAT drivers
in the image for no gain in what is shown. So the device's root directory lives on the host (the
receiver runs on it, as it would after the device booted), its `/boot` is the ESP, copied into
the VM's FAT disk before a boot and back after it (mtools, no root or loop devices), and the VM
reports on its serial console what it booted: `REUP-BOOTED <cmdline>` from a good initramfs, then
it powers off; a bad one makes `/init` exit, the kernel panics and `panic=1` resets the VM, which
systemd-boot then counts. The driver turns the reported `init=<toplevel>/init` into the device's
`/run/booted-system`, which is what NixOS's stage 2 does on a real device.

Needs Debian's qemu-system-x86, ovmf, systemd-boot-efi, linux-image-amd64, busybox-static, mtools
and dosfstools (`available()` says which are missing).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
SYSTEMD_BOOT = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
MARKER = "REUP-BOOTED"
_INIT_RE = re.compile(r"\binit=(\S+)/init\b")

GOOD_INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc
/bin/busybox mount -t proc proc /proc
echo "{MARKER} $(/bin/busybox cat /proc/cmdline)"
/bin/busybox sync
/bin/busybox poweroff -f
"""
# /init exits: "Attempted to kill init", a panic, and `panic=1` resets the machine.
BAD_INIT = """#!/bin/busybox sh
echo "REUP-PANIC this initramfs does not come up"
exit 1
"""


def kernel_image() -> str | None:
    found = sorted(Path("/boot").glob("vmlinuz-*"))
    return str(found[-1]) if found else None


def available() -> list[str]:
    """What is missing to run the VM (empty: everything is there)."""
    missing = [p for p in (OVMF_CODE, OVMF_VARS, SYSTEMD_BOOT, BUSYBOX) if not os.path.exists(p)]
    missing += [c for c in (QEMU, "mcopy", "mkfs.fat") if shutil.which(c) is None]
    if kernel_image() is None:
        missing.append("/boot/vmlinuz-*")
    if os.path.exists(BUSYBOX):
        with open(BUSYBOX, "rb") as fh:
            if b"ld-linux" in fh.read(8192):  # dynamically linked: no use in an initramfs
                missing.append("busybox-static")
    return missing


def initramfs(init_script: str) -> bytes:
    """A gzip'd newc cpio: busybox, /init, /dev/console (a device node: no root needed)."""
    out = io.BytesIO()
    ino = 1

    def add(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
        ino += 1

    for d in ("bin", "dev", "proc", "sys"):
        add(d, 0o040755)
    add("dev/console", 0o020600, rdev=(5, 1))
    add("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes())
    add("init", 0o100755, init_script.encode())
    add("TRAILER!!!", 0)
    return gzip.compress(out.getvalue(), compresslevel=1)


@dataclass(frozen=True)
class Boot:
    """One qemu run: what the serial console showed and what came up."""

    serial: str
    seconds: float
    booted_init: str | None  # the toplevel whose init ran (from `init=` on the cmdline), None: nothing booted
    panics: int  # initramfs panics seen (each a reset systemd-boot counted)
    firmware_starts: int  # how often the firmware started (1 + resets)


class UefiVm:
    """A disk with only an EFI system partition (FAT on the whole disk) behind OVMF."""

    def __init__(self, workdir: str, esp_mb: int = 96) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk = self.dir / "disk.img"
        self.vars = self.dir / "OVMF_VARS.fd"
        self.esp_mb = esp_mb
        self.env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

    def _mtools(self, *argv: str) -> None:
        subprocess.run(list(argv), check=True, env=self.env, capture_output=True)

    def write_esp(self, esp: str) -> None:
        """Make the VM's disk hold exactly the files of the host directory `esp`."""
        if not self.vars.exists():
            shutil.copyfile(OVMF_VARS, self.vars)
        if self.disk.exists():
            self.disk.unlink()
        with open(self.disk, "wb") as fh:
            fh.truncate(self.esp_mb << 20)
        subprocess.run(["mkfs.fat", "-F", "32", "-n", "ESP", str(self.disk)], check=True, capture_output=True)
        names = sorted(os.listdir(esp))
        if names:
            self._mtools("mcopy", "-s", "-p", "-i", str(self.disk), *[os.path.join(esp, n) for n in names], "::/")

    def read_esp(self, esp: str) -> None:
        """Copy the VM's ESP back into the host directory `esp` (systemd-boot renamed entries there)."""
        tmp = Path(str(esp) + ".vm-read")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self._mtools("mcopy", "-s", "-n", "-i", str(self.disk), "::/*", str(tmp))
        shutil.rmtree(esp)
        os.rename(tmp, esp)

    def boot(self, timeout: float = 600.0, memory_mb: int = 384) -> Boot:
        """Start the VM and wait until it powers off (a good boot) or `timeout` passes."""
        serial = self.dir / "serial.log"
        argv = [QEMU, "-machine", "q35,accel=tcg", "-cpu", "max", "-m", str(memory_mb), "-smp", "1",
                "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={self.vars}",
                "-drive", f"file={self.disk},format=raw,if=virtio",
                "-display", "none", "-monitor", "none", "-nic", "none",
                "-serial", f"file:{serial}"]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            text = serial.read_text(errors="replace") if serial.exists() else ""
            raise TimeoutError(f"the VM did not power off within {timeout:.0f} s; serial tail:\n{text[-3000:]}") from None
        seconds = time.monotonic() - start
        text = serial.read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"qemu exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
        booted = None
        for line in text.splitlines():
            if line.startswith(MARKER):
                m = _INIT_RE.search(line)
                booted = m.group(1) if m else ""
        return Boot(text, seconds, booted, text.count("REUP-PANIC"), max(1, text.count("BdsDxe: loading")))
