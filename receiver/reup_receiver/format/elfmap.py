"""The ELF_MAP patch container: x86-64 references made absolute, the old ones moved to the new layout.

A new build of a program moves most of its code and data, so every relative
call, jump and RIP-relative operand changes although the code around it did
not. ELF_X86 (elfx86.py) turns each displacement into the file offset it points
to, which helps only where targets did not move. This codec follows
Zucchini's idea of references: the encoder aligns the two files (a piecewise
map from old virtual addresses to new ones, `Map`, sent with the patch), rewrites
every reference of the *old* file as the *new* address of its target and every
reference of the new file as its absolute target; code that is unchanged but
moved, and new code calling old functions, then reads the same bytes on both
sides. The inner patch (HDiffPatch or bsdiff+LZMA2) between the two normalised
files carries what really changed, including where the map guessed wrong.

The receiver rewrites the old file with the map, applies the inner patch and
turns the new file's absolute targets back into displacements. Which 4-byte
fields are references is decided by the opcode bytes before them, which the
transform never changes, so the inverse is exact; the file's SHA-256 is checked
afterwards as for any patch.

Intra-function jumps keep their displacement when a function moves whole, so mode
6 rewrites calls and RIP-relative operands only; mode 3 rewrites every branch.

Not every E8 byte is a call: a byte of an immediate or a displacement that happens to
be E8 would have its next 4 bytes rewritten too, and differently in each file. Mode
bit 8 (codec ELF_MAP2 only, `FILTERED_MODES`) converts a branch's field only where its
top byte is 00 or FF (a displacement within +-16 MiB, as xz's x86 BCJ filter tests),
in 25-bit arithmetic sign-extended to 32 bits, so a converted field keeps that top
byte and the receiver's scan takes the same decisions on the normalised file; every
matched opcode still consumes its 4-byte field, converted or not. On libzstd 1.5.5 ->
1.5.6 this made normalising the calls pay (mode 14: 4% smaller than mode 2).

Mode bit 32 (codec ELF_SPLIT only, `SPLIT_MODES`): the inner patches are x86split's
streams, each kind of instruction field against the same kind in the old file.

Layout: inner codec u8, mode u8 (2: RIP-relative operands as in elfx86; 3: and the
branches E8/E9/0F 8x rel32; 6: and the calls E8 only; 11 and 14: 3 and 6 with the
branches filtered; +16 the address tables; +32 split), old ranges, new ranges
(each: count varint, then offset, length and virtual address varints of an
executable section), the map (count varint, then per segment the start address as
a varint delta from the previous start and the shift as a zigzag varint, in the
FILTERED modes its difference from the previous shift), then the inner patch (SPLIT:
x86split's payload of inner patches).
Memory on the receiver (`apply`): the normalised old file, the inner codec's output
and a write buffer (SPLIT: the old file's parts, the new file's parts and the joined
file); the new file is restored while it is written.
Encoder: reup.delta.elfmap (`pack` with its map); receiver: patches.apply_patch (`apply`).
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Callable, Sequence
from typing import cast

from reup_receiver.errors import Corrupt
from reup_receiver.format import elftables, elfx86, x86split
from reup_receiver.format.literal import Sink
from reup_receiver.format.wire import Buf, put_varint

MAX_FILE = elfx86.MAX_FILE
MAX_RANGES = elfx86.MAX_RANGES
MAX_SEGMENTS = 1 << 16  # ruff (30 MB) needs 1.4 K; bounds the receiver's map to a few MB
_MASK = 0xFFFFFFFF
STEP = 1 << 20  # bytes per write of the restored file

Ranges = list[tuple[int, int, int]]  # (file offset, length, virtual address)


loads = elftables.loads  # (offset, vaddr, filesz) of the PT_LOAD segments


def code_ranges(data: bytes) -> Ranges:
    """Executable sections as (offset, length, vaddr); sections outside a PT_LOAD are left out."""
    segs = loads(data)
    out: Ranges = []
    for off, size in elfx86.exec_ranges(data):
        for s_off, s_va, s_size in segs:
            if s_off <= off and off + size <= s_off + s_size:
                out.append((off, size, off - s_off + s_va))
                break
    return out


class Map:
    """Old virtual address -> new: the shift of the last segment starting at or below it."""

    def __init__(self, segments: Sequence[tuple[int, int]]) -> None:
        self.starts = [s for s, _ in segments]
        self.shifts = [d for _, d in segments]

    def __call__(self, va: int) -> int:
        i = bisect.bisect_right(self.starts, va) - 1
        return va + self.shifts[i] if i >= 0 else va


# Each match is an opcode (as in elfx86) and the 4-byte field after it; scanning goes on
# after the field, so bytes a rewrite changed are never looked at again.
RIP, BRANCHES_RIP, CALLS_RIP = 2, 3, 6  # mode bits: 1 branches, 2 RIP-relative, 4 calls only
FILTERED = 8  # mode bit: branch fields only where their top byte is 00/FF, 25-bit arithmetic
TABLES = 16  # mode bit: and the address tables of elftables.py
BRANCHES_RIP_FILTERED, CALLS_RIP_FILTERED = BRANCHES_RIP | FILTERED, CALLS_RIP | FILTERED
CALLS_RIP_TABLES = CALLS_RIP_FILTERED | TABLES
SPLIT = 32  # mode bit: the normalised files coded as x86split's streams (codec ELF_SPLIT)
MODES = (RIP, BRANCHES_RIP, CALLS_RIP)  # codec ELF_MAP
FILTERED_MODES = (BRANCHES_RIP_FILTERED, CALLS_RIP_FILTERED, CALLS_RIP_TABLES)  # codec ELF_MAP2 takes these too
SPLIT_MODES = tuple(mode | SPLIT for mode in FILTERED_MODES)  # and codec ELF_SPLIT these
_OPCODES = {RIP: elfx86._RIP, BRANCHES_RIP: elfx86._BRANCH + b"|" + elfx86._RIP, CALLS_RIP: b"\xe8|" + elfx86._RIP}
_FIELDS = {mode: re.compile(b"(?:" + pattern + b")....", re.DOTALL) for mode, pattern in _OPCODES.items()}
# Filtered modes scan as their unfiltered ones. A branch's last opcode byte (E8, E9, 80..8F)
# is never a RIP operand's (FF 15/25, or a ModRM 05..3D), so it tells the two apart.
_FIELDS.update({mode: _FIELDS[mode & (FILTERED - 1)] for mode in FILTERED_MODES + SPLIT_MODES})
_BRANCH_LAST = frozenset(b"\xe8\xe9" + bytes(range(0x80, 0x90)))
_HALF25, _MASK25 = 1 << 24, (1 << 25) - 1


def _wrap25(value: int) -> int:
    """`value` mod 2^25 as a sign-extended 32-bit field: its top byte is 00 or FF."""
    return (((value + _HALF25) & _MASK25) - _HALF25) & _MASK


# The loops below are the hot path (a 30 MB executable has ~0.5 M references): struct
# in place, no per-field slices or calls beyond the scan.
_U32 = struct.Struct("<I")
_S32 = struct.Struct("<i")
_TOPS = (0, 0xFF)  # a filtered branch field's top byte


def map_old(buf: bytearray, ranges: Ranges, mode: int, layout: Map) -> None:
    """In place: each reference -> the new address of its target (mod 2^32)."""
    if mode & FILTERED:
        _map_old_filtered(buf, ranges, mode, layout)
        if mode & TABLES:
            elftables.map_old(buf, layout)
        return
    unpack, pack, rx = _U32.unpack_from, _U32.pack_into, _FIELDS[mode]
    starts, shifts, find = layout.starts, layout.shifts, bisect.bisect_right
    for start, length, va in ranges:
        bias = va - start  # the field's end is m.end(): vaddr of the next byte = m.end() + bias
        for m in rx.finditer(buf, start, start + length):
            end = m.end()
            value = unpack(buf, end - 4)[0]
            target = end + bias + (value - 0x100000000 if value & 0x80000000 else value)
            i = find(starts, target) - 1
            pack(buf, end - 4, (target + shifts[i] if i >= 0 else target) & _MASK)


def _map_old_filtered(buf: bytearray, ranges: Ranges, mode: int, layout: Map) -> None:
    """`map_old` for the filtered modes: branch fields with top byte 00/FF, in 25 bits."""
    unpack, pack, rx = _S32.unpack_from, _U32.pack_into, _FIELDS[mode]
    starts, shifts, find = layout.starts, layout.shifts, bisect.bisect_right
    for start, length, va in ranges:
        bias = va - start
        for m in rx.finditer(buf, start, start + length):
            end = m.end()
            branch = buf[end - 5] in _BRANCH_LAST
            if branch and buf[end - 1] not in _TOPS:
                continue  # not converted (its field is consumed all the same)
            target = end + bias + unpack(buf, end - 4)[0]
            i = find(starts, target) - 1
            if i >= 0:
                target += shifts[i]
            pack(buf, end - 4, _wrap25(target) if branch else target & _MASK)



def _shift_new_filtered(buf: bytearray, ranges: Ranges, mode: int, sign: int) -> None:
    """`_shift_new` for the filtered modes: a branch field with top byte 00/FF in 25 bits."""
    unpack, spack, pack, rx = _S32.unpack_from, _S32.pack_into, _U32.pack_into, _FIELDS[mode]
    for start, length, va in ranges:
        bias = va - start
        for m in rx.finditer(buf, start, start + length):
            end = m.end()
            if buf[end - 5] not in _BRANCH_LAST:
                pack(buf, end - 4, (unpack(buf, end - 4)[0] + sign * (end + bias)) & _MASK)
            elif buf[end - 1] in _TOPS:
                spack(buf, end - 4, ((unpack(buf, end - 4)[0] + sign * (end + bias) + _HALF25) & _MASK25) - _HALF25)


def _shift_new(buf: bytearray, ranges: Ranges, mode: int, sign: int) -> None:
    """In place: field + sign * (vaddr of the next byte), mod 2^32, for every reference."""
    if mode & FILTERED:
        _shift_new_filtered(buf, ranges, mode, sign)
        return
    unpack, pack, rx = _U32.unpack_from, _U32.pack_into, _FIELDS[mode]
    for start, length, va in ranges:
        bias = va - start
        for m in rx.finditer(buf, start, start + length):
            end = m.end()
            pack(buf, end - 4, (unpack(buf, end - 4)[0] + sign * (end + bias)) & _MASK)


def normalise_old(data: bytes, ranges: Ranges, mode: int, layout: Map) -> bytearray:
    """Each reference -> the new address of its target (mod 2^32)."""
    buf = bytearray(data)
    map_old(buf, ranges, mode, layout)
    return buf


def normalise_new(data: bytes, ranges: Ranges, mode: int) -> bytearray:
    """Each reference -> the address of its target (mod 2^32)."""
    buf = bytearray(data)
    _shift_new(buf, ranges, mode, 1)
    if mode & TABLES:
        elftables.normalise_new(buf)
    return buf


def restore_new(buf: bytearray, ranges: Ranges, mode: int) -> None:
    """The inverse of `normalise_new`, in place."""
    tables = _tables(bytes(buf), ranges, mode)
    _shift_new(buf, ranges, mode, -1)
    for off, part in tables:
        buf[off : off + len(part)] = part


def _tables(data: bytes | bytearray, ranges: Ranges, mode: int) -> list[tuple[int, bytes]]:
    """The restored table sections (mode bit TABLES); Corrupt where they overlap each other
    or the code ranges (the encoder never sends such a file)."""
    if not mode & TABLES:
        return []
    out = elftables.restored(data)
    spans = sorted([(off, off + len(part)) for off, part in out] + [(off, off + size) for off, size, _ in ranges])
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        raise Corrupt("elf-map patch: address tables overlap the code")
    return out


def tables_apply(new: bytes, ranges: Ranges, normal: bytes | bytearray | None = None) -> bool:
    """Whether mode bit TABLES inverts exactly on `new` (elftables.invertible)."""
    return elftables.invertible(new, [(off, size) for off, size, _ in ranges], normal)


def _put_ranges(out: bytearray, ranges: Ranges) -> None:
    put_varint(out, len(ranges))
    for off, size, va in ranges:
        put_varint(out, off)
        put_varint(out, size)
        put_varint(out, va)


def _get_ranges(buf: Buf, limit: int) -> Ranges:
    n = buf.varint()
    if n > MAX_RANGES:
        raise Corrupt("elf-map patch: too many ranges")
    out: Ranges = []
    last = 0
    for _ in range(n):
        off, size, va = buf.varint(), buf.varint(), buf.varint()
        if off < last or off + size > limit:
            raise Corrupt("elf-map patch: range outside its file or out of order")
        out.append((off, size, va))
        last = off + size
    return out


def put_map(out: bytearray, segments: Sequence[tuple[int, int]], relative: bool = False) -> None:
    """`relative` (the ELF_MAP2 modes): each shift as the difference from the previous one,
    which is a function's change in size, most often one byte where the shift takes three."""
    put_varint(out, len(segments))
    last = last_shift = 0
    for start, shift in segments:
        put_varint(out, start - last)
        step = shift - last_shift
        put_varint(out, (step << 1) ^ (step >> 63))
        last = start
        if relative:
            last_shift = shift


