"""The delta encoder: (what the device holds, target toplevel) -> a reup stream.

`encode` reads the local Nix store (through reup.io.nix for path metadata), works
out which store paths the device lacks, plans every path (a MIRROR of its
predecessor or plain entries; per file dedup, hash rewrite, patch or literal:
strategy.py, with diffs running on a process pool), then writes the body in
stream order to a scratch file and the final stream: header, manifest, body,
trailer.
Called by `reup delta` (delta/cli.py), the controller's push and the benchmark.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reup_receiver.format.entries import EntryCoder
from reup_receiver.format.manifest import encode_manifest
from reup_receiver.format.manifest2 import encode_body, names_block, sized_payload
from reup_receiver.format.model import (
    F_REWRITE,
    F_SOLID_TREE,
    KIND_DIR,
    KIND_MIRROR,
    KIND_SYMLINK,
    Codec,
    Entry,
    Manifest,
    MirrorFile,
    PathEntry,
    is_store_name,
)
from reup_receiver.format.nar import parse_hash, walk_nar_order
from reup_receiver.format.wire import (
    T_ENTRY,
    T_MANIFEST,
    T_PATH,
    T_PATH_END,
    VERSION,
    RecordWriter,
    put_varint,
    stream_size,
)

from reup.delta.literalmemo import LiteralMemo
from reup.delta.stats import DeltaStats
from reup.delta.strategy import FileCoder, FileCoding, MirrorPlan, StoreFile
from reup.io.nix import NixExecutor, PathInfo


def toposort(infos: dict[str, PathInfo], paths: Iterable[str]) -> list[str]:
    """Paths ordered dependencies first (ties by name), so stream-internal bases come earlier."""
    wanted = set(paths)
    order: list[str] = []
    seen: set[str] = set()

    def visit(p: str) -> None:
        if p in seen:
            return
        seen.add(p)
        for ref in sorted(infos[p].references):
            if ref in wanted and ref != p:
                visit(ref)
        order.append(p)

    for p in sorted(wanted, key=lambda q: (os.path.basename(q)[33:], q)):
        visit(p)
    return order


def seen_first(infos: dict[str, PathInfo], ordered: Sequence[str], seen: Callable[[str], bool]) -> set[str]:
    """The paths of `ordered` (dependencies first) that an earlier stream carried, and all their
    dependencies among `ordered` too: sent first, they keep the order valid."""
    wanted = set(ordered)
    first: set[str] = set()
    for p in ordered:
        if seen(p) and all(r in first or r not in wanted or r == p for r in infos[p].references):
            first.add(p)
    return first


class _Table:
    """Store-path table of a manifest: new paths first, then device paths as first used."""

    def __init__(self, new: Sequence[str]) -> None:
        self.paths = list(new)
        self.index = {p: i for i, p in enumerate(new)}
        self.known: list[str] = []

    def __call__(self, path: str) -> int:
        i = self.index.get(path)
        if i is None:
            i = self.index[path] = len(self.index)
            self.known.append(path)
        return i


def encode(
    held: Sequence[str],
    target: str,
    out: str | os.PathLike[str],
    staged: Sequence[str] = (),
    *,
    executor: NixExecutor | None = None,
    store_dir: str = "/nix/store",
    workers: int | None = None,
    avoid: Sequence[str] = (),
    codecs: Sequence[Codec] | None = None,
    allowed_codecs: Sequence[Codec] | None = None,
    version: int = VERSION,
    pool: Executor | None = None,
    literal_memo: LiteralMemo | None = None,
) -> DeltaStats:
    """Write to `out` a stream taking a device holding `held` (closures) to `target`.

    `held` is ordered: its first entries are the device's current and newest
    generations, which pairing tries first. `workers` sizes the diff process
    pool (default: one per CPU; 0 runs diffs inline). `avoid` are paths the
    device reported broken (a missing base file): treated as not held, so
    they are neither bases nor assumed present, and are sent again if needed.
    `codecs` forces the patch codecs (tests and benchmarks); default: the best of
    `allowed_codecs`, what the device reports it can apply (default: all).
    `version` 1 writes the full manifest for receivers without the STREAM_V2 capability.
    `pool` runs the diffs instead of a pool of this call's own (the controller's
    diffmemo.DiffMemo, shared by its encodes). With `literal_memo` (the controller's), paths an
    earlier stream carried go first and their literal groups are shared (literalmemo.py).
    """
    start = time.monotonic()
    nix = executor or NixExecutor()
    target_closure = nix.closure([target])
    held_local = [p for p in held if os.path.lexists(p)]  # the base is what we still have
    held_closure = nix.closure(held_local) if held_local else {}
    for p in avoid:
        held_closure.pop(p, None)
    missing = toposort(target_closure, (p for p in target_closure if p not in held_closure))
    seen = seen_first(target_closure, missing, literal_memo.seen) if literal_memo is not None else set()
    missing = [p for p in missing if p in seen] + [p for p in missing if p not in seen]
    staged_set = set(staged)

    stats = DeltaStats(paths=len(missing), nar_bytes=sum(target_closure[p].nar_size for p in missing))
    table = _Table(missing)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(pool) if pool is not None else _pool(workers)) as pool, \
            tempfile.TemporaryFile(dir=out_path.parent) as body_fh:
        coder = FileCoder(held_closure, target_closure, missing, stats, pool, InlineExecutor(),
                          held_local, target, codecs, allowed_codecs, literal_memo)
        plans = [(i, _plan_path(p, coder)) for i, p in enumerate(missing) if p not in staged_set]
        for _, plan in plans:
            if plan.mirror is not None:
                coder.solidify(plan.mirror, plan.decisions())
        literal = [(missing[i], d) for i, plan in plans for d in plan.decisions() if coder.is_literal(d)]
        coder.literal.plan([(d.file.host, d.file.size, d.sha) for _, d in literal],
                           shared=sum(1 for p, _ in literal if p in seen))
        body = RecordWriter(body_fh, header=False)
        entries = _Entries(table, store_dir, version)
        for i, plan in plans:
            _emit_path(body, i, plan, coder, entries)
        for ref in (r for p in missing for r in target_closure[p].references):
            table(ref)
        rewrites = sorted((table(o), table(n)) for o, n in coder.rewrite_paths.items())
        table(target)
        manifest = _manifest(missing, staged_set, target_closure, table, target, store_dir, set(avoid))
        manifest.rewrites = rewrites
        manifest.literal = coder.literal.codec
        if version >= 2:  # known paths the device holds go as short ids (manifest2.py)
            holdings = {os.fsencode(os.path.basename(p)) for p in [*held_closure, *avoid]}
            payload, manifest.stream_bytes = sized_payload(encode_body(manifest, holdings), body.size)
        else:
            payload = encode_manifest(manifest)
            manifest.stream_bytes = stream_size(len(payload), body.size)
            payload = encode_manifest(manifest)
        body_fh.seek(0)
        with open(out_path, "wb") as fh:
            final = RecordWriter(fh, version=version)
            final.record(T_MANIFEST, payload)
            if version >= 2:
                final.digest.update(names_block(manifest))
            final.copy_from(body_fh)
            final.trailer()
        assert final.size == manifest.stream_bytes
    if literal_memo is not None:
        literal_memo.note(missing)
    stats.add("manifest", len(payload))
    stats.stream_bytes = final.size
    stats.bytes_by_kind["framing"] = final.size - sum(stats.bytes_by_kind.values())
    stats.seconds = time.monotonic() - start
    stats.peak_rss_bytes = 1024 * max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    return stats


@contextlib.contextmanager
def _pool(workers: int | None) -> Iterator[Executor]:
    if workers == 0:
        yield InlineExecutor()
        return
    pool = _LazyPool(workers or os.cpu_count() or 1)
    try:
        yield pool
    finally:
        pool.shutdown()


class _LazyPool(Executor):
    """A process pool started on the first submit: most small updates never need one."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self.pool is None:
            ctx = multiprocessing.get_context("forkserver")
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self.pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)


