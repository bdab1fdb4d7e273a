"""SOLID frames (reup.delta.solid -> reup_receiver.format.solid): round trip, corruption
refused, and the receiver's memory bounded by the dictionary and window limits."""

from __future__ import annotations

import random

import pytest
import pyzstd
from reup.delta import solid as enc
from reup_receiver.errors import Corrupt
from reup_receiver.format import solid
from reup_receiver.format.literal import MemorySink


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
