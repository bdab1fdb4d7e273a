"""Device roots whose generations boot: NixOS-shaped toplevels (kernel, initrd, kernel-params, init,
dtbs) in a device's store, and a boot partition for each loader. Used by tests/unit/test_boot_*.py
and the VM test (tests/vm/)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

STORE = "/nix/store"


def store_name(label: str) -> str:
    digest = hashlib.sha256(label.encode()).hexdigest()
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    return "".join(alphabet[int(digest[i:i + 2], 16) % 32] for i in range(0, 64, 2)) + "-" + label


def add_file(root: str, label: str, member: str, data: bytes) -> str:
    """A store path `<hash>-label` holding `member`; returns the device path of the member."""
    path = f"{STORE}/{store_name(label)}"
    host = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(os.path.join(host, member)), exist_ok=True)
    with open(os.path.join(host, member), "wb") as fh:
        fh.write(data)
    return f"{path}/{member}"


def add_toplevel(root: str, label: str, kernel: str, initrd: str, params: str, dtbs: str | None = None,
                 activation_log: str | None = None) -> str:
    """A toplevel `<hash>-nixos-system-<label>` like NixOS's; its switch-to-configuration appends its
    action to `activation_log` (a device path) so tests see what ran."""
    top = f"{STORE}/{store_name('nixos-system-' + label)}"
    host = os.path.join(root, top.lstrip("/"))
    os.makedirs(os.path.join(host, "bin"))
    os.symlink(kernel, os.path.join(host, "kernel"))
    os.symlink(initrd, os.path.join(host, "initrd"))
    if dtbs:
        os.symlink(dtbs, os.path.join(host, "dtbs"))
    with open(os.path.join(host, "kernel-params"), "w") as fh:
        fh.write(params)
    with open(os.path.join(host, "init"), "w") as fh:
        fh.write("#!/bin/sh\n")
    log = activation_log or "/var/log/activations"
    script = os.path.join(host, "bin", "switch-to-configuration")
    with open(script, "w") as fh:
        fh.write(f'#!/bin/sh\nmkdir -p "$REUP_ROOT{os.path.dirname(log)}"\n'
                 f'echo "{label} $1" >> "$REUP_ROOT{log}"\n')
    os.chmod(script, 0o755)
    return top


def set_profile(root: str, toplevels: Sequence[str]) -> None:
    profiles = os.path.join(root, "nix/var/nix/profiles")
    os.makedirs(profiles, exist_ok=True)
    for i, top in enumerate(toplevels, 1):
        os.symlink(top, os.path.join(profiles, f"system-{i}-link"))
    os.symlink(f"system-{len(toplevels)}-link", os.path.join(profiles, "system"))


def set_booted(root: str, toplevel: str | None) -> None:
    """What NixOS's stage 2 does at boot: /run/booted-system -> the toplevel that booted."""
    link = os.path.join(root, "run", "booted-system")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    if toplevel:
        os.symlink(toplevel, link)


def write_settings(root: str, **settings: object) -> None:
    path = os.path.join(root, "etc", "reup", "boot.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(settings, fh)


def activations(root: str) -> list[str]:
    try:
        with open(os.path.join(root, "var", "log", "activations")) as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        return []


def tree(base: str) -> dict[str, bytes]:
    """Every file under `base` by relative path (golden comparisons)."""
    out = {}
    for dirpath, _, files in os.walk(base):
        for f in files:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, base)] = fh.read()
    return out
