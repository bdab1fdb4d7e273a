"""Per-file coding decisions of the encoder: how each new file reaches the device.

`FileCoder.code` returns the stream entry for one new file plus its data
bytes. Today: whole-file dedup (by sha256 + executable bit) against the
device's holdings and everything earlier in the stream, else the stream-wide
zstd literal stream. The delta engine adds pairing, store-hash rewriting and
patch codecs here. Called by encode.py.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zstandard
from reup_receiver.model import F_EXECUTABLE, KIND_FILE, Entry, Method
from reup_receiver.nar import walk_nar_order

from ..nix import PathInfo

if TYPE_CHECKING:
    from .encode import DeltaStats

LITERAL_LEVEL = 19
LITERAL_WINDOW_LOG = 25  # 32 MiB: the receiver's decoder memory stays bounded


@dataclass(frozen=True)
class StoreFile:
    path: str  # store path
    relpath: bytes
    executable: bool
    size: int

    @property
    def host(self) -> bytes:
        return os.path.join(os.fsencode(self.path), self.relpath) if self.relpath else os.fsencode(self.path)


Key = tuple[bytes, bool]  # (sha256, executable)


class ContentIndex:
    """Where a (content, exec bit) already exists on the device or earlier in the stream.

    Device files are indexed by (size, exec) and hashed only when a new file of
    the same size shows up, so a large base costs a stat per file, not a read.
    """

    def __init__(self, base_paths: Sequence[str]) -> None:
        self.by_key: dict[Key, tuple[str, bytes]] = {}
        self.unhashed: dict[tuple[int, bool], list[StoreFile]] = {}
        for path in base_paths:
            for f in iter_files(path):
                self.unhashed.setdefault((f.size, f.executable), []).append(f)

    def add(self, key: Key, f: StoreFile) -> None:
        self.by_key.setdefault(key, (f.path, f.relpath))

    def find(self, key: Key, size: int) -> tuple[str, bytes] | None:
        for f in self.unhashed.pop((size, key[1]), []):
            with open(f.host, "rb") as fh:
                self.add((hashlib.sha256(fh.read()).digest(), f.executable), f)
        return self.by_key.get(key)


def iter_files(path: str) -> list[StoreFile]:
    out = []
    for parts, st in walk_nar_order(path):
        if stat.S_ISREG(st.st_mode):
            out.append(StoreFile(path, b"/".join(parts), bool(st.st_mode & 0o100), st.st_size))
    return out


class FileCoder:
    def __init__(
        self,
        held: dict[str, PathInfo],
        target: dict[str, PathInfo],
        missing: Sequence[str],
        stats: DeltaStats,
    ) -> None:
        self.index = ContentIndex(sorted(held))
        self.stats = stats
        self.literal = zstandard.ZstdCompressor(
            compression_params=zstandard.ZstdCompressionParameters.from_level(
                LITERAL_LEVEL, window_log=LITERAL_WINDOW_LOG, enable_ldm=True
            )
        ).compressobj()

    def code(self, f: StoreFile, table: Callable[[str], int]) -> tuple[Entry, bytes, str]:
        """(entry, data, kind) for one new file."""
        with open(f.host, "rb") as fh:
            content = fh.read()
        sha = hashlib.sha256(content).digest()
        key = (sha, f.executable)
        flags = F_EXECUTABLE if f.executable else 0
        self.stats.files += 1
        found = self.index.find(key, len(content))
        self.index.add(key, f)
        if found is not None:
            src_path, src_rel = found
            entry = Entry(KIND_FILE, f.relpath, flags=flags, size=len(content), sha256=sha,
                          method=Method.COPY, source=table(src_path), source_relpath=src_rel)
            return entry, b"", "dedup"
        data = self.literal.compress(content) + self.literal.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        entry = Entry(KIND_FILE, f.relpath, flags=flags, size=len(content), sha256=sha,
                      method=Method.LITERAL, data_len=len(data))
        return entry, data, "literal"

    def finish(self) -> None:
        """Nothing buffered: every file's literal data was flushed with it."""
