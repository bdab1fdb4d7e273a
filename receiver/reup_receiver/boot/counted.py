"""Activation `reboot`: a generation that changes what boots goes on trial in the boot loader.

For such a generation the receiver installs and verifies everything as for any other, then,
instead of activating, writes a boot entry with a try counter (`install`, through the loader
of boot/systemd_boot.py, uboot.py or grub.py), records the trial in `nix/var/reup/boot-trial.json`,
switches the `system` profile and reboots (`reboot`, after the answer is out). The entry the
loader booted before stays the fallback. What happened is judged at every receiver call
(`judge`): the device runs the new toplevel (`/run/booted-system`, set by NixOS's stage 2) ->
it waits for `confirm`, which runs the health check and only then blesses the entry; the loader
used up the tries and the device runs another toplevel -> the generation failed to boot and is
rolled back with reason `boot_failed` (confirm.settle_boot). Called by generations.py,
confirm.py and cli.py; settings from the device's `/etc/reup/boot.json` (the NixOS module
writes it).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from reup_receiver.boot.entry import BootEntry, EntryState, Loader, boot_changes
from reup_receiver.boot.grub import Grub
from reup_receiver.boot.systemd_boot import SystemdBoot
from reup_receiver.boot.uboot import UBoot
from reup_receiver.device import Device, write_atomic

SETTINGS = "/etc/reup/boot.json"
LOADERS = ("systemd-boot", "uboot", "grub")


@dataclass(frozen=True)
class BootSettings:
    loader: str | None = None  # None: detect from what is in boot_dir
    boot_dir: str = "/boot"  # the ESP (systemd-boot) or the partition holding extlinux/ or grub/
    tries: int = 3
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    reboot_delay: float = 2.0  # seconds between the answer and the reboot
    uboot_env: str = "/boot/firmware/uboot.env"
    uboot_bootdev: str = "mmc 0:2"

    @classmethod
    def read(cls, device: Device) -> BootSettings:
        try:
            with open(device.host(SETTINGS)) as fh:
                data: dict[str, Any] = json.load(fh)
        except FileNotFoundError:
            return cls()
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{SETTINGS}: unknown keys {sorted(unknown)}")
        if data.get("loader") not in (None, *LOADERS):
            raise ValueError(f"{SETTINGS}: loader must be one of {LOADERS}")
        if "reboot_command" in data:
            data["reboot_command"] = tuple(data["reboot_command"])
        settings = cls(**data)
        if not 1 <= settings.tries <= 9:
            raise ValueError(f"{SETTINGS}: tries must be 1..9")
        return settings


def loader_for(device: Device, settings: BootSettings) -> Loader:
    boot = device.host(settings.boot_dir)
    name = settings.loader
    if name is None:
        if os.path.isdir(os.path.join(boot, "loader")):
            name = "systemd-boot"
        elif os.path.isdir(os.path.join(boot, "extlinux")):
            name = "uboot"
        elif os.path.isdir(os.path.join(boot, "grub")):
            name = "grub"
        else:
            raise ValueError(f"no boot loader found in {settings.boot_dir} (set `loader` in {SETTINGS})")
    if name == "systemd-boot":
        return SystemdBoot(device, settings.boot_dir)
    if name == "uboot":
        return UBoot(device, settings.boot_dir, settings.uboot_env, settings.uboot_bootdev)
    return Grub(device, settings.boot_dir)


def _trial_file(device: Device) -> str:
    return os.path.join(device.state, "boot-trial.json")


def trial(device: Device) -> dict[str, Any] | None:
    try:
        with open(_trial_file(device)) as fh:
            data: dict[str, Any] = json.load(fh)
            return data
    except FileNotFoundError:
        return None


def changes(device: Device, previous: tuple[int, str] | None, toplevel: str) -> tuple[str, ...]:
    """What of the boot path `toplevel` changes against the running generation (empty: nothing)."""
    return boot_changes(device, previous[1] if previous else None, toplevel)


def install(device: Device, number: int, toplevel: str, previous: tuple[int, str] | None,
            changed: tuple[str, ...]) -> list[str]:
    """Write generation `number`'s counted entry and record the trial; returns the files written."""
    settings = BootSettings.read(device)
    loader = loader_for(device, settings)
    fallback = BootEntry.of(device, previous[0], previous[1]) if previous else None
    written = loader.install(BootEntry.of(device, number, toplevel), fallback, settings.tries)
    record = {"generation": number, "toplevel": toplevel, "previous": list(previous) if previous else None,
              "loader": loader.name, "tries": settings.tries, "changes": sorted(changed),
              "files": written}
    try:
        os.makedirs(device.state, exist_ok=True)
        write_atomic(_trial_file(device), json.dumps(record).encode())
    except OSError:
        loader.discard(number)  # no trial on record: no entry the loader would try
        raise
    return written


def booted(device: Device) -> str | None:
    """The toplevel the device booted (NixOS's /run/booted-system), None if it does not say."""
    try:
        return os.readlink(device.host("/run/booted-system"))
    except OSError:
        return None


def judge(device: Device) -> tuple[str, dict[str, Any] | None]:
    """(verdict, trial): "none" (no trial), "not_rebooted", "booted_new" or "boot_failed"."""
    record = trial(device)
    if record is None:
        return "none", None
    state = loader_for(device, BootSettings.read(device)).state(int(record["generation"]))
    running = booted(device)
    if running is not None and running == record["toplevel"]:
        return "booted_new", record
    if state == EntryState.UNTRIED:
        return "not_rebooted", record
    if state in (EntryState.EXHAUSTED, EntryState.ABSENT):
        return "boot_failed", record
    # Tried but the device runs something else (chosen by hand, or a pinned default): it did not
    # boot into the new generation; with no word on what runs, trust the loader's counter.
    return ("boot_failed" if running is not None else "booted_new"), record


def bless(device: Device, generation: int) -> None:
    """After the health check: the entry boots without counting from now on."""
    record = trial(device)
    if record is None or int(record["generation"]) != generation:
        return
    loader_for(device, BootSettings.read(device)).bless(generation)
    os.unlink(_trial_file(device))


def revert(device: Device, failed: int, previous: str | None) -> tuple[str, bool]:
    """Undo generation `failed`'s trial entry; returns the activation for the previous generation
    and whether the device must reboot into it (it runs the failed one's kernel)."""
    record = trial(device)
    if record is None or int(record["generation"]) != failed:
        return "switch", False  # nothing that boots had changed: it was switched at once
    loader_for(device, BootSettings.read(device)).discard(failed)
    os.unlink(_trial_file(device))
    running = booted(device)
    return "boot", running is not None and running != previous


def reboot(device: Device) -> None:
    """Reboot after `reboot_delay` seconds, detached, so the verb's answer reaches the controller."""
    settings = BootSettings.read(device)
    script = 'sleep "$0"; exec "$@"'
    with contextlib.suppress(OSError):
        subprocess.Popen(["/bin/sh", "-c", script, str(settings.reboot_delay), *settings.reboot_command],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True,
                         env={**os.environ, "REUP_ROOT": device.root})
