"""ELF_MAP2 (reup_receiver.format.elfmap, filtered modes; elftables, the address tables) and the
symbol map (reup.delta.elfsyms, reup.delta.elfmap): real gcc-built ELF round trips, the exact
inverse on adversarial bytes, the older codec refusing the new modes, offered only to receivers
that list ELF_MAP2, symbols (PLT stubs too) and table entries mapped to their new addresses,
tables overlapping code refused, receiver memory bounded."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reup.delta import elfmap as layout
from reup.delta import elfsyms
from reup.delta.codecs import candidates, make_patch
from reup_receiver.errors import Corrupt
from reup_receiver.format import elfmap, elftables
from reup_receiver.format.literal import MemorySink
from reup_receiver.format.model import PATCH_CODECS, Codec
from reup_receiver.patches import available_codecs
from support.elves import applied as elves_applied
from support.elves import applied_to_file, gcc_pair, random_ranges


def applied(old: bytes | bytearray, patch: bytes, size: int | None = None, codec: Codec = Codec.ELF_MAP2) -> bytes:
    return elves_applied(old, patch, size, codec)


def mapped(old: bytes, new: bytes, inner: Codec, mode: int = elfmap.CALLS_RIP_FILTERED) -> bytes:
    return layout.pack(old, new, int(inner), mode, lambda o, n, _part: make_patch(inner, o, n))


def _program(n: int, changed: int) -> str:
    """Exported functions (called through the PLT in a -fPIC library), static ones and
    constants holding E8 bytes; functions below `changed` get longer in the new build."""
    out = ["#include <stdlib.h>", "#include <string.h>", "int g[32];"]
    for i in range(n):
        grow = "".join(f" x = x * {k + 3} + g[{k % 32}];" for k in range(8)) if i < changed else ""
        callee = f"f{i - 1}(x ^ 0x12e8{i:04x})" if i else "x"
        out.append(f"static int s{i}(int x) {{ x ^= 0xe8e8{i:04x};{grow} return x + g[{i % 32}]; }}")
        out.append(f"__attribute__((noinline)) int f{i}(int x) {{ char b[64]; memset(b, x, sizeof b); "
                   f"x += s{i}(b[{i % 32}]) + (int)strtol(b, 0, x & 15); return {callee} ^ {i * 7919}; }}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def elves(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return gcc_pair(tmp_path_factory.mktemp("elves2"), _program(300, 0), _program(300, 40))


@pytest.mark.parametrize("mode", elfmap.FILTERED_MODES)
@pytest.mark.parametrize("inner", [Codec.HDIFFPATCH, Codec.BSDIFF_LZMA, Codec.LZMA_PREFIX])
def test_filtered_modes_round_trip(elves: tuple[bytes, bytes], inner: Codec, mode: int) -> None:
    old, new = elves
    patch = mapped(old, new, inner, mode)
    assert applied(old, patch, len(new)) == new
    base = bytearray(old)
    assert applied(base, patch, len(new)) == new
    assert base == b""


def test_elf_map_refuses_the_filtered_modes(elves: tuple[bytes, bytes]) -> None:
    """A receiver that only knows ELF_MAP never decodes a filtered mode as an unfiltered one."""
    old, new = elves
    patch = mapped(old, new, Codec.HDIFFPATCH)
    with pytest.raises(Corrupt, match="unknown mode"):
        applied(old, patch, len(new), Codec.ELF_MAP)
    with pytest.raises(Corrupt, match="unknown mode"):
        applied(old, patch[:1] + bytes([elfmap.FILTERED | elfmap.RIP]) + patch[2:], len(new))


# Bytes that make opcodes, 00/FF top bytes and RIP-relative ModRMs frequent.
_ALPHABET = st.sampled_from([0x00, 0xFF, 0xE8, 0xE9, 0x0F, 0x85, 0x48, 0x8B, 0x8D, 0x05, 0x15, 0x25, 0x7F, 0x01])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(_ALPHABET, st.integers(0, 255)), max_size=3000), st.integers(0, 2**32),
       st.sampled_from(elfmap.FILTERED_MODES))
def test_filtered_normalise_is_exactly_inverted(raw: list[int], seed: int, mode: int) -> None:
    data = bytes(raw)
    ranges = random_ranges(len(data), seed)
    normal = elfmap.normalise_new(data, ranges, mode)
    sink = MemorySink()
    elfmap.write_restored(bytes(normal), ranges, mode, sink)
    assert bytes(sink.out) == data
    buf = bytearray(normal)
    elfmap.restore_new(buf, ranges, mode)
    assert bytes(buf) == data
    # The old side's rewrite with any map keeps the decisions too: it is a bijection per field.
    layout_map = elfmap.Map([(0, random.Random(seed).randrange(-(1 << 20), 1 << 20))])
    assert len(elfmap.normalise_old(data, ranges, mode, layout_map)) == len(data)


def test_stray_e8_is_left_alone() -> None:
    """A call field whose top byte is not 00/FF is kept; a real one becomes its target (25 bits)."""
    data = b"\x90\xe8\x10\x20\x30\x40" + b"\x90\xe8\xf0\xff\xff\xff" + b"\x90" * 4
    ranges = [(0, len(data), 0x1000)]
    out = elfmap.normalise_new(data, ranges, elfmap.CALLS_RIP_FILTERED)
    assert out[:6] == data[:6]
    assert int.from_bytes(out[8:12], "little") == 0x1000 + 12 - 16
    unfiltered = elfmap.normalise_new(data, ranges, elfmap.CALLS_RIP)
    assert unfiltered[:6] != data[:6]


def _nm(data: bytes, tmp: Path) -> dict[str, int]:
    if shutil.which("nm") is None:
        pytest.skip("nm not installed")
    path = tmp / "lib.so"
    path.write_bytes(data)
    out = subprocess.run(["nm", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    return {name: int(addr, 16) for addr, kind, name in (line.split() for line in out.stdout.splitlines())
            if kind == "T"}


def test_symbols_and_plt_stubs_map_to_their_new_addresses(elves: tuple[bytes, bytes], tmp_path: Path) -> None:
    old, new = elves
    syms = elfsyms.symbols(old)
    assert b"f10@plt" in syms and b"strtol@plt" in syms  # PLT stubs named by their relocations
    segments = layout.symbol_map(old, new)
    assert segments
    where = elfmap.Map(segments)
    old_nm, new_nm = _nm(old, tmp_path), _nm(new, tmp_path)
    for name in ("f0", "f50", "f150", "f299"):
        assert where(old_nm[name]) == new_nm[name]
    new_syms = elfsyms.symbols(new)
    assert where(syms[b"f10@plt"]) == new_syms[b"f10@plt"]
    assert elfsyms.symbols(b"not an elf" * 10) == {}


def test_prune_keeps_only_segments_with_references() -> None:
    segments = [(0, 5), (100, 7), (200, 9), (300, 7)]
    assert layout.prune(segments, [10, 310]) == [(0, 5), (300, 7)]
    assert layout.prune(segments, [150, 250]) == [(0, 5), (100, 7), (200, 9)]
    assert layout.prune(segments, []) == [(0, 5)]


def test_offered_only_to_receivers_that_list_it(elves: tuple[bytes, bytes]) -> None:
    old, new = elves
    assert Codec.ELF_MAP2 in available_codecs()
    offered = [p for c, p in candidates(old, new) if c == Codec.ELF_MAP2]
    assert offered and all(p[1] == elfmap.CALLS_RIP_TABLES for p in offered)  # gcc's tables invert
    assert all(applied(old, p, len(new)) == new for p in offered)
    older = [c for c in PATCH_CODECS if c != Codec.ELF_MAP2]
    assert Codec.ELF_MAP2 not in [c for c, _ in candidates(old, new, allowed=older)]


def test_apply_memory_is_bounded(elves: tuple[bytes, bytes], tmp_path: Path) -> None:
    """As for ELF_MAP: the normalised base, the inner codec's output and a write buffer."""
    old, new = elves
    old, new = old * 8, new * 8
    patch = mapped(old, new, Codec.BSDIFF_LZMA)
    out = tmp_path / "out"
    base = bytearray(old)
    del old
    peak = applied_to_file(base, patch, len(new), Codec.ELF_MAP2, out)
    assert out.read_bytes() == new
    assert peak <= 2 * len(new) + elfmap.STEP + (2 << 20), peak


