"""ELF tables that hold code addresses, moved with the code for ELF_MAP2's mode bit TABLES.

When code moves, not only its call and RIP-relative fields change: every symbol's
value (`.symtab`, `.dynsym`), every relocation's offset and R_X86_64_RELATIVE addend,
the unwind table's sorted (pc, FDE) pairs (`.eh_frame_hdr`) and each FDE's pc-relative
start and CIE pointer (`.eh_frame`) change too, although what they describe did not.
On the old file (`map_old`) each such address becomes the new address of what it names,
through elfmap's map; on the new file (`normalise_new`) the pc-relative and relative ones
become absolute; on both, each FDE offset of `.eh_frame_hdr` and each `.symtab` name
offset become the distance from the previous one (a name added or dropped shifts all
later ones). An entry that did not change then reads the same on both sides. On libzstd
1.5.5 -> 1.5.6 this took 4% off the patch (165,135 -> 158,623 B), on ruff 0.6.8 -> 0.6.9
10%.

The old file needs no inverse (the receiver maps its own copy as the encoder did). The
new file's changed sections are restored by `restored`, which reads only fields the
transform keeps (section headers, `.eh_frame` record lengths, the `.eh_frame_hdr`
encodings and count), so the inverse is exact; every transform is a bijection of its field (a CIE
pointer stays non-zero). `regions` names the changed sections; the encoder uses the bit only
where they do not overlap the code ranges and read the same in the normalised file, and
the receiver refuses a patch where they overlap. Called by reup_receiver.format.elfmap.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

_SHT_SYMTAB, _SHT_RELA, _SHT_DYNSYM = 2, 4, 11
_R_RELATIVE, _R_IRELATIVE = 8, 37
_SHN_LORESERVE = 0xFF00
_M32, _M64 = 0xFFFFFFFF, (1 << 64) - 1
_HDR_ENCODINGS = b"\x01\x1b\x03\x3b"  # version 1, pcrel sdata4 pointer, udata4 count, datarel sdata4 table

Section = tuple[bytes, int, int, int, int]  # name, type, addr, offset, size (within the file)
Header = tuple[bytes, int, int, int, int, int, int, int]  # name, type, flags, addr, offset, size, link, entsize
_PT_LOAD = 1


def loads(data: bytes | bytearray) -> list[tuple[int, int, int]]:
    """(offset, vaddr, filesz) of a little-endian ELF64's PT_LOAD segments; [] for anything else."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if phentsize < 56 or phoff + phnum * phentsize > len(data):
        return []
    out = []
    for i in range(phnum):
        p_type, _flags, off, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            out.append((off, vaddr, filesz))
    return out


def section_headers(data: bytes | bytearray, in_file: bool = False) -> list[Header]:
    """The section headers of a little-endian ELF64 (sizes as declared; `in_file`: only sections
    with content inside the file and a name that is); [] for anything else."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        return []
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = raw[shstrndx][4]
    out = []
    for name, sh_type, flags, addr, off, size, link, _info, _align, entsize in raw:
        if in_file and (sh_type == 8 or off + size > len(data) or names + name >= len(data)):
            continue  # NOBITS, or not in the file
        end = data.find(b"\0", names + name)
        if end < 0:  # no terminator: to the end of the file (in_file), or no name
            end = len(data) if in_file else names + name
        label = bytes(data[names + name : end])
        out.append((label, sh_type, flags, addr, off, size, link, entsize))
    return out


def sections(data: bytes | bytearray) -> list[Section]:
    """A little-endian ELF64's sections that lie inside the file; [] for anything else."""
    return [(name, sh_type, addr, off, size) for name, sh_type, _flags, addr, off, size, _link, _entsize
            in section_headers(data, in_file=True)]


def _changed(name: bytes, sh_type: int) -> bool:
    """Whether `normalise_new` changes a section: the unwind tables and `.symtab`."""
    return name in (b".eh_frame_hdr", b".eh_frame") or sh_type == _SHT_SYMTAB


