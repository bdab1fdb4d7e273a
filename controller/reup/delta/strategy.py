"""Per-file coding decisions of the encoder: how each new file reaches the device.

In order of preference: whole-file dedup (sha256 + executable bit) against
the device's holdings and everything earlier in the stream; a COPY of the
paired old file after store-hash rewriting (no data); a binary patch of the
rewritten old file (codecs.py, on a process pool); the literal stream
(literal.py). Paths shaped like their predecessor travel as a MIRROR of it
(`mirror_plan`). `FileCoder.plan` decides in stream order and starts the
expensive diffs; `emit`/`mirror_spec` turn a decision into what is sent,
waiting for its diff. Called by encode.py.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from reup_receiver.format.model import (
    F_EXECUTABLE,
    F_REWRITE,
    FILE_HASH_LEN,
    KIND_FILE,
    SOLID_CODECS,
    Codec,
    Entry,
    Method,
    MirrorFile,
)
from reup_receiver.format.nar import walk_nar_order
from reup_receiver.format.rewrite import rewrite_bytes

from reup.delta import pycsolid, solid
from reup.delta.codecs import DiffResult, diff_job, literal_estimate
from reup.delta.literal import LiteralEncoder
from reup.delta.literalmemo import LiteralMemo
from reup.delta.pairing import (
    Graph,
    pair_files,
    pair_paths,
    parse_drv_name,
    rewrite_pairs,
    store_name,
)
from reup.delta.stats import DeltaStats
from reup.io.nix import PathInfo

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


def _read(path: bytes) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def file_sha256(path: bytes) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.digest()


Walk = list[tuple[list[bytes], os.stat_result]]


def iter_files(path: str, walk: Walk) -> list[StoreFile]:
    """The regular files of a store path, from its NAR-order walk."""
    out = []
    for parts, st in walk:
        if stat.S_ISREG(st.st_mode):
            out.append(StoreFile(path, b"/".join(parts), bool(st.st_mode & 0o100), st.st_size))
    return out


@dataclass
class MirrorPlan:
    old: str  # the source path on the device
    skip: list[bytes]  # its relpaths the new tree does not mirror (with subtrees)
    files: list[FileCoding]  # mirrored files, NAR order
    explicit: list[tuple[list[bytes], os.stat_result]]  # nodes sent as entries, NAR order
    solid_tree: bool = False  # the solid frame's dictionary is the whole old tree (F_SOLID_TREE)


@dataclass
class FileCoding:
    """How one new file is coded; `diff` is pending work on the pool."""

    file: StoreFile
    sha: bytes
    kind: str  # "dedup", "diff" or "literal"
    source: tuple[str, bytes] | None = None
    diff: Future[DiffResult] | None = None
    solid: bytes | None = None  # this file's part of its mirror's solid frame (solid.py)
    solid_codec: Codec = Codec.SOLID  # that frame's codec (SOLID or SOLID_LZMA)


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
        literal_memo: LiteralMemo | None = None,
    ) -> None:
        self.codecs = codecs
        self.allowed = allowed
        self.stats = stats
        self.pool = pool
        self.inline = inline
        self.old_walks = {p: walk_nar_order(p) for p in sorted(held)}  # walked once, used twice
        self.old_files = {p: iter_files(p, w) for p, w in self.old_walks.items()}
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
        self.literal = LiteralEncoder(elf=allowed is None or Codec.LITERAL_ELF in allowed, memo=literal_memo)

    def file_pairs(self, new_path: str, new_files: Sequence[StoreFile]) -> dict[bytes, bytes]:
        old = self.pairs.get(new_path)
        if old is None:
            return {}
        new_version = parse_drv_name(store_name(new_path))[1]
        old_version = parse_drv_name(store_name(old))[1]
        return pair_files([f.relpath for f in new_files], [f.relpath for f in self.old_files[old]],
                          new_version, old_version)

    def plan(self, f: StoreFile, partner: bytes | None) -> FileCoding:
        """Decide for one new file, in stream order; starts its diff on the pool."""
        sha = file_sha256(f.host)
        key = (sha, f.executable)
        self.stats.files += 1
        found = self.index.find(key, f.size)
        self.index.add(key, f)
        if found is not None:
            return FileCoding(f, sha, "dedup", source=found)
        if partner is not None:
            return self._diff(f, sha, self.pairs[f.path], partner)
        return FileCoding(f, sha, "literal")

    def _diff(self, f: StoreFile, sha: bytes, old: str, old_rel: bytes) -> FileCoding:
        """Start diffing `f` against the old file (after the hash rewrite)."""
        old_host = os.path.join(os.fsencode(old), old_rel) if old_rel else os.fsencode(old)
        # Small pairs cost less to diff here than to ship to a worker.
        pool = self.inline if f.size < INLINE_MAX else self.pool
        future = pool.submit(diff_job, old_host, f.host, self.rewrites, sha, self.codecs, self.allowed)
        return FileCoding(f, sha, "diff", source=(old, old_rel), diff=future)

    def mirror_plan(self, path: str, nodes: Sequence[tuple[list[bytes], os.stat_result]]) -> MirrorPlan | None:
        """How much of the path's tree its old partner already has, or None if too little.

        A node is mirrored when the old path has the same kind at the same relative
        path (files: same exec bit; symlinks: target equal after the hash rewrite)
        and all its ancestors are mirrored; the receiver then makes it from the old
        tree. Everything else is explicit; old nodes that are not mirrored are
        skipped. Worth it when most nodes are mirrored, as in rebuilt packages and
        in symlink trees such as system-path.
        """
        old = self.pairs.get(path)
        if old is None:
            return None
        old_nodes = {tuple(parts): st for parts, st in self.old_walks[old]}
        bold, bnew = os.fsencode(old), os.fsencode(path)
        mirrored: set[tuple[bytes, ...]] = set()
        files: list[StoreFile] = []
        explicit: list[tuple[list[bytes], os.stat_result]] = []
        for parts, st in nodes:
            key = tuple(parts)
            old_st = old_nodes.get(key)
            if old_st is not None and (not parts or key[:-1] in mirrored) and \
                    self._same_node(bnew, bold, b"/".join(parts), st, old_st):
                mirrored.add(key)
                if stat.S_ISREG(st.st_mode):
                    files.append(StoreFile(path, b"/".join(parts), bool(st.st_mode & 0o100), st.st_size))
            else:
                explicit.append((parts, st))
        if () not in mirrored or len(explicit) * 2 > len(nodes):
            return None
        skip = [b"/".join(k) for k in old_nodes if k not in mirrored and k[:-1] in mirrored]
        decisions = []
        for f in files:
            sha = file_sha256(f.host)
            self.stats.files += 1
            self.index.add((sha, f.executable), f)
            decisions.append(self._diff(f, sha, old, f.relpath))
        return MirrorPlan(old, sorted(skip, key=lambda r: r.split(b"/")), decisions, explicit)

    def _same_node(self, bnew: bytes, bold: bytes, rel: bytes, st: os.stat_result,
                   old_st: os.stat_result) -> bool:
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(old_st.st_mode):
            return False
        if stat.S_ISREG(st.st_mode):
            return not (st.st_mode ^ old_st.st_mode) & 0o100
        if stat.S_ISLNK(st.st_mode):
            new_target = os.readlink(os.path.join(bnew, rel) if rel else bnew)
            old_target = os.readlink(os.path.join(bold, rel) if rel else bold)
            return rewrite_bytes(old_target, self.rewrites) == new_target
        return True

    def solidify(self, plan: MirrorPlan, ordered: Sequence[FileCoding]) -> None:
        """Code a mirrored path's small changed files as one solid frame when that is smaller.

        `ordered`: all the path's file decisions in stream order (mirrored and explicit).
        The dictionary is the whole old tree when it fits (F_SOLID_TREE: moved and new
        modules find their old text), else the old versions of the mirrored solid files.
        Waits for the path's diffs. A file's own cost: its patch, or the literal estimate.
        """
        solid_ok = [c for c in SOLID_CODECS if self.allowed is None or c in self.allowed]
        if not solid_ok or self.codecs is not None:
            return
        mirrored = {id(d) for d in plan.files}
        chosen: list[tuple[FileCoding, int]] = []
        new_total = 0
        for d in ordered:
            result = d.diff.result() if d.diff is not None else None
            if d.kind == "dedup" or (result is not None and result.kind == "rewrite") \
                    or d.file.size > solid.FILE_MAX:
                continue
            if new_total + d.file.size > solid.CONTENT_MAX:
                break
            cost = len(result.data) if result is not None and result.codec is not None \
                else literal_estimate(_read(d.file.host))
            chosen.append((d, cost))
            new_total += d.file.size
        old_tree = self.old_files[plan.old]
        plan.solid_tree = sum(f.size for f in old_tree) <= solid.MAX_PREFIX
        if plan.solid_tree:
            prefix = b"".join(_read(f.host) for f in old_tree)
        else:
            chosen = [(d, c) for d, c in chosen if id(d) not in mirrored
                      or self._old_size(plan.old, d) <= solid.FILE_MAX]
            prefix = b"".join(_read(self._old_host(plan.old, d)) for d, _ in chosen if id(d) in mirrored)
        if len(chosen) < 2 or len(prefix) < 8 or len(prefix) > solid.MAX_PREFIX or \
                (not plan.solid_tree and not any(id(d) in mirrored for d, _ in chosen)):
            plan.solid_tree = False
            return
        prefix = rewrite_bytes(prefix, self.rewrites)
        contents = [_read(d.file.host) for d, _ in chosen]
        frames = [(sum(map(len, p)), c, p, [c] * len(p)) for c, p in (
            (Codec.SOLID, solid.frame_parts(prefix, contents) if Codec.SOLID in solid_ok else None),
            (Codec.SOLID_LZMA, solid.lzma_parts(prefix, contents) if Codec.SOLID_LZMA in solid_ok else None),
        ) if p is not None]
        frames += self._pyc_frame(prefix, [d for d, _ in chosen], contents, solid_ok)
        if not frames:
            plan.solid_tree = False
            return
        size, _, parts, codecs = min(frames, key=lambda f: (f[0], f[1]))
        if size >= sum(cost for _, cost in chosen):
            plan.solid_tree = False
            return
        for (d, _), part, codec in zip(chosen, parts, codecs, strict=True):
            d.solid, d.solid_codec = part, codec
            if id(d) not in mirrored:
                d.source = (plan.old, d.file.relpath)  # named on the wire, never read

    @staticmethod
    def _pyc_frame(prefix: bytes, files: Sequence[FileCoding], contents: Sequence[bytes],
                   solid_ok: Sequence[Codec]) -> list[tuple[int, Codec, list[bytes], list[Codec]]]:
        """The SOLID_LZMA frame with the .pyc files as recipes (pycsolid.py), if any is one."""
        if Codec.SOLID_PYC not in solid_ok or Codec.SOLID_LZMA not in solid_ok or not files:
            return []
        made = pycsolid.recipes(files[0].file.path, [d.file.relpath for d in files], contents)
        if not any(r is not None for r in made):
            return []
        parts = solid.lzma_parts(prefix, [c if r is None else r for c, r in zip(contents, made, strict=True)])
        if parts is None:
            return []
        codecs = [Codec.SOLID_LZMA if r is None else Codec.SOLID_PYC for r in made]
        return [(sum(map(len, parts)), Codec.SOLID_PYC, parts, codecs)]

    @staticmethod
    def _old_host(old: str, d: FileCoding) -> bytes:
        return os.path.join(os.fsencode(old), d.file.relpath) if d.file.relpath else os.fsencode(old)

    def _old_size(self, old: str, d: FileCoding) -> int:
        return os.lstat(self._old_host(old, d)).st_size

    def mirror_spec(self, d: FileCoding) -> tuple[MirrorFile, bytes, str]:
        """A mirrored file's spec, its DATA and the stats kind (literal data made now, in order)."""
        assert d.diff is not None
        sha = d.sha[:FILE_HASH_LEN]
        if d.solid is not None:
            return MirrorFile(Method.PATCH, sha, d.file.size, d.solid_codec, len(d.solid)), d.solid, "solid"
        result = d.diff.result()
        if result.kind == "rewrite":
            return MirrorFile(Method.COPY, sha), b"", "mirror"
        if result.codec is not None:
            return MirrorFile(Method.PATCH, sha, d.file.size, result.codec, len(result.data)), \
                result.data, result.kind
        data = self._literal(d.file)
        return MirrorFile(Method.LITERAL, sha, d.file.size, None, len(data)), data, "literal"

    def _literal(self, f: StoreFile) -> bytes:
        return self.literal.data(f.host)

    @staticmethod
    def is_literal(d: FileCoding) -> bool:
        """Whether a planned file ends up in the literal stream (waits for its diff)."""
        if d.solid is not None:
            return False
        if d.kind == "literal":
            return True
        return d.diff is not None and d.diff.result().kind == "literal"

    def emit(self, d: FileCoding, table: Callable[[str], int]) -> tuple[Entry, bytes, str]:
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
        if d.solid is not None:
            return entry(Method.PATCH, d.source, d.solid_codec, d.solid), d.solid, "solid"
        if d.diff is not None:
            result = d.diff.result()
            if result.kind != "literal":
                flags |= F_REWRITE if result.rewritten else 0
                if result.codec is None:
                    return entry(Method.COPY, d.source), b"", "rewrite"
                return entry(Method.PATCH, d.source, result.codec, result.data), result.data, result.kind
        data = self._literal(f)
        return entry(Method.LITERAL, data=data), data, "literal"