def _section(data: bytes, name: bytes) -> tuple[int, int, int]:
    """(addr, offset, size) of a section."""
    return next((addr, off, size) for n, _, addr, off, size in elftables.sections(data) if n == name)


def test_tables_move_with_the_code(elves: tuple[bytes, bytes]) -> None:
    """After map_old, an unchanged function's unwind entry and symbol read as in the new file."""
    old, new = elves
    mode = elfmap.CALLS_RIP_TABLES
    segments = layout.layout_map(old, new, mode)
    normal_old = elfmap.normalise_old(old, elfmap.code_ranges(old), mode, elfmap.Map(segments))
    normal_new = elfmap.normalise_new(new, elfmap.code_ranges(new), mode)
    _, off_old, size_old = _section(old, b".eh_frame_hdr")
    _, off_new, size_new = _section(new, b".eh_frame_hdr")
    pcs_old = {bytes(normal_old[i : i + 4]) for i in range(off_old + 12, off_old + size_old, 8)}
    pcs_new = {bytes(normal_new[i : i + 4]) for i in range(off_new + 12, off_new + size_new, 8)}
    assert len(pcs_old & pcs_new) >= len(pcs_new) // 2  # the 260 unchanged functions at least
    plain_old = {bytes(old[i : i + 4]) for i in range(off_old + 12, off_old + size_old, 8)}
    plain_new = {bytes(new[i : i + 4]) for i in range(off_new + 12, off_new + size_new, 8)}
    assert len(pcs_old & pcs_new) > len(plain_old & plain_new)
    # .symtab entries (name as a difference, value mapped) of unchanged functions match too.
    _, off_old, size_old = _section(old, b".symtab")
    _, off_new, size_new = _section(new, b".symtab")
    entries_old = {bytes(normal_old[i : i + 24]) for i in range(off_old, off_old + size_old, 24)}
    entries_new = {bytes(normal_new[i : i + 24]) for i in range(off_new, off_new + size_new, 24)}
    plain_old = {bytes(old[i : i + 24]) for i in range(off_old, off_old + size_old, 24)}
    plain_new = {bytes(new[i : i + 24]) for i in range(off_new, off_new + size_new, 24)}
    assert len(entries_old & entries_new) > len(plain_old & plain_new)


