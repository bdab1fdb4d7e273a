"""The BSDIFF_LZMA patch container: bsdiff's three blocks, each compressed with LZMA2.

bsdiff4's own format compresses its control, diff and extra blocks with bzip2;
LZMA2 tuned per block (literal context bits off for the byte-difference
block) is measurably smaller on executables. Decoding needs only bsdiff4's
core and the standard library's lzma. The encoder (reup.delta.codecs) calls
`pack`; the receiver (patches.apply_patch) calls `apply`.

Layout: dict_log u8, new_size varint, len(ctrl) varint, len(diff) varint,
then the three raw LZMA2 streams (the extra block's runs to the end). The
control block travels as columns of varints (`ctrl_pack`).
"""

from __future__ import annotations

import lzma

import bsdiff4.core

from reup_receiver.errors import Corrupt
from reup_receiver.format.wire import Buf, put_varint

# (lc, lp, pb) per block (control, diff, extra), measured on executables: little
# literal context and no position bits beat LZMA's defaults on all three.
_PARAMS = ((1, 0, 0), (1, 0, 0), (1, 0, 0))
MAX_DICT_LOG = 26


def _filters(dict_log: int, block: int) -> list[dict[str, int]]:
    lc, lp, pb = _PARAMS[block]
    return [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << dict_log, "lc": lc, "lp": lp, "pb": pb,
             "mode": lzma.MODE_NORMAL, "nice_len": 273, "mf": lzma.MF_BT4, "depth": 512}]


def _offtin(raw: bytes) -> int:
    """bsdiff's 8-byte sign-magnitude integer."""
    value = int.from_bytes(raw, "little") & ~(1 << 63)
    return -value if raw[7] & 0x80 else value


def _offtout(value: int) -> bytes:
    raw = bytearray(abs(value).to_bytes(8, "little"))
    if value < 0:
        raw[7] |= 0x80
    return bytes(raw)


def ctrl_pack(ctrl: bytes) -> bytes:
    """bsdiff's control triples as three columns of varints (the seek column zigzagged):
    far smaller than 24 fixed bytes per triple before compression, and after it."""
    cols: list[bytearray] = [bytearray(), bytearray(), bytearray()]
    for off in range(0, len(ctrl), 24):
        x, y, z = (_offtin(ctrl[off + 8 * i : off + 8 * i + 8]) for i in range(3))
        put_varint(cols[0], x)
        put_varint(cols[1], y)
        put_varint(cols[2], (z << 1) ^ (z >> 63))
    out = bytearray()
    put_varint(out, len(ctrl) // 24)
    return bytes(out + cols[0] + cols[1] + cols[2])


def ctrl_unpack(packed: bytes, limit: int) -> bytes:
    buf = Buf(packed, "bsdiff control")
    n = buf.varint()
    if n > limit:
        raise Corrupt("bsdiff control block larger than its file")
    cols = [[buf.varint() for _ in range(n)] for _ in range(3)]
    buf.end()
    out = bytearray()
    for x, y, zz in zip(*cols, strict=True):
        out += _offtout(x) + _offtout(y) + _offtout((zz >> 1) ^ -(zz & 1))
    return bytes(out)


def pack(old: bytes, new: bytes) -> bytes:
    raw_ctrl, diff, extra = bsdiff4.core.diff(old, new)
    ctrl = ctrl_pack(raw_ctrl)
    dict_log = max(16, min(MAX_DICT_LOG, max(len(diff), len(extra), len(ctrl), 1).bit_length()))
    parts = [lzma.compress(b, format=lzma.FORMAT_RAW, filters=_filters(dict_log, i))
             for i, b in enumerate((ctrl, diff, extra))]
    out = bytearray([dict_log])
    put_varint(out, len(new))
    put_varint(out, len(parts[0]))
    put_varint(out, len(parts[1]))
    return bytes(out) + b"".join(parts)


def _unpack(data: bytes, dict_log: int, block: int, limit: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_filters(dict_log, block))
    out = d.decompress(data, max_length=limit + 1)
    if len(out) > limit:
        raise Corrupt("bsdiff block larger than its file")
    return out


def apply(old: bytes, patch: bytes, size: int | None = None) -> bytes:
    """`size`: the output size the stream declared; a patch claiming another is refused before decoding."""
    buf = Buf(patch, "bsdiff-lzma patch")
    dict_log = buf.u8()
    if not 12 <= dict_log <= MAX_DICT_LOG:
        raise Corrupt("bsdiff-lzma patch: bad dictionary size")
    new_size = buf.varint()
    if size is not None and new_size != size:
        raise Corrupt(f"bsdiff-lzma patch declares {new_size} bytes, its entry {size}")
    ctrl_len, diff_len = buf.varint(), buf.varint()
    ctrl_c, diff_c = buf.raw(ctrl_len), buf.raw(diff_len)
    extra_c = bytes(buf.data[buf.pos :])
    # Each block is at most as long as the new file; control: at most 3 varints per byte.
    ctrl = ctrl_unpack(_unpack(ctrl_c, dict_log, 0, 30 * (new_size + 1)), new_size + 1)
    diff = _unpack(diff_c, dict_log, 1, new_size)
    extra = _unpack(extra_c, dict_log, 2, new_size)
    result: bytes = bsdiff4.core.patch(old, new_size, ctrl, diff, extra)
    return result
