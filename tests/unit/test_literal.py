"""The literal stream, all codecs: encoder (reup.delta.literal) against receiver (reup_receiver.format.literal)."""

from __future__ import annotations

import os
import random

import pytest
import reup.delta.literal as enc_mod
from hypothesis import given, settings
from hypothesis import strategies as st
from reup.delta.literal import LiteralEncoder, elf_ranges
from reup_receiver.errors import Corrupt, Unsupported
from reup_receiver.format import elfstream, elfx86
from reup_receiver.format.literal import (
    LITERAL_LZMA_ELF,
    LITERAL_LZMA_X86,
    LITERAL_ZSTD,
    STEP,
    LiteralStream,
    MemorySink,
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
    enc.plan([(p, len(d), b"") for p, d in zip(paths, files, strict=True)])
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
    enc.plan([(os.fsencode(p), 300_000, b"")])
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


def _encoded_alone(d: str, exe: bytes) -> tuple[LiteralEncoder, bytes]:
    """The literal encoder after one file `exe` (its group: the whole DATA)."""
    p = os.fsencode(os.path.join(d, "exe"))
    with open(p, "wb") as fh:
        fh.write(exe)
    enc = LiteralEncoder()
    enc.plan([(p, len(exe), b"")])
    return enc, enc.data(p)


def test_elf_corruption_is_refused_or_differs(tmp_path: os.PathLike[str]) -> None:
    exe = _x86_64_elf()[: 1 << 20]
    enc, chunk = _encoded_alone(str(tmp_path), exe)
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
    """A restored executable is written in STEP pieces as it is decoded: the receiver holds
    the group's compressed bytes and the LZMA2 dictionary, never the file."""
    exe = _x86_64_elf()
    enc, chunk = _encoded_alone(str(tmp_path), exe)
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
    assert len(writes) > 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.integers(1, 5000), min_size=1, max_size=12))
def test_streaming_restore_equals_whole_file_restore(seed: int, pieces: list[int]) -> None:
    """Restorer, fed in arbitrary pieces, gives exactly elfx86.restore's bytes (operands that
    straddle piece boundaries and range ends included)."""
    rnd = random.Random(seed)
    ops = [b"\xff\x15", b"\xff\x25", b"\x48\x8b\x05", b"\x4c\x8d\x3d", b"\x90", b"\xe8"]
    data = bytearray()
    while len(data) < 6000:
        data += rnd.choice(ops) + rnd.randbytes(rnd.randrange(0, 6))
    data = data[:6000]
    a, b = sorted(rnd.sample(range(1, 5999), 2))
    ranges = [(0, a), (a + rnd.randrange(0, 3), b - a)]
    ranges = [(o, n) for o, n in ranges if n > 0 and o + n <= len(data)]
    norm = bytes(elfx86.normalise(bytes(data), ranges, elfx86.RIP))
    out = MemorySink()
    restorer = elfstream.Restorer(out, ranges)
    pos = 0
    for n in pieces * 4:
        restorer.write(norm[pos : pos + n])
        pos += n
    restorer.write(norm[pos:])
    restorer.close()
    assert bytes(out.out) == bytes(data)


def test_executable_map_is_checked() -> None:
    from reup_receiver.format.wire import Buf

    head = bytearray()
    elfstream.put_map(head, [(0, [(64, 100), (200, 50)]), (3, [(10, 5)])])
    assert elfstream.get_map(Buf(bytes(head), "t")) == {0: [(64, 100), (200, 50)], 3: [(10, 5)]}
    bads: list[list[tuple[int, list[tuple[int, int]]]]] = [
        [(1, [(0, 5)]), (1, [(9, 1)])], [(0, [(50, 10), (40, 5)])], [(0, [])], [(0, [(5, 0)])]]
    for bad in bads:
        head = bytearray()
        elfstream.put_map(head, bad)
        with pytest.raises(Corrupt):
            elfstream.get_map(Buf(bytes(head), "t"))
    with pytest.raises(Corrupt):
        elfstream.check_ranges([(0, 10), (20, 30)], 49)


def test_map_naming_a_missing_file_is_refused() -> None:
    """A group whose executable map names more files than the group has is corrupt."""
    import lzma

    from reup_receiver.format.literal import lzma_filters

    content = random.Random(3).randbytes(5000)
    head = bytearray([16])
    elfstream.put_map(head, [(4, [(0, 100)])])
    data = bytes(head) + lzma.compress(content, format=lzma.FORMAT_RAW, filters=lzma_filters(16, LITERAL_LZMA_ELF))
    dec = LiteralStream(LITERAL_LZMA_ELF)
    dec.feed(MemorySink(), data)
    dec.complete(MemorySink(), len(content), len(data))
    with pytest.raises(Corrupt, match="executable map"):
        dec.finish()
