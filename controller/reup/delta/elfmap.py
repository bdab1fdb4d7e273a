"""Encoder side of ELF_MAP (reup_receiver.format.elfmap): align two builds of an executable.

The map from old to new virtual addresses comes from anchors: the 24 bytes after
each `ret` (C3) opcode — a content-defined sample, the same in both files where
the code is the same — that occur exactly once in each file. Sorted by old
address, anchors sharing one shift form a segment; a shift seen at a single
anchor is noise and dropped. A segment starts just above the last anchor of
the previous one, so an address takes the shift of the next anchor above it:
calls point at function entries, and the next anchor is then in the same
function. Section starts with the same name in both files are anchors too, so
references into data and .bss move with their sections. Sampling keeps this to
one dictionary over ~1% of the positions (0.2 s on a 30 MB binary).

Where both files have symbols (reup.delta.elfsyms: functions, objects, PLT stubs and
GOT slots) and these give the finer map, they are the anchors instead, each exact: a
segment starts at each paired symbol; unique 16-byte strings after a zero byte in the
data sections add anchors for string literals and tables, which have no symbols. A segment no reference of the old file points into costs map bytes and changes
nothing, so it is merged into the one before it (libzstd 1.5.5 -> 1.5.6: the symbol map
made the patch 1% smaller with the pruning, its own cost eaten without).
Called by reup.delta.codecs.
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Callable

from reup_receiver.format import elfmap, elftables

from reup.delta import elfsyms

_ANCHOR = re.compile(rb"\xc3", re.DOTALL)
_KEY = 24


def _unique_keys(data: bytes) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for m in _ANCHOR.finditer(data):
        pos = m.end()
        key = data[pos : pos + _KEY]
        out[key] = -1 if key in out else pos
    return out


def _vaddr(segs: list[tuple[int, int, int]], off: int) -> int | None:
    for s_off, s_va, s_size in segs:
        if s_off <= off < s_off + s_size:
            return off - s_off + s_va
    return None


def _section_shifts(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """(old address, shift) of each allocated section the new file has by the same name."""
    def addresses(data: bytes) -> dict[bytes, int]:
        return {name: addr for name, _type, _flags, addr, *_ in elftables.section_headers(data) if addr}

    new_addrs = addresses(new)
    return [(addr, new_addrs[name] - addr) for name, addr in addresses(old).items() if name in new_addrs]


MIN_SYMBOLS = 16  # fewer paired symbols: the content anchors
# Above: the content anchors only. Reading the symbols and relocations and pruning by the
# references cost ~1.5 s on a 30 MB executable (ruff), whose Rust names pair few (the
# mangled names carry a hash that changes between versions).
SYMBOLS_MAX = 16 << 20


def symbol_map(old: bytes, new: bytes, data: bool = True) -> list[tuple[int, int]]:
    """(start, shift) segments from paired symbols and sections (and with `data`, the data
    sections' content anchors); [] with too few symbols."""
    pairs = elfsyms.pairs(old, new)
    if len(pairs) < MIN_SYMBOLS:
        return []
    pairs += _section_shifts(old, new)
    shifts: dict[int, int] = {}
    if data:
        new_data = _data_keys(new)
        shifts.update((va, new_data[key] - va) for key, va in _data_keys(old).items() if key in new_data)
    shifts.update(pairs)  # a symbol outranks a content anchor at the same address
    segments: list[tuple[int, int]] = []
    for va, shift in sorted(shifts.items()):
        if not segments or segments[-1][1] != shift:
            segments.append((va, shift))
    return segments


_DATA_ANCHOR = re.compile(rb"\0(?=[^\0])")


def _data_keys(data: bytes) -> dict[bytes, int]:
    """Unique 16-byte strings after a zero byte in `.rodata*`/`.data*` -> their addresses:
    string literals and tables have no symbols, yet the code points at them."""
    seen: dict[bytes, int] = {}
    for name, _, addr, off, size in elftables.sections(data):
        if name.startswith((b".rodata", b".data")):
            for m in _DATA_ANCHOR.finditer(data, off, off + size - _DATA_KEY):
                key = data[m.end() : m.end() + _DATA_KEY]
                seen[key] = -1 if key in seen else addr + m.end() - off
    return {key: va for key, va in seen.items() if va >= 0}


_DATA_KEY = 16


def targets(data: bytes, mode: int) -> list[int]:
    """Sorted addresses the references of `data` point to, as elfmap.map_old reads them."""
    rx = elfmap._FIELDS[mode]
    out = []
    for start, length, va in elfmap.code_ranges(data):
        bias = va - start
        for m in rx.finditer(data, start, start + length):
            end = m.end()
            if mode & elfmap.FILTERED and data[end - 5] in elfmap._BRANCH_LAST and data[end - 1] not in (0, 0xFF):
                continue
            out.append(end + bias + struct.unpack_from("<i", data, end - 4)[0])
    if mode & elfmap.TABLES:  # and every address the tables hold, as map_old asks for them
        def record(va: int) -> int:
            out.append(va)
            return va
        elftables.map_old(bytearray(data), record)
    out.sort()
    return out


def prune(segments: list[tuple[int, int]], points: list[int]) -> list[tuple[int, int]]:
    """`segments` without those no point falls in (their range joins the segment before)."""
    out: list[tuple[int, int]] = []
    for i, (start, shift) in enumerate(segments):
        stop = segments[i + 1][0] if i + 1 < len(segments) else 1 << 64
        k = bisect.bisect_left(points, start)
        referenced = k < len(points) and points[k] < stop
        if not out or (referenced and out[-1][1] != shift):
            out.append((start, shift))
    return out


def content_map(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """(start, shift) segments from content anchors, sorted by start: old address -> new."""
    old_segs, new_segs = elfmap.loads(old), elfmap.loads(new)
    new_keys = _unique_keys(new)
    pairs: list[tuple[int, int]] = []
    for key, pos in _unique_keys(old).items():
        other = new_keys.get(key, -1)
        if pos < 0 or other < 0:
            continue
        va_old, va_new = _vaddr(old_segs, pos), _vaddr(new_segs, other)
        if va_old is not None and va_new is not None:
            pairs.append((va_old, va_new - va_old))
    pairs += _section_shifts(old, new)
    pairs.sort()
    kept = [p for i, p in enumerate(pairs)
            if (i and pairs[i - 1][1] == p[1]) or (i + 1 < len(pairs) and pairs[i + 1][1] == p[1])]
    segments: list[tuple[int, int]] = []
    last = -1
    for va, shift in kept:
        if not segments or segments[-1][1] != shift:
            segments.append((last + 1, shift))
        last = va
    return segments[: elfmap.MAX_SEGMENTS]


def layout_map(old: bytes, new: bytes, mode: int | None = None) -> list[tuple[int, int]]:
    """The map ELF_MAP sends: from symbols where they give more segments than the content
    anchors (pruned to the segments `mode`'s references point into), else from content.

    Rust's mangled names carry a hash that changes between versions: ruff 0.6.8 -> 0.6.9
    pairs 188 segments that way against 1,371 from content, whose map is the better one."""
    content = content_map(old, new)
    if max(len(old), len(new)) > SYMBOLS_MAX:
        return content
    # Symbols against content anchors, without the data anchors: counting those picked the
    # symbol map for pydantic-core 2.23.3 -> 2.23.4, 43% larger than the content one (71 KB).
    if len(symbol_map(old, new, data=False)) <= len(content):
        return content
    segments = symbol_map(old, new)
    if mode is not None:
        segments = prune(segments, targets(old, mode))
    return segments[: elfmap.MAX_SEGMENTS]


def pack(old: bytes, new: bytes, inner: int, mode: int, diff: Callable[[bytes, bytes, int], bytes]) -> bytes:
    """An ELF_MAP patch with `inner` between the normalised files (or, in a SPLIT mode, their
    x86split parts: `diff(old, new, part)`, part -1 for the whole file)."""
    return elfmap.pack(old, new, inner, mode, layout_map(old, new, mode), diff)
