"""ELF_SPLIT (reup_receiver.format.x86split, elfmap's mode bit SPLIT): the instruction decoder on
golden cases and against objdump on every instruction of a gcc-built library, the split as an
exact bijection of any bytes, real round trips, every kind of damage refused, the older codecs
refusing the new modes, offered only to receivers that list it, receiver memory bounded."""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reup.delta import codecs
from reup.delta import elfmap as layout
from reup.delta.codecs import SPLIT_PROPS, candidates, make_patch
from reup_receiver.errors import Corrupt
from reup_receiver.format import elfmap, elftables, x86split
from reup_receiver.format.model import PATCH_CODECS, Codec
from reup_receiver.format.wire import Buf, put_varint
from reup_receiver.patches import available_codecs
from support.elves import applied, applied_to_file, gcc_pair, random_ranges

X = x86split

GOLDEN = [  # objdump's reading of each: prefixes/opcode/ModRM/SIB, then the operand fields
    ("488b0500000000", [(X.OP, 3), (X.RIP32, 4)]),  # mov rax, [rip+0]
    ("e8fbffffff", [(X.OP, 1), (X.REL32, 4)]),  # call
    ("0f8510000000", [(X.OP, 2), (X.REL32, 4)]),  # jne rel32
    ("7405", [(X.OP, 1), (X.REL8, 1)]),  # je rel8
    ("4883c408", [(X.OP, 3), (X.IMM8, 1)]),  # add rsp, 8
    ("4881ec00010000", [(X.OP, 3), (X.IMM32, 4)]),  # sub rsp, 0x100
    ("66813f3412", [(X.OP, 3), (X.IMM16, 2)]),  # cmp word [rdi], 0x1234
    ("48b88877665544332211", [(X.OP, 2), (X.IMM64, 8)]),  # movabs rax, imm64
    ("b801000000", [(X.OP, 1), (X.IMM32, 4)]),  # mov eax, 1
    ("8b442408", [(X.OP, 3), (X.DISP8, 1)]),  # mov eax, [rsp+8]
    ("8b842400010000", [(X.OP, 3), (X.DISP32, 4)]),  # mov eax, [rsp+0x100]
    ("8b042578563412", [(X.OP, 3), (X.DISP32, 4)]),  # mov eax, [0x12345678] (SIB, no base)
    ("f6c101", [(X.OP, 2), (X.IMM8, 1)]),  # test cl, 1
    ("f7d8", [(X.OP, 2)]),  # neg eax: group 3 without an immediate
    ("f7c700010000", [(X.OP, 2), (X.IMM32, 4)]),  # test edi, 0x100
    ("c4e2791805f8ffffff", [(X.OP, 5), (X.RIP32, 4)]),  # vbroadcastss xmm0, [rip-8] (VEX 0F38)
    ("c5f877", [(X.OP, 3)]),  # vzeroupper
    ("660f3a0fc108", [(X.OP, 5), (X.IMM8, 1)]),  # palignr xmm0, xmm1, 8
    ("c4e37d18c101", [(X.OP, 5), (X.IMM8, 1)]),  # vinsertf128 ymm0, ymm0, xmm1, 1
    ("c5f9700000", [(X.OP, 4), (X.IMM8, 1)]),  # vpshufd xmm0, [rax], 0 (VEX map 1 with imm8)
    ("f30f1efa", [(X.OP, 4)]),  # endbr64
    ("c3", [(X.OP, 1)]),  # ret
    ("c8100001", [(X.OP, 1), (X.IMM16, 2), (X.IMM8, 1)]),  # enter 0x10, 1
    ("48a11122334455667788", [(X.OP, 2), (X.IMM64, 8)]),  # mov rax, moffs64
    ("66662e0f1f840000000000", [(X.OP, 7), (X.DISP32, 4)]),  # nopw cs:[rax+rax+0]
]


@pytest.mark.parametrize(("code", "fields"), GOLDEN)
def test_golden_instructions(code: str, fields: list[tuple[int, int]]) -> None:
    data = bytes.fromhex(code)
    assert x86split.parse(data, 0, len(data)) == fields
    assert x86split.parse(data + b"\x90" * 16, 0, len(data) + 16) == fields


def test_a_field_past_the_range_is_cut() -> None:
    assert x86split.parse(bytes.fromhex("e800"), 0, 2) == [(X.OP, 1), (X.REL32, 1)]
    assert x86split.parse(bytes.fromhex("488b05"), 0, 2) == [(X.OP, 2)]
    assert x86split.parse(b"\x66\x66", 0, 2) == [(X.OP, 2)]


