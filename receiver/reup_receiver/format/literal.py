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
- LZMA_ELF: the same groups (LZMA2 preset 9e), where x86-64 executables had
  their RIP-relative operands normalised first (elfx86.normalise, mode RIP:
  `[rip+d32]` becomes the absolute offset it points to, as the x86 filter does
  for calls); on a 30 MB Rust executable 8% smaller than LZMA_X86. The group's
  DATA starts, after the dictionary byte, with the map of those files and their
  executable ranges (elfstream.py), and the receiver restores them as they
  stream out of the decoder, holding back a few bytes, never a whole file.

Output is produced in bounded steps in both cases. Used by builder.py; the
encoder's side is reup.delta.literal.
"""

from __future__ import annotations

import lzma
from typing import Protocol, cast

import zstandard

from reup_receiver.errors import Corrupt, Unsupported
from reup_receiver.format import elfstream
from reup_receiver.format.wire import Buf

MAX_WINDOW = 1 << 31  # zstd-prefix patches: further bounded by base + new size (patches.apply_patch)
MAX_LITERAL_WINDOW = 1 << 25  # the encoder's literal stream never uses more (reup.delta.literal)
LITERAL_ZSTD, LITERAL_LZMA_X86, LITERAL_LZMA_ELF = 0, 1, 2
LZMA_CODECS = (LITERAL_LZMA_X86, LITERAL_LZMA_ELF)
MAX_DICT_LOG = 25  # 32 MiB
STEP = 1 << 20
_IN_STEP = 1 << 16  # compressed bytes per decoder call


def lzma_filters(dict_log: int, codec: int = LITERAL_LZMA_X86) -> list[dict[str, int]]:
    preset = 9 | lzma.PRESET_EXTREME if codec == LITERAL_LZMA_ELF else 9
    return [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": 1 << dict_log}]


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


def zstd_feed(dobj: zstandard.ZstdDecompressionObj, data: bytes, sink: Sink) -> None:
    """Decompress in 64-byte slices: zstd can expand 3 bytes into a 128 KiB block,
    so this bounds each step's output (and memory) to about 3 MiB."""
    view = memoryview(data)
    for off in range(0, len(view), 64):
        out = dobj.decompress(view[off : off + 64])
        if out:
            sink.write(out)


class LzmaCutter:
    """A raw LZMA2 decoder over one buffer of compressed bytes, cut into consecutive files.

    The decoder gets the bytes in slices as it asks (it would copy input it cannot use yet), and
    is never called past its end (decompress() there raises EOFError). Used by the literal
    groups here, SOLID_LZMA frames (solid.py) and LZMA_PREFIX patches (lzmaprefix.py);
    LZMAError propagates to the caller."""

    def __init__(self, dec: lzma.LZMADecompressor, src: bytes | bytearray, pos: int = 0) -> None:
        self.dec, self.src, self.pos = dec, src, pos

    def cut(self, sink: Sink, size: int) -> int:
        """Write the next `size` bytes to `sink`; what is left unwritten (0 unless the data ended)."""
        left = size
        while left and not self.dec.eof:
            data: bytes | bytearray = b""
            if self.dec.needs_input and self.pos < len(self.src):
                data = self.src[self.pos : self.pos + _IN_STEP]
                self.pos += len(data)
            out = self.dec.decompress(data, max_length=min(STEP, left))
            if out:
                sink.write(out)
                left -= len(out)
            elif self.dec.needs_input and self.pos >= len(self.src):
                break
        return left

    def cut_exact(self, sink: Sink, size: int, what: str, undecodable: type[Corrupt] = Corrupt) -> None:
        """`cut` exactly `size` bytes, else Corrupt; data that does not decompress raises `undecodable`."""
        try:
            left = self.cut(sink, size)
        except lzma.LZMAError as exc:
            raise undecodable(f"{what} does not decompress: {exc}") from exc
        if left:
            raise Corrupt(f"{what} ended {left} bytes early")

    def used_up(self) -> bool:
        """Whether the data ended exactly with the last file cut: no byte decodes beyond it."""
        unread = self.src[self.pos :]
        self.src, self.pos = b"", 0
        if self.dec.eof:
            return not unread and not self.dec.unused_data
        rest = self.dec.decompress(unread, max_length=1)
        return not rest and self.dec.eof and not self.dec.unused_data


class LiteralStream:
    def __init__(self, codec: int) -> None:
        if codec not in (LITERAL_ZSTD, *LZMA_CODECS):
            raise Unsupported(f"unknown literal codec {codec}")
        self.codec = codec
        self.zstd = zstandard.ZstdDecompressor(max_window_size=MAX_LITERAL_WINDOW).decompressobj()
        self.group: LzmaCutter | None = None
        self.pending = bytearray()  # compressed bytes of a group still arriving
        self.elf_map: dict[int, list[tuple[int, int]]] = {}  # LZMA_ELF: the group's executables
        self.index = 0  # the next file's position among the group's non-empty files

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
            head = Buf(cast(bytes, self.pending), "literal group")
            dict_log = head.u8()
            if not 16 <= dict_log <= MAX_DICT_LOG:
                raise Corrupt(f"literal group: bad dictionary size 2^{dict_log}")
            self.elf_map = elfstream.get_map(head) if self.codec == LITERAL_LZMA_ELF else {}
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=lzma_filters(dict_log, self.codec))
            self.group, self.index = LzmaCutter(dec, self.pending, head.pos), 0
            self.pending = bytearray()
        if size == 0:
            return
        if self.group is None:
            raise Corrupt("literal file without a literal group")
        ranges = self.elf_map.get(self.index)
        self.index += 1
        if ranges:
            elfstream.check_ranges(ranges, size)
            restorer = elfstream.Restorer(sink, ranges)
            self._cut(restorer, size)
            restorer.close()
        else:
            self._cut(sink, size)

    def _cut(self, sink: Sink, size: int) -> None:
        assert self.group is not None
        self.group.cut_exact(sink, size, "literal group")

    def _end_group(self) -> None:
        group = self.group
        if group is None:
            return
        if self.elf_map and max(self.elf_map) >= self.index:
            raise Corrupt("literal group: executable map names a file the group does not have")
        try:
            exact = group.used_up()
        except lzma.LZMAError as exc:
            raise Corrupt(f"literal group does not decompress: {exc}") from exc
        if not exact:
            raise Corrupt("literal group holds more data than its files")

    def finish(self) -> None:
        """End of stream: the last group must be used up exactly."""
        if self.pending:
            raise Corrupt("literal data outside a file")
        self._end_group()
