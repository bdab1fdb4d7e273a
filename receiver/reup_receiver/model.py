"""The manifest and the tree operations of a reup stream, and their byte encoding.

Pure data + encode/decode; no I/O. The encoder (reup.delta) builds these and
calls `encode_*`; the receiver (receive.py) calls `decode_*` on record payloads.
Layout is specified in docs/stream-format.md.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import zstandard

from .errors import Corrupt, UnsafeName, Unsupported
from .nar import from_nix32, to_nix32
from .wire import STREAM_BYTES, Buf, put_bytes, put_varint

HASH_LEN = 32  # characters of a store path's hash part
FILE_HASH_LEN = 16  # per-file check: the first 128 bits of the content's SHA-256
MAX_MANIFEST_BODY = 1 << 30
MANIFEST_RAW, MANIFEST_ZSTD = 0, 1
DERIVER_NONE, DERIVER_NAMED, DERIVER_SAME_NAME = 0, 1, 2
SUFFIX_EXPLICIT, SUFFIX_RELPATH = 0, 1  # store symlinks: target suffix given, or "/" + relpath


class Method(enum.IntEnum):
    LITERAL = 0  # next bytes of the stream-wide zstd literal stream; DATA follows
    COPY = 1  # the source file, byte for byte (after the optional hash rewrite)
    PATCH = 2  # the source file patched with a codec; DATA holds the patch


class Codec(enum.IntEnum):
    BSDIFF4 = 1
    HDIFFPATCH = 2
    ZSTD_PREFIX = 3  # a zstd frame compressed with the source as raw-content prefix
    BSDIFF_LZMA = 4  # bsdiff's blocks, LZMA2-compressed (bsdiffxz.py)


KIND_DIR, KIND_SYMLINK, KIND_FILE = 1, 2, 3
KIND_STORE_SYMLINK = 4  # on the wire only: a symlink to a table path + suffix
KIND_MIRROR = 5  # the whole tree mirrors a source path; per-file specs in `mirror`
F_EXECUTABLE = 0x01
F_REWRITE = 0x02  # apply the manifest's store-hash rewrite map to the source first
F_SAME_RELPATH = 0x04  # on the wire only: source_relpath equals relpath and is omitted


@dataclass(frozen=True)
class PathEntry:
    """One store path the device must end up holding, with its Nix database row."""

    name: bytes  # base name "<hash>-<name>"
    nar_hash: bytes  # raw sha256 of the NAR serialisation
    nar_size: int
    references: tuple[int, ...]  # indices into Manifest.table
    deriver: bytes = b""  # base name of the .drv, or empty
    carried: bool = True  # False: the device has it staged already; no operations follow
    replace: bool = False  # the device's copy is broken: install this one over it


@dataclass
class Manifest:
    """What a stream installs. `table` = new paths, then `known` (already on the device)."""

    store_dir: bytes
    known: list[bytes]
    paths: list[PathEntry]
    toplevel: int  # index into table
    rewrites: list[tuple[int, int]] = field(default_factory=list)  # (old, new) table indices
    stream_bytes: int = 0
    literal: int = 0  # literal stream codec (literal.py)

    @property
    def table(self) -> list[bytes]:
        return [p.name for p in self.paths] + self.known

    def store_path(self, index: int) -> str:
        return os.fsdecode(self.store_dir + b"/" + self.table[index])

    def rewrite_map(self) -> dict[bytes, bytes]:
        table = self.table
        return {table[o][:HASH_LEN]: table[n][:HASH_LEN] for o, n in self.rewrites}


@dataclass(frozen=True)
class MirrorFile:
    """How one regular file of a mirrored tree is made (in the source's NAR order)."""

    method: Method
    sha256: bytes
    size: int = 0  # PATCH/LITERAL only; a COPY keeps the (rewritten) source's size
    codec: Codec | None = None
    data_len: int = 0


@dataclass(frozen=True)
class Entry:
    """One node of a new store path's tree, in NAR order. `relpath` b"" is the path itself."""

    kind: int
    relpath: bytes
    target: bytes = b""  # symlinks
    flags: int = 0  # files: F_*
    size: int = 0
    sha256: bytes = b""  # first FILE_HASH_LEN bytes of the content's SHA-256
    method: Method = Method.LITERAL
    source: int = -1  # table index of the source store path
    source_relpath: bytes = b""
    codec: Codec | None = None
    data_len: int = 0
    mirror: tuple[MirrorFile, ...] = ()

    @property
    def executable(self) -> bool:
        return bool(self.flags & F_EXECUTABLE)


# --- names -------------------------------------------------------------------


def check_component(name: bytes, what: str) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafeName(f"unsafe name {name!r} in {what}")


def split_relpath(relpath: bytes, what: str) -> list[bytes]:
    if relpath == b"":
        return []
    parts = relpath.split(b"/")
    for part in parts:
        check_component(part, what)
    return parts


_NIX32_CHARS = frozenset(b"0123456789abcdfghijklmnpqrsvwxyz")


def is_store_name(name: bytes) -> bool:
    try:
        check_store_name(name)
    except UnsafeName:
        return False
    return all(c in _NIX32_CHARS for c in name[:HASH_LEN])


def check_store_name(name: bytes) -> None:
    check_component(name, "store path name")
    if len(name) < HASH_LEN + 2 or name[HASH_LEN : HASH_LEN + 1] != b"-" or name.startswith(b"."):
        raise UnsafeName(f"not a store path name: {name!r}")


# --- manifest ----------------------------------------------------------------


def put_store_name(out: bytearray, name: bytes) -> None:
    """A store base name as its hash's 20 raw bytes + the rest (`-name`)."""
    out += from_nix32(name[:HASH_LEN].decode())
    put_bytes(out, name[HASH_LEN:])


def get_store_name(buf: Buf) -> bytes:
    name = to_nix32(buf.raw(20)).encode() + buf.bytes(256)
    check_store_name(name)
    return name


def encode_manifest(m: Manifest) -> bytes:
    body = bytearray()
    put_bytes(body, m.store_dir)
    put_varint(body, len(m.known))
    for name in m.known:
        put_store_name(body, name)
    put_varint(body, len(m.paths))
    for p in m.paths:
        put_store_name(body, p.name)
        body += p.nar_hash
        put_varint(body, p.nar_size)
        if not p.deriver:
            body.append(DERIVER_NONE)
        elif p.deriver[HASH_LEN:] == p.name[HASH_LEN:] + b".drv":
            body.append(DERIVER_SAME_NAME)  # the common case: only the hash travels
            body += from_nix32(p.deriver[:HASH_LEN].decode())
        else:
            body.append(DERIVER_NAMED)
            put_store_name(body, p.deriver)
        put_varint(body, len(p.references))
        for ref in p.references:
            put_varint(body, ref)
        body.append((1 if p.carried else 0) | (2 if p.replace else 0))
    put_varint(body, m.toplevel)
    put_varint(body, len(m.rewrites))
    for old, new in m.rewrites:
        put_varint(body, old)
        put_varint(body, new)
    body.append(m.literal)
    packed = zstandard.ZstdCompressor(level=19).compress(bytes(body))
    if len(packed) < len(body):
        return STREAM_BYTES.pack(m.stream_bytes) + bytes([MANIFEST_ZSTD]) + packed
    return STREAM_BYTES.pack(m.stream_bytes) + bytes([MANIFEST_RAW]) + bytes(body)


def decode_manifest(payload: bytes) -> Manifest:
    if len(payload) < STREAM_BYTES.size + 1:
        raise Corrupt("manifest record too short")
    (stream_bytes,) = STREAM_BYTES.unpack_from(payload)
    compression, rest = payload[STREAM_BYTES.size], payload[STREAM_BYTES.size + 1 :]
    if compression == MANIFEST_RAW:
        body = rest
    elif compression == MANIFEST_ZSTD:
        try:
            body = zstandard.ZstdDecompressor().decompress(rest, max_output_size=MAX_MANIFEST_BODY)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"manifest does not decompress: {exc}") from exc
    else:
        raise Unsupported(f"unknown manifest compression {compression}")
    buf = Buf(body, "manifest")
    store_dir = buf.bytes()
    if not store_dir.startswith(b"/") or b"\0" in store_dir:
        raise UnsafeName(f"bad store dir {store_dir!r}")
    known = [get_store_name(buf) for _ in range(buf.varint())]
    n_paths = buf.varint()
    paths = []
    for _ in range(n_paths):
        name = get_store_name(buf)
        nar_hash = buf.raw(32)
        nar_size = buf.varint()
        how = buf.u8()
        if how == DERIVER_NONE:
            deriver = b""
        elif how == DERIVER_SAME_NAME:
            deriver = to_nix32(buf.raw(20)).encode() + name[HASH_LEN:] + b".drv"
        elif how == DERIVER_NAMED:
            deriver = get_store_name(buf)
        else:
            raise Corrupt("manifest: bad deriver flag")
        refs = tuple(buf.varint() for _ in range(buf.varint()))
        flags = buf.u8()
        if flags > 3:
            raise Corrupt("manifest: bad path flags")
        paths.append(PathEntry(name, nar_hash, nar_size, refs, deriver, bool(flags & 1), bool(flags & 2)))
    toplevel = buf.varint()
    rewrites = [(buf.varint(), buf.varint()) for _ in range(buf.varint())]
    literal = buf.u8()
    buf.end()
    m = Manifest(store_dir, known, paths, toplevel, rewrites, stream_bytes, literal)
    _validate_manifest(m)
    return m


