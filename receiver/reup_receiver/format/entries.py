"""Byte encoding of tree entries (ENTRY records), stateful per store path.

Relative paths are prefix-compressed against the previous entry, symlinks into
the store name their target by table index, MIRROR entries carry per-file
specs. Called by the encoder (reup.delta) and receive.py; the layout is in
docs/stream-format.md.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TypeVar

from reup_receiver.errors import Corrupt, UnsafeName, Unsupported
from reup_receiver.format.model import (
    F_EXECUTABLE,
    F_REWRITE,
    F_SAME_RELPATH,
    F_SOLID_TREE,
    FILE_HASH_LEN,
    KIND_DIR,
    KIND_FILE,
    KIND_MIRROR,
    KIND_STORE_SYMLINK,
    KIND_SYMLINK,
    Codec,
    Entry,
    Method,
    MirrorFile,
    split_relpath,
)
from reup_receiver.format.wire import Buf, put_bytes, put_varint

SUFFIX_EXPLICIT, SUFFIX_RELPATH = 0, 1  # store symlinks: target suffix given, or "/" + relpath
E = TypeVar("E", bound=enum.IntEnum)


def _get_enum(buf: Buf, kind: type[E], what: str) -> E:
    try:
        return kind(buf.u8())
    except ValueError as exc:
        raise Unsupported(f"unknown {what}: {exc}") from exc


def _put_shared(out: bytearray, base: bytes, value: bytes) -> None:
    """`value` as (bytes shared with `base`, then the rest): cheap for similar paths."""
    n = 0
    for a, b in zip(base, value, strict=False):
        if a != b:
            break
        n += 1
    put_varint(out, n)
    put_bytes(out, value[n:])


def _get_shared(buf: Buf, base: bytes) -> bytes:
    n = buf.varint()
    if n > len(base):
        raise Corrupt("entry: shared prefix longer than its base")
    return base[:n] + buf.bytes(4096)


class EntryCoder:
    """Encodes/decodes the entries of one store path.

    Stateful because relpaths are prefix-compressed against the previous
    entry, and symlinks into the store name their target by table index.
    """

    def __init__(self, table: Sequence[bytes] = (), store_dir: bytes = b"/nix/store", version: int = 1) -> None:
        self.table = table
        self.version = version  # 2: a MIRROR has no relpath, its specs no hashes, its COPYs come as runs
        self.store_prefix = store_dir + b"/"
        self.index = {name: i for i, name in enumerate(table)}
        self.prev = b""

    def _put_relpath(self, out: bytearray, relpath: bytes) -> None:
        _put_shared(out, self.prev, relpath)
        self.prev = relpath

    def _get_relpath(self, buf: Buf) -> bytes:
        relpath = _get_shared(buf, self.prev)
        split_relpath(relpath, "entry path")
        self.prev = relpath
        return relpath

    def _store_target(self, target: bytes) -> tuple[int, bytes] | None:
        if not target.startswith(self.store_prefix):
            return None
        name, sep, rest = target[len(self.store_prefix) :].partition(b"/")
        i = self.index.get(name)
        return None if i is None else (i, sep + rest)

    def encode(self, e: Entry) -> bytes:
        store_target = self._store_target(e.target) if e.kind == KIND_SYMLINK else None
        out = bytearray([KIND_STORE_SYMLINK if store_target else e.kind])
        if e.kind == KIND_MIRROR and self.version >= 2:
            self._put_mirror_v2(out, e)
            return bytes(out)
        self._put_relpath(out, e.relpath)
        if store_target:
            put_varint(out, store_target[0])
            if store_target[1] == b"/" + e.relpath and e.relpath:
                out.append(SUFFIX_RELPATH)
            else:
                out.append(SUFFIX_EXPLICIT)
                put_bytes(out, store_target[1])
        elif e.kind == KIND_MIRROR:
            _put_mirror_head(out, e)
            for f in e.mirror:
                _put_spec(out, f)
        elif e.kind == KIND_SYMLINK:
            put_bytes(out, e.target)
        elif e.kind == KIND_FILE:
            sourced = e.method in (Method.COPY, Method.PATCH)
            same = sourced and e.source_relpath == e.relpath
            out.append(e.flags | (F_SAME_RELPATH if same else 0))
            put_varint(out, e.size)
            assert len(e.sha256) == FILE_HASH_LEN
            out += e.sha256
            out.append(int(e.method))
            if sourced:
                put_varint(out, e.source)
                if not same:
                    _put_shared(out, e.relpath, e.source_relpath)
            if e.method == Method.PATCH:
                assert e.codec is not None
                out.append(int(e.codec))
            if e.method in (Method.LITERAL, Method.PATCH):
                put_varint(out, e.data_len)
        return bytes(out)

    def _put_mirror_v2(self, out: bytearray, e: Entry) -> None:
        _put_mirror_head(out, e)
        run = 0
        for f in [*e.mirror, None]:  # one tag byte per spec, or per run of up to 128 COPYs
            if f is not None and f.method == Method.COPY:
                run += 1
                continue
            while run:
                out.append(TAG_COPY_RUN | (min(run, 128) - 1))
                run -= min(run, 128)
            if f is None:
                break
            if f.method == Method.LITERAL:
                out.append(TAG_LITERAL)
            else:
                assert f.codec is not None and 0 < f.codec < TAG_COPY_RUN
                out.append(int(f.codec))
            put_varint(out, f.size)
            put_varint(out, f.data_len)

    def decode(self, payload: bytes) -> Entry:
        buf = Buf(payload, "entry")
        kind = buf.u8()
        if kind == KIND_MIRROR and self.version >= 2:
            return self._decode_mirror(buf, b"")
        relpath = self._get_relpath(buf)
        if kind == KIND_DIR:
            buf.end()
            return Entry(kind, relpath)
        if kind == KIND_MIRROR:
            return self._decode_mirror(buf, relpath)
        if kind in (KIND_SYMLINK, KIND_STORE_SYMLINK):
            if kind == KIND_STORE_SYMLINK:
                index = buf.varint()
                if index >= len(self.table):
                    raise Corrupt("entry: symlink target out of range")
                mode = buf.u8()
                if mode == SUFFIX_RELPATH and relpath:
                    suffix = b"/" + relpath
                elif mode == SUFFIX_EXPLICIT:
                    suffix = buf.bytes(4096)
                else:
                    raise Corrupt("entry: bad symlink suffix mode")
                target = self.store_prefix + self.table[index] + suffix
            else:
                target = buf.bytes(4096)
            if not target or b"\0" in target:
                raise UnsafeName(f"bad symlink target {target!r}")
            buf.end()
            return Entry(KIND_SYMLINK, relpath, target=target)
        if kind != KIND_FILE:
            raise Unsupported(f"unknown entry kind {kind}")
        flags = buf.u8()
        if flags & ~(F_EXECUTABLE | F_REWRITE | F_SAME_RELPATH):
            raise Unsupported(f"unknown file flags {flags:#x}")
        size = buf.varint()
        sha = buf.raw(FILE_HASH_LEN)
        method = _get_enum(buf, Method, "file method")
        source, source_relpath, codec, data_len = -1, b"", None, 0
        if method in (Method.COPY, Method.PATCH):
            source = buf.varint()
            if source >= len(self.table):
                raise Corrupt("entry: source out of range")
            if flags & F_SAME_RELPATH:
                source_relpath = relpath
            else:
                source_relpath = _get_shared(buf, relpath)
                split_relpath(source_relpath, "source path")
        elif flags & (F_REWRITE | F_SAME_RELPATH):
            raise Corrupt("entry: source flags on a literal")
        if method == Method.PATCH:
            codec = _get_enum(buf, Codec, "patch codec")
        if method in (Method.LITERAL, Method.PATCH):
            data_len = buf.varint()
        buf.end()
        return Entry(
            kind, relpath, flags=flags & ~F_SAME_RELPATH, size=size, sha256=sha, method=method,
            source=source, source_relpath=source_relpath, codec=codec, data_len=data_len,
        )


    def _decode_mirror(self, buf: Buf, relpath: bytes) -> Entry:
        if relpath:
            raise Corrupt("entry: a mirror must be the root of its path")
        source = buf.varint()
        if source >= len(self.table):
            raise Corrupt("entry: mirror source out of range")
        flags = buf.u8()
        if flags & ~(F_REWRITE | F_SOLID_TREE):
            raise Unsupported(f"unknown mirror flags {flags:#x}")
        skip = []
        prev = b""
        for _ in range(buf.varint()):
            prev = _get_shared(buf, prev)
            split_relpath(prev, "mirror skip")
            skip.append(prev)
        files: list[MirrorFile] = []
        n = buf.varint()
        if n > MAX_MIRROR_FILES:  # a tag byte makes up to 128 files: bound them here
            raise Corrupt(f"entry: mirror of {n} files (limit {MAX_MIRROR_FILES})")
        if self.version < 2:
            files = [_get_spec(buf) for _ in range(n)]
        while len(files) < n:
            tag = buf.u8()
            if tag & TAG_COPY_RUN:
                run = (tag & ~TAG_COPY_RUN) + 1
                if run > n - len(files):
                    raise Corrupt("entry: mirror run longer than its file count")
                files += [UNCHECKED_COPY] * run
                continue
            method, codec = Method.LITERAL, None
            if tag != TAG_LITERAL:
                method = Method.PATCH
                try:
                    codec = Codec(tag)
                except ValueError as exc:
                    raise Unsupported(f"unknown patch codec: {exc}") from exc
            files.append(MirrorFile(method, b"", buf.varint(), codec, buf.varint()))
        buf.end()
        return Entry(KIND_MIRROR, b"", flags=flags, source=source, mirror=tuple(files),
                     skip=tuple(skip))


MAX_MIRROR_FILES = 1 << 20  # regular files of one mirrored store path
# Version-2 mirror spec tags: LITERAL, a patch codec's number (PATCH), or a run of 1..128 COPYs.
TAG_LITERAL, TAG_COPY_RUN = 0x00, 0x80
# A mirrored COPY of a version-2 stream. Version-2 mirror specs carry no per-file hash: the
# path's NAR hash checks them, and a mismatch blames the mirror's source (receive.py).
UNCHECKED_COPY = MirrorFile(Method.COPY, b"")


def _put_mirror_head(out: bytearray, e: Entry) -> None:
    """A MIRROR's source, flags, skipped relpaths and file count: the same in both versions."""
    put_varint(out, e.source)
    out.append(e.flags)
    put_varint(out, len(e.skip))
    prev = b""
    for rel in e.skip:
        _put_shared(out, prev, rel)
        prev = rel
    put_varint(out, len(e.mirror))


def _put_spec(out: bytearray, f: MirrorFile) -> None:
    out.append(int(f.method))
    assert len(f.sha256) == FILE_HASH_LEN
    out += f.sha256
    if f.method == Method.PATCH:
        assert f.codec is not None
        out.append(int(f.codec))
    if f.method in (Method.PATCH, Method.LITERAL):
        put_varint(out, f.size)
        put_varint(out, f.data_len)


def _get_spec(buf: Buf) -> MirrorFile:
    method = _get_enum(buf, Method, "file method")
    sha = buf.raw(FILE_HASH_LEN)
    codec, size, data_len = None, 0, 0
    if method == Method.PATCH:
        codec = _get_enum(buf, Codec, "patch codec")
    if method in (Method.PATCH, Method.LITERAL):
        size = buf.varint()
        data_len = buf.varint()
    return MirrorFile(method, sha, size, codec, data_len)


def encode_entry(e: Entry) -> bytes:
    """One entry on its own (no prefix compression, literal symlink targets)."""
    return EntryCoder().encode(e)