def get_map(buf: Buf, relative: bool = False) -> Map:
    n = buf.varint()
    if n > MAX_SEGMENTS:
        raise Corrupt("elf-map patch: too many map segments")
    segments = []
    start = last_shift = 0
    for _ in range(n):
        start += buf.varint()
        z = buf.varint()
        shift = last_shift + ((z >> 1) ^ -(z & 1))
        segments.append((start, shift))
        if relative:
            last_shift = shift
    return Map(segments)


def pack(old: bytes, new: bytes, inner: int, mode: int, segments: Sequence[tuple[int, int]],
         diff: Callable[[bytes, bytes, int], bytes]) -> bytes:
    """Header + `diff(normalised old, normalised new, -1)`, in a SPLIT mode x86split's payload
    of `diff(old part, new part, part)`; `segments` (start, shift) is the map.
    A TABLES mode falls back to its code-only mode where `tables_apply` says no."""
    if mode not in MODES + FILTERED_MODES + SPLIT_MODES:
        raise ValueError(f"unknown mode {mode}")
    old_ranges, new_ranges = code_ranges(old), code_ranges(new)
    normal_new = normalise_new(new, new_ranges, mode)
    if mode & TABLES and not tables_apply(new, new_ranges, normal_new):
        mode &= ~TABLES  # tables this transform would not restore exactly: the code only
        normal_new = normalise_new(new, new_ranges, mode)
    out = bytearray([inner, mode])
    _put_ranges(out, old_ranges)
    _put_ranges(out, new_ranges)
    put_map(out, segments, bool(mode & FILTERED))
    normal_old = normalise_old(old, old_ranges, mode, Map(segments))
    if mode & SPLIT:
        return bytes(out) + x86split.pack(normal_old, normal_new, old_ranges, new_ranges, diff)
    return bytes(out) + diff(bytes(normal_old), bytes(normal_new), -1)


