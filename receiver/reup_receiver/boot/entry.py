"""What a generation boots, and how a boot loader's entry for it stands.

A NixOS toplevel names what boots in four members: `kernel` and `initrd` (links to store
files), `kernel-params` (a text file) and `dtbs` (a link to the device trees, on ARM boards).
A generation whose members differ from the running one's changes what boots; with activation
`reboot` it gets a boot entry with a try counter (boot/counted.py). The loaders
(systemd_boot.py, uboot.py, grub.py) implement `Loader`. Pure apart from reading the toplevel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from reup_receiver.device import Device

BOOT_MEMBERS = ("kernel", "initrd", "kernel-params", "dtbs")


def boot_inputs(device: Device, toplevel: str) -> dict[str, str | None]:
    """Each boot member of `toplevel`: a link's target, the params file's text, None if absent."""
    out: dict[str, str | None] = {}
    for name in BOOT_MEMBERS:
        path = os.path.join(device.host(toplevel), name)
        if os.path.islink(path):
            out[name] = os.readlink(path)
        elif os.path.isfile(path):
            with open(path) as fh:
                out[name] = fh.read().strip()
        else:
            out[name] = None
    return out


def boot_changes(device: Device, old: str | None, new: str) -> tuple[str, ...]:
    """The boot members that differ between toplevels `old` and `new` (all present ones if no old)."""
    after = boot_inputs(device, new)
    if old is None:
        return tuple(k for k, v in after.items() if v is not None)
    before = boot_inputs(device, old)
    return tuple(k for k in BOOT_MEMBERS if before[k] != after[k])


@dataclass(frozen=True)
class BootEntry:
    """One generation as a boot loader sees it (device paths; `kernel`/`initrd` are store files)."""

    generation: int
    toplevel: str
    kernel: str
    initrd: str | None
    params: str
    dtbs: str | None = None

    @property
    def options(self) -> str:
        return f"init={self.toplevel}/init {self.params}".strip()

    @classmethod
    def of(cls, device: Device, generation: int, toplevel: str) -> BootEntry:
        inputs = boot_inputs(device, toplevel)
        kernel = inputs["kernel"]
        if kernel is None:
            raise ValueError(f"{toplevel} has no kernel: it cannot get a boot entry")
        return cls(generation, toplevel, kernel, inputs["initrd"], inputs["kernel-params"] or "", inputs["dtbs"])


class EntryState(StrEnum):
    ABSENT = "absent"  # no counted entry for the generation
    UNTRIED = "untried"  # written, not booted yet
    TRYING = "trying"  # booted at least once, tries left, not blessed
    EXHAUSTED = "exhausted"  # no tries left: the loader boots the fallback
    BLESSED = "blessed"  # marked good: no counter any more


class Loader(Protocol):
    """A boot loader's side of a counted boot entry."""

    name: str

    def install(self, entry: BootEntry, fallback: BootEntry | None, tries: int) -> list[str]:
        """Write `entry` with `tries` attempts before `fallback`; returns the files written."""
        ...

    def state(self, generation: int) -> EntryState: ...

    def bless(self, generation: int) -> None:
        """Mark the entry good: it boots from now on without counting."""
        ...

    def discard(self, generation: int) -> None:
        """Remove the counted entry (after a rollback): the fallback is the default again."""
        ...


def copy_into(device: Device, store_file: str, dest_dir: str, suffix: str = "") -> str:
    """Copy a store file into the boot partition as `<hash-name>-<basename><suffix>` (once); returns
    the new file's name. Named by store path, so a kernel shared by generations is copied once."""
    parent = os.path.basename(os.path.dirname(store_file))
    name = f"{parent}-{os.path.basename(store_file)}{suffix}" if parent else os.path.basename(store_file) + suffix
    dest = os.path.join(dest_dir, name)
    if not os.path.exists(dest):
        os.makedirs(dest_dir, exist_ok=True)
        tmp = dest + ".reup-tmp"
        with open(device.host(store_file), "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, dest)
    return name
