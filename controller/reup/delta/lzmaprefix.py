"""Encoder of LZMA_PREFIX (reup_receiver.format.lzmaprefix): LZMA2 with the old file preloaded.

The preset dictionary comes from liblzma itself (reup.delta.xzdict), the library the
standard module is built on; `AVAILABLE` is False when it cannot be found, and the
codec is then not offered. Called by reup.delta.codecs.
"""

from __future__ import annotations

from reup_receiver.format import lzmaprefix
from reup_receiver.format.wire import put_varint

from reup.delta import xzdict

PRESET = 6  # measured on libzstd 1.5.5 -> 1.5.6: as small as 9e (the dictionary is set here anyway), twice as fast
AVAILABLE = xzdict.available()


def pack(old: bytes, new: bytes, props: tuple[int, int, int] = (3, 0, 2)) -> bytes:
    """The LZMA_PREFIX patch: dictionary size, then raw LZMA2 of `new` with `old` preloaded;
    `props` (lc, lp, pb) travel in the LZMA2 chunk headers, so the receiver needs no word of them."""
    dsize = lzmaprefix.dict_size(len(old), len(new))
    head = bytearray()
    put_varint(head, dsize)
    lc, lp, pb = props
    return bytes(head) + xzdict.compress(new, old, dsize, lc=lc, lp=lp, pb=pb, preset=PRESET)