def regions(data: bytes | bytearray) -> list[tuple[int, int]]:
    """(offset, size) of the sections `normalise_new` changes."""
    return sorted((off, size) for name, sh_type, _, off, size in sections(data) if _changed(name, sh_type))


def _name_steps(buf: bytearray, off: int, size: int, sign: int) -> None:
    """`.symtab` st_name -> the difference from the previous entry's (raw values, so the
    restore runs in order): linkers lay `.strtab` out in symbol order, so a name that was
    added or dropped moves every later offset but changes only its own difference."""
    previous = 0
    for at in range(off, off + size - 23, 24):
        value, = struct.unpack_from("<I", buf, at)
        if sign > 0:
            struct.pack_into("<I", buf, at, (value - previous) & _M32)
            previous = value
        else:
            previous = (value + previous) & _M32
            struct.pack_into("<I", buf, at, previous)


def _cie_pointer(value: int, pos: int) -> int:
    """A non-zero CIE pointer <-> the CIE's offset + 1: an involution of the non-zero values.

    `pos + 1 - value` is zero only for value == pos + 1, which therefore keeps its value,
    the one no other value gives."""
    return value if value == pos + 1 else (pos + 1 - value) & _M32


def _eh_frame(buf: bytearray, addr: int, off: int, size: int, pc: Callable[[int, int], int], _sign: int) -> None:
    """Every FDE: CIE pointer as in `_cie_pointer`, pc_begin (pcrel sdata4) through `pc`."""
    p, end = off, off + size
    while p + 8 <= end:
        length, cie = struct.unpack_from("<II", buf, p)
        if length in (0, _M32) or p + 4 + length > end:
            return  # the terminator, a 64-bit record or a damaged one: the rest stays as it is
        if cie and length >= 12:
            struct.pack_into("<I", buf, p + 4, _cie_pointer(cie, p + 4 - off))
            field = p + 8
            value, = struct.unpack_from("<I", buf, field)
            struct.pack_into("<I", buf, field, pc(value, addr + field - off) & _M32)
        p += 4 + length


