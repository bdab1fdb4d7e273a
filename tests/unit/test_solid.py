"""SOLID and SOLID_LZMA frames (reup.delta.solid -> reup_receiver.format.solid): round trip,
corruption refused, and the receiver's memory bounded by the dictionary and window limits."""

from __future__ import annotations

import random
import tracemalloc

import pytest
import pyzstd
from reup.delta import solid as enc
from reup_receiver.errors import Corrupt, Oversized
from reup_receiver.format import solid
from reup_receiver.format.literal import STEP, MemorySink


def _module(rnd: random.Random, n: int) -> bytes:
    words = [b"def", b"return", b"self", b"value", b"request", b"header", b"pool", b"timeout", b"(", b")", b":"]
    return b"\n".join(b" ".join(rnd.choice(words) for _ in range(8)) for _ in range(n))


def _pairs() -> tuple[list[bytes], list[bytes]]:
    rnd = random.Random(7)
    old = [_module(rnd, 80) for _ in range(6)]
    new = [o.replace(b"timeout", b"deadline", 3) + b"\n# 2.2.3\n" for o in old]
    return old, new


def _decode(prefix: bytes, parts: list[bytes]) -> list[bytes]:
    frame = solid.SolidFrame(prefix)
    out = []
    for part in parts:
        sink = MemorySink()
        frame.feed(sink, part)
        out.append(bytes(sink.out))
    return out


def test_round_trip_file_by_file() -> None:
    old, new = _pairs()
    parts = enc.frame_parts(b"".join(old), new)
    assert _decode(b"".join(old), parts) == new  # each file complete when its part arrived
    own = sum(len(pyzstd.compress(n, 19, pyzstd.ZstdDict(o, is_raw=True).as_prefix)) for o, n in zip(old, new, strict=True))
    assert sum(map(len, parts)) < own  # one context beats one frame per file


