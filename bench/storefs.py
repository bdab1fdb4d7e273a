"""Walking store-path trees: files, symlinks, directories, content keys.

Used by the file-level baseline (`bench.baseline_files`) and the corpus summary in
`bench.run`. Works on any directory tree, so tests use small temporary trees.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One node of a store path, relative to the store path ("" is the path itself)."""

    rel: str
    kind: str  # "d", "f" or "l"
    executable: bool = False
    size: int = 0
    target: str = ""  # symlink target


def walk(root: str) -> Iterator[Entry]:
    """Entries of a tree in sorted (NAR) order; the root itself comes first."""
    st = os.lstat(root)
    yield _entry("", root, st)
    if stat.S_ISDIR(st.st_mode):
        yield from _walk_dir(root, "")


def _walk_dir(root: str, rel: str) -> Iterator[Entry]:
    here = os.path.join(root, rel) if rel else root
    for name in sorted(os.listdir(here)):
        sub = f"{rel}/{name}" if rel else name
        full = os.path.join(root, sub)
        st = os.lstat(full)
        yield _entry(sub, full, st)
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(root, sub)


def _entry(rel: str, full: str, st: os.stat_result) -> Entry:
    if stat.S_ISLNK(st.st_mode):
        return Entry(rel, "l", target=os.readlink(full))
    if stat.S_ISDIR(st.st_mode):
        return Entry(rel, "d")
    if stat.S_ISREG(st.st_mode):
        return Entry(rel, "f", executable=bool(st.st_mode & 0o111), size=st.st_size)
    raise ValueError(f"{full}: unsupported file type in a store path")


def join(root: str, rel: str) -> str:
    return os.path.join(root, rel) if rel else root


def content_key(path: str, executable: bool) -> bytes:
    """SHA-256 of the content plus the executable bit (the whole-file dedup identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest() + (b"x" if executable else b"-")


def index_files(roots: Iterable[str]) -> dict[bytes, str]:
    """Content key -> one file path holding it, over every regular file under `roots`."""
    out: dict[bytes, str] = {}
    for root in roots:
        for e in walk(root):
            if e.kind == "f":
                full = join(root, e.rel)
                out.setdefault(content_key(full, e.executable), full)
    return out


@dataclass(frozen=True)
class TreeStats:
    files: int
    bytes: int
    largest: int
    largest_rel: str


def tree_stats(roots: Iterable[str]) -> TreeStats:
    files = total = largest = 0
    largest_rel = ""
    for root in roots:
        for e in walk(root):
            if e.kind != "f":
                continue
            files += 1
            total += e.size
            if e.size > largest:
                largest, largest_rel = e.size, join(root, e.rel)
    return TreeStats(files, total, largest, largest_rel)
