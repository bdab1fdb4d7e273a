"""The encoder's side of SOLID coding (reup_receiver.format.solid has the format).

For each mirrored path, the small files that would travel as separate patches
(or literals) are coded again as one zstd frame against the concatenation of
their old versions; the frame is flushed at each file's end so the receiver can
finish files one by one. `solidify` keeps it only when the frame is smaller than
what the files cost on their own. Called by strategy.FileCoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyzstd
from reup_receiver.format.solid import MAX_PREFIX, MAX_WINDOW_LOG

__all__ = ["CONTENT_MAX", "FILE_MAX", "MAX_PREFIX", "frame_parts"]
FILE_MAX = 1 << 20  # larger files keep their own patch: their own context is big enough
CONTENT_MAX = 8 << 20  # the new bytes of one frame (bounds the receiver's window with MAX_PREFIX)
LEVEL = 19


def frame_parts(prefix: bytes, contents: Sequence[bytes]) -> list[bytes]:
    """One zstd frame over `contents` with `prefix` as raw-content dictionary, cut per file."""
    total = len(prefix) + sum(len(c) for c in contents)
    window = max(17, min(MAX_WINDOW_LOG, total.bit_length()))
    opts: dict[int, int] = {
        pyzstd.CParameter.compressionLevel: LEVEL,
        pyzstd.CParameter.windowLog: window,
        pyzstd.CParameter.enableLongDistanceMatching: 1,
    }
    comp = pyzstd.ZstdCompressor(opts, pyzstd.ZstdDict(prefix, is_raw=True).as_prefix)
    parts = []
    for i, content in enumerate(contents):
        mode = comp.FLUSH_FRAME if i == len(contents) - 1 else comp.FLUSH_BLOCK
        parts.append(comp.compress(content, mode))
    return parts

