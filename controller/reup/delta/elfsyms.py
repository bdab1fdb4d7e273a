"""Symbol anchors for ELF_MAP's layout map: where the same function or object sits in two builds.

An unstripped ELF (nixpkgs strips debug sections only, so `.symtab` usually stays)
names its functions and objects; a name defined once in each file pairs the old
address with the new one exactly, where reup.delta.elfmap's content anchors only
sample. PLT stubs and GOT slots have no symbols, yet in a `-fPIC` shared library
most calls go to a PLT stub: they are named here after the dynamic symbol their
relocation binds (`name@plt`, `name@got`), so a stub that moved because an import
was added still maps to itself. Everything is read defensively: a malformed table
gives no anchors, never an error. Called by reup.delta.elfmap.
"""

from __future__ import annotations

import re
import struct

from reup_receiver.format import elftables
from reup_receiver.format.elftables import Header

_SHT_SYMTAB, _SHT_RELA, _SHT_DYNSYM = 2, 4, 11
_STT_OBJECT, _STT_FUNC = 1, 2
_SHF_EXECINSTR = 0x4
_JMP_GOT = re.compile(rb"\xff\x25(....)", re.DOTALL)  # jmp *slot(%rip), the core of every PLT stub

def _headers(data: bytes) -> list[Header]:
    """The section headers, sizes cut to the file."""
    return [(name, sh_type, flags, addr, off, min(size, max(0, len(data) - off)), link, entsize)
            for name, sh_type, flags, addr, off, size, link, entsize in elftables.section_headers(data)]


def _cstr(data: bytes, start: int) -> bytes:
    end = data.find(b"\0", start)
    return data[start:end] if 0 <= start < len(data) and end >= 0 else b""


def _symbol_names(data: bytes, heads: list[Header], index: int) -> list[tuple[bytes, int, int, int]]:
    """(name, type, section index, value) of every entry of symbol table `index`."""
    if not 0 <= index < len(heads) or heads[index][1] not in (_SHT_SYMTAB, _SHT_DYNSYM):
        return []
    _, _, _, _, off, size, link, _ = heads[index]
    if not 0 <= link < len(heads):
        return []
    strings = heads[link][4]
    out = []
    for k in range(size // 24):
        st_name, st_info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", data, off + 24 * k)
        out.append((_cstr(data, strings + st_name), st_info & 15, shndx, value))
    return out


def _relocated_slots(data: bytes, heads: list[Header]) -> dict[int, bytes]:
    """GOT slot address -> the dynamic symbol its relocation names."""
    out: dict[int, bytes] = {}
    for _, sh_type, _, _, off, size, link, _ in heads:
        if sh_type != _SHT_RELA:
            continue
        names = _symbol_names(data, heads, link)
        for k in range(size // 24):
            r_offset, r_info, _addend = struct.unpack_from("<QQq", data, off + 24 * k)
            sym = r_info >> 32
            if 0 < sym < len(names) and names[sym][0]:
                out[r_offset] = names[sym][0]
    return out


def symbols(data: bytes) -> dict[bytes, int]:
    """Name -> address of the functions, objects, PLT stubs and GOT slots defined once."""
    heads = _headers(data)
    seen: dict[bytes, set[int]] = {}
    for i, (_, sh_type, *_rest) in enumerate(heads):
        if sh_type in (_SHT_SYMTAB, _SHT_DYNSYM):
            for name, kind, shndx, value in _symbol_names(data, heads, i):
                if name and value and shndx and kind in (_STT_OBJECT, _STT_FUNC):
                    seen.setdefault(name, set()).add(value)
    slots = _relocated_slots(data, heads)
    for slot, name in slots.items():
        seen.setdefault(name + b"@got", set()).add(slot)
    for label, _, flags, addr, off, size, _, entsize in heads:
        if not flags & _SHF_EXECINSTR or not label.startswith(b".plt"):
            continue
        for m in _JMP_GOT.finditer(data, off, off + size):
            at = addr + m.start() - off
            bound = slots.get(at + 6 + struct.unpack("<i", m.group(1))[0])
            if bound is not None:  # the stub starts at its entry's start (entries are entsize apart)
                seen.setdefault(bound + b"@plt", set()).add(at - (at - addr) % entsize if entsize else at)
    return {name: min(values) for name, values in seen.items() if len(values) == 1}


def pairs(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """(old address, shift to the new one) for every name defined once in both files."""
    old_syms, new_syms = symbols(old), symbols(new)
    return sorted((addr, new_syms[name] - addr) for name, addr in old_syms.items() if name in new_syms)
