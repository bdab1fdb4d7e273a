"""Pairs of real x86-64 shared objects built by gcc from generated C, for the ELF codec tests
(tests/unit/test_elfx86.py, test_elfmap.py)."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest


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
