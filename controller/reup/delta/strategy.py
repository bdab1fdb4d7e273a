"""Per-file coding decisions of the encoder: how each new file reaches the device.

In order of preference: whole-file dedup (sha256 + executable bit) against
the device's holdings and everything earlier in the stream; a COPY of the
paired old file after store-hash rewriting (no data); a binary patch of the
rewritten old file (codecs.py, on a process pool); the stream-wide zstd
literal stream. `FileCoder.plan` decides in stream order and starts the
expensive diffs; `FileCoder.emit` turns a decision into the entry + data,
waiting for its diff. Called by encode.py.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reup_receiver.model import (
    F_EXECUTABLE,
    F_REWRITE,
    FILE_HASH_LEN,
    KIND_FILE,
    KIND_MIRROR,
    Codec,
    Entry,
    Method,
    MirrorFile,
)
from reup_receiver.nar import walk_nar_order
from reup_receiver.rewrite import rewrite_bytes

from ..nix import PathInfo
from .codecs import DiffResult, diff_job
from .literal import LiteralEncoder
from .pairing import Graph, pair_files, pair_paths, parse_drv_name, rewrite_pairs, store_name

if TYPE_CHECKING:
    from .encode import DeltaStats

HASH_LEN = 32
INLINE_MAX = 64 << 10


@dataclass(frozen=True)
class StoreFile:
    path: str  # store path
    relpath: bytes
    executable: bool
    size: int

    @property
    def host(self) -> bytes:
        return os.path.join(os.fsencode(self.path), self.relpath) if self.relpath else os.fsencode(self.path)


Key = tuple[bytes, bool]  # (sha256, executable)


class ContentIndex:
    """Where a (content, exec bit) already exists on the device or earlier in the stream.

    Device files are indexed by (size, exec) and hashed only when a new file of
    the same size shows up, so a large base costs a stat per file, not a read.
    """

    def __init__(self, base_files: Sequence[StoreFile]) -> None:
        self.by_key: dict[Key, tuple[str, bytes]] = {}
        self.unhashed: dict[tuple[int, bool], list[StoreFile]] = {}
        for f in base_files:
            self.unhashed.setdefault((f.size, f.executable), []).append(f)

    def add(self, key: Key, f: StoreFile) -> None:
        self.by_key.setdefault(key, (f.path, f.relpath))

    def find(self, key: Key, size: int) -> tuple[str, bytes] | None:
        for f in self.unhashed.pop((size, key[1]), []):
            self.add((file_sha256(f.host), f.executable), f)
        return self.by_key.get(key)


def file_sha256(path: bytes) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.digest()


def iter_files(path: str) -> list[StoreFile]:
    out = []
    for parts, st in walk_nar_order(path):
        if stat.S_ISREG(st.st_mode):
            out.append(StoreFile(path, b"/".join(parts), bool(st.st_mode & 0o100), st.st_size))
    return out


@dataclass
class Decision:
    """How one new file is coded; `diff` is pending work on the pool."""

    file: StoreFile
    sha: bytes
    kind: str  # "dedup", "diff" or "literal"
    source: tuple[str, bytes] | None = None
    diff: Future[DiffResult] | None = None


class FileCoder:
    def __init__(
        self,
        held: Mapping[str, PathInfo],
        target: Mapping[str, PathInfo],
        missing: Sequence[str],
        stats: DeltaStats,
        pool: Executor,
        inline: Executor,
        held_roots: Sequence[str],
        target_root: str,
        codecs: Sequence[Codec] | None = None,
        allowed: Sequence[Codec] | None = None,
    ) -> None:
        self.codecs = codecs
        self.allowed = allowed
        self.stats = stats
        self.pool = pool
        self.inline = inline
        self.old_files = {p: iter_files(p) for p in sorted(held)}
        self.index = ContentIndex([f for fs in self.old_files.values() for f in fs])
        self.pairs = pair_paths(
            missing,
            Graph({p: i.references for p, i in target.items()}, {p: i.nar_size for p, i in target.items()}),
            [target_root],
            Graph({p: i.references for p, i in held.items()}, {p: i.nar_size for p, i in held.items()}),
            list(held_roots),
        )
        self.rewrite_paths = rewrite_pairs(self.pairs)  # old path -> new path
        self.rewrites = {
            os.path.basename(o)[:HASH_LEN].encode(): os.path.basename(n)[:HASH_LEN].encode()
            for o, n in self.rewrite_paths.items()
        }
        self.literal = LiteralEncoder()

    def file_pairs(self, new_path: str, new_files: Sequence[StoreFile]) -> dict[bytes, bytes]:
        old = self.pairs.get(new_path)
        if old is None:
            return {}
        new_version = parse_drv_name(store_name(new_path))[1]
        old_version = parse_drv_name(store_name(old))[1]
        return pair_files([f.relpath for f in new_files], [f.relpath for f in self.old_files[old]],
                          new_version, old_version)

    def plan(self, f: StoreFile, partner: bytes | None) -> Decision:
        """Decide for one new file, in stream order; starts its diff on the pool."""
        sha = file_sha256(f.host)
        key = (sha, f.executable)
        self.stats.files += 1
        found = self.index.find(key, f.size)
        self.index.add(key, f)
        if found is not None:
            return Decision(f, sha, "dedup", source=found)
        if partner is not None:
            old = self.pairs[f.path]
            old_host = os.path.join(os.fsencode(old), partner) if partner else os.fsencode(old)
            # Small pairs cost less to diff here than to ship to a worker.
            pool = self.inline if f.size < INLINE_MAX else self.pool
            future = pool.submit(diff_job, old_host, f.host, self.rewrites, sha, self.codecs,
                                 self.allowed)
            return Decision(f, sha, "diff", source=(old, partner), diff=future)
        return Decision(f, sha, "literal")

    def mirror_plan(self, path: str, nodes: Sequence[tuple[list[bytes], os.stat_result]]) -> list[Decision] | None:
        """Decisions for a path whose tree has the same shape as its old partner's, else None.

        Such a path travels as one MIRROR entry: the receiver takes the tree from
        the old path (symlink targets rewritten) and only per-file specs travel.
        """
        old = self.pairs.get(path)
        if old is None:
            return None
        old_nodes = walk_nar_order(old)
        if len(old_nodes) != len(nodes):
            return None
        bold, bnew = os.fsencode(old), os.fsencode(path)
        files = []
        for (parts, st), (old_parts, old_st) in zip(nodes, old_nodes, strict=True):
            if parts != old_parts or stat.S_IFMT(st.st_mode) != stat.S_IFMT(old_st.st_mode):
                return None
            rel = b"/".join(parts)
            if stat.S_ISLNK(st.st_mode):
                new_target = os.readlink(os.path.join(bnew, rel) if rel else bnew)
                old_target = os.readlink(os.path.join(bold, rel) if rel else bold)
                if rewrite_bytes(old_target, self.rewrites) != new_target:
                    return None
            elif stat.S_ISREG(st.st_mode):
                if (st.st_mode ^ old_st.st_mode) & 0o100:
                    return None
                files.append(StoreFile(path, rel, bool(st.st_mode & 0o100), st.st_size))
        decisions = []
        for f in files:
            sha = file_sha256(f.host)
            self.stats.files += 1
            self.index.add((sha, f.executable), f)
            old_host = os.path.join(bold, f.relpath) if f.relpath else bold
            pool = self.inline if f.size < INLINE_MAX else self.pool
            future = pool.submit(diff_job, old_host, f.host, self.rewrites, sha, self.codecs,
                                 self.allowed)
            decisions.append(Decision(f, sha, "diff", source=(old, f.relpath), diff=future))
        return decisions

    def emit_mirror(self, old: str, decisions: Sequence[Decision],
                    table: Callable[[str], int]) -> tuple[Entry, list[bytes], dict[str, int]]:
        """The MIRROR entry, the DATA of its patched/literal files in order, bytes per kind."""
        specs: list[MirrorFile] = []
        datas: list[bytes] = []
        kinds: dict[str, int] = {}
        for d in decisions:
            assert d.diff is not None
            result = d.diff.result()
            sha = d.sha[:FILE_HASH_LEN]
            if result.kind == "rewrite":
                specs.append(MirrorFile(Method.COPY, sha))
                data = b""
            elif result.codec is not None:
                data = result.data
                specs.append(MirrorFile(Method.PATCH, sha, d.file.size, result.codec, len(data)))
            else:
                data = self._literal(d.file)
                specs.append(MirrorFile(Method.LITERAL, sha, d.file.size, None, len(data)))
            kind = result.kind if result.kind != "rewrite" else "mirror"
            kinds[kind] = kinds.get(kind, 0) + len(data)
            datas.append(data)
        entry = Entry(KIND_MIRROR, b"", flags=F_REWRITE, source=table(old), mirror=tuple(specs))
        return entry, datas, kinds

    def _literal(self, f: StoreFile) -> bytes:
        return self.literal.data(f.host)

    @staticmethod
    def is_literal(d: Decision) -> bool:
        """Whether a planned file ends up in the literal stream (waits for its diff)."""
        if d.kind == "literal":
            return True
        return d.diff is not None and d.diff.result().kind == "literal"

    def emit(self, d: Decision, table: Callable[[str], int]) -> tuple[Entry, bytes, str]:
        """(entry, data, stats kind) for a planned file."""
        f = d.file
        flags = F_EXECUTABLE if f.executable else 0

        def entry(method: Method, source: tuple[str, bytes] | None = None,
                  codec: Codec | None = None, data: bytes = b"") -> Entry:
            index, relpath = (table(source[0]), source[1]) if source else (-1, b"")
            return Entry(KIND_FILE, f.relpath, flags=flags, size=f.size, sha256=d.sha[:FILE_HASH_LEN],
                         method=method,
                         source=index, source_relpath=relpath, codec=codec, data_len=len(data))

        if d.kind == "dedup":
            return entry(Method.COPY, d.source), b"", "dedup"
        if d.diff is not None:
            result = d.diff.result()
            if result.kind != "literal":
                flags |= F_REWRITE if result.rewritten else 0
                if result.codec is None:
                    return entry(Method.COPY, d.source), b"", "rewrite"
                return entry(Method.PATCH, d.source, result.codec, result.data), result.data, result.kind
        data = self._literal(f)
        return entry(Method.LITERAL, data=data), data, "literal"
