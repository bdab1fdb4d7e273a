"""The ELF_X86 patch container: an inner patch between branch-normalised executables.

When code moves between two builds of a library, every relative call, jump and
RIP-relative operand after the first change holds a different displacement, so
a byte diff sees changes all over the code. Like xz's BCJ filter (and, more
thoroughly, Courgette/Zucchini), this codec rewrites each such 32-bit
displacement as the absolute file offset it points to before diffing: calls to
an unmoved function become identical bytes again, and calls to a moved one all
change the same way. The transform is a bijection applied only inside the
executable sections, decided by opcode bytes that it never rewrites, so the
receiver inverts it exactly; the file's SHA-256 is checked afterwards as for any
patch.

Operands normalised (x86-64): `E8`/`E9` rel32 (call, jmp), `0F 80..8F` rel32
(jcc), `FF 15`/`FF 25` (call/jmp [rip+d32]) and REX.W loads, stores, `lea` and
compares with a `[rip+d32]` operand and no immediate.

Layout: inner codec u8, mode u8 (bit 0: branches, bit 1: RIP-relative), then for the old file and the new file: count varint and
(offset, length) varints of their executable ranges; then the inner patch between
the normalised files. Memory on the receiver: the old file, one normalised copy of
it and the new file, so the encoder uses this codec up to `MAX_FILE` bytes.
Encoder: reup.delta.codecs (`pack`); receiver: patches.apply_patch (`apply`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from reup_receiver.errors import Corrupt
from reup_receiver.format.wire import Buf, put_varint

MAX_FILE = 64 << 20
MAX_RANGES = 64
_MASK = 0xFFFFFFFF
_SHF_EXECINSTR = 0x4
_SHT_NOBITS = 8

# Each match ends on the last opcode/ModRM byte; its 4-byte displacement follows.
_BRANCH = rb"[\xe8\xe9]|\x0f[\x80-\x8f]"
_RIP = rb"\xff[\x15\x25]|[\x48-\x4f][\x8b\x89\x8d\x3b\x39\x03\x2b\x33\x85\x63][\x05\x0d\x15\x1d\x25\x2d\x35\x3d]"
BRANCHES, RIP = 1, 2  # mode bits: which operands are normalised
MODES = (RIP, BRANCHES | RIP)
_OPERANDS = {
    RIP: re.compile(_RIP, re.DOTALL),
    BRANCHES: re.compile(_BRANCH, re.DOTALL),
    BRANCHES | RIP: re.compile(_BRANCH + b"|" + _RIP, re.DOTALL),
}

Ranges = list[tuple[int, int]]


def exec_ranges(data: bytes) -> Ranges:
    """File ranges of a little-endian ELF64's executable sections; [] for anything else."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    if shentsize < 64 or shoff + shnum * shentsize > len(data):
        return []
    out: Ranges = []
    for i in range(shnum):
        base = shoff + i * shentsize
        sh_type, = struct.unpack_from("<I", data, base + 4)
        flags, _addr, offset, size = struct.unpack_from("<QQQQ", data, base + 8)
        if flags & _SHF_EXECINSTR and sh_type != _SHT_NOBITS and size and offset + size <= len(data):
            out.append((offset, size))
    out.sort()
    merged: Ranges = []
    for off, size in out:
        if merged and off < merged[-1][0] + merged[-1][1]:
            continue  # overlapping sections: keep the first (never produced by linkers)
        merged.append((off, size))
    return merged[:MAX_RANGES]


def _transform(buf: bytearray, ranges: Ranges, mode: int, step: Callable[[int, int], int]) -> None:
    operand = _OPERANDS[mode]
    for start, length in ranges:
        end = start + length
        pos = start
        while True:
            m = operand.search(buf, pos, end)
            if m is None:
                break
            field = m.end()
            nxt = field + 4
            if nxt > end:
                break
            value = int.from_bytes(buf[field:nxt], "little")
            buf[field:nxt] = step(value, nxt).to_bytes(4, "little")
            pos = nxt


def normalise(data: bytes, ranges: Ranges, mode: int) -> bytearray:
    """Relative displacements -> absolute file offsets (mod 2^32)."""
    buf = bytearray(data)
    _transform(buf, ranges, mode, lambda v, nxt: (v + nxt) & _MASK)
    return buf


def restore(buf: bytearray, ranges: Ranges, mode: int) -> None:
    """The inverse of `normalise`, in place."""
    _transform(buf, ranges, mode, lambda v, nxt: (v - nxt) & _MASK)


def _put_ranges(out: bytearray, ranges: Ranges) -> None:
    put_varint(out, len(ranges))
    for off, size in ranges:
        put_varint(out, off)
        put_varint(out, size)


def _get_ranges(buf: Buf, limit: int) -> Ranges:
    n = buf.varint()
    if n > MAX_RANGES:
        raise Corrupt("elf-x86 patch: too many ranges")
    out: Ranges = []
    last = 0
    for _ in range(n):
        off, size = buf.varint(), buf.varint()
        if off < last or off + size > limit:
            raise Corrupt("elf-x86 patch: range outside its file or out of order")
        out.append((off, size))
        last = off + size
    return out


def pack(old: bytes, new: bytes, inner: int, mode: int, diff: Callable[[bytes, bytes], bytes]) -> bytes:
    """Header + `diff(normalised old, normalised new)`; `inner` names the inner codec."""
    old_ranges, new_ranges = exec_ranges(old), exec_ranges(new)
    out = bytearray([inner, mode])
    _put_ranges(out, old_ranges)
    _put_ranges(out, new_ranges)
    return bytes(out) + diff(bytes(normalise(old, old_ranges, mode)), bytes(normalise(new, new_ranges, mode)))


def apply(old: bytes, patch: bytes, apply_inner: Callable[[int, bytes, bytes], bytearray]) -> bytearray:
    """The new file; `apply_inner(codec, old, patch)` applies the inner patch."""
    if len(old) > MAX_FILE:
        raise Corrupt("elf-x86 patch: base file above the codec's size limit")
    buf = Buf(patch, "elf-x86 patch")
    inner, mode = buf.u8(), buf.u8()
    if mode not in _OPERANDS:
        raise Corrupt(f"elf-x86 patch: unknown mode {mode}")
    old_ranges = _get_ranges(buf, len(old))
    new_ranges = _get_ranges(buf, MAX_FILE)
    inner_patch = bytes(buf.data[buf.pos :])
    normal_old = bytes(normalise(old, old_ranges, mode))
    out = apply_inner(inner, normal_old, inner_patch)
    del normal_old
    if len(out) > MAX_FILE:
        raise Corrupt("elf-x86 patch: result above the codec's size limit")
    if new_ranges and new_ranges[-1][0] + new_ranges[-1][1] > len(out):
        raise Corrupt("elf-x86 patch: range outside the new file")
    restore(out, new_ranges, mode)
    return out