def _program(n: int, salt: int) -> str:
    """Loops, switches (jump tables), 64-bit constants, floating point and calls through the PLT:
    `salt` changes constants and bodies everywhere, as a real release does."""
    out = ["#include <stdlib.h>", "#include <string.h>", "long g[64]; double h[16];"]
    for i in range(n):
        k = i * 7 + salt
        out.append(
            f"__attribute__((noinline)) long f{i}(long x, int y) {{ long a = 0x1234567890{k % 256:02x}L;"
            f" for (int j = 0; j < y; j++) a += g[(j + {k}) % 64] * (x ^ {k * 31});"
            f" switch (y & 7) {{ case 0: a ^= {k}; break; case 1: a += x; break; case 2: a -= {k}L << 20; break;"
            f" case 3: a = a * {k + 3}; break; case 5: h[{k % 16}] += (double)a / {k + 1}.5; break;"
            f" default: a = strtol((char *)g, 0, 10); }}"
            f" return {f'f{i - 1}(a, y - 1)' if i and salt % 3 != i % 3 else 'a'} + (long)memchr(g, {k % 255}, 8); }}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def elves(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return gcc_pair(tmp_path_factory.mktemp("elfsplit"), _program(200, 1), _program(220, 2))


def test_parse_agrees_with_objdump(elves: tuple[bytes, bytes], tmp_path: Path) -> None:
    """Every instruction boundary the decoder finds in gcc's code is one objdump finds, and
    it finds them all: the split follows real instructions."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump not installed")
    for name, data in zip(("old", "new"), elves, strict=True):
        path = tmp_path / f"{name}.so"
        path.write_bytes(data)
        dump = subprocess.run(["objdump", "-d", "-j", ".text", str(path)], capture_output=True, text=True,
                              check=True).stdout
        # A long instruction continues on a line with bytes only: not a start.
        starts = {int(m.group(1), 16) for m in re.finditer(r"^\s+([0-9a-f]+):\t[0-9a-f ]+\t", dump, re.M)}
        (_, _, addr, off, size), = [s for s in elftables.sections(data) if s[0] == b".text"]
        mine, i = set(), off
        while i < off + size:
            mine.add(i - off + addr)
            i += sum(n for _, n in x86split.parse(data, i, off + size - i))
        assert mine == starts


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=4000), st.integers(0, 2**32))
def test_split_is_a_bijection_of_any_bytes(data: bytes, seed: int) -> None:
    ranges = random_ranges(len(data), seed)
    parts = x86split.split(data, ranges)
    assert len(parts) == len(x86split.KINDS) + 1 and sum(map(len, parts)) == len(data)
    assert x86split.join(parts, ranges, len(data)) == data


def split_patch(old: bytes, new: bytes) -> bytes:
    patch = make_patch(Codec.ELF_SPLIT, old, new)
    assert patch[1] & elfmap.SPLIT
    return patch


def test_round_trip(elves: tuple[bytes, bytes]) -> None:
    old, new = elves
    patch = split_patch(old, new)
    assert applied(old, patch, len(new), Codec.ELF_SPLIT) == new
    base = bytearray(old)
    assert applied(base, patch, len(new), Codec.ELF_SPLIT) == new
    assert base == b""  # taken over, as the builder hands it
    # Where the tables would not invert, the split goes with the code-only mode.
    patch = layout.pack(old, new, int(Codec.LZMA_PREFIX), elfmap.CALLS_RIP_FILTERED | elfmap.SPLIT,
                        lambda o, n, part: make_patch(Codec.LZMA_PREFIX, o, n))
    assert applied(old, patch, len(new), Codec.ELF_SPLIT) == new


def test_older_codecs_refuse_the_split_modes(elves: tuple[bytes, bytes]) -> None:
    old, new = elves
    patch = split_patch(old, new)
    for older in (Codec.ELF_MAP, Codec.ELF_MAP2):
        with pytest.raises(Corrupt, match="unknown mode"):
            applied(old, patch, len(new), older)


def test_offered_only_to_receivers_that_list_it(elves: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = elves
    assert Codec.ELF_SPLIT in available_codecs()
    # Generated code diffs well; a real release changes enough for the LZMA coders to be tried.
    monkeypatch.setattr(codecs, "LZMA_WORTH", 1000)
    offered = dict(candidates(old, new))
    assert Codec.ELF_SPLIT in offered
    assert applied(old, offered[Codec.ELF_SPLIT], len(new), Codec.ELF_SPLIT) == new
    older = [c for c in PATCH_CODECS if c != Codec.ELF_SPLIT]
    assert Codec.ELF_SPLIT not in dict(candidates(old, new, allowed=older))
    assert set(SPLIT_PROPS) == set(range(len(x86split.KINDS) + 1))


def _parts(patch: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The ELF_SPLIT patch as (header, [(new part size, inner patch)])."""
    buf = Buf(patch, "test")
    buf.u8(), buf.u8()
    elfmap._get_ranges(buf, elfmap.MAX_FILE), elfmap._get_ranges(buf, elfmap.MAX_FILE)  # old, new
    elfmap.get_map(buf, relative=True)
    header = patch[: buf.pos]
    parts = []
    while buf.pos < len(patch):
        size = buf.varint()
        parts.append((size, buf.raw(buf.varint())))
    return header, parts


def _packed(header: bytes, parts: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(header)
    for size, inner in parts:
        put_varint(out, size)
        put_varint(out, len(inner))
        out += inner
    return bytes(out)


def test_damage_is_refused(elves: tuple[bytes, bytes]) -> None:
    """Truncated, extended, a part's size or patch damaged, parts swapped: refused every time,
    by the container (Corrupt) or by LZMA's own checks, which the builder reports as Corrupt
    (a result that decoded to other bytes would still fail the file's SHA-256)."""
    old, new = elves
    patch = split_patch(old, new)
    header, parts = _parts(patch)
    assert _packed(header, parts) == patch and len(parts) == len(x86split.KINDS) + 1
    bad = [patch[:-1], patch + b"\0", _packed(header, parts[:-1]), _packed(header, [*parts, (0, b"")]),
           _packed(header, [parts[1], parts[0], *parts[2:]])]
    for i in (0, 1, 2, 10):
        size, inner = parts[i]
        bad.append(_packed(header, [*parts[:i], (size + 1, inner), *parts[i + 1:]]))
        bad.append(_packed(header, [*parts[:i], (size, inner[: len(inner) // 2]), *parts[i + 1:]]))
    for damaged in bad:
        with pytest.raises((Corrupt, lzma.LZMAError)):
            applied(old, damaged, len(new), Codec.ELF_SPLIT)
    with pytest.raises(Corrupt):
        applied(old, patch, len(new) + 1, Codec.ELF_SPLIT)


def test_join_refuses_streams_that_do_not_fit() -> None:
    code = bytes.fromhex("488b0500000000e8fbffffff7405c3") * 3
    data = b"head" + code + b"tail"
    ranges = [(4, len(code), 0x1000)]
    parts = x86split.split(data, ranges)
    assert x86split.join(parts, ranges, len(data)) == data
    short_ops = [parts[0], parts[1][:-2], *parts[2:], ]
    short_ops[1 + X.REL8] += b"\0\0"  # same total, opcodes cut
    rip_short = list(parts)
    rip_short[1 + X.RIP32] = rip_short[1 + X.RIP32][:-1]
    rip_short[0] += b"\0"
    for broken, rng in ((short_ops, ranges), (rip_short, ranges), (parts[:-1], ranges),
                        (parts, [(4, len(code) + 1, 0x1000)]), (parts, [(len(data), 0, 0)])):
        with pytest.raises(Corrupt):
            x86split.join(broken, rng, len(data))


def test_split_bases_above_the_limit_are_refused(elves: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = elves
    patch = split_patch(old, new)
    monkeypatch.setattr(x86split, "SPLIT_MAX", len(old) - 1)
    monkeypatch.setattr(codecs, "LZMA_WORTH", 1000)
    with pytest.raises(Corrupt, match="size limit"):
        applied(old, patch, len(new), Codec.ELF_SPLIT)
    assert Codec.ELF_SPLIT not in dict(candidates(old, new))


def test_apply_memory_is_bounded(elves: tuple[bytes, bytes], tmp_path: Path) -> None:
    """The old file's parts, the new file's parts and the joined new file, a write buffer."""
    old, new = elves
    old, new = old * 4, new * 4
    patch = split_patch(old, new)
    out = tmp_path / "out"
    base = bytearray(old)
    old_size = len(old)
    del old
    peak = applied_to_file(base, patch, len(new), Codec.ELF_SPLIT, out)
    assert out.read_bytes() == new
    assert peak <= old_size + 2 * len(new) + elfmap.STEP + (2 << 20), peak