def _validate_manifest(m: Manifest) -> None:
    table = m.table
    for name in table:
        check_store_name(name)
    if len(set(table)) != len(table):
        raise Corrupt("manifest lists a store path twice")
    for p in m.paths:
        if p.deriver:
            check_store_name(p.deriver)
        if any(r >= len(table) for r in p.references):
            raise Corrupt(f"manifest: reference out of range in {p.name!r}")
    if m.toplevel >= len(table):
        raise Corrupt("manifest: toplevel out of range")
    if any(o >= len(table) or n >= len(table) for o, n in m.rewrites):
        raise Corrupt("manifest: rewrite out of range")


# --- entries -----------------------------------------------------------------


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

    def __init__(self, table: Sequence[bytes] = (), store_dir: bytes = b"/nix/store") -> None:
        self.table = table
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
        self._put_relpath(out, e.relpath)
        if store_target:
            put_varint(out, store_target[0])
            if store_target[1] == b"/" + e.relpath and e.relpath:
                out.append(SUFFIX_RELPATH)
            else:
                out.append(SUFFIX_EXPLICIT)
                put_bytes(out, store_target[1])
        elif e.kind == KIND_MIRROR:
            put_varint(out, e.source)
            out.append(e.flags)
            put_varint(out, len(e.mirror))
            for f in e.mirror:
                out.append(int(f.method))
                assert len(f.sha256) == FILE_HASH_LEN
                out += f.sha256
                if f.method == Method.PATCH:
                    assert f.codec is not None
                    out.append(int(f.codec))
                if f.method in (Method.PATCH, Method.LITERAL):
                    put_varint(out, f.size)
                    put_varint(out, f.data_len)
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

    def decode(self, payload: bytes) -> Entry:
        buf = Buf(payload, "entry")
        kind = buf.u8()
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
        try:
            method = Method(buf.u8())
        except ValueError as exc:
            raise Unsupported(f"unknown file method: {exc}") from exc
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
            try:
                codec = Codec(buf.u8())
            except ValueError as exc:
                raise Unsupported(f"unknown patch codec: {exc}") from exc
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
        if flags & ~F_REWRITE:
            raise Unsupported(f"unknown mirror flags {flags:#x}")
        files = []
        for _ in range(buf.varint()):
            try:
                method = Method(buf.u8())
            except ValueError as exc:
                raise Unsupported(f"unknown file method: {exc}") from exc
            sha = buf.raw(FILE_HASH_LEN)
            codec, size, data_len = None, 0, 0
            if method == Method.PATCH:
                try:
                    codec = Codec(buf.u8())
                except ValueError as exc:
                    raise Unsupported(f"unknown patch codec: {exc}") from exc
            if method in (Method.PATCH, Method.LITERAL):
                size = buf.varint()
                data_len = buf.varint()
            files.append(MirrorFile(method, sha, size, codec, data_len))
        buf.end()
        return Entry(KIND_MIRROR, b"", flags=flags, source=source, mirror=tuple(files))


def encode_entry(e: Entry) -> bytes:
    """One entry on its own (no prefix compression, literal symlink targets)."""
    return EntryCoder().encode(e)
