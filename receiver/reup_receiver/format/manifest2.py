"""The compact manifest of stream version 2: known paths as short ids, names by reference.

A version-2 manifest names a path the device already holds by the first `id_chars`
base-32 characters of its store hash (a *short id*), which the receiver resolves against
its own valid paths; the encoder picks the length so that the id is unique among the
paths it knows the device holds. An id that matches no valid path, or several, is
refused (`MissingBase`), and the full names the ids resolved to are folded into the
trailer digest (`names_block`), so a stream never installs against another path than
the one its encoder meant. New paths' names are written as a shared prefix of an
earlier table name, references as gaps, and derivers are left out. Called by the
encoder (reup.delta.encode) and receive.py; the layout is in docs/stream-format.md.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable

import zstandard

from reup_receiver.errors import Corrupt, MissingBase, Oversized, UnsafeName, Unsupported
from reup_receiver.format.manifest import (
    MANIFEST_RAW,
    MANIFEST_ZSTD,
    MAX_MANIFEST_BODY,
    decompress_bounded,
    get_store_name,
    put_manifest_tail,
    put_store_name,
    read_manifest_tail,
)
from reup_receiver.format.model import HASH_LEN, Manifest, PathEntry, check_store_name
from reup_receiver.format.nar import from_nix32, to_nix32
from reup_receiver.format.wire import Buf, put_bytes, put_varint, stream_size
from reup_receiver.protocol import short_id_text

DEFAULT_STORE = b"/nix/store"
F_STORE_DIR = 0x01  # manifest flags: the store dir follows (else DEFAULT_STORE)
# 8 characters are 40 bits: a clash with a path the encoder does not know the device holds
# is a refusal, never a wrong path, and is rare enough (1e-6 for 1,000 ids among 1,000
# unknown paths) that a few bytes per id buy nothing more.
MIN_ID_CHARS = 8
_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
_DIGIT = {c: i for i, c in enumerate(_NIX32)}

# The device's valid store paths, as base names (called only when the manifest has short ids).
Holdings = Callable[[], Iterable[bytes]]


def id_bytes(chars: int) -> int:
    return (5 * chars + 7) // 8


def pack_id(name: bytes, chars: int) -> bytes:
    value = 0
    for ch in name[:chars].decode():
        value = value * 32 + _DIGIT[ch]
    return value.to_bytes(id_bytes(chars), "big")


def unpack_id(raw: bytes, chars: int) -> bytes:
    value = int.from_bytes(raw, "big")
    if value >= 32 ** chars:
        raise Corrupt("manifest: short id out of range")
    out = []
    for _ in range(chars):
        value, digit = divmod(value, 32)
        out.append(_NIX32[digit])
    return "".join(reversed(out)).encode()


def id_chars_for(names: Collection[bytes], holdings: Collection[bytes]) -> int:
    """The fewest characters (>= MIN_ID_CHARS) that tell each of `names` from every other held path."""
    chars = MIN_ID_CHARS
    while chars < HASH_LEN:
        prefixes: dict[bytes, int] = {}
        for h in {*holdings, *names}:
            prefixes[h[:chars]] = prefixes.get(h[:chars], 0) + 1
        if all(prefixes[n[:chars]] == 1 for n in names):
            return chars
        chars += 1
    return HASH_LEN


def names_block(m: Manifest) -> bytes:
    """What a version-2 stream's trailer digest covers after the manifest record: the full
    names of the known paths, as the receiver resolved them (never sent)."""
    return b"".join(name + b"\n" for name in m.known)


def _shared(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_body(m: Manifest, holdings: Collection[bytes]) -> bytes:
    """The manifest body; known paths in `holdings` (base names) travel as short ids."""
    body = bytearray()
    flags = 0 if m.store_dir == DEFAULT_STORE else F_STORE_DIR
    body.append(flags)
    if flags & F_STORE_DIR:
        put_bytes(body, m.store_dir)
    short = [n in holdings for n in m.known]
    chars = id_chars_for([n for n, s in zip(m.known, short, strict=True) if s], holdings) if any(short) else 0
    body.append(chars)
    put_varint(body, len(m.known))
    bits = bytearray((len(m.known) + 7) // 8)
    for i, s in enumerate(short):
        if not s:
            bits[i // 8] |= 1 << (i % 8)  # a full name follows
    body += bits
    for name, s in zip(m.known, short, strict=True):
        if s:
            body += pack_id(name, chars)
        else:
            put_store_name(body, name)
    put_varint(body, len(m.paths))
    n_new = len(m.paths)
    # Names a new path may refer to (known ones, earlier new ones), sorted: the longest shared
    # prefix is with a neighbour. A rebuild keeps its name, a version bump its stem.
    bases = sorted((name[HASH_LEN:], n_new + k) for k, name in enumerate(m.known))
    for i, p in enumerate(m.paths):
        body += from_nix32(p.name[:HASH_LEN].decode())
        rest = p.name[HASH_LEN:]
        at = bisect.bisect_left(bases, (rest, -1))
        best, shared = -1, 0
        for other, j in bases[max(0, at - 1):at + 1]:
            if _shared(other, rest) > shared:
                best, shared = j, _shared(other, rest)
        if shared > 1:
            put_varint(body, best + 1)
            put_varint(body, shared)
        else:
            put_varint(body, 0)
            shared = 0
        put_bytes(body, rest[shared:])
        bisect.insort(bases, (rest, i))
        body += p.nar_hash
        put_varint(body, p.nar_size)
        put_varint(body, len(p.references) << 2 | (1 if p.carried else 0) | (2 if p.replace else 0))
        prev = -1
        for ref in sorted(p.references):
            put_varint(body, ref - prev - 1)  # sorted, distinct: gaps
            prev = ref
    put_manifest_tail(body, m)
    return bytes(body)


def manifest_payload(stream_bytes: int, body: bytes) -> bytes:
    """stream_bytes varint, compression u8, the (compressed when smaller) body."""
    packed = zstandard.ZstdCompressor(level=19).compress(body)
    head = bytearray()
    put_varint(head, stream_bytes)
    if len(packed) < len(body):
        return bytes(head) + bytes([MANIFEST_ZSTD]) + packed
    return bytes(head) + bytes([MANIFEST_RAW]) + body


def sized_payload(body: bytes, body_records: int) -> tuple[bytes, int]:
    """The manifest payload whose stream_bytes is the size of the whole stream it heads
    (the varint's own length counts), and that size."""
    size = 0
    while True:
        payload = manifest_payload(size, body)
        total = stream_size(len(payload), body_records)
        if total == size:
            return payload, size
        size = total


def decode_manifest_v2(payload: bytes, holdings: Holdings) -> Manifest:
    buf = Buf(payload, "manifest")
    stream_bytes = buf.varint()
    compression = buf.u8()
    rest = payload[buf.pos:]
    if compression == MANIFEST_RAW:
        if len(rest) > MAX_MANIFEST_BODY:
            raise Oversized(f"manifest body larger than {MAX_MANIFEST_BODY} bytes")
        body = rest
    elif compression == MANIFEST_ZSTD:
        body = decompress_bounded(rest)
    else:
        raise Unsupported(f"unknown manifest compression {compression}")
    return _decode_body(Buf(body, "manifest"), stream_bytes, holdings)


def _index(holdings: Holdings, chars: int) -> dict[bytes, bytes | None]:
    """Short id -> the one valid path with it (None: several)."""
    out: dict[bytes, bytes | None] = {}
    for name in holdings():
        if name[HASH_LEN:HASH_LEN + 1] != b"-":  # not a store path name
            continue
        key = name[:chars]
        out[key] = None if key in out else name
    return out


def _decode_body(buf: Buf, stream_bytes: int, holdings: Holdings) -> Manifest:
    flags = buf.u8()
    if flags & ~F_STORE_DIR:
        raise Unsupported(f"unknown manifest flags {flags:#x}")
    store_dir = buf.bytes() if flags & F_STORE_DIR else DEFAULT_STORE
    if not store_dir.startswith(b"/") or b"\0" in store_dir:
        raise UnsafeName(f"bad store dir {store_dir!r}")
    chars = buf.u8()
    if chars and not MIN_ID_CHARS <= chars <= HASH_LEN:
        raise Corrupt(f"manifest: short ids of {chars} characters")
    n_known = buf.varint()
    bits = buf.raw((n_known + 7) // 8)  # bounded by the body: refused before any table is built
    seen: set[bytes] = set()

    def unique(name: bytes) -> bytes:
        if name in seen:
            raise Corrupt("manifest lists a store path twice")
        seen.add(name)
        return name

    index: dict[bytes, bytes | None] | None = None
    known = []
    for i in range(n_known):
        if bits[i // 8] >> (i % 8) & 1:
            known.append(unique(get_store_name(buf)))
            continue
        if not chars:
            raise Corrupt("manifest: a short id without an id length")
        prefix = unpack_id(buf.raw(id_bytes(chars)), chars)
        if index is None:
            index = _index(holdings, chars)
        if prefix not in index:
            raise MissingBase(f"no valid store path has the {short_id_text(prefix.decode())} (the "
                              f"device no longer holds a path the stream needs)", prefix.decode())
        name = index[prefix]
        if name is None:
            raise MissingBase(f"{short_id_text(prefix.decode())} is ambiguous on this device",
                              prefix.decode())
        known.append(unique(name))
    n_paths = buf.varint()
    paths: list[PathEntry] = []
    names: list[bytes] = []  # new paths' names so far; the table is names + known
    for i in range(n_paths):
        hash_part = to_nix32(buf.raw(20)).encode()
        base = buf.varint()
        prefix = b""
        if base:
            j = base - 1
            if j < i:
                ref_name = names[j]
            elif n_paths <= j < n_paths + n_known:
                ref_name = known[j - n_paths]
            else:
                raise Corrupt("manifest: a name refers to a later path")
            shared = buf.varint()
            if shared > len(ref_name) - HASH_LEN:
                raise Corrupt("manifest: shared name prefix longer than its base")
            prefix = ref_name[HASH_LEN:HASH_LEN + shared]
        name = hash_part + prefix + buf.bytes(256)
        check_store_name(name)
        names.append(unique(name))
        nar_hash = buf.raw(32)
        nar_size = buf.varint()
        head = buf.varint()
        refs = []
        prev = -1
        for _ in range(head >> 2):
            prev += buf.varint() + 1
            refs.append(prev)
        paths.append(PathEntry(name, nar_hash, nar_size, tuple(refs), b"", bool(head & 1), bool(head & 2)))
    return read_manifest_tail(buf, store_dir, known, paths, stream_bytes)