def test_corrupt_part_is_refused_or_differs() -> None:
    old, new = _pairs()
    parts = enc.frame_parts(b"".join(old), new)
    bad = bytearray(parts[2])
    bad[len(bad) // 2] ^= 0x55
    try:
        got = _decode(b"".join(old), parts[:2] + [bytes(bad)] + parts[3:])
    except Corrupt:
        return
    assert got != new  # the per-file SHA-256 refuses it on the device


def test_wrong_dictionary_gives_other_bytes() -> None:
    old, new = _pairs()
    parts = enc.frame_parts(b"".join(old), new)
    other = b"".join(old).replace(b"pool", b"loop")
    try:
        got = _decode(other, parts)
    except Corrupt:
        return
    assert got != new


def test_dictionary_limits() -> None:
    with pytest.raises(Corrupt):
        solid.SolidFrame(b"x" * (solid.MAX_PREFIX + 1))
    with pytest.raises(Corrupt):
        solid.SolidFrame(b"short")


def test_window_above_the_limit_is_refused() -> None:
    """A frame asking for a larger window than MAX_WINDOW_LOG is refused, not allocated."""
    prefix = b"p" * 64
    opts: dict[int, int] = {pyzstd.CParameter.compressionLevel: 3, pyzstd.CParameter.windowLog: solid.MAX_WINDOW_LOG + 2}
    comp = pyzstd.ZstdCompressor(opts, pyzstd.ZstdDict(prefix, is_raw=True).as_prefix)
    # Two calls: the frame's content size stays unknown, so its header declares the window.
    data = comp.compress(random.Random(1).randbytes(1 << 16), comp.FLUSH_BLOCK) + comp.compress(b"", comp.FLUSH_FRAME)
    with pytest.raises(Corrupt):
        _decode(prefix, [data])


def test_encoder_window_stays_within_the_limit() -> None:
    old, new = [b"a" * enc.FILE_MAX] * 8, [b"b" * enc.FILE_MAX] * 8
    parts = enc.frame_parts(b"".join(old), new)
    assert _decode(b"".join(old), parts) == new


# --- SOLID_LZMA: one LZMA2 stream with the dictionary preset ---------------------------


def _decode_lzma(prefix: bytes, parts: list[bytes], sizes: list[int]) -> list[bytes]:
    frame = solid.SolidLzma(prefix)
    out = []
    for part, size in zip(parts, sizes, strict=True):
        sink = MemorySink()
        if part:
            frame.feed(sink, part)
        frame.complete(sink, size, len(part))
        out.append(bytes(sink.out))
    frame.finish()
    return out


def _lzma_parts(old: list[bytes], new: list[bytes]) -> list[bytes]:
    parts = enc.lzma_parts(b"".join(old), new)
    assert parts is not None, "liblzma is loaded by Python's lzma module"
    return parts


def test_lzma_round_trip_and_smaller_than_zstd() -> None:
    old, new = _pairs()
    parts = _lzma_parts(old, new)
    assert all(not p for p in parts[1:])  # the frame rides with the first file
    assert _decode_lzma(b"".join(old), parts, [len(n) for n in new]) == new
    assert sum(map(len, parts)) < sum(map(len, enc.frame_parts(b"".join(old), new)))


def test_lzma_uses_the_dictionary() -> None:
    """Text only the dictionary holds costs almost nothing: the preset window is used."""
    rnd = random.Random(5)
    old = [rnd.randbytes(50_000)]
    new = [old[0][10_000:40_000] + b"tail"]
    parts = _lzma_parts(old, new)
    assert len(parts[0]) < 200
    assert _decode_lzma(old[0], parts, [len(new[0])]) == new


def test_lzma_corruption_is_refused_or_differs() -> None:
    old, new = _pairs()
    parts = _lzma_parts(old, new)
    sizes = [len(n) for n in new]
    for pos in (1, 5, len(parts[0]) // 2, len(parts[0]) - 2):
        bad = bytearray(parts[0])
        bad[pos] ^= 0x55
        try:
            got = _decode_lzma(b"".join(old), [bytes(bad), *parts[1:]], sizes)
        except Corrupt:
            continue
        assert got != new  # the per-file SHA-256 refuses it on the device


def test_lzma_frame_must_match_its_files() -> None:
    old, new = _pairs()
    parts = _lzma_parts(old, new)
    sizes = [len(n) for n in new]
    prefix = b"".join(old)
    with pytest.raises(Corrupt, match="more than its files"):
        _decode_lzma(prefix, parts[:-1], sizes[:-1])  # a file short
    with pytest.raises(Corrupt, match="early"):
        _decode_lzma(prefix, parts, sizes[:-1] + [sizes[-1] + 1])
    with pytest.raises(Corrupt, match="before its frame"):
        _decode_lzma(prefix, [b"", *parts[1:]], sizes)
    with pytest.raises(Corrupt, match="after its frame started"):
        _decode_lzma(prefix, [parts[0], parts[0], *parts[2:]], sizes)


def test_lzma_limits_are_checked_before_allocating() -> None:
    old, new = _pairs()
    parts = _lzma_parts(old, new)
    big = bytes([solid.MAX_LZMA_DICT_LOG + 1]) + parts[0][1:]
    with pytest.raises(Corrupt, match="dictionary of 2"):
        _decode_lzma(b"".join(old), [big, *parts[1:]], [len(n) for n in new])
    frame = solid.SolidLzma(b"d" * 64)
    with pytest.raises(Oversized):
        for _ in range(solid.MAX_LZMA_DATA // (1 << 20) + 1):
            frame.feed(MemorySink(), b"\0" * (1 << 20))
    with pytest.raises(Corrupt):
        solid.SolidLzma(b"x" * (solid.MAX_PREFIX + 1))


def test_lzma_decoder_memory_is_bounded() -> None:
    """Peak memory while decoding: dictionary + LZMA2 window + compressed frame + output steps,
    not the files' total (4 MiB of output here, cut into 1 MiB writes)."""
    rnd = random.Random(9)
    prefix = rnd.randbytes(256 << 10)
    new = [prefix[: 128 << 10] * 32]  # 4 MiB that compresses to almost nothing
    parts = _lzma_parts([prefix], new)
    dict_log = parts[0][0]
    frame = solid.SolidLzma(prefix)
    writes: list[int] = []

    class Counting:
        def write(self, data: bytes) -> int:
            writes.append(len(data))
            return len(data)

    tracemalloc.start()
    try:
        frame.feed(Counting(), parts[0])
        frame.complete(Counting(), len(new[0]), len(parts[0]))
        frame.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(writes) == len(new[0]) and max(writes) <= STEP
    assert peak < len(prefix) + (1 << dict_log) + len(parts[0]) + 3 * STEP, peak