def test_tables_restore_exactly_even_when_damaged(elves: tuple[bytes, bytes]) -> None:
    """The tables' transform is a bijection whatever their bytes: damaged records, lengths
    and counts included; the encoder's check says yes for gcc's output."""
    _, new = elves
    ranges = elfmap.code_ranges(new)
    assert elfmap.tables_apply(new, ranges)
    rnd = random.Random(7)
    for name in (b".eh_frame", b".eh_frame_hdr", b".symtab"):
        _, off, size = _section(new, name)
        for _ in range(30):
            damaged = bytearray(new)
            for _ in range(rnd.randrange(1, 6)):
                at = off + rnd.randrange(size)
                damaged[at] = rnd.choice([0, 0xFF, rnd.randrange(256)])
            data = bytes(damaged)
            assert elfmap.tables_apply(data, ranges)
            normal = elfmap.normalise_new(data, ranges, elfmap.CALLS_RIP_TABLES)
            sink = MemorySink()
            elfmap.write_restored(bytes(normal), ranges, elfmap.CALLS_RIP_TABLES, sink)
            assert bytes(sink.out) == data


def test_tables_overlapping_code_are_refused(elves: tuple[bytes, bytes]) -> None:
    _, new = elves
    _, off, size = _section(new, b".eh_frame")
    ranges = [*elfmap.code_ranges(new), (off + size // 2, 16, 0x400000)]
    assert not elfmap.tables_apply(new, ranges)
    with pytest.raises(Corrupt, match="overlap"):
        elfmap.write_restored(new, ranges, elfmap.CALLS_RIP_TABLES, MemorySink())


def test_pack_falls_back_to_the_code_where_tables_would_not_invert(
        elves: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = elves
    assert mapped(old, new, Codec.HDIFFPATCH, elfmap.CALLS_RIP_TABLES)[1] == elfmap.CALLS_RIP_TABLES
    monkeypatch.setattr(elfmap, "tables_apply", lambda *args: False)
    patch = mapped(old, new, Codec.HDIFFPATCH, elfmap.CALLS_RIP_TABLES)
    assert patch[1] == elfmap.CALLS_RIP_FILTERED
    assert applied(old, patch, len(new)) == new


def _strings_program(extra: int) -> str:
    """Functions printing string literals (no symbols); the new build has `extra` more, one
    before every 20th of the others, so the literals move by different amounts."""
    out = ["#include <stdio.h>"]
    for i in range(200):
        if i % 20 == 0 and i // 20 < extra:
            out.append(f'void e{i}(void) {{ puts("inserted literal number {i} {"y" * (i // 10)}"); }}')
        out.append(f'void p{i}(void) {{ puts("literal {i} of the program, long enough"); }}')
    return "\n".join(out)


def test_string_literals_move_with_the_map(tmp_path: Path) -> None:
    old, new = gcc_pair(tmp_path, _strings_program(0), _strings_program(10))
    where = elfmap.Map(layout.symbol_map(old, new))
    _, off_old, _ = _section(old, b".rodata")
    _, off_new, _ = _section(new, b".rodata")
    addr_old, addr_new = _section(old, b".rodata")[0], _section(new, b".rodata")[0]
    for i in (5, 100, 199):
        text = f"literal {i} of the program".encode()
        at_old = old.index(text, off_old) - off_old + addr_old
        at_new = new.index(text, off_new) - off_new + addr_new
        assert where(at_old) == at_new


def test_relative_map_round_trips() -> None:
    from reup_receiver.format.wire import Buf

    segments = [(0x1000, -300), (0x1400, -296), (0x9000, 12), (0x9010, -(1 << 40)), (1 << 50, 7)]
    for relative in (False, True):
        out = bytearray()
        elfmap.put_map(out, segments, relative)
        got = elfmap.get_map(Buf(bytes(out), "t"), relative)
        assert list(zip(got.starts, got.shifts, strict=True)) == segments
    # Functions that grew a little each: three-byte shifts, one-byte steps.
    growing = [(0x1000 * k, -70000 + 5 * k) for k in range(1, 50)]
    plain, steps = bytearray(), bytearray()
    elfmap.put_map(plain, growing)
    elfmap.put_map(steps, growing, True)
    assert len(steps) < len(plain)


def test_data_anchors_do_not_decide_between_the_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Symbols against content anchors is decided on the symbols alone; the data anchors
    then refine the symbol map (they would outnumber the content anchors of a Rust library)."""
    old, new = gcc_pair(tmp_path, _strings_program(0), _strings_program(10))
    symbols_only, with_data = layout.symbol_map(old, new, data=False), layout.symbol_map(old, new)
    assert len(with_data) > len(symbols_only)
    content = [(k, 0) for k in range(len(symbols_only) + 1)]
    monkeypatch.setattr(layout, "content_map", lambda old, new: content)
    assert layout.layout_map(old, new) == content
    monkeypatch.setattr(layout, "content_map", lambda old, new: content[:-2])
    assert layout.layout_map(old, new) == with_data
