"""Device verbs besides receiving: status, rollback and garbage collection.

`status` is what the controller reads to choose a delta base; `rollback` and
`gc` are for operators and the controller. Called by cli.py.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable

from reup_receiver import confirm, resume
from reup_receiver.device import Device
from reup_receiver.errors import NoGeneration
from reup_receiver.format import pyc
from reup_receiver.format.model import Codec
from reup_receiver.format.wire import VERSION
from reup_receiver.generations import switch_generation
from reup_receiver.patches import available_codecs
from reup_receiver.protocol import STREAM_V2

_HASH_RE = re.compile(rb"[0-9a-df-np-sv-z]{32}")


def status(device: Device) -> dict[str, object]:
    current = device.current()
    codecs = available_codecs()
    return {
        "current": current[1] if current else None,
        "generation": current[0] if current else None,
        "generations": [{"number": n, "toplevel": t} for n, t in device.generations()],
        "paths": sorted(device.valid_paths()),
        "staged": sorted(device.staged()),
        "pending": confirm.pending(device),
        "last_rollback": confirm.last_rollback(device),
        "format": VERSION,
        "codecs": [*(c.name.lower() for c in codecs), STREAM_V2,
                   *([pyc.identity()] if Codec.SOLID_PYC in codecs else [])],
        "resume": resume.status_field(device),
    }


def rollback(device: Device, activate: str = "switch") -> dict[str, object]:
    """A pending generation: back to the last confirmed one. Otherwise: switch to the newest
    generation older than the current one (as a new generation), which becomes the confirmed one."""
    with device.lock():
        entry = confirm.roll_back_pending(device, "rolled back by the rollback verb")
        if entry is not None:
            restored = device.current()
            return {"generation": restored[0] if restored else None,
                    "toplevel": restored[1] if restored else None, "rolled_back_to": entry["restored"]}
        current = device.current()
        older = [(n, t) for n, t in device.generations() if current is None or n < current[0]]
        if not older:
            raise NoGeneration("no earlier generation to roll back to")
        number, toplevel = older[-1]
        if not os.path.lexists(device.host(toplevel)):
            raise NoGeneration(f"generation {number} is not complete on the device")
        new, _ = switch_generation(device, toplevel, activate)
        confirm.mark_confirmed(device, (new, toplevel))
        return {"generation": new, "toplevel": toplevel, "rolled_back_to": number}


def gc(device: Device, keep: int) -> dict[str, object]:
    """Delete store paths no kept generation needs (invariant 3).

    Kept: the newest `keep` generations counted from the last confirmed one, every newer one
    (a pending generation), the current and the last confirmed generation, whatever a pending
    record names, and the booted system (`/run/booted-system`) when the device has one.
    """
    if keep < 1:
        raise ValueError("--keep must be at least 1")
    with device.lock():
        device.prepare_staging()
        generations = device.generations()
        current = device.current()
        confirmed = confirm.last_confirmed(device)
        record = confirm.read_pending(device)
        base = confirmed[0] if confirmed else (current[0] if current else 0)
        older = [g for g in generations if g[0] <= base]
        keep_numbers = {n for n, _ in older[-keep:]} | {n for n, _ in generations if n > base}
        for gen in (current, confirmed):
            if gen is not None:
                keep_numbers.add(gen[0])
        roots = {t for n, t in generations if n in keep_numbers}
        if record is not None:
            if isinstance(record.get("generation"), int):
                keep_numbers.add(record["generation"])
            if record.get("toplevel"):
                roots.add(str(record["toplevel"]))
            if record.get("previous"):
                roots.add(str(record["previous"][1]))
        if confirmed is not None:
            roots.add(confirmed[1])
        with contextlib.suppress(OSError):
            roots.add(os.readlink(device.host("/run/booted-system")))
        for number, _ in generations:
            if number not in keep_numbers:
                device.drop_generation(number)
        valid = device.valid_paths()
        live = closure(roots & valid, references(device, valid))
        dead = sorted(valid - live)
        device.db.unregister(dead)
        for path in dead:
            device.forget(path)
            host = device.host(path)
            if os.path.lexists(host):
                device.remove_tree(host)
        resume.discard(device)  # a partial stream is staging too
        staged = list(device.staged())
        for path in staged:
            name = os.path.basename(path)
            os.unlink(os.path.join(device.done, name + ".json"))
            device.remove_tree(os.path.join(device.done, name))
        return {"deleted": dead, "deleted_staged": sorted(staged),
                "generations": [n for n, _ in device.generations()]}


def references(device: Device, valid: set[str]) -> dict[str, set[str]]:
    """Each valid path's references: the Nix DB, else our records, else a scan like Nix's."""
    if device.db.exists():
        return device.db.references()
    recorded = {p: set(r.references) for p, r in device.records().items()}
    by_hash = {os.path.basename(p)[:32].encode(): p for p in valid}
    return {p: recorded[p] if p in recorded else scan_references(device.host(p), by_hash)
            for p in valid}


def scan_references(host_path: str, by_hash: dict[bytes, str]) -> set[str]:
    found: set[str] = set()
    for data in _tree_bytes(host_path):
        for m in _HASH_RE.finditer(data):
            ref = by_hash.get(m.group())
            if ref:
                found.add(ref)
    return found


def _tree_bytes(host_path: str) -> Iterable[bytes]:
    if os.path.islink(host_path):
        yield os.fsencode(os.readlink(host_path))
    elif os.path.isfile(host_path):
        with open(host_path, "rb") as fh:
            yield fh.read()
    elif os.path.isdir(host_path):
        for name in os.listdir(host_path):
            yield from _tree_bytes(os.path.join(host_path, name))


def closure(roots: Iterable[str], refs: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(refs.get(p, ()))
    return seen
