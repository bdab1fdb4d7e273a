"""The LZMA_PREFIX patch: the new file as raw LZMA2 whose dictionary starts with the old file.

Where most of a file really changed (zstd 1.5.5 -> 1.5.6 rebuilt its library with
different inlining), a diff of matched blocks has little to match, and what wins is
an LZ77 coder that may copy any string of the old file: zstd with the old file as
prefix (ZSTD_PREFIX) does that, LZMA's context coding does it 9% smaller. Python's
lzma module cannot load a preset dictionary, but an LZMA2 stream can carry one:
uncompressed chunks (control byte 1, then 2) put bytes into the dictionary, and a
following compressed chunk with a state reset but no dictionary reset (control
0xC0..0xDF) may copy from them. The receiver feeds the old file as such chunks,
throws that output away, then decodes the patch, which the encoder (reup.delta.
lzmaprefix, liblzma with the old file as preset dictionary) made to start with
exactly such a chunk.

Layout: dictionary size varint (at least old + new: the decoder allocates it, so it
is bounded by the base and the declared size), then the raw LZMA2 chunks, ending
with the end marker. Receiver: patches.apply_patch (`apply`), output streamed.
"""

from __future__ import annotations

import lzma
from collections.abc import Iterator

from reup_receiver.errors import Corrupt
from reup_receiver.format.literal import LzmaCutter, Sink
from reup_receiver.format.wire import Buf

CHUNK = 1 << 16  # an uncompressed LZMA2 chunk holds at most 64 KiB
MIN_DICT = 4096
SLACK = 1 << 16


def dict_size(old_len: int, new_len: int) -> int:
    return max(MIN_DICT, old_len + new_len)


def uncompressed_chunks(prefix: bytes) -> Iterator[bytes]:
    """`prefix` as LZMA2 uncompressed chunks (the first resets the dictionary), one at a time."""
    view = memoryview(prefix)
    for off in range(0, len(prefix), CHUNK):
        part = view[off : off + CHUNK]
        yield bytes([1 if off == 0 else 2]) + (len(part) - 1).to_bytes(2, "big") + part


def load_dictionary(dec: lzma.LZMADecompressor, prefix: bytes, what: str) -> None:
    """Put `prefix` into a raw LZMA2 decoder's dictionary; the echoed output is discarded."""
    left = len(prefix)
    try:
        for chunk in uncompressed_chunks(prefix):
            left -= len(dec.decompress(chunk))
    except lzma.LZMAError as exc:  # pragma: no cover - our own chunks always decode
        raise Corrupt(f"{what} dictionary: {exc}") from exc
    if left:
        raise Corrupt(f"{what} dictionary did not load")


def apply(old: bytes, patch: bytes, size: int, sink: Sink, exact: bool = True) -> None:
    """Write the new file to `sink`: exactly `size` bytes, else Corrupt (at most, if not `exact`)."""
    buf = Buf(patch, "lzma-prefix patch")
    dsize = buf.varint()
    if not MIN_DICT <= dsize <= dict_size(len(old), size) + SLACK:
        raise Corrupt(f"lzma-prefix patch: dictionary of {dsize} bytes for {len(old)} + {size}")
    dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": dsize}])
    load_dictionary(dec, old, "lzma-prefix patch")
    cutter = LzmaCutter(dec, patch, buf.pos)
    left = cutter.cut(sink, size)  # never more than `size` bytes
    if left and (exact or not dec.eof):
        raise Corrupt(f"lzma-prefix patch: {size - left} bytes{'' if dec.eof else ' and truncated'}, declared {size}")
    if not cutter.used_up():
        raise Corrupt(f"lzma-prefix patch: does not end after its {size - left} bytes (declared {size})")
