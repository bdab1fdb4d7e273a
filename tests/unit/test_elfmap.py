"""The ELF_MAP codec (reup_receiver.format.elfmap, reup.delta.elfmap): real gcc-built ELF
round trips with code inserted early (everything after it moves), the mapped patch smaller
than the plain one, exact inverse, corrupt containers and wrong declared sizes refused,
receiver memory bounded, and only offered to receivers that list it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reup.delta import elfmap as layout
from reup.delta.codecs import candidates, hdiff, make_patch
from reup_receiver.errors import Corrupt
from reup_receiver.format import elfmap, elfx86
from reup_receiver.format.literal import MemorySink
from reup_receiver.format.model import PATCH_CODECS, Codec
from reup_receiver.format.wire import Buf, put_varint
from reup_receiver.patches import available_codecs
from support.elves import applied as elves_applied
from support.elves import applied_to_file, gcc_pair, random_ranges


def applied(old: bytes | bytearray, patch: bytes, size: int | None = None) -> bytes:
    return elves_applied(old, patch, size, Codec.ELF_MAP)


def mapped(old: bytes, new: bytes, inner: Codec, mode: int = elfmap.CALLS_RIP) -> bytes:
    return layout.pack(old, new, int(inner), mode, lambda o, n, _part: make_patch(inner, o, n))


def _program(n: int, shift: int) -> str:
    """C source: functions calling each other and reading globals; `shift` grows an early one."""
    out = ["#include <stdio.h>", "int g[64];", "const char *names[] = {\"a\", \"b\", \"c\"};"]
    for i in range(n):
        extra = "".join(f" x = x * 31 + g[{k % 64}];" for k in range(shift)) if i == 2 else ""
        callee = f"f{i - 1}(x + {i})" if i else "x"
        far = f" + f{i // 2}(x)" if i > 4 and i % 3 == 0 else ""
        # Some code without references first, as real functions have: it anchors the map.
        mix = f"x = (x ^ {i * 7919 + 13}) * {i * 104729 + 7}; x += (x >> 7) * {i + 3}; x ^= x << {i % 13 + 1};"
        out.append(f"__attribute__((noinline)) int f{i}(int x) {{ {mix}{extra} g[{i % 64}] += x; "
                   f"return ({callee}{far}) ^ {i} ^ names[{i % 3}][0];}}")
    out.append("int main(int c, char **v) { (void)v; printf(\"%d\\n\", f" + str(n - 1) + "(c)); return 0; }")
    return "\n".join(out)


@pytest.fixture(scope="module")
def elves(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return gcc_pair(tmp_path_factory.mktemp("elves"), _program(400, 0), _program(400, 60))


def test_code_ranges_carry_addresses(elves: tuple[bytes, bytes]) -> None:
    old, _ = elves
    ranges = elfmap.code_ranges(old)
    assert [(o, s) for o, s, _ in ranges] == elfx86.exec_ranges(old)
    assert all(va >= off for off, _, va in ranges)
    assert elfmap.code_ranges(b"not an elf" * 10) == []


def _symbols(data: bytes, tmp: Path) -> dict[str, int]:
    """Function name -> address, as nm reads the dynamic symbol table."""
    path = tmp / "lib.so"
    path.write_bytes(data)
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    return {name: int(addr, 16) for addr, kind, name in (line.split() for line in out.stdout.splitlines())
            if kind == "T"}


def test_map_follows_moved_code(elves: tuple[bytes, bytes], tmp_path: Path) -> None:
    """The functions after the grown one moved; the map sends (almost) each old entry
    address to the new one, which is what makes calls to them identical after mapping."""
    if shutil.which("nm") is None:
        pytest.skip("nm not installed")
    old, new = elves
    lookup = elfmap.Map(layout.layout_map(old, new))
    old_syms, new_syms = _symbols(old, tmp_path), _symbols(new, tmp_path)
    moved = [name for name in old_syms if name in new_syms and old_syms[name] != new_syms[name]]
    assert len(moved) > 300
    right = sum(lookup(old_syms[name]) == new_syms[name] for name in moved)
    assert right >= 0.95 * len(moved), (right, len(moved))


@pytest.mark.parametrize("mode", elfmap.MODES)
@pytest.mark.parametrize("inner", [Codec.HDIFFPATCH, Codec.BSDIFF_LZMA, Codec.ZSTD_PREFIX, Codec.LZMA_PREFIX])
def test_real_elf_round_trips(elves: tuple[bytes, bytes], inner: Codec, mode: int) -> None:
    old, new = elves
    patch = mapped(old, new, inner, mode)
    assert applied(old, patch, len(new)) == new
    base = bytearray(old)
    assert applied(base, patch, len(new)) == new
    assert base == b""  # taken over by the codec: the receiver never holds two bases


def test_mapped_patch_beats_the_plain_one(elves: tuple[bytes, bytes]) -> None:
    old, new = elves
    assert len(mapped(old, new, Codec.HDIFFPATCH)) < len(hdiff(old, new))


def test_offered_only_to_receivers_that_list_it(elves: tuple[bytes, bytes]) -> None:
    old, new = elves
    assert Codec.ELF_MAP in available_codecs()
    # A receiver without ELF_MAP2 (tests/unit/test_elfmap2.py) gets modes 6 and 2, HDiffPatch inside.
    no_map2 = [c for c in PATCH_CODECS if c != Codec.ELF_MAP2]
    offered = [(c, p) for c, p in candidates(old, new, allowed=no_map2) if c == Codec.ELF_MAP]
    assert sorted(p[1] for _, p in offered) == [elfmap.RIP, elfmap.CALLS_RIP]
    assert all(applied(old, p, len(new)) == new for _, p in offered)
    older = [c for c in no_map2 if c != Codec.ELF_MAP]
    assert Codec.ELF_MAP not in [c for c, _ in candidates(old, new, allowed=older)]
    assert not [c for c, _ in candidates(b"x" * 5000, b"y" * 5000) if c == Codec.ELF_MAP]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.integers(0, 2**32), st.sampled_from(elfmap.MODES))
def test_normalise_is_exactly_inverted(data: bytes, seed: int, mode: int) -> None:
    ranges = random_ranges(len(data), seed)
    sink = MemorySink()
    elfmap.write_restored(bytes(elfmap.normalise_new(data, ranges, mode)), ranges, mode, sink)
    assert bytes(sink.out) == data
    buf = elfmap.normalise_new(data, ranges, mode)
    elfmap.restore_new(buf, ranges, mode)
    assert bytes(buf) == data


def _header_end(patch: bytes) -> int:
    buf = Buf(patch, "t")
    buf.u8(), buf.u8()
    for _ in range(2):
        for _ in range(buf.varint()):
            buf.varint(), buf.varint(), buf.varint()
    elfmap.get_map(buf)
    return buf.pos


def _varint(n: int) -> bytes:
    out = bytearray()
    put_varint(out, n)
    return bytes(out)


def test_corrupt_containers_are_refused(elves: tuple[bytes, bytes]) -> None:
    old, new = elves
    patch = bytearray(mapped(old, new, Codec.BSDIFF_LZMA))
    for bad in (bytes([Codec.ELF_MAP]) + patch[1:],  # recursion
                bytes([Codec.ELF_X86]) + patch[1:],
                bytes([Codec.SOLID]) + patch[1:],  # not a patch codec
                bytes([99]) + patch[1:],  # unknown inner codec
                patch[:1] + bytes([9]) + patch[2:],  # unknown mode
                patch[:2] + bytes([1, 0x80, 0x80, 0x80, 0x01, 4, 0]) + patch[2:],  # a range past the old file
                patch[:2] + bytes([0, 0]) + _varint(elfmap.MAX_SEGMENTS + 1) + bytes(8),  # a huge map
                patch[:3]):  # truncated
        with pytest.raises(Corrupt):
            applied(old, bytes(bad))
    # A damaged inner patch either fails to apply or gives other bytes, which the file's
    # SHA-256 then refuses (the builder checks every file).
    end = _header_end(bytes(patch))
    damaged = bytes(patch[: end + 20]) + bytes([patch[end + 20] ^ 0xFF]) + bytes(patch[end + 21 :])
    with contextlib.suppress(Exception):  # any codec error is a refusal too
        assert applied(old, damaged, len(new)) != new


@pytest.mark.parametrize("inner", [Codec.HDIFFPATCH, Codec.ZSTD_PREFIX, Codec.LZMA_PREFIX])
def test_declared_size_is_checked_exactly(elves: tuple[bytes, bytes], inner: Codec) -> None:
    old, new = elves
    patch = mapped(old, new, inner)
    for wrong in (len(new) - 1, len(new) + 1):
        with pytest.raises(Exception, match="declared|exceeds|size"):
            applied(old, patch, wrong)


def test_size_limit_refused(elves: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = elves
    patch = mapped(old, new, Codec.BSDIFF_LZMA)
    monkeypatch.setattr(elfmap, "MAX_FILE", len(old) - 1)
    with pytest.raises(Corrupt, match="size limit"):
        applied(old, patch)


def test_apply_memory_is_bounded(elves: tuple[bytes, bytes], tmp_path: Path) -> None:
    """Python-side memory with the base handed over as the builder does: the normalised
    base, the inner codec's output and a write buffer (plus slack), not the base as well."""
    old, new = elves
    old, new = old * 8, new * 8  # a few MiB: allocations dominate the interpreter's noise
    patch = mapped(old, new, Codec.BSDIFF_LZMA)
    out = tmp_path / "out"
    base = bytearray(old)
    del old
    peak = applied_to_file(base, patch, len(new), Codec.ELF_MAP, out)
    assert out.read_bytes() == new
    assert peak <= 2 * len(new) + elfmap.STEP + (2 << 20), peak