def write_restored(data: bytes | bytearray, ranges: Ranges, mode: int, sink: Sink) -> None:
    """`restore_new` streamed: write `data` with its references turned back into displacements.

    Reads only `data` (the scan never looks behind a field it rewrote, so the values it
    decides on are the unmodified ones) and writes about STEP bytes at a time: no second
    copy of the new file."""
    view = memoryview(data)
    pending = bytearray()
    done = 0
    tables = _tables(data, ranges, mode)  # outside the code ranges: only `emit` writes them

    def emit(upto: int) -> None:
        nonlocal done
        while done < upto:
            if len(pending) >= STEP:
                sink.write(bytes(pending))
                pending.clear()
            take = min(upto, done + STEP - len(pending))
            for off, part in tables:
                if off < take and done < off + len(part):
                    if done < off:
                        take = off  # up to the table, then the table's restored bytes
                    else:
                        take = min(take, off + len(part))
                        pending.extend(part[done - off : take - off])
                        break
            else:
                pending.extend(view[done:take])
            done = take

    unpack, sunpack, rx, filtered = _U32.unpack_from, _S32.unpack_from, _FIELDS[mode], bool(mode & FILTERED)
    for start, length, va in ranges:
        emit(start)  # the inlined copy below then never crosses a table
        bias = va - start
        for m in rx.finditer(data, start, start + length):
            end = m.end()
            if not filtered or data[end - 5] not in _BRANCH_LAST:
                value = (unpack(data, end - 4)[0] - end - bias) & _MASK
            elif data[end - 1] in _TOPS:
                value = _wrap25(sunpack(data, end - 4)[0] - end - bias)
            else:
                continue  # left as it is: written with the bytes around it
            if len(pending) < STEP and end - done <= STEP:
                pending += view[done : end - 4]  # the common case, inlined
            else:
                emit(end - 4)
            pending += _U32.pack(value)
            done = end
    emit(len(data))
    if pending:
        sink.write(bytes(pending))


