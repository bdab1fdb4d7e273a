"""The encoder's side of the literal stream (see reup_receiver/literal.py for the format).

Small literal content goes into one zstd stream flushed per file (a few bytes
of overhead per file). From `LZMA_MIN` bytes of literal content on, the
stream uses groups of x86-filtered LZMA2, which on this project's corpus is
~11% smaller than zstd -19 and ~2% smaller than `xz -9` of the whole export;
where the device lists `literal_elf`, x86-64 executables in them first have
their RIP-relative operands normalised (LZMA_ELF, another ~6-8% on executables).
`LiteralEncoder.plan` sees every literal file in stream order before any is
emitted (the encoder resolves all decisions first), so a group's compressed
bytes can ride with its first file. With the controller's `LiteralMemo`, the
leading files from store paths an earlier stream already carried close a group
of their own, and those groups' bytes are taken from (or left in) the memo:
a per-device system's fresh stream then compresses only what is its own.
Called by strategy.py.
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import zstandard
from reup_receiver.format import elfstream, elfx86
from reup_receiver.format.literal import (
    LITERAL_LZMA_ELF,
    LITERAL_LZMA_X86,
    LITERAL_ZSTD,
    dict_log_for,
    lzma_filters,
)

from reup.delta.literalmemo import LiteralMemo, group_key

ZSTD_LEVEL = 19
ZSTD_WINDOW_LOG = 25  # 32 MiB: the receiver's decoder memory stays bounded
LZMA_MIN = 256 << 10
MEMO_MIN = 16 << 10  # shared literal content from which groups are cut for the memo
_EM_X86_64 = 62
GROUP_MAX = 32 << 20  # a group's content; its compressed bytes are held by the receiver


def _read(path: bytes) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def elf_ranges(data: bytes) -> elfx86.Ranges:
    """LZMA_ELF normalises x86-64 ELF64 files up to elfx86.MAX_FILE (they are held whole here)."""
    if len(data) > elfx86.MAX_FILE or len(data) < 64 or struct.unpack_from("<H", data, 18)[0] != _EM_X86_64:
        return []
    return elfx86.exec_ranges(data)


class LiteralEncoder:
    def __init__(self, elf: bool = True, memo: LiteralMemo | None = None) -> None:
        """`elf`: the device applies LZMA_ELF (it lists `literal_elf`); `memo`: the controller's."""
        self.elf = elf
        self.memo = memo
        self.codec = LITERAL_ZSTD
        self.zstd: zstandard.ZstdCompressionObj | None = None
        self.groups: dict[bytes, _Group] = {}  # first file -> its group

    def plan(self, files: Sequence[tuple[bytes, int, bytes]], shared: int = 0) -> None:
        """All literal files (host path, size, SHA-256) in stream order; the first `shared` come
        from store paths an earlier stream carried (with a memo: they form groups of their own).

        Windows and dictionaries are sized to the content: the receiver's decoder
        allocates them whole, whatever the data.
        """
        total_size = sum(size for _, size, _ in files)
        if self.memo is None or sum(size for _, size, _ in files[:shared]) < MEMO_MIN:
            shared = 0
        if total_size < LZMA_MIN and not shared:
            window_log = max(17, min(ZSTD_WINDOW_LOG, total_size.bit_length()))
            self.zstd = zstandard.ZstdCompressor(
                compression_params=zstandard.ZstdCompressionParameters.from_level(
                    ZSTD_LEVEL, window_log=window_log, enable_ldm=True
                )
            ).compressobj()
            return
        self.codec = LITERAL_LZMA_ELF if self.elf else LITERAL_LZMA_X86
        group = _Group(memo=shared > 0)
        for index, (path, size, sha) in enumerate(files):
            if shared and index == shared:  # the shared run ends: its groups are closed
                if group.files:
                    self.groups[group.files[0]] = group
                group = _Group(memo=False)
            if size == 0:
                continue  # empty files need no data and never start a group
            if group.files and group.size + size > GROUP_MAX:
                self.groups[group.files[0]] = group
                group = _Group(memo=group.memo)
            group.files.append(path)
            group.shas.append(sha)
            group.size += size
        if group.files:
            self.groups[group.files[0]] = group

    def data(self, path: bytes) -> bytes:
        """The DATA to send with this literal file."""
        if self.codec == LITERAL_ZSTD:
            assert self.zstd is not None, "plan() first"
            return self.zstd.compress(_read(path)) + self.zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        group = self.groups.get(path)
        if group is None:
            return b""  # inside a group, or empty
        dict_log = dict_log_for(group.size)
        key = group_key(self.codec, dict_log, group.shas) if group.memo and self.memo is not None else None
        if key is not None and self.memo is not None and (found := self.memo.get(key)) is not None:
            return found
        data = self._compress(group.files, dict_log)
        if key is not None and self.memo is not None:
            self.memo.put(key, data)
        return data

    def _compress(self, files: list[bytes], dict_log: int) -> bytes:
        enc = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=lzma_filters(dict_log, self.codec))
        parts = []
        elf_map: list[tuple[int, elfx86.Ranges]] = []
        for index, p in enumerate(files):  # a group's files are all non-empty
            content = _read(p)
            ranges = elf_ranges(content) if self.codec == LITERAL_LZMA_ELF else []
            if ranges:
                content = bytes(elfx86.normalise(content, ranges, elfx86.RIP))
                elf_map.append((index, ranges))
            parts.append(enc.compress(content))
        head = bytearray([dict_log])
        if self.codec == LITERAL_LZMA_ELF:
            elfstream.put_map(head, elf_map)
        return bytes(head) + b"".join(parts) + enc.flush()


@dataclass
class _Group:
    """Consecutive literal files compressed as one LZMA2 stream; `memo`: all from shared paths."""

    memo: bool
    files: list[bytes] = field(default_factory=list)
    shas: list[bytes] = field(default_factory=list)
    size: int = 0
