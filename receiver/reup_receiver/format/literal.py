"""The literal stream: the content of new files that have no base, in stream order.

Three codecs, chosen per stream by the encoder (the manifest's `literal` field):

- ZSTD: one zstd stream through all literal files; each file's DATA is what the
  encoder flushed for it, so a file is complete when its DATA has arrived.
- LZMA_X86: groups of consecutive literal files, each group one raw stream of
  the x86 branch filter + LZMA2 (what `xz` uses for executables). A group's
  dictionary size (one byte, log2) and compressed bytes arrive as the DATA of
  its first file; later files of the
  group carry no DATA and are cut from the same decompressor. Memory: one
  group's compressed bytes and the LZMA2 dictionary.
- LZMA_ELF: the same groups (LZMA2 preset 9e), where each x86-64 ELF file of at
  most `MAX_ELF` bytes had its RIP-relative operands normalised first
  (elfx86.normalise, mode RIP: `[rip+d32]` becomes the absolute offset it
  points to, as the x86 filter does for calls). On a 30 MB Rust executable that
  is 8% smaller than LZMA_X86. The receiver cuts such a file whole into memory
  (at most `MAX_ELF` bytes) and restores it before writing. Which files were
  normalised is decided by the same rule on both sides (`elf_ranges`), so the
  stream carries no flag for it.

Output is produced in bounded steps in both cases. Used by builder.py; the
encoder's side is reup.delta.literal.
"""

from __future__ import annotations

import lzma
import struct
from typing import Protocol, cast

import zstandard

from reup_receiver.errors import Corrupt, Unsupported
from reup_receiver.format import elfx86

MAX_WINDOW = 1 << 31  # zstd-prefix patches: further bounded by base + new size (builder.apply_patch)
MAX_LITERAL_WINDOW = 1 << 25  # the encoder's literal stream never uses more (reup.delta.literal)
LITERAL_ZSTD, LITERAL_LZMA_X86, LITERAL_LZMA_ELF = 0, 1, 2
LZMA_CODECS = (LITERAL_LZMA_X86, LITERAL_LZMA_ELF)
MAX_DICT_LOG = 25  # 32 MiB
STEP = 1 << 20
_IN_STEP = 1 << 16  # compressed bytes per decoder call
MAX_ELF = 64 << 20  # LZMA_ELF: larger files are not normalised (the receiver holds one whole)
_EM_X86_64 = 62


