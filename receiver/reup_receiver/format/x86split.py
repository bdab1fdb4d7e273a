"""x86-64 code as separate streams of opcodes, displacements, immediates and branch targets.

ELF_SPLIT's mode bit SPLIT (elfmap.py). An LZ coder reads machine code as one byte string,
in which an opcode, its ModRM byte, a stack offset, a constant and a call target follow
each other and share one set of contexts. Real releases change much of their code
(libzstd 1.5.5 -> 1.5.6: old code helps only 29% on the new .text), so how well new code
compresses decides the patch. Splitting each instruction into its fields and coding each
kind of field as its own stream, against the same stream of the old file, is what
kkrunchy's disfilter and Oodle's executable filters do: opcodes then follow opcodes,
4-byte targets line up with LZMA's position bits. On libzstd 1.5.5 -> 1.5.6 the split
took 3.2% off the ELF_MAP2 patch (157,757 -> 152,704 B) and coder settings per stream
another 0.6% (151,719 B); no setting of one coder over the unsplit file gained 0.2%.

`parse` is an instruction-length decoder for 64-bit mode: legacy prefixes, REX, the
one-byte, 0F, 0F 38 and 0F 3A maps, VEX and EVEX, ModRM/SIB displacements and
immediates. It decides only from the bytes it puts into the opcode stream, and `join`
runs the same decoder over that stream, so the split is a bijection of any byte string:
an opcode the table gets wrong costs compression, never correctness. A field that would
run past the end of a code range is cut there, on both sides.

Streams (`KINDS`): 0 opcode bytes (prefixes, opcode, ModRM, SIB), 1 disp8, 2 disp32,
3 RIP-relative disp32, 4 imm8, 5 imm16, 6 imm32, 7 imm64 and moffs, 8 rel8, 9 rel32.
The SPLIT payload (`pack`, `apply`): per part, 0 the bytes outside the code ranges and
1 + k stream k, the new part's size varint, its patch's size varint and the patch, of the
container's inner codec between the old file's part and the new one's (so each part has
its own dictionary and coder settings). Called by reup_receiver.format.elfmap (pack,
apply); reup.delta.codecs names the streams for their coder settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from reup_receiver.errors import Corrupt
from reup_receiver.format.wire import Buf, put_varint

SPLIT_MAX = 16 << 20  # per file: the receiver holds the new file's parts and the joined file at once
KINDS = ("op", "disp8", "disp32", "rip32", "imm8", "imm16", "imm32", "imm64", "rel8", "rel32")
OP, DISP8, DISP32, RIP32, IMM8, IMM16, IMM32, IMM64, REL8, REL32 = range(len(KINDS))

_PREFIX = bytes(1 if b in b"\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65\x66\x67" else 0 for b in range(256))

# Immediates: per opcode a code; _Z is imm16/32 by operand size, _V imm16/32/64 (B8+r),
# _MO a moffs (8 bytes, 4 with 67), _ENTER imm16 then imm8.
_NONE, _I8, _I16, _Z, _V, _MO, _ENTER, _R8, _R32 = range(9)


def _table(entries: dict[int, int]) -> bytes:
    out = bytearray(256)
    for op, code in entries.items():
        out[op] = code
    return bytes(out)


_ALU = [base + k for base in range(0, 0x40, 8) for k in range(4)]  # 00-03, 08-0B, ... 38-3B
_MODRM1 = _table({op: 1 for op in [*_ALU, 0x62, 0x63, 0x69, 0x6B, *range(0x80, 0x90), 0xC0, 0xC1,
                                   0xC4, 0xC5, 0xC6, 0xC7, 0xD0, 0xD1, 0xD2, 0xD3, *range(0xD8, 0xE0),
                                   0xF6, 0xF7, 0xFE, 0xFF]})
_IMM1 = _table({
    **{base + 4: _I8 for base in range(0, 0x40, 8)}, **{base + 5: _Z for base in range(0, 0x40, 8)},
    **{op: _I8 for op in (0x6A, 0x6B, 0x80, 0x82, 0x83, 0xA8, 0xC0, 0xC1, 0xC6, 0xCD, 0xE4, 0xE5, 0xE6, 0xE7)},
    **{op: _I8 for op in range(0xB0, 0xB8)}, **{op: _V for op in range(0xB8, 0xC0)},
    **{op: _Z for op in (0x68, 0x69, 0x81, 0xA9, 0xC7)}, **{op: _MO for op in range(0xA0, 0xA4)},
    0xC2: _I16, 0xCA: _I16, 0xC8: _ENTER,
    **{op: _R8 for op in (*range(0x70, 0x80), 0xE0, 0xE1, 0xE2, 0xE3, 0xEB)}, 0xE8: _R32, 0xE9: _R32,
})
_NO_MODRM2 = (0x05, 0x06, 0x07, 0x08, 0x09, 0x0B, 0x0E, *range(0x30, 0x38), 0x77, 0xA0, 0xA1, 0xA2,
              0xA8, 0xA9, 0xAA, *range(0x80, 0x90), *range(0xC8, 0xD0))
_MODRM2 = bytes(0 if op in _NO_MODRM2 else 1 for op in range(256))
_IMM8_0F = (0x70, 0x71, 0x72, 0x73, 0xC2, 0xC4, 0xC5, 0xC6)  # also with VEX (map 1)
_IMM2 = _table({**{op: _I8 for op in (*_IMM8_0F, 0xA4, 0xAC, 0xBA, 0x0F)}, **{op: _R32 for op in range(0x80, 0x90)}})
_VEX_IMM1 = _table({op: _I8 for op in _IMM8_0F})


def parse(buf: bytes | bytearray, i: int, avail: int) -> list[tuple[int, int]]:
    """The fields (kind, length) of the instruction at `buf[i]`, at most `avail` bytes in all.

    Reads only bytes that end up in the OP field (prefixes, opcode, ModRM, SIB)."""
    end = i + avail
    j = i
    opsz = adsz = False
    while j < end and _PREFIX[buf[j]]:
        opsz |= buf[j] == 0x66
        adsz |= buf[j] == 0x67
        j += 1
    rex = 0
    if j < end and 0x40 <= buf[j] <= 0x4F:
        rex = buf[j]
        j += 1
    if j >= end:
        return [(OP, avail)]
    op = buf[j]
    j += 1
    if op == 0x0F:
        if j >= end:
            return [(OP, avail)]
        op2 = buf[j]
        j += 1
        if op2 in (0x38, 0x3A):
            j += 1
            modrm, imm = True, _I8 if op2 == 0x3A else _NONE
        else:
            modrm, imm = bool(_MODRM2[op2]), _IMM2[op2]
    elif op in (0xC4, 0xC5, 0x62):  # VEX (3 and 2 bytes) and EVEX: always so in 64-bit mode
        if op == 0xC5:
            vmap = 1
            j += 1
        else:
            if j >= end:
                return [(OP, avail)]
            vmap = buf[j] & (0x1F if op == 0xC4 else 0x07)
            j += 2 if op == 0xC4 else 3
        if j >= end:
            return [(OP, avail)]
        vop = buf[j]
        j += 1
        modrm = not (vmap == 1 and vop == 0x77)  # vzeroupper/vzeroall
        imm = _I8 if vmap == 3 else (_VEX_IMM1[vop] if vmap == 1 else _NONE)
    else:
        modrm, imm = bool(_MODRM1[op]), _IMM1[op]
        if op in (0xF6, 0xF7):  # TEST /0 and /1 take an immediate, the rest of the group none
            imm = (_I8 if op == 0xF6 else _Z) if j < end and (buf[j] >> 3) & 7 < 2 else _NONE
    disp = -1
    if modrm:
        if j >= end:
            return [(OP, avail)]
        m = buf[j]
        j += 1
        mod, rm = m >> 6, m & 7
        if mod != 3:
            if rm == 4:
                if j >= end:
                    return [(OP, avail)]
                base = buf[j] & 7
                j += 1
                if mod == 0 and base == 5:
                    disp = DISP32
            if mod == 0 and rm == 5:
                disp = RIP32
            elif mod == 1:
                disp = DISP8
            elif mod == 2:
                disp = DISP32
    if j > end:
        return [(OP, avail)]
    fields = [(OP, j - i)]
    if disp >= 0:
        fields.append((disp, 1 if disp == DISP8 else 4))
    if imm == _I8:
        fields.append((IMM8, 1))
    elif imm == _Z:
        fields.append((IMM16, 2) if opsz and not rex & 8 else (IMM32, 4))
    elif imm == _V:
        fields.append((IMM64, 8) if rex & 8 else ((IMM16, 2) if opsz else (IMM32, 4)))
    elif imm == _I16:
        fields.append((IMM16, 2))
    elif imm == _ENTER:
        fields += [(IMM16, 2), (IMM8, 1)]
    elif imm == _MO:
        fields.append((IMM32, 4) if adsz else (IMM64, 8))
    elif imm == _R8:
        fields.append((REL8, 1))
    elif imm == _R32:
        fields.append((REL32, 4))
    left = avail
    out = []
    for kind, size in fields:  # a field past the range's end is cut there
        size = min(size, left)
        if size:
            out.append((kind, size))
            left -= size
    return out


Ranges = Sequence[tuple[int, int, int]]  # (file offset, length, vaddr), sorted, disjoint


def split(data: bytes | bytearray, ranges: Ranges) -> list[bytes]:
    """[the bytes outside the ranges, then each stream of KINDS over all ranges in order]."""
    streams = [bytearray() for _ in KINDS]
    rest = bytearray()
    done = 0
    view = memoryview(data)
    for start, length, _ in ranges:
        rest += view[done:start]
        i, end = start, start + length
        while i < end:
            for kind, size in parse(data, i, end - i):
                streams[kind] += view[i : i + size]
                i += size
        done = end
    rest += view[done:]
    return [bytes(rest)] + [bytes(s) for s in streams]


def join(parts: Sequence[bytes], ranges: Ranges, size: int) -> bytearray:
    """The inverse of `split`: the file of `size` bytes; Corrupt if the parts do not make it."""
    if len(parts) != len(KINDS) + 1 or sum(map(len, parts)) != size or \
            len(parts[0]) + sum(length for _, length, _ in ranges) != size:
        raise Corrupt("elf-split patch: streams do not match the code ranges")
    out = bytearray(size)
    rest, streams = parts[0], parts[1:]
    ops = streams[OP]
    at = [0] * len(KINDS)
    pos = taken = 0  # in `out`, in `rest`
    for start, length, _ in ranges:
        if start < pos:
            raise Corrupt("elf-split patch: code ranges out of order")
        out[pos:start] = rest[taken : taken + start - pos]
        taken += start - pos
        pos, end = start, start + length
        while pos < end:
            try:  # the decoder reads only opcode bytes, as it did when splitting
                fields = parse(ops, at[OP], end - pos)
            except IndexError:
                raise Corrupt("elf-split patch: opcode stream too short") from None
            for kind, n in fields:
                src, k = streams[kind], at[kind]
                if k + n > len(src):
                    raise Corrupt(f"elf-split patch: stream {KINDS[kind]} too short")
                out[pos : pos + n] = src[k : k + n]
                at[kind] = k + n
                pos += n
    out[pos:] = rest[taken:]
    if len(out) != size:  # the rest was too short for the gaps between the ranges
        raise Corrupt("elf-split patch: code ranges outside the file")
    return out


def pack(old: bytes | bytearray, new: bytes | bytearray, old_ranges: Ranges, new_ranges: Ranges,
         diff: Callable[[bytes, bytes, int], bytes]) -> bytes:
    """The SPLIT payload: per part of `split` (0 the rest, then 1 + each kind) the new part's
    size, the patch's size and `diff(old part, new part, part)`."""
    out = bytearray()
    for i, (o, n) in enumerate(zip(split(old, old_ranges), split(new, new_ranges), strict=True)):
        patch = diff(o, n, i)
        put_varint(out, len(n))
        put_varint(out, len(patch))
        out += patch
    return bytes(out)


def apply(old_parts: list[bytes], patch: bytes, new_ranges: Ranges, limit: int,
          apply_one: Callable[[bytes, bytes, int], bytes]) -> bytearray:
    """The new (normalised) file from `split` of the old one and a `pack` payload;
    `apply_one(old part, patch, size)` applies one inner patch. Each old part is dropped once
    used, so memory stays at both files plus the parts of the new one."""
    buf = Buf(patch, "elf-split patch")
    new_parts = []
    total = 0
    for i in range(len(old_parts)):
        size = buf.varint()
        total += size
        if total > limit:
            raise Corrupt(f"elf-split patch: streams above the file's {limit} bytes")
        part = apply_one(old_parts[i], buf.raw(buf.varint()), size)
        if len(part) != size:
            raise Corrupt(f"elf-split patch: stream {i} of {len(part)} bytes, declared {size}")
        old_parts[i] = b""
        new_parts.append(part)
    buf.end()
    return join(new_parts, new_ranges, total)
