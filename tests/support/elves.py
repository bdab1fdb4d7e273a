"""Pairs of real x86-64 shared objects built by gcc from generated C, and applying ELF_MAP/ELF_MAP2
patches as the receiver does, for the ELF codec tests (tests/unit/test_elfx86.py, test_elfmap.py,
test_elfmap2.py)."""

from __future__ import annotations

import random
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from reup_receiver.format.literal import MemorySink
from reup_receiver.format.model import Codec
from reup_receiver.patches import apply_elf_map, apply_patch


def gcc_pair(d: Path, old_source: str, new_source: str) -> tuple[bytes, bytes]:
    """`-O1 -fPIC -shared` builds of the two sources; skips the test where gcc is missing."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    built = []
    for name, source in (("old", old_source), ("new", new_source)):
        src = d / f"{name}.c"
        src.write_text(source)
        subprocess.run(["gcc", "-O1", "-fPIC", "-shared", "-o", str(d / f"{name}.so"), str(src)], check=True)
        built.append((d / f"{name}.so").read_bytes())
    return built[0], built[1]


def random_ranges(size: int, seed: int) -> list[tuple[int, int, int]]:
    """Up to four disjoint (offset, length, virtual address) ranges in `size` bytes: the executable
    ranges the normalisation property tests run over."""
    rnd = random.Random(seed)
    ranges: list[tuple[int, int, int]] = []
    pos = 0
    while pos < size and len(ranges) < 4:
        start = rnd.randrange(pos, size)
        length = rnd.randrange(0, size - start + 1)
        ranges.append((start, length, rnd.randrange(0, 1 << 40)))
        pos = start + length + 1
    return ranges


def applied(old: bytes | bytearray, patch: bytes, size: int | None, codec: Codec) -> bytes:
    """As the receiver applies it, with the output size the stream's entry declares: a bytearray
    base is handed over as the builder does, bytes go through apply_patch."""
    sink = MemorySink()
    if isinstance(old, bytearray):
        apply_elf_map(old, patch, sink, size, codec)
    else:
        apply_patch(codec, old, patch, sink, size)
    return bytes(sink.out)


def applied_to_file(base: bytearray, patch: bytes, size: int, codec: Codec, out: Path) -> int:
    """Apply with the base handed over, into `out`; the Python-side peak memory it took (tracemalloc)."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        with out.open("wb") as fh:
            apply_elf_map(base, patch, fh, size, codec)
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
