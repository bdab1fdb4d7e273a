"""Byte encoding of the manifest (the first record of a stream).

Store names travel as their hash's 20 raw bytes plus the rest; the body is
zstd-compressed when that is smaller. Called by the encoder (reup.delta) and
receive.py; the layout is in docs/stream-format.md.
"""

from __future__ import annotations

import zstandard

from reup_receiver.errors import Corrupt, Oversized, UnsafeName, Unsupported
from reup_receiver.format.model import HASH_LEN, Manifest, PathEntry, check_store_name
from reup_receiver.format.nar import from_nix32, to_nix32
from reup_receiver.format.wire import STREAM_BYTES, Buf, put_bytes, put_varint

# Sized for real systems (a NixOS closure of 5,000 paths is well under 2 MiB); docs/device-invariants.md.
MAX_MANIFEST_BODY = 64 << 20
MANIFEST_RAW, MANIFEST_ZSTD = 0, 1
DERIVER_NONE, DERIVER_NAMED, DERIVER_SAME_NAME = 0, 1, 2


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
    put_manifest_tail(body, m)
    packed = zstandard.ZstdCompressor(level=19).compress(bytes(body))
    if len(packed) < len(body):
        return STREAM_BYTES.pack(m.stream_bytes) + bytes([MANIFEST_ZSTD]) + packed
    return STREAM_BYTES.pack(m.stream_bytes) + bytes([MANIFEST_RAW]) + bytes(body)


def put_manifest_tail(body: bytearray, m: Manifest) -> None:
    """Toplevel, rewrites and literal codec: the same in both versions (read_manifest_tail)."""
    put_varint(body, m.toplevel)
    put_varint(body, len(m.rewrites))
    for old, new in m.rewrites:
        put_varint(body, old)
        put_varint(body, new)
    body.append(m.literal)


def decode_manifest(payload: bytes) -> Manifest:
    if len(payload) < STREAM_BYTES.size + 1:
        raise Corrupt("manifest record too short")
    (stream_bytes,) = STREAM_BYTES.unpack_from(payload)
    compression, rest = payload[STREAM_BYTES.size], payload[STREAM_BYTES.size + 1 :]
    if compression == MANIFEST_RAW:
        body = rest
        if len(body) > MAX_MANIFEST_BODY:
            raise Oversized(f"manifest body larger than {MAX_MANIFEST_BODY} bytes")
    elif compression == MANIFEST_ZSTD:
        body = decompress_bounded(rest)
    else:
        raise Unsupported(f"unknown manifest compression {compression}")
    buf = Buf(body, "manifest")
    store_dir = buf.bytes()
    if not store_dir.startswith(b"/") or b"\0" in store_dir:
        raise UnsafeName(f"bad store dir {store_dir!r}")
    seen: set[bytes] = set()

    def unique(name: bytes) -> bytes:  # refused as read, not after building a huge table
        if name in seen:
            raise Corrupt("manifest lists a store path twice")
        seen.add(name)
        return name

    known = [unique(get_store_name(buf)) for _ in range(buf.varint())]
    n_paths = buf.varint()
    paths = []
    for _ in range(n_paths):
        name = unique(get_store_name(buf))
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
    return read_manifest_tail(buf, store_dir, known, paths, stream_bytes)


def read_manifest_tail(buf: Buf, store_dir: bytes, known: list[bytes], paths: list[PathEntry],
                       stream_bytes: int) -> Manifest:
    """Toplevel, rewrites and literal codec (the same in both versions), then the whole manifest checked."""
    toplevel = buf.varint()
    rewrites = [(buf.varint(), buf.varint()) for _ in range(buf.varint())]
    literal = buf.u8()
    buf.end()
    m = Manifest(store_dir, known, paths, toplevel, rewrites, stream_bytes, literal)
    validate_manifest(m)
    return m


def validate_manifest(m: Manifest) -> None:
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


def decompress_bounded(data: bytes) -> bytes:
    """Streaming decompression that stops at MAX_MANIFEST_BODY, whatever the frame header claims."""
    dobj = zstandard.ZstdDecompressor(max_window_size=1 << 27).decompressobj()
    out = bytearray()
    view = memoryview(data)
    try:
        for off in range(0, len(view), 64):  # 64 input bytes expand to at most ~3 MiB
            out += dobj.decompress(view[off : off + 64])
            if len(out) > MAX_MANIFEST_BODY:
                raise Oversized(f"manifest body larger than {MAX_MANIFEST_BODY} bytes")
    except zstandard.ZstdError as exc:
        raise Corrupt(f"manifest does not decompress: {exc}") from exc
    if not dobj.eof:
        raise Corrupt("manifest does not decompress: truncated frame")
    return bytes(out)
