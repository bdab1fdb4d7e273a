"""Nix archive (NAR) hashing and Nix's hash notations.

`NarHasher` computes a path's NAR hash incrementally from the entries of a
stream in NAR order, so the receiver verifies a path while writing it without
reading it back. `nar_hash_tree` hashes an existing tree (tests, resume checks).
`parse_hash` / `to_nix32` convert between Nix's notations. Used by receive.py,
the encoder and the tests.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import struct

from reup_receiver.errors import Corrupt

_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
_U64 = struct.Struct("<Q")


def to_nix32(digest: bytes) -> str:
    n = len(digest)
    length = (n * 8 - 1) // 5 + 1
    out = []
    for pos in range(length - 1, -1, -1):
        b = pos * 5
        i, j = divmod(b, 8)
        c = digest[i] >> j
        if i + 1 < n:
            c |= digest[i + 1] << (8 - j)
        out.append(_NIX32[c & 0x1F])
    return "".join(out)


def from_nix32(text: str) -> bytes:
    n = len(text) * 5 // 8
    out = bytearray(n)
    for pos, ch in enumerate(reversed(text)):
        digit = _NIX32.index(ch)
        b = pos * 5
        i, j = divmod(b, 8)
        out[i] |= (digit << j) & 0xFF
        if i + 1 < n:
            out[i + 1] |= digit >> (8 - j)
        elif digit >> (8 - j):
            raise ValueError("nix32 value out of range")
    return bytes(out)


def parse_hash(text: str) -> bytes:
    """A sha256 in any notation Nix prints: SRI `sha256-<b64>`, `sha256:<nix32|hex>`."""
    if text.startswith("sha256-"):
        raw = base64.b64decode(text[7:])
    else:
        body = text.removeprefix("sha256:")
        raw = bytes.fromhex(body) if len(body) == 64 else from_nix32(body)
    if len(raw) != 32:
        raise ValueError(f"not a sha256: {text}")
    return raw


def sri(digest: bytes) -> str:
    return "sha256-" + base64.b64encode(digest).decode()


def _str(data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return _U64.pack(len(data)) + data + b"\0" * pad


_OPEN = _str(b"(")
_CLOSE = _str(b")")


class NarHasher:
    """Hashes a NAR fed as a depth-first, name-sorted sequence of entries.

    Checks the order (parents before children, names strictly increasing), so a
    stream cannot create duplicates or nest under a file.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.h = hashlib.sha256()
        self.size = 0
        self.limit = limit  # the declared NAR size: more is refused as it comes
        self.stack: list[bytes] = []  # open directories' names below the root
        self.last_child: list[bytes | None] = []  # last entry name in each open directory
        self.started = False
        self.root_is_dir = False
        self.file_remaining = 0
        self.file_pad = 0
        self._file_parts_nonroot = False

    def _w(self, data: bytes) -> None:
        self.h.update(data)
        self.size += len(data)
        self._check()

    def _check(self) -> None:
        if self.limit is not None and self.size > self.limit:
            from reup_receiver.errors import Oversized

            raise Oversized(f"store path larger than its declared NAR size of {self.limit} bytes")

    def _enter(self, parts: list[bytes]) -> None:
        if self.file_remaining:
            raise Corrupt("entry starts before the previous file's data ended")
        if not self.started:
            if parts:
                raise Corrupt("first entry of a path must be its root")
            self.started = True
            self._w(_str(b"nix-archive-1"))
            return
        if not self.root_is_dir or not parts:
            raise Corrupt("entries after a non-directory root, or a second root")
        parent = parts[:-1]
        while len(self.stack) > len(parent) or self.stack != parent[: len(self.stack)]:
            if not self.stack:
                break
            self._close_dir()
        if self.stack != parent:
            raise Corrupt(f"entry {b'/'.join(parts)!r} comes before its parent")
        name = parts[-1]
        last = self.last_child[-1]
        if last is not None and name <= last:
            raise Corrupt(f"entry {b'/'.join(parts)!r} out of NAR order")
        self.last_child[-1] = name
        self._w(_str(b"entry") + _OPEN + _str(b"name") + _str(name) + _str(b"node"))

    def _close_dir(self) -> None:
        self.stack.pop()
        self.last_child.pop()
        self._w(_CLOSE + _CLOSE)  # directory node, then the entry

    def directory(self, parts: list[bytes]) -> None:
        self._enter(parts)
        if not parts:
            self.root_is_dir = True
        else:
            self.stack.append(parts[-1])
        self.last_child.append(None)
        self._w(_OPEN + _str(b"type") + _str(b"directory"))

    def symlink(self, parts: list[bytes], target: bytes) -> None:
        self._enter(parts)
        self._w(_OPEN + _str(b"type") + _str(b"symlink") + _str(b"target") + _str(target) + _CLOSE)
        if parts:
            self._w(_CLOSE)

    def file_start(self, parts: list[bytes], executable: bool, size: int) -> None:
        self._enter(parts)
        head = _OPEN + _str(b"type") + _str(b"regular")
        if executable:
            head += _str(b"executable") + _str(b"")
        self._w(head + _str(b"contents") + _U64.pack(size))
        if self.limit is not None and self.size + size > self.limit:  # before a byte of it is written
            from reup_receiver.errors import Oversized

            raise Oversized(f"file of {size} bytes exceeds its path's declared NAR size of {self.limit}")
        self.file_remaining = size
        self.file_pad = (-size) % 8
        self._file_parts_nonroot = bool(parts)
        if size == 0:
            self._file_end()

    def file_data(self, data: bytes | memoryview) -> None:
        if len(data) > self.file_remaining:
            raise Corrupt("file data longer than its declared size")
        self.h.update(data)
        self.size += len(data)
        self._check()
        self.file_remaining -= len(data)
        if self.file_remaining == 0:
            self._file_end()

    def _file_end(self) -> None:
        self._w(b"\0" * self.file_pad + _CLOSE)
        if self._file_parts_nonroot:
            self._w(_CLOSE)

    def finish(self) -> tuple[bytes, int]:
        if not self.started:
            raise Corrupt("store path has no entries")
        if self.file_remaining:
            raise Corrupt("store path ended inside a file")
        while self.stack:
            self._close_dir()
        if self.root_is_dir:
            self._w(_CLOSE)
        return self.h.digest(), self.size


