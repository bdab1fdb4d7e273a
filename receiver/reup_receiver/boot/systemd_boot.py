"""systemd-boot: a Boot Loader Specification Type #1 entry whose file name counts the tries.

`loader/entries/reup-generation-N+T.conf` (T tries). systemd-boot renames the file before each
boot of it (`+T` -> `+(T-1)-1` -> ... -> `+0-T`); an entry with no tries left sorts after all
others, so the newest other entry, the previous generation, boots instead. Blessing (what
systemd-bless-boot does) renames it to `reup-generation-N.conf`. Entries sort by their names,
newest version first, so `reup-generation-N` comes before the previous generation's entry; a
`default` line in loader.conf would pin one entry and defeat the order, so `install` removes it
and `bless` points it at the blessed entry. Used by boot/counted.py.
"""

from __future__ import annotations

import contextlib
import os
import re

from reup_receiver.boot.entry import BootEntry, EntryState, copy_into
from reup_receiver.device import Device, fsync_dir, write_atomic

PREFIX = "reup-generation-"
_ENTRY_RE = re.compile(r"^reup-generation-(\d+)(?:\+(\d+)(?:-(\d+))?)?\.conf$")


def entry_text(entry: BootEntry, kernel_file: str, initrd_file: str | None) -> str:
    lines = [f"title reup generation {entry.generation}",
             f"version {entry.generation}",
             f"linux /EFI/reup/{kernel_file}"]
    if initrd_file:
        lines.append(f"initrd /EFI/reup/{initrd_file}")
    lines.append(f"options {entry.options}")
    return "\n".join(lines) + "\n"


class SystemdBoot:
    name = "systemd-boot"

    def __init__(self, device: Device, esp: str) -> None:
        self.device = device
        self.esp = device.host(esp)
        self.entries = os.path.join(self.esp, "loader", "entries")

    def _files(self, generation: int) -> list[tuple[str, int | None, int | None]]:
        """(file name, tries left, tries done) of every entry file of `generation`."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.entries)):
                m = _ENTRY_RE.match(name)
                if m and int(m.group(1)) == generation:
                    left = int(m.group(2)) if m.group(2) is not None else None
                    done = int(m.group(3)) if m.group(3) is not None else None
                    out.append((name, left, done))
        return out

    def install(self, entry: BootEntry, fallback: BootEntry | None, tries: int) -> list[str]:
        # The fallback is whatever entry the loader booted before (NixOS's or an earlier reup one):
        # it stays as it is.
        if tries < 1:
            raise ValueError("tries must be at least 1")
        target = os.path.join(self.esp, "EFI", "reup")
        kernel = copy_into(self.device, entry.kernel, target, ".efi")
        initrd = copy_into(self.device, entry.initrd, target, ".efi") if entry.initrd else None
        os.makedirs(self.entries, exist_ok=True)
        for name, _, _ in self._files(entry.generation):  # a leftover of an earlier attempt
            os.unlink(os.path.join(self.entries, name))
        path = os.path.join(self.entries, f"{PREFIX}{entry.generation}+{tries}.conf")
        write_atomic(path, entry_text(entry, kernel, initrd).encode())
        self._set_default(None)
        fsync_dir(self.entries)
        return [os.path.join("EFI", "reup", kernel), *([os.path.join("EFI", "reup", initrd)] if initrd else []),
                os.path.relpath(path, self.esp)]

    def state(self, generation: int) -> EntryState:
        files = self._files(generation)
        if not files:
            return EntryState.ABSENT
        _, left, done = files[0]
        if left is None:
            return EntryState.BLESSED
        if left == 0:
            return EntryState.EXHAUSTED
        return EntryState.TRYING if done else EntryState.UNTRIED

    def bless(self, generation: int) -> None:
        files = self._files(generation)
        if not files:
            raise FileNotFoundError(f"no boot entry for generation {generation} in {self.entries}")
        blessed = f"{PREFIX}{generation}.conf"
        if files[0][0] != blessed:
            os.rename(os.path.join(self.entries, files[0][0]), os.path.join(self.entries, blessed))
            fsync_dir(self.entries)
        self._set_default(blessed)

    def discard(self, generation: int) -> None:
        for name, _, _ in self._files(generation):
            os.unlink(os.path.join(self.entries, name))
        if os.path.isdir(self.entries):
            fsync_dir(self.entries)
        self._collect()

    def _collect(self) -> None:
        """Delete kernels and initrds under EFI/reup that no reup entry names (the ESP is small)."""
        target = os.path.join(self.esp, "EFI", "reup")
        if not os.path.isdir(target):
            return
        used = set()
        for name in os.listdir(self.entries):
            if _ENTRY_RE.match(name):
                with open(os.path.join(self.entries, name)) as fh:
                    for line in fh:
                        key, _, value = line.strip().partition(" ")
                        if key in ("linux", "initrd") and value.startswith("/EFI/reup/"):
                            used.add(value[len("/EFI/reup/"):])
        for name in os.listdir(target):
            if name not in used:
                os.unlink(os.path.join(target, name))

    def _set_default(self, entry: str | None) -> None:
        """Rewrite loader.conf's `default` (None: no default, the entries' order decides)."""
        conf = os.path.join(self.esp, "loader", "loader.conf")
        try:
            with open(conf) as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            lines = []
        kept = [ln for ln in lines if ln.split(maxsplit=1)[:1] != ["default"]]
        if entry is not None:
            kept.append(f"default {entry}")
        if kept != lines:
            write_atomic(conf, ("\n".join(kept) + "\n").encode())
