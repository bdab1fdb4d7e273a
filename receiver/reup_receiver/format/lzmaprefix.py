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
with the end marker. Receiver: builder.apply_patch (`apply`), output streamed.
"""

from __future__ import annotations

import lzma

from reup_receiver.errors import Corrupt
from reup_receiver.format.literal import Sink
from reup_receiver.format.wire import Buf

CHUNK = 1 << 16  # an uncompressed LZMA2 chunk holds at most 64 KiB
STEP = 1 << 20  # output per decompress call
MIN_DICT = 4096
SLACK = 1 << 16


def dict_size(old_len: int, new_len: int) -> int:
    return max(MIN_DICT, old_len + new_len)


def apply(old: bytes, patch: bytes, size: int, sink: Sink, exact: bool = True) -> None:
    """Write the new file to `sink`: exactly `size` bytes, else Corrupt (at most, if not `exact`)."""
    buf = Buf(patch, "lzma-prefix patch")
    dsize = buf.varint()
    if not MIN_DICT <= dsize <= dict_size(len(old), size) + SLACK:
        raise Corrupt(f"lzma-prefix patch: dictionary of {dsize} bytes for {len(old)} + {size}")
    dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": dsize}])
    view = memoryview(old)
    for pos in range(0, len(old), CHUNK):
        piece = view[pos : pos + CHUNK]
        header = bytes([1 if pos == 0 else 2]) + (len(piece) - 1).to_bytes(2, "big")
        dec.decompress(header + piece)  # the old file, echoed: only the dictionary matters
    written = 0
    out = dec.decompress(bytes(buf.data[buf.pos :]), max_length=STEP)
    while True:
        written += len(out)
        if written > size:
            raise Corrupt(f"lzma-prefix patch: more than the declared {size} bytes")
        if out:
            sink.write(out)
        if dec.eof or dec.needs_input:
            break
        out = dec.decompress(b"", max_length=STEP)
    if not dec.eof or (exact and written != size) or dec.unused_data:
        raise Corrupt(f"lzma-prefix patch: {written} bytes{'' if dec.eof else ' and truncated'}, declared {size}")
