"""The data of a reup stream: the manifest, tree entries, codes and name rules.

Pure data, no I/O. Their byte encodings are in manifest.py and entries.py;
the layout is specified in docs/stream-format.md. Used by the receiver and
the encoder (reup.delta).
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field

from reup_receiver.errors import UnsafeName

HASH_LEN = 32  # characters of a store path's hash part
FILE_HASH_LEN = 16  # per-file check: the first 128 bits of the content's SHA-256


class Method(enum.IntEnum):
    LITERAL = 0  # next bytes of the stream-wide zstd literal stream; DATA follows
    COPY = 1  # the source file, byte for byte (after the optional hash rewrite)
    PATCH = 2  # the source file patched with a codec; DATA holds the patch


class Codec(enum.IntEnum):
    BSDIFF4 = 1
    HDIFFPATCH = 2
    ZSTD_PREFIX = 3  # a zstd frame compressed with the source as raw-content prefix
    BSDIFF_LZMA = 4  # bsdiff's blocks, LZMA2-compressed (bsdiffxz.py)
    ELF_X86 = 5  # an inner patch between branch-normalised x86-64 executables (elfx86.py)
    SOLID = 6  # not a patch: the next part of the mirror's solid zstd frame (solid.py)
    SOLID_LZMA = 7  # not a patch: the next files of the mirror's solid LZMA2 frame (solid.py)
    LITERAL_ELF = 8  # never in an entry: the receiver reads literal codec 2, LZMA_ELF (literal.py)
    ELF_MAP = 9  # an inner patch between x86-64 executables with references mapped old -> new (elfmap.py)
    LZMA_PREFIX = 10  # raw LZMA2 with the source preloaded as dictionary (lzmaprefix.py)
    SOLID_PYC = 11  # not a patch: a .pyc compiled on the device from a recipe in the SOLID_LZMA frame (pyc.py)
    ELF_MAP2 = 12  # ELF_MAP that may also use the filtered-branch modes (elfmap.FILTERED_MODES)
    ELF_SPLIT = 13  # ELF_MAP2 that may also code x86 instruction fields as streams (elfmap.SPLIT_MODES)


SOLID_CODECS = (Codec.SOLID, Codec.SOLID_LZMA, Codec.SOLID_PYC)


def solid_frame_codec(codec: Codec) -> Codec:
    """The frame a solid file's codec belongs to: SOLID_PYC files are parts of a SOLID_LZMA frame."""
    return Codec.SOLID_LZMA if codec == Codec.SOLID_PYC else codec


# The codecs a single patch may use; the SOLID ones code a mirror's files together, and
# LITERAL_ELF is only a capability in --status.
PATCH_CODECS = tuple(c for c in Codec if c not in (*SOLID_CODECS, Codec.LITERAL_ELF))
ELF_MAP_CODECS = (Codec.ELF_MAP, Codec.ELF_MAP2, Codec.ELF_SPLIT)  # one container (elfmap.py), growing modes


KIND_DIR, KIND_SYMLINK, KIND_FILE = 1, 2, 3
KIND_STORE_SYMLINK = 4  # on the wire only: a symlink to a table path + suffix
KIND_MIRROR = 5  # the whole tree mirrors a source path; per-file specs in `mirror`
F_EXECUTABLE = 0x01
F_REWRITE = 0x02  # apply the manifest's store-hash rewrite map to the source first
F_SAME_RELPATH = 0x04  # on the wire only: source_relpath equals relpath and is omitted
F_SOLID_TREE = 0x08  # MIRROR: the solid dictionary is every file of the source tree (solid.py)


@dataclass(frozen=True)
class PathEntry:
    """One store path the device must end up holding, with its Nix database row."""

    name: bytes  # base name "<hash>-<name>"
    nar_hash: bytes  # raw sha256 of the NAR serialisation
    nar_size: int
    references: tuple[int, ...]  # indices into Manifest.table
    deriver: bytes = b""  # base name of the .drv, or empty
    carried: bool = True  # False: the device has it staged already; no operations follow
    replace: bool = False  # the device's copy is broken: install this one over it