class InlineExecutor(Executor):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


Node = tuple[bytes, os.stat_result, FileCoding | None]


@dataclass
class PathPlan:
    nodes: list[Node]  # entries to send (all nodes, or a mirror's explicit ones), NAR order
    mirror: MirrorPlan | None = None

    def order(self) -> list[tuple[list[bytes], FileCoding | None, Node | None]]:
        """Everything of the path in stream order: mirrored files and explicit nodes merged."""
        items: list[tuple[list[bytes], FileCoding | None, Node | None]] = [
            (node[0].split(b"/") if node[0] else [], None, node) for node in self.nodes]
        if self.mirror is not None:
            items += [(d.file.relpath.split(b"/") if d.file.relpath else [], d, None)
                      for d in self.mirror.files]
        return sorted(items, key=lambda item: item[0])

    def decisions(self) -> list[FileCoding]:
        """The path's file decisions in stream order."""
        out = []
        for _, mirrored, node in self.order():
            d = mirrored or (node[2] if node else None)
            if d is not None:
                out.append(d)
        return out


def _plan_path(path: str, coder: FileCoder) -> PathPlan:
    """The path's nodes in NAR order, each file with its coding decision (diffs started)."""
    walked = walk_nar_order(path)
    mirror = coder.mirror_plan(path, walked)
    explicit = mirror.explicit if mirror is not None else walked
    files = [StoreFile(path, b"/".join(parts), bool(st.st_mode & 0o100), st.st_size)
             for parts, st in explicit if stat.S_ISREG(st.st_mode)]
    partners = coder.file_pairs(path, files)
    decisions = iter([coder.plan(f, partners.get(f.relpath)) for f in files])
    nodes = [(b"/".join(parts), st, next(decisions) if stat.S_ISREG(st.st_mode) else None)
             for parts, st in explicit]
    return PathPlan(nodes, mirror)


