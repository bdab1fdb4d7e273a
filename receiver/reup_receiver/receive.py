"""Receive one stream: stage and verify every path, then install, switch, activate.

The phases, each leaving the device on a complete generation if killed:
1. read + verify: each carried path is built in `staging/work`, its files and
   NAR hash checked, then renamed to `staging/done` (kept for resume);
2. only after the trailer digest checks out: record, rename into the store,
   register in the Nix DB;
3. add `system-N-link`, swap `system` by rename, run the activation; on failure
   swap back and re-activate the previous generation.
Called by cli.py.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import BinaryIO

from reup_receiver import confirm
from reup_receiver.builder import PathBuilder
from reup_receiver.device import Device, exchange, write_atomic
from reup_receiver.errors import (
    Corrupt,
    DiskFull,
    HashMismatch,
    MissingBase,
    MissingPath,
    ReceiveError,
)
from reup_receiver.format.entries import EntryCoder
from reup_receiver.format.literal import LiteralStream
from reup_receiver.format.manifest import decode_manifest
from reup_receiver.format.manifest2 import decode_manifest_v2, names_block
from reup_receiver.format.model import Manifest
from reup_receiver.format.nar import nar_hash_tree
from reup_receiver.format.wire import (
    T_DATA,
    T_ENTRY,
    T_MANIFEST,
    T_PATH,
    T_PATH_END,
    T_TRAILER,
    Buf,
    RecordReader,
)
from reup_receiver.generations import switch_generation
from reup_receiver.nixdb import PathRecord
from reup_receiver.protocol import ReceiveAnswer, check_confirm_timeout


def receive(device: Device, inp: BinaryIO, activate: str = "switch",
            confirm_timeout: float = 0) -> ReceiveAnswer:
    """Receive a stream; with `confirm_timeout`, the new generation must be confirmed in time."""
    check_confirm_timeout(confirm_timeout)
    start = time.monotonic()
    with device.lock():
        device.prepare_staging()
        try:
            reader = RecordReader(inp)
            manifest = _read_manifest(reader, device)
            _check_space(manifest, device)
            _read_paths(reader, manifest, device)
        finally:  # a failed receive leaves no partial tree behind; verified `done` paths stay for resume
            device.clear_work()
        toplevel = manifest.store_path(manifest.toplevel)
        current = device.current()
        if current is None or current[1] != toplevel:
            confirm.refuse_if_pending(device)  # invariant 2: never switch away from a pending generation
        installed = _install(manifest, device)
        if current is not None and current[1] == toplevel:
            record = confirm.read_pending(device)
            waiting = record is not None and record.get("generation") == current[0]
            return ReceiveAnswer(current[0], toplevel, tuple(installed), reader.bytes_read,
                                 time.monotonic() - start, unchanged=True,
                                 confirm_deadline=float(record["deadline"]) if record and waiting else None,
                                 confirm_remaining=max(0.0, confirm.remaining(record)) if record and waiting else None)
        _check_complete(device, toplevel)
        if confirm_timeout > 0:
            number, record = confirm.switch_armed(device, toplevel, activate, confirm_timeout)
            return ReceiveAnswer(number, toplevel, tuple(installed), reader.bytes_read, time.monotonic() - start,
                                 confirm_deadline=float(record["deadline"]),
                                 confirm_remaining=max(0.0, confirm.remaining(record)))
        number, _ = switch_generation(device, toplevel, activate)
        confirm.mark_confirmed(device, (number, toplevel))
        return ReceiveAnswer(number, toplevel, tuple(installed), reader.bytes_read, time.monotonic() - start)


# Kept free on the store's filesystem after staging (docs/device-invariants.md): Nix's database,
# logs and the activation need room too.
SPACE_RESERVE = 1 << 20


def _check_space(m: Manifest, device: Device) -> None:
    """Refuse before staging when the paths the manifest says it will write do not fit (statvfs)."""
    staged = device.staged()
    need = sum(p.nar_size for p in m.paths
               if p.carried and device.store_path(os.fsdecode(p.name)) not in staged)
    free = device.free_bytes()
    if need + SPACE_RESERVE > free:
        raise DiskFull(f"stream needs {need} bytes of staging (+{SPACE_RESERVE} reserve), "
                       f"{free} bytes free on the store's filesystem")


def _check_complete(device: Device, toplevel: str) -> None:
    """Invariant 5: the switch target and its whole closure are present and registered."""
    valid = device.valid_paths()
    refs = device.db.references() if device.db.exists() else {
        p: set(r.references) for p, r in device.records().items()}
    seen: set[str] = set()
    todo = [toplevel]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        if p not in valid or not os.path.lexists(device.host(p)):
            raise MissingPath(f"switch target incomplete: {p} is not a valid path on the device")
        todo.extend(refs.get(p, ()))


def _read_manifest(reader: RecordReader, device: Device) -> Manifest:
    tag, payload = reader.next()
    if tag != T_MANIFEST:
        raise Corrupt("stream does not start with a manifest")
    if reader.version >= 2:
        def holdings() -> list[bytes]:
            return [os.fsencode(os.path.basename(p)) for p in device.valid_paths()]

        m = decode_manifest_v2(payload, holdings)
        # The full names the short ids resolved to are part of the digest: a stream meant
        # for other paths never gets past its trailer (manifest2.py).
        reader.digest.update(names_block(m))
    else:
        m = decode_manifest(payload)
    if m.stream_bytes < reader.bytes_read:
        raise Corrupt("manifest declares a stream shorter than its own header")
    reader.limit = m.stream_bytes
    if os.fsdecode(m.store_dir) != device.store_dir:
        raise Corrupt(f"stream is for store {m.store_dir!r}, device has {device.store_dir}")
    return m


def _read_paths(reader: RecordReader, m: Manifest, device: Device) -> None:
    """Phase 1: build and verify each carried path into staging/done."""
    table = m.table
    carried = {i for i, p in enumerate(m.paths) if p.carried}
    built: set[int] = set()
    literal = LiteralStream(m.literal)
    rewrites = m.rewrite_map()

    def resolve(index: int, relpath: bytes) -> tuple[str, str]:
        name = os.fsdecode(table[index])
        label = f"{device.store_path(name)}/{os.fsdecode(relpath)}"
        if index in carried and index not in built:
            return os.path.join(device.work, name), label  # the path being built now
        for base in (device.done, device.store):
            if os.path.lexists(os.path.join(base, name)):
                return os.path.join(base, name), label
        raise MissingBase(f"base file missing: {label}", label)

    order = iter(sorted(carried))  # version 2: PATH records are empty, in manifest order
    while True:
        tag, payload = reader.next()
        if tag == T_TRAILER:
            reader.check_trailer(payload)
            literal.finish()
            break
        if tag != T_PATH:
            raise Corrupt(f"unexpected record {tag:#x} between store paths")
        index = _index(payload) if reader.version == 1 else _next(payload, order)
        if index not in carried or index in built:
            raise Corrupt(f"stream carries path #{index} the manifest does not expect")
        entry = m.paths[index]
        builder = PathBuilder(device.work, entry.name, resolve, rewrites, literal, entry.nar_size)
        entries = EntryCoder(table, m.store_dir, reader.version)
        try:
            while True:
                tag, payload = reader.next()
                if tag == T_ENTRY:
                    builder.entry(entries.decode(payload))
                elif tag == T_DATA:
                    builder.data(payload)
                elif tag == T_PATH_END and (_index(payload) == index if reader.version == 1 else not payload):
                    break
                else:
                    raise Corrupt(f"unexpected record {tag:#x} inside {entry.name!r}")
            nar_hash, nar_size = builder.finish()
        finally:
            builder.close()
        if nar_hash != entry.nar_hash or nar_size != entry.nar_size:
            if reader.version >= 2 and (blame := builder.mirror_blame("NAR hash of its mirror")):
                # Mirrored copies carry no file hash in version 2: blame the base, as a file
                # mismatch inside a mirror does, so the controller re-encodes without it.
                raise blame
            raise HashMismatch(f"NAR hash mismatch: {device.store_path(os.fsdecode(entry.name))}")
        _stage_done(device, _record(m, index, device, table))
        built.add(index)
    missing = carried - built
    if missing:
        raise Corrupt(f"stream ended without {len(missing)} path(s) its manifest announced")


def _next(payload: bytes, order: Iterator[int]) -> int:
    """Version 2: the next carried path of the manifest (-1 past the last)."""
    if payload:
        raise Corrupt("a version-2 PATH record names no index")
    return next(order, -1)


def _index(payload: bytes) -> int:
    buf = Buf(payload, "path record")
    index = buf.varint()
    buf.end()
    return index


def _record(m: Manifest, i: int, device: Device, table: list[bytes]) -> PathRecord:
    p = m.paths[i]

    def path(j: int) -> str:
        return device.store_path(os.fsdecode(table[j]))

    return PathRecord(
        path=path(i),
        nar_hash=p.nar_hash,
        nar_size=p.nar_size,
        references=tuple(sorted(path(r) for r in p.references)),
        deriver=device.store_path(os.fsdecode(p.deriver)) if p.deriver else None,
    )


def _stage_done(device: Device, rec: PathRecord) -> None:
    name = os.path.basename(rec.path)
    dest = os.path.join(device.done, name)
    if os.path.lexists(dest):
        device.remove_tree(dest)
    write_atomic(dest + ".json", json.dumps(rec.to_json()).encode())
    os.rename(os.path.join(device.work, name), dest)


def _is_broken(device: Device, rec: PathRecord) -> bool:
    """The device's copy of a path the controller reports broken: does it fail its NAR hash?"""
    try:
        return nar_hash_tree(device.host(rec.path))[0] != rec.nar_hash
    except (OSError, ReceiveError):
        return True