@dataclass
class Manifest:
    """What a stream installs. `table` = new paths, then `known` (already on the device)."""

    store_dir: bytes
    known: list[bytes]
    paths: list[PathEntry]
    toplevel: int  # index into table
    rewrites: list[tuple[int, int]] = field(default_factory=list)  # (old, new) table indices
    stream_bytes: int = 0
    literal: int = 0  # literal stream codec (literal.py)

    @property
    def table(self) -> list[bytes]:
        return [p.name for p in self.paths] + self.known

    def store_path(self, index: int) -> str:
        return os.fsdecode(self.store_dir + b"/" + self.table[index])

    def rewrite_map(self) -> dict[bytes, bytes]:
        table = self.table
        return {table[o][:HASH_LEN]: table[n][:HASH_LEN] for o, n in self.rewrites}


@dataclass(frozen=True)
class MirrorFile:
    """How one regular file of a mirrored tree is made (in the source's NAR order)."""

    method: Method
    sha256: bytes
    size: int = 0  # PATCH/LITERAL only; a COPY keeps the (rewritten) source's size
    codec: Codec | None = None
    data_len: int = 0


@dataclass(frozen=True)
class Entry:
    """One node of a new store path's tree, in NAR order. `relpath` b"" is the path itself."""

    kind: int
    relpath: bytes
    target: bytes = b""  # symlinks
    flags: int = 0  # files: F_*
    size: int = 0
    sha256: bytes = b""  # first FILE_HASH_LEN bytes of the content's SHA-256
    method: Method = Method.LITERAL
    source: int = -1  # table index of the source store path
    source_relpath: bytes = b""
    codec: Codec | None = None
    data_len: int = 0
    mirror: tuple[MirrorFile, ...] = ()  # MIRROR: specs of the source's kept files, in order
    skip: tuple[bytes, ...] = ()  # MIRROR: source relpaths left out (with their subtrees)

    @property
    def executable(self) -> bool:
        return bool(self.flags & F_EXECUTABLE)


# --- names -------------------------------------------------------------------


# Limits on trees (docs/device-invariants.md): no walk over a stream's tree ever recurses deeper
# than MAX_DEPTH, and every host path stays below PATH_MAX.
MAX_DEPTH = 128
MAX_RELPATH = 3072
MAX_NAME_PART = 211  # Nix's limit on the name after "<hash>-"


def check_component(name: bytes, what: str) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafeName(f"unsafe name {name!r} in {what}")


def split_relpath(relpath: bytes, what: str) -> list[bytes]:
    if relpath == b"":
        return []
    if len(relpath) > MAX_RELPATH:
        raise UnsafeName(f"path of {len(relpath)} bytes in {what} (limit {MAX_RELPATH})")
    parts = relpath.split(b"/")
    if len(parts) > MAX_DEPTH:
        raise UnsafeName(f"tree {len(parts)} levels deep in {what} (limit {MAX_DEPTH})")
    for part in parts:
        check_component(part, what)
    return parts


_NIX32_CHARS = frozenset(b"0123456789abcdfghijklmnpqrsvwxyz")
# What Nix accepts after "<hash>-" (its store-path name grammar).
_NAME_RE = re.compile(rb"[A-Za-z0-9+\-._?=]+")


def is_store_name(name: bytes) -> bool:
    try:
        check_store_name(name)
    except UnsafeName:
        return False
    return True


def check_store_name(name: bytes) -> None:
    """`<32 base-32 chars>-<name>`, as Nix's own parser accepts it; else UnsafeName."""
    check_component(name, "store path name")
    rest = name[HASH_LEN + 1 :]
    if (len(name) < HASH_LEN + 2 or name[HASH_LEN : HASH_LEN + 1] != b"-"
            or not all(c in _NIX32_CHARS for c in name[:HASH_LEN])
            or len(rest) > MAX_NAME_PART or rest.startswith(b".") or not _NAME_RE.fullmatch(rest)):
        raise UnsafeName(f"not a store path name: {name[:300]!r}")