def apply(old: bytes | bytearray, patch: bytes | bytearray,
          apply_inner: Callable[[int, bytes, bytes, int | None], bytes],
          sink: Sink, size: int | None = None, modes: Sequence[int] = MODES) -> None:
    """Write the new file to `sink`; `apply_inner(codec, old, patch, size)` applies an inner
    patch (`size` None: the whole file's, bounded by the caller); `size`, the size the entry
    declares, must be the result's exactly; `modes`: those the codec allows (ELF_MAP: `MODES`,
    ELF_MAP2: and `FILTERED_MODES`, ELF_SPLIT: and `SPLIT_MODES`).

    A bytearray `old` is taken over: normalised in place, copied to bytes for the inner
    codec and emptied, so the base and its normalised copy are never both held while
    the inner patch runs; a bytearray `patch` likewise loses its header and is emptied.
    Memory then: the normalised base, the inner codec's output (and its own working
    memory) and about STEP bytes."""
    if len(old) > MAX_FILE:
        raise Corrupt("elf-map patch: base file above the codec's size limit")
    buf = Buf(cast(bytes, patch), "elf-map patch")  # Buf only takes a memoryview of it
    inner, mode = buf.u8(), buf.u8()
    if mode not in modes:
        raise Corrupt(f"elf-map patch: unknown mode {mode}")
    old_ranges = _get_ranges(buf, len(old))
    new_ranges = _get_ranges(buf, MAX_FILE)
    layout = get_map(buf, bool(mode & FILTERED))
    header = buf.pos
    del buf  # releases its view of `patch`, which may now shrink
    if isinstance(patch, bytearray):
        del patch[:header]
        inner_patch = bytes(patch)
        patch.clear()
    else:
        inner_patch = patch[header:]
    if isinstance(old, bytearray):
        map_old(old, old_ranges, mode, layout)
        normal = old
    else:
        normal = normalise_old(old, old_ranges, mode, layout)
    out: bytes | bytearray
    if mode & SPLIT:
        if len(normal) > x86split.SPLIT_MAX:
            raise Corrupt("elf-split patch: base file above the split streams' size limit")
        parts = x86split.split(normal, old_ranges)
        normal.clear()
        limit = x86split.SPLIT_MAX if size is None else min(size, x86split.SPLIT_MAX)
        out = x86split.apply(parts, inner_patch, new_ranges, limit, lambda o, p, n: apply_inner(inner, o, p, n))
    else:
        normal_old = bytes(normal)
        normal.clear()
        out = apply_inner(inner, normal_old, inner_patch, None)
        del normal_old
    if len(out) > MAX_FILE:
        raise Corrupt("elf-map patch: result above the codec's size limit")
    if size is not None and len(out) != size:
        raise Corrupt(f"elf-map patch: result of {len(out)} bytes, declared {size}")
    if new_ranges and new_ranges[-1][0] + new_ranges[-1][1] > len(out):
        raise Corrupt("elf-map patch: range outside the new file")
    write_restored(out, new_ranges, mode, sink)