def _replace(device: Device, rec: PathRecord) -> None:
    """Invariant 4: the verified staged copy goes in beside the broken one and is swapped in by one
    atomic exchange, so the path is never missing; the NAR hash is registered again first."""
    name = os.path.basename(rec.path)
    beside = os.path.join(device.trash, name + ".replace")
    os.unlink(os.path.join(device.done, name + ".json"))
    os.rename(os.path.join(device.done, name), beside)
    device.record(rec)
    if device.db.exists():
        device.db.reregister(rec)
    exchange(beside, device.host(rec.path))
    device.remove_tree(beside)  # the broken copy


def _install(m: Manifest, device: Device) -> list[str]:
    """Phase 2: every manifest path into the store (from staging), recorded and registered.

    A valid path is kept unless the manifest marks it `replace` (the device
    reported its copy broken), so a repeated stream is a no-op.
    """
    valid = {p for p in device.valid_paths() if os.path.lexists(device.host(p))}
    staged = device.staged()
    table = m.table
    records = [_record(m, i, device, table) for i in range(len(m.paths))]
    replace = {rec.path for rec, p in zip(records, m.paths, strict=True) if p.replace}
    for rec in records:
        st = staged.get(rec.path)
        if rec.path not in valid and (st is None or st.nar_hash != rec.nar_hash):
            raise MissingPath(f"store path neither in the stream nor staged: {rec.path}")
    new_paths = {r.path for r in records}
    for rec in records:
        for ref in rec.references:
            if ref not in valid and ref not in new_paths:
                raise MissingPath(f"{rec.path} references {ref}, which the device lacks")
    installed = []
    for rec in records:
        name = os.path.basename(rec.path)
        if rec.path in valid and rec.path in replace and rec.path in staged and _is_broken(device, rec):
            _replace(device, rec)
            installed.append(rec.path)
            continue
        if rec.path in valid:  # invariant 4: a valid path that verifies is never touched
            if rec.path in staged:  # carried although present: the staged copy is surplus
                os.unlink(os.path.join(device.done, name + ".json"))
                device.remove_tree(os.path.join(device.done, name))
            continue
        device.record(rec)
        dest = os.path.join(device.store, name)
        if os.path.lexists(dest):  # an unregistered leftover, or a copy reported broken
            device.remove_tree(dest)
        os.rename(os.path.join(device.done, name), dest)
        os.unlink(os.path.join(device.done, name + ".json"))
        installed.append(rec.path)
    if device.db.exists():
        device.db.register([r for r in records if r.path not in valid])
    return installed