class _Entries(EntryCoder):
    """Entry encoder whose store-symlink targets enter the (growing) table."""

    def __init__(self, table: _Table, store_dir: str, version: int) -> None:
        super().__init__((), os.fsencode(store_dir), version)
        self.paths = table
        self.store_dir = store_dir

    def _store_target(self, target: bytes) -> tuple[int, bytes] | None:
        if not target.startswith(self.store_prefix):
            return None
        name, sep, rest = target[len(self.store_prefix) :].partition(b"/")
        if not is_store_name(name):
            return None
        return self.paths(f"{self.store_dir}/{os.fsdecode(name)}"), sep + rest


def _emit_path(body: RecordWriter, index: int, plan: PathPlan, coder: FileCoder,
               entries: _Entries) -> None:
    """PATH, then (a MIRROR and) the entries and DATA in NAR order, then PATH_END."""
    head = bytearray()
    if entries.version == 1:  # version 2: PATH and PATH_END are empty, paths in manifest order
        put_varint(head, index)
    body.record(T_PATH, head)
    entries.prev = b""
    top = os.fsencode(entries.paths.paths[index])
    # Data is made in stream order (the literal stream depends on it), before the
    # MIRROR entry that declares the mirrored files' lengths.
    records: list[tuple[Entry | None, bytes, str]] = []
    specs: list[MirrorFile] = []
    for _, mirrored, node in plan.order():
        if mirrored is not None:
            spec, data, kind = coder.mirror_spec(mirrored)
            specs.append(spec)
            records.append((None, data, kind))
        elif node is not None:
            relpath, st, decision = node
            if decision is not None:
                records.append(coder.emit(decision, entries.paths))
            elif stat.S_ISDIR(st.st_mode):
                records.append((Entry(KIND_DIR, relpath), b"", "framing"))
            else:
                target = os.readlink(os.path.join(top, relpath) if relpath else top)
                records.append((Entry(KIND_SYMLINK, relpath, target=target), b"", "framing"))
    if plan.mirror is not None:
        before = body.size
        body.record(T_ENTRY, entries.encode(Entry(
            KIND_MIRROR, b"", flags=F_REWRITE | (F_SOLID_TREE if plan.mirror.solid_tree else 0),
            source=entries.paths(plan.mirror.old),
            mirror=tuple(specs), skip=tuple(plan.mirror.skip))))
        coder.stats.add("mirror", body.size - before)
    for entry, data, kind in records:
        before = body.size
        if entry is not None:
            body.record(T_ENTRY, entries.encode(entry))
        body.data(data)
        if kind != "framing":
            coder.stats.add(kind, body.size - before)
    body.record(T_PATH_END, head)


def _manifest(
    missing: Sequence[str],
    staged: set[str],
    infos: dict[str, PathInfo],
    table: _Table,
    target: str,
    store_dir: str,
    replace: set[str],
) -> Manifest:
    def name(p: str) -> bytes:
        return os.fsencode(os.path.basename(p))

    paths = []
    for p in missing:
        info = infos[p]
        paths.append(
            PathEntry(
                name=name(p),
                nar_hash=parse_hash(info.nar_hash),
                nar_size=info.nar_size,
                references=tuple(sorted(table(r) for r in info.references)),
                deriver=name(info.deriver) if info.deriver else b"",
                carried=p not in staged,
                replace=p in replace,
            )
        )
    return Manifest(
        store_dir=os.fsencode(store_dir),
        known=[name(p) for p in table.known],
        paths=paths,
        toplevel=table(target),
    )
