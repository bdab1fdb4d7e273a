"""The literal stream, both codecs: encoder (reup.delta.literal) against receiver (reup_receiver.format.literal)."""

from __future__ import annotations

import os
import random

import pytest
import reup.delta.literal as enc_mod
from hypothesis import given, settings
from hypothesis import strategies as st
from reup.delta.literal import LiteralEncoder
from reup_receiver.errors import Corrupt, Unsupported
from reup_receiver.format.literal import LITERAL_LZMA_X86, LITERAL_ZSTD, LiteralStream, MemorySink


def contents(rnd: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        kind = rnd.randrange(4)
        size = rnd.choice([0, 1, 100, 5000, 70000])
        if kind == 0:
            out.append(os.urandom(size))
        elif kind == 1:
            out.append(bytes(size))
        else:
            out.append((b"text %d " % rnd.randrange(99) * size)[:size])
    return out


def round_trip(tmp: str, files: list[bytes]) -> tuple[int, int]:
    paths: list[bytes] = []
    for i, data in enumerate(files):
        p = os.path.join(tmp, f"f{i}")
        with open(p, "wb") as fh:
            fh.write(data)
        paths.append(os.fsencode(p))
    enc = LiteralEncoder()
    enc.plan([(p, len(d)) for p, d in zip(paths, files, strict=True)])
    dec = LiteralStream(enc.codec)
    wire = 0
    for path, data in zip(paths, files, strict=True):
        chunk = enc.data(path)
        wire += len(chunk)
        sink = MemorySink()
        for off in range(0, len(chunk), 4096):
            dec.feed(sink, chunk[off : off + 4096])
        dec.complete(sink, len(data), len(chunk))
        assert bytes(sink.out) == data
    dec.finish()
    return enc.codec, wire


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 25), st.sampled_from([0, 1 << 40]))
def test_round_trip_both_codecs(tmp_path_factory: pytest.TempPathFactory, seed: int, n: int,
                                lzma_min: int) -> None:
    old = enc_mod.LZMA_MIN, enc_mod.GROUP_MAX
    enc_mod.LZMA_MIN, enc_mod.GROUP_MAX = lzma_min, 100_000  # small groups: many boundaries
    try:
        files = contents(random.Random(seed), n)
        codec, _ = round_trip(str(tmp_path_factory.mktemp("lit")), files)
        if lzma_min == 0 and any(files):
            assert codec == LITERAL_LZMA_X86
        if lzma_min:
            assert codec == LITERAL_ZSTD
    finally:
        enc_mod.LZMA_MIN, enc_mod.GROUP_MAX = old


def test_group_with_extra_data_is_rejected(tmp_path: os.PathLike[str]) -> None:
    """A group that decodes to more than its files declare is corrupt, not silently ignored."""
    p = os.path.join(tmp_path, "a")
    with open(p, "wb") as fh:
        fh.write(os.urandom(300_000))
    enc = LiteralEncoder()
    enc.plan([(os.fsencode(p), 300_000)])
    chunk = enc.data(os.fsencode(p))
    dec = LiteralStream(enc.codec)
    dec.feed(MemorySink(), chunk)
    dec.complete(MemorySink(), 299_999, len(chunk))  # one byte short of the group
    with pytest.raises(Corrupt):
        dec.finish()


def test_unknown_codec_is_unsupported() -> None:
    with pytest.raises(Unsupported):
        LiteralStream(7)