def _eh_frame_hdr(buf: bytearray, addr: int, off: int, size: int, pc: Callable[[int, int], int], sign: int) -> None:
    """The binary-search table: each pc through `pc`, each FDE offset as the difference
    from the previous one (raw values, so the restore runs in order)."""
    if size < 12 or bytes(buf[off : off + 4]) != _HDR_ENCODINGS:
        return
    count, = struct.unpack_from("<I", buf, off + 8)
    count = min(count, (size - 12) // 8)
    previous = 0
    for k in range(count):
        at = off + 12 + 8 * k
        loc, fde = struct.unpack_from("<II", buf, at)
        struct.pack_into("<I", buf, at, pc(loc, addr) & _M32)
        if sign > 0:
            struct.pack_into("<I", buf, at + 4, (fde - previous) & _M32)
            previous = fde
        else:
            previous = (fde + previous) & _M32
            struct.pack_into("<I", buf, at + 4, previous)


def _signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def _pointers(buf: bytearray) -> Callable[[int], int | None]:
    """Virtual address -> file offset of an 8-byte word inside a PT_LOAD segment, or None."""
    segments = loads(buf)

    def offset(va: int) -> int | None:
        for off, vaddr, filesz in segments:
            if vaddr <= va and va + 8 <= vaddr + filesz and off + (va - vaddr) + 8 <= len(buf):
                return off + va - vaddr
        return None
    return offset


def map_old(buf: bytearray, where: Callable[[int], int]) -> None:
    """In place: the old file's addresses -> `where` (the new address of what they name);
    a RELATIVE relocation's target word too where it holds the addend (GNU ld and lld
    write it there: ruff has 43 K such pointers in its vtables)."""
    offset = _pointers(buf)
    for name, sh_type, addr, off, size in sections(buf):
        if sh_type in (_SHT_SYMTAB, _SHT_DYNSYM):
            for at in range(off, off + size - 23, 24):
                shndx, value = struct.unpack_from("<HQ", buf, at + 6)
                if value and 0 < shndx < _SHN_LORESERVE:
                    struct.pack_into("<Q", buf, at + 8, where(value) & _M64)
            if sh_type == _SHT_SYMTAB:
                _name_steps(buf, off, size, 1)
        elif sh_type == _SHT_RELA:
            for at in range(off, off + size - 23, 24):
                r_offset, r_info, addend = struct.unpack_from("<QQQ", buf, at)
                struct.pack_into("<Q", buf, at, where(r_offset) & _M64)
                if r_info & _M32 in (_R_RELATIVE, _R_IRELATIVE):
                    struct.pack_into("<Q", buf, at + 16, where(addend) & _M64)
                    word = offset(r_offset)
                    if word is not None and struct.unpack_from("<Q", buf, word)[0] == addend:
                        struct.pack_into("<Q", buf, word, where(addend) & _M64)
        elif name == b".eh_frame":
            _eh_frame(buf, addr, off, size, lambda v, va: where(va + _signed(v)), 1)
        elif name == b".eh_frame_hdr":
            _eh_frame_hdr(buf, addr, off, size, lambda v, va: where(va + _signed(v)), 1)


def _new(buf: bytearray, section: Section, base: int, sign: int) -> None:
    """One section's new-file transform (`sign` 1) or its inverse (-1); `base`: the file
    offset of buf[0]."""
    name, sh_type, addr, off, size = section
    if sh_type == _SHT_SYMTAB:
        _name_steps(buf, off - base, size, sign)
    elif name == b".eh_frame":
        _eh_frame(buf, addr, off - base, size, lambda v, va: v + sign * va, sign)
    elif name == b".eh_frame_hdr":
        _eh_frame_hdr(buf, addr, off - base, size, lambda v, va: v + sign * va, sign)


def normalise_new(buf: bytearray) -> None:
    """In place: pc-relative unwind fields -> absolute, FDE offsets and symbol names ->
    differences."""
    for section in sections(buf):
        if _changed(section[0], section[1]):
            _new(buf, section, 0, 1)


def restored(data: bytes | bytearray) -> list[tuple[int, bytes]]:
    """(offset, bytes) of the changed sections as they were before `normalise_new`, in file order."""
    out = []
    for section in sorted(sections(data), key=lambda s: s[3]):
        if _changed(section[0], section[1]):
            off, size = section[3], section[4]
            copy = bytearray(data[off : off + size])
            _new(copy, section, off, -1)
            out.append((off, bytes(copy)))
    return out


def invertible(new: bytes, code: list[tuple[int, int]], normal: bytes | bytearray | None = None) -> bool:
    """Whether the tables' transform inverts exactly on `new` (the encoder's check): the
    section headers, their names and the tables lie outside the `code` (offset, size)
    ranges (so the receiver reads them alike from the normalised file) and `restored`
    gives their bytes back; `normal`: `new` normalised (code and tables), if at hand."""
    if not sections(new):
        return False  # also: the header table lies inside the file
    shoff, = struct.unpack_from("<Q", new, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", new, 0x3A)
    names_off, names_size = struct.unpack_from("<QQ", new, shoff + shstrndx * shentsize + 0x18)
    spans = sorted([(off, off + size) for off, size in code] + [(shoff, shoff + shnum * shentsize)]
                   + [(names_off, names_off + names_size)] + [(off, off + size) for off, size in regions(new)])
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        return False
    if normal is None:
        normal = bytearray(new)
        normalise_new(normal)
    if regions(normal) != regions(new):
        return False
    return all(new[off : off + len(part)] == part for off, part in restored(bytes(normal)))
