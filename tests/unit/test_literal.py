"""The literal stream, all codecs: encoder (reup.delta.literal) against receiver (reup_receiver.format.literal)."""

from __future__ import annotations

import os
import random

import pytest
import reup.delta.literal as enc_mod
from hypothesis import given, settings
from hypothesis import strategies as st
from reup.delta.literal import LiteralEncoder
from reup_receiver.errors import Corrupt, Unsupported
from reup_receiver.format import elfx86
from reup_receiver.format.literal import (
    LITERAL_LZMA_ELF,
    LITERAL_LZMA_X86,
    LITERAL_ZSTD,
    STEP,
    LiteralStream,
    MemorySink,
    elf_ranges,
)


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


def round_trip(tmp: str, files: list[bytes], elf: bool = True) -> tuple[int, int]:
    paths: list[bytes] = []
    for i, data in enumerate(files):
        p = os.path.join(tmp, f"f{i}")
        with open(p, "wb") as fh:
            fh.write(data)
        paths.append(os.fsencode(p))
    enc = LiteralEncoder(elf)
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
@given(st.integers(0, 2**32), st.integers(1, 25), st.sampled_from([0, 1 << 40]), st.booleans())
def test_round_trip_all_codecs(tmp_path_factory: pytest.TempPathFactory, seed: int, n: int,
                               lzma_min: int, elf: bool) -> None:
    old = enc_mod.LZMA_MIN, enc_mod.GROUP_MAX
    enc_mod.LZMA_MIN, enc_mod.GROUP_MAX = lzma_min, 100_000  # small groups: many boundaries
    try:
        files = contents(random.Random(seed), n)
        codec, _ = round_trip(str(tmp_path_factory.mktemp("lit")), files, elf)
        if lzma_min == 0 and any(files):
            assert codec == (LITERAL_LZMA_ELF if elf else LITERAL_LZMA_X86)
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


def _x86_64_elf() -> bytes:
    """A real x86-64 ELF with RIP-relative code: the largest one this interpreter has mapped
    (libpython or the interpreter itself), at most 8 MiB of it kept whole."""
    with open("/proc/self/maps", encoding="utf-8") as fh:
        mapped = {line.split()[-1] for line in fh if "/" in line.split()[-1]}
    found = sorted((os.path.getsize(p), p) for p in mapped | {os.path.realpath("/proc/self/exe")}
                   if os.path.isfile(p) and os.path.getsize(p) <= 8 << 20)
    for _, path in reversed(found):
        with open(path, "rb") as fh:
            data = fh.read()
        if len(data) >= enc_mod.LZMA_MIN and elf_ranges(data):
            return data
    pytest.skip("no x86-64 ELF of the right size mapped")


def test_elf_round_trip_smaller_than_x86(tmp_path: os.PathLike[str]) -> None:
    """LZMA_ELF restores executables exactly (with text around them) and beats the x86 filter alone."""
    exe = _x86_64_elf()
    files = [b"#!/bin/sh\necho hello\n" * 40, exe, bytes(1000), exe[: len(exe) // 2]]  # and a truncated copy
    codec, elf_wire = round_trip(str(tmp_path), files, elf=True)
    assert codec == LITERAL_LZMA_ELF
    _, x86_wire = round_trip(str(tmp_path), files[:3], elf=False)
    _, elf_whole = round_trip(str(tmp_path), files[:3], elf=True)
    assert elf_whole < x86_wire
    norm = bytes(elfx86.normalise(exe, elf_ranges(exe), elfx86.RIP))
    assert norm != exe and elf_ranges(norm) == elf_ranges(exe)  # the rule finds the same ranges


def test_elf_corruption_is_refused_or_differs(tmp_path: os.PathLike[str]) -> None:
    exe = _x86_64_elf()[: 1 << 20]
    p = os.fsencode(os.path.join(tmp_path, "exe"))
    with open(p, "wb") as fh:
        fh.write(exe)
    enc = LiteralEncoder()
    enc.plan([(p, len(exe))])
    chunk = enc.data(p)
    for pos in (2, len(chunk) // 3, len(chunk) - 3):
        bad = bytearray(chunk)
        bad[pos] ^= 0x40
        dec = LiteralStream(enc.codec)
        sink = MemorySink()
        try:
            dec.feed(sink, bytes(bad))
            dec.complete(sink, len(exe), len(bad))
            dec.finish()
        except Corrupt:
            continue
        assert bytes(sink.out) != exe  # the per-file SHA-256 refuses it on the device


def test_elf_output_in_bounded_steps(tmp_path: os.PathLike[str]) -> None:
    """A restored executable is written in STEP pieces; the receiver holds one file of at most
    MAX_ELF bytes, and files above MAX_ELF are never normalised, so never held whole."""
    exe = _x86_64_elf()
    p = os.fsencode(os.path.join(tmp_path, "exe"))
    with open(p, "wb") as fh:
        fh.write(exe)
    enc = LiteralEncoder()
    enc.plan([(p, len(exe))])
    chunk = enc.data(p)
    writes: list[bytes] = []

    class Recording:
        def write(self, data: bytes) -> int:
            writes.append(data)
            return len(data)

    dec = LiteralStream(enc.codec)
    dec.feed(Recording(), chunk)
    dec.complete(Recording(), len(exe), len(chunk))
    dec.finish()
    assert b"".join(writes) == exe and max(map(len, writes)) <= STEP
    big = bytearray(exe)
    big.extend(bytes(64 << 20))
    assert elf_ranges(big) == []  # above MAX_ELF: left alone
