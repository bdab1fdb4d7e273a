"""SOLID: the small changed files of a mirrored path coded in one compression context.

A file patched on its own pays for a frame and a fresh context, and cannot use
what its neighbours share (a module's `.py` beside its `.pyc`, the same strings
in sibling modules). With SOLID, a MIRROR entry marks some of its files
(`MirrorFile` with method PATCH and codec SOLID); the receiver then reads the
old versions of exactly those files (rewritten like the tree) and concatenates
them, in NAR order, into one raw-content dictionary. Each marked file's DATA is
the next part of a single zstd frame compressed against that dictionary and
flushed at the file's end, so a file is complete when its DATA has arrived, and
later files can refer to earlier ones. The file's SHA-256 is checked as always.

Memory on the receiver: the dictionary (at most `MAX_PREFIX` bytes, else the
stream is refused) and the decoder's window (at most 2^`MAX_WINDOW_LOG`).
Encoder: reup.delta.solid; receiver: builder.PathBuilder.
"""

from __future__ import annotations

import zstandard

from reup_receiver.errors import Corrupt
from reup_receiver.format.literal import Sink, zstd_feed

MAX_PREFIX = 8 << 20
MAX_WINDOW_LOG = 25


class SolidFrame:
    """The decoder of one mirrored path's solid frame."""

    def __init__(self, prefix: bytes) -> None:
        if not 8 <= len(prefix) <= MAX_PREFIX:  # 8: zstd's smallest raw-content dictionary
            raise Corrupt(f"solid dictionary of {len(prefix)} bytes (allowed: 8 to {MAX_PREFIX})")
        self.dobj = zstandard.ZstdDecompressor(
            dict_data=zstandard.ZstdCompressionDict(prefix, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
            max_window_size=1 << MAX_WINDOW_LOG,
        ).decompressobj()

    def feed(self, sink: Sink, data: bytes) -> None:
        """DATA of the current solid file, decompressed into its sink in bounded steps."""
        try:
            zstd_feed(self.dobj, data, sink)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"solid data does not decompress: {exc}") from exc
