"""SOLID and SOLID_LZMA: the small changed files of a mirrored path coded in one context.

A file patched on its own pays for a frame and a fresh context, and cannot use
what its neighbours share (a module's `.py` beside its `.pyc`, the same strings
in sibling modules). With SOLID, a MIRROR entry marks some of its files
(`MirrorFile` with method PATCH and codec SOLID); the receiver then reads the
old versions of exactly those files (rewritten like the tree) and concatenates
them, in NAR order, into one raw-content dictionary. Each marked file's DATA is
the next part of a single zstd frame compressed against that dictionary and
flushed at the file's end, so a file is complete when its DATA has arrived, and
later files can refer to earlier ones. The file's SHA-256 is checked as always.

SOLID_PYC files (pyc.py) are parts of a SOLID_LZMA frame whose content is a recipe the
receiver compiles, not the file's bytes.

SOLID_LZMA codes the same files as one raw LZMA2 stream whose window starts
filled with that dictionary (LZMA models text and bytecode ~10% tighter than
zstd). Python's lzma has no preset-dictionary call, so the receiver feeds the
decoder the dictionary as LZMA2 *uncompressed* chunks (control 1, then 2; at most
64 KiB each), discards their output, then the encoder's stream, whose first chunk
resets state and properties but keeps the dictionary. The whole stream arrives as
the DATA of the first SOLID_LZMA file: a byte log2 of the LZMA2 dictionary size
(16..`MAX_LZMA_DICT_LOG`), then the compressed bytes; the other files carry no DATA
and are cut from the decoder in stream order. At the path's end the stream must be
used up exactly.

Memory on the receiver: the dictionary (at most `MAX_PREFIX` bytes, else the
stream is refused) and the decoder's window (at most 2^`MAX_WINDOW_LOG`); for
SOLID_LZMA the LZMA2 dictionary (at most 2^`MAX_LZMA_DICT_LOG` = 16 MiB), the
compressed bytes (at most `MAX_LZMA_DATA`) and output steps of `STEP`.
Encoder: reup.delta.solid; receiver: builder.PathBuilder.
"""

from __future__ import annotations

import lzma

import zstandard

from reup_receiver.errors import Corrupt, Oversized
from reup_receiver.format import pyc
from reup_receiver.format.literal import LzmaCutter, MemorySink, Sink, zstd_feed
from reup_receiver.format.lzmaprefix import load_dictionary

MAX_PREFIX = 8 << 20
MAX_WINDOW_LOG = 25
MAX_LZMA_DICT_LOG = 24  # 16 MiB: the dictionary plus the frame's new content (8 MiB each)
MAX_LZMA_DATA = 9 << 20  # compressed bytes of one frame: 8 MiB of content never needs more


class DoesNotDecode(Corrupt):
    """A frame that does not decode against its dictionary: the device's old files (the base)
    may differ from what the encoder saw, so the builder blames the mirror's base."""


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
            raise DoesNotDecode(f"solid data does not decompress: {exc}") from exc

    def complete(self, sink: Sink, size: int, data_len: int) -> None:
        """A SOLID file's DATA is in; its content was written as it arrived."""
        if data_len == 0:
            raise Corrupt(f"{getattr(sink, 'label', 'solid file')}: solid file without data")

    def finish(self) -> None:
        """The path ends (zstd frames need no end check: every file's hash was)."""


def lzma2_filters(dict_log: int) -> list[dict[str, int]]:
    return [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << dict_log}]


class SolidLzma:
    """The decoder of one mirrored path's SOLID_LZMA frame (see the module docstring)."""

    def __init__(self, prefix: bytes) -> None:
        if not 1 <= len(prefix) <= MAX_PREFIX:
            raise Corrupt(f"solid dictionary of {len(prefix)} bytes (allowed: 1 to {MAX_PREFIX})")
        self.prefix = prefix
        self.pending = bytearray()  # the frame, while its first file's DATA arrives
        self.frame: LzmaCutter | None = None
        self.started = False

    def feed(self, sink: Sink, data: bytes) -> None:
        if self.started:
            raise Corrupt("solid LZMA data after its frame started")
        if len(self.pending) + len(data) > MAX_LZMA_DATA:
            raise Oversized(f"solid LZMA frame above {MAX_LZMA_DATA} bytes")
        self.pending += data

    def complete(self, sink: Sink, size: int, data_len: int) -> None:
        """Cut the next `size` bytes of the frame; the first file brings the frame."""
        if data_len:
            self._start()
        elif not self.started:
            raise Corrupt("solid LZMA file before its frame")
        self._cut(sink, size)

    def complete_pyc(self, sink: Sink, size: int, data_len: int) -> None:
        """A SOLID_PYC file (pyc.py): cut its recipe from the frame, then compile it."""
        if data_len:
            self._start()
        elif not self.started:
            raise Corrupt("solid LZMA file before its frame")
        head = MemorySink()
        self._cut(head, pyc.HEADER.size)
        recipe = pyc.parse_header(bytes(head.out), size)  # bounds the body before it is cut
        body = MemorySink()
        self._cut(body, recipe.body_len)
        sink.write(pyc.build(recipe, bytes(body.out), size))

    def _start(self) -> None:
        if self.started or len(self.pending) < 2:
            raise Corrupt("solid LZMA frame: a second frame, or an empty one")
        dict_log, self.started = self.pending[0], True
        if not 16 <= dict_log <= MAX_LZMA_DICT_LOG:
            raise Corrupt(f"solid LZMA frame: dictionary of 2^{dict_log} bytes "
                          f"(allowed: 2^16 to 2^{MAX_LZMA_DICT_LOG})")
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=lzma2_filters(dict_log))
        load_dictionary(dec, self.prefix, "solid LZMA")
        self.prefix = b""
        self.frame, self.pending = LzmaCutter(dec, self.pending, 1), bytearray()

    def _cut(self, sink: Sink, size: int) -> None:
        assert self.frame is not None
        self.frame.cut_exact(sink, size, "solid LZMA frame", DoesNotDecode)

    def finish(self) -> None:
        """The path ends: the frame must be used up exactly."""
        if self.pending:
            raise Corrupt("solid LZMA data that no file used")
        if self.frame is None:
            return
        try:
            exact = self.frame.used_up()
        except lzma.LZMAError as exc:
            raise DoesNotDecode(f"solid LZMA frame does not decompress: {exc}") from exc
        if not exact:
            raise Corrupt("solid LZMA frame holds more than its files")
