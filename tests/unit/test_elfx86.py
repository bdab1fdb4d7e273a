"""The ELF_X86 codec (reup_receiver.format.elfx86): exact inverse, real ELF round trips,
corrupt containers refused, and the receiver's memory for it bounded."""

from __future__ import annotations

import contextlib
import random
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reup.delta.codecs import candidates, elf_patch
from reup_receiver.errors import Corrupt
from reup_receiver.format import elfx86
from reup_receiver.format.literal import MemorySink
from reup_receiver.format.model import PATCH_CODECS, Codec
from reup_receiver.patches import apply_patch
from support.elves import gcc_pair


def applied(old: bytes, patch: bytes, size: int | None = None) -> bytes:
    """As the receiver applies it, with the output size the stream's entry declares."""
    sink = MemorySink()
    apply_patch(Codec.ELF_X86, old, patch, sink, size)
    return bytes(sink.out)


def _program(n: int, shift: int) -> str:
    """C source with many functions calling each other and globals; `shift` grows an early one."""
    out = ["#include <stdio.h>", "int g[64];"]
    for i in range(n):
        extra = "".join(f" x = x * 31 + g[{k % 64}];" for k in range(shift)) if i == 3 else ""
        callee = f"f{i - 1}(x + {i})" if i else "x"
        out.append(f"__attribute__((noinline)) int f{i}(int x) {{{extra} g[{i % 64}] += x; return {callee} ^ {i};}}")
    out.append("int main(int c, char **v) { (void)v; printf(\"%d\\n\", f" + str(n - 1) + "(c)); return 0; }")
    return "\n".join(out)


@pytest.fixture(scope="module")
def elves(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return gcc_pair(tmp_path_factory.mktemp("elves"), _program(300, 0), _program(300, 40))


def test_exec_ranges_find_the_code(elves: tuple[bytes, bytes]) -> None:
    old, _ = elves
    ranges = elfx86.exec_ranges(old)
    assert ranges and all(off > 0 and off + size <= len(old) for off, size in ranges)
    assert elfx86.exec_ranges(b"not an elf" * 10) == []


@pytest.mark.parametrize("mode", elfx86.MODES)
@pytest.mark.parametrize("inner", [Codec.HDIFFPATCH, Codec.BSDIFF_LZMA, Codec.ZSTD_PREFIX])
def test_real_elf_round_trips(elves: tuple[bytes, bytes], inner: Codec, mode: int) -> None:
    old, new = elves
    patch = elf_patch(old, new, inner, mode)
    assert applied(old, patch, len(new)) == new


def test_best_of_offers_elf_x86_for_executables(elves: tuple[bytes, bytes]) -> None:
    old, new = elves
    # ELF_X86 is for receivers without ELF_MAP or ELF_MAP2 (which subsume it).
    assert not [c for c, _ in candidates(old, new) if c == Codec.ELF_X86]
    assert not [c for c, _ in candidates(old, new, allowed=[c for c in PATCH_CODECS if c != Codec.ELF_MAP])
                if c == Codec.ELF_X86]
    older = [c for c in PATCH_CODECS if c not in (Codec.ELF_MAP, Codec.ELF_MAP2)]
    offered = [(c, p) for c, p in candidates(old, new, allowed=older) if c == Codec.ELF_X86]
    assert len(offered) == 1  # RIP-relative mode, HDiffPatch inside
    assert all(applied(old, p, len(new)) == new for _, p in offered)
    assert not [c for c, _ in candidates(b"x" * 5000, b"y" * 5000) if c == Codec.ELF_X86]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.integers(0, 2**32), st.sampled_from(elfx86.MODES))
def test_normalise_is_exactly_inverted(data: bytes, seed: int, mode: int) -> None:
    rnd = random.Random(seed)
    ranges: elfx86.Ranges = []
    pos = 0
    while pos < len(data) and len(ranges) < 4:
        start = rnd.randrange(pos, len(data))
        size = rnd.randrange(0, len(data) - start + 1)
        ranges.append((start, size))
        pos = start + size + 1
    buf = elfx86.normalise(data, ranges, mode)
    elfx86.restore(buf, ranges, mode)
    assert bytes(buf) == data


def _header(patch: bytes) -> tuple[int, int]:
    """Length of (inner, mode, old ranges) and of the whole header."""
    from reup_receiver.format.wire import Buf

    buf = Buf(patch, "t")
    buf.u8(), buf.u8()
    for _ in range(buf.varint()):
        buf.varint(), buf.varint()
    old_end = buf.pos
    for _ in range(buf.varint()):
        buf.varint(), buf.varint()
    return old_end, buf.pos


def test_corrupt_containers_are_refused(elves: tuple[bytes, bytes]) -> None:
    old, new = elves
    patch = bytearray(elf_patch(old, new, Codec.BSDIFF_LZMA))
    for bad in (bytes([Codec.ELF_X86]) + patch[1:],  # recursion
                bytes([Codec.SOLID]) + patch[1:],  # not a patch codec
                bytes([99]) + patch[1:],  # unknown inner codec
                patch[:1] + bytes([9]) + patch[2:],  # unknown mode
                patch[:2] + bytes([1, 0x80, 0x80, 0x80, 0x01, 4]) + patch[2:],  # a range past the old file
                patch[:3]):  # truncated
        with pytest.raises(Corrupt):
            applied(old, bytes(bad))
    # A damaged inner patch either fails to apply or gives other bytes, which the file's
    # SHA-256 then refuses (the builder checks every file).
    _, end = _header(bytes(patch))
    damaged = bytes(patch[: end + 20]) + bytes([patch[end + 20] ^ 0xFF]) + bytes(patch[end + 21 :])
    with contextlib.suppress(Exception):  # any codec error is a refusal too
        assert applied(old, damaged, len(new)) != new


def test_size_limit_refused(elves: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = elves
    patch = elf_patch(old, new, Codec.BSDIFF_LZMA)
    monkeypatch.setattr(elfx86, "MAX_FILE", len(old) - 1)
    with pytest.raises(Corrupt, match="size limit"):
        applied(old, patch)


def test_apply_memory_is_bounded(elves: tuple[bytes, bytes], tmp_path: Path) -> None:
    """Python-side memory: the old file, one normalised copy and the new file (plus slack)."""
    old, new = elves
    old, new = old * 8, new * 8  # a few MiB: allocations dominate the interpreter's noise
    patch = elf_patch(old, new, Codec.BSDIFF_LZMA)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sink = MemorySink()
        apply_patch(Codec.ELF_X86, old, patch, sink, len(new))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert bytes(sink.out) == new
    assert peak <= 4 * len(new) + len(old) + (1 << 20), peak