def lzma_filters(dict_log: int, codec: int = LITERAL_LZMA_X86) -> list[dict[str, int]]:
    preset = 9 | lzma.PRESET_EXTREME if codec == LITERAL_LZMA_ELF else 9
    return [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": 1 << dict_log}]


def elf_ranges(data: bytes | bytearray) -> elfx86.Ranges:
    """LZMA_ELF: the executable ranges of a file that is normalised ([] if it is not): an
    x86-64 ELF64 of at most MAX_ELF bytes. The normalisation never changes the ELF and
    section headers, so the receiver finds the same ranges in the normalised file."""
    if len(data) > MAX_ELF or len(data) < 64 or struct.unpack_from("<H", data, 18)[0] != _EM_X86_64:
        return []
    return elfx86.exec_ranges(cast(bytes, data))  # reads headers only: a bytearray is fine, no copy


def dict_log_for(size: int) -> int:
    """The dictionary a group of `size` bytes needs: the decoder allocates all of it."""
    return max(16, min(MAX_DICT_LOG, (size - 1).bit_length()))


class Sink(Protocol):
    def write(self, data: bytes) -> int: ...


class MemorySink:
    """A Sink into memory: for outputs the caller already bounded (an inner patch), and tests."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> int:
        self.out += data
        return len(data)


class _Whole:
    """A Sink into one preallocated buffer of a file's declared size (LZMA_ELF restores it whole)."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.pos = 0

    def write(self, data: bytes) -> int:
        end = self.pos + len(data)
        if end > len(self.buf):
            raise Corrupt("literal group: more bytes than the file declares")
        self.buf[self.pos : end] = data
        self.pos = end
        return len(data)


def zstd_feed(dobj: zstandard.ZstdDecompressionObj, data: bytes, sink: Sink) -> None:
    """Decompress in 64-byte slices: zstd can expand 3 bytes into a 128 KiB block,
    so this bounds each step's output (and memory) to about 3 MiB."""
    view = memoryview(data)
    for off in range(0, len(view), 64):
        out = dobj.decompress(view[off : off + 64])
        if out:
            sink.write(out)


class LiteralStream:
    def __init__(self, codec: int) -> None:
        if codec not in (LITERAL_ZSTD, *LZMA_CODECS):
            raise Unsupported(f"unknown literal codec {codec}")
        self.codec = codec
        self.zstd = zstandard.ZstdDecompressor(max_window_size=MAX_LITERAL_WINDOW).decompressobj()
        self.group: lzma.LZMADecompressor | None = None
        self.pending = bytearray()  # compressed bytes of a group still arriving
        self.first = False  # `pending` holds a started group's bytes, not yet given to its decoder
        self.src: bytes | bytearray = b""  # the current group's compressed bytes
        self.src_pos = 0  # how many of them the decoder has

    def feed(self, sink: Sink, data: bytes) -> None:
        """DATA of the current literal file."""
        if self.codec in LZMA_CODECS:
            self.pending += data
            return
        try:
            zstd_feed(self.zstd, data, sink)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"literal data does not decompress: {exc}") from exc

    def complete(self, sink: Sink, size: int, data_len: int) -> None:
        """The current literal file's DATA is in: cut its `size` bytes (LZMA groups)."""
        if self.codec not in LZMA_CODECS:
            return
        if data_len:
            if size == 0:
                raise Corrupt("a literal group must start at a non-empty file")
            self._end_group()
            dict_log = self.pending[0]
            if not 16 <= dict_log <= MAX_DICT_LOG:
                raise Corrupt(f"literal group: bad dictionary size 2^{dict_log}")
            self.group = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=lzma_filters(dict_log, self.codec))
            self.first = True  # the group's bytes wait in `pending` until its first decompress call
        if size == 0:
            return
        if self.group is None:
            raise Corrupt("literal file without a literal group")
        if self.codec == LITERAL_LZMA_ELF and size <= MAX_ELF:
            whole = _Whole(size)  # allocated once: no reallocation copies while it fills
            self._cut(whole, size)
            ranges = elf_ranges(whole.buf)
            if ranges:
                elfx86.restore(whole.buf, ranges, elfx86.RIP)
            view = memoryview(whole.buf)
            for off in range(0, size, STEP):
                sink.write(bytes(view[off : off + STEP]))
            return
        self._cut(sink, size)

    def _cut(self, sink: Sink, size: int) -> None:
        assert self.group is not None
        if self.first:  # the group's compressed bytes (after the dictionary byte), given to the
            # decoder in slices as it asks: it copies any input it cannot use yet.
            self.src, self.src_pos, self.first = self.pending, 1, False
            self.pending = bytearray()
        left = size
        try:
            while left and not self.group.eof:  # decompress() past the end raises EOFError
                data: bytes | bytearray = b""
                if self.group.needs_input and self.src_pos < len(self.src):
                    data = self.src[self.src_pos : self.src_pos + _IN_STEP]
                    self.src_pos += len(data)
                out = self.group.decompress(data, max_length=min(STEP, left))
                if out:
                    sink.write(out)
                    left -= len(out)
                elif self.group.needs_input and self.src_pos >= len(self.src):
                    break
        except lzma.LZMAError as exc:
            raise Corrupt(f"literal group does not decompress: {exc}") from exc
        if left:
            raise Corrupt(f"literal group ended {left} bytes early")

    def _end_group(self) -> None:
        group = self.group
        if group is None:
            return
        unread = self.src[self.src_pos :]
        self.src, self.src_pos = b"", 0
        if group.eof and unread:
            raise Corrupt("literal group holds more data than its files")
        try:
            rest = group.decompress(unread, max_length=1) if not group.eof else b""
        except lzma.LZMAError as exc:
            raise Corrupt(f"literal group does not decompress: {exc}") from exc
        if rest or not group.eof or group.unused_data:
            raise Corrupt("literal group holds more data than its files")

    def finish(self) -> None:
        """End of stream: the last group must be used up exactly."""
        if self.pending:
            raise Corrupt("literal data outside a file")
        self._end_group()