def walk_nar_order(root: str) -> list[tuple[list[bytes], os.stat_result]]:
    """Every node under `root` (itself first) in NAR order, without following symlinks.

    Iterative (an explicit stack), so a deep tree is never a RecursionError.
    """
    out: list[tuple[list[bytes], os.stat_result]] = []
    broot = os.fsencode(root)
    todo: list[list[bytes]] = [[]]
    while todo:
        parts = todo.pop()
        path = os.path.join(broot, *parts) if parts else broot
        st = os.lstat(path)
        out.append((parts, st))
        if stat.S_ISDIR(st.st_mode):
            todo.extend([*parts, name] for name in sorted(os.listdir(path), reverse=True))
    return out


def nar_hash_tree(root: str) -> tuple[bytes, int]:
    """NAR sha256 and size of an existing file tree."""
    hasher = NarHasher()
    broot = os.fsencode(root)
    for parts, st in walk_nar_order(root):
        path = os.path.join(broot, *parts) if parts else broot
        if stat.S_ISDIR(st.st_mode):
            hasher.directory(parts)
        elif stat.S_ISLNK(st.st_mode):
            hasher.symlink(parts, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            hasher.file_start(parts, bool(st.st_mode & 0o100), st.st_size)
            if st.st_size:
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        hasher.file_data(chunk)
                if hasher.file_remaining:
                    raise Corrupt(f"{path!r} changed while hashing")
        else:
            raise Corrupt(f"{path!r}: not a file, directory or symlink")
    return hasher.finish()
