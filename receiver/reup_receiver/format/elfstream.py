"""LZMA_ELF's executable map and its streaming inverse (literal codec 2, see literal.py).

Before an LZMA_ELF group is compressed, every x86-64 executable in it has its
RIP-relative operands normalised (elfx86.normalise, mode RIP). The group's DATA
then starts with a map of those files and their executable ranges, so the
receiver knows before a file's first byte which bytes to restore, and restores
them as the file streams out of the decoder: `Restorer` holds back at most
`_HOLD` bytes (an opcode and its displacement) instead of the whole file.

Map: n varint, then n times: index varint (the file's position among the group's
non-empty files, strictly increasing), count varint (1..elfx86.MAX_RANGES), then
count (offset, length) varints, sorted, not overlapping, each ending inside the
file (checked when its size is known). Encoder: reup.delta.literal; receiver:
literal.LiteralStream.
"""

from __future__ import annotations

from typing import Protocol

from reup_receiver.errors import Corrupt
from reup_receiver.format import elfx86
from reup_receiver.format.wire import Buf, put_varint

_MASK = 0xFFFFFFFF
_HOLD = 7  # the longest operand pattern (3 bytes) and its 4-byte field
_OPERAND = elfx86._OPERANDS[elfx86.RIP]  # the very pattern normalise() used


class _Sink(Protocol):
    def write(self, data: bytes) -> int: ...


def put_map(out: bytearray, files: list[tuple[int, elfx86.Ranges]]) -> None:
    put_varint(out, len(files))
    for index, ranges in files:
        put_varint(out, index)
        put_varint(out, len(ranges))
        for off, length in ranges:
            put_varint(out, off)
            put_varint(out, length)


def get_map(buf: Buf) -> dict[int, elfx86.Ranges]:
    """The map, its order and range counts checked (sizes are checked per file)."""
    out: dict[int, elfx86.Ranges] = {}
    last = -1
    for _ in range(buf.varint()):
        index, count = buf.varint(), buf.varint()
        if index <= last or not 1 <= count <= elfx86.MAX_RANGES:
            raise Corrupt("literal group: bad executable map")
        ranges = [(buf.varint(), buf.varint()) for _ in range(count)]
        end = 0
        for off, length in ranges:
            if off < end or length == 0:
                raise Corrupt("literal group: executable ranges out of order")
            end = off + length
        out[index] = ranges
        last = index
    return out


def check_ranges(ranges: elfx86.Ranges, size: int) -> None:
    if ranges and ranges[-1][0] + ranges[-1][1] > size:
        raise Corrupt("literal group: executable range past its file")


class Restorer:
    """A sink that inverts elfx86.normalise (mode RIP) on the bytes written through it, in
    order, and passes them on; `close()` at the file's end. Same scan as elfx86._transform:
    within each range, the leftmost operand match from the scan position, its field rewritten,
    the scan going on after the field; a field that would cross the range's end stops the range."""

    def __init__(self, sink: _Sink, ranges: elfx86.Ranges) -> None:
        self.sink = sink
        self.ranges = ranges
        self.buf = bytearray()
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset where the scan goes on
        self.ri = 0  # the range being scanned

    def write(self, data: bytes) -> int:
        self.buf += data
        self._scan(done=False)
        return len(data)

    def close(self) -> None:
        self._scan(done=True)
        if self.ri < len(self.ranges):
            raise Corrupt("literal group: executable range past its file")
        self._emit(self.base + len(self.buf))

    def _scan(self, done: bool) -> None:
        have = self.base + len(self.buf)  # file offset just past the bytes we hold
        while self.ri < len(self.ranges):
            start, length = self.ranges[self.ri]
            end = start + length
            self.pos = max(self.pos, start)
            if end <= have:  # the rest of this range is here: finish it exactly as _transform
                self._range(end, end)
                self.ri += 1
                continue
            if done:
                return
            # Only matches starting before `safe` are whole (pattern and field) in what we hold.
            safe = have - _HOLD
            if self.pos < safe:
                self._range(have, safe)
                self.pos = max(self.pos, safe)
            break
        limit = self.pos if self.ri < len(self.ranges) else have
        self._emit(min(limit, have))

    def _range(self, end: int, safe: int) -> None:
        """Rewrite the matches that start before `safe`, searching up to `end` (file offsets)."""
        buf, base = self.buf, self.base
        while True:
            m = _OPERAND.search(buf, self.pos - base, end - base)
            if m is None or m.start() + base >= safe:
                return
            field = m.end()
            nxt = field + 4
            if nxt + base > end:
                self.pos = end
                return
            value = int.from_bytes(buf[field:nxt], "little")
            buf[field:nxt] = ((value - (nxt + base)) & _MASK).to_bytes(4, "little")
            self.pos = nxt + base

    def _emit(self, upto: int) -> None:
        """Pass on the bytes before file offset `upto`: no later scan changes them."""
        n = upto - self.base
        if n > 0:
            self.sink.write(bytes(self.buf[:n]))
            del self.buf[:n]
            self.base = upto
