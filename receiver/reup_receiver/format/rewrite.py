"""Store-hash rewriting: replace old 32-character store hashes by new ones.

When a dependency changes, every file that mentions it changes only in those
hashes. The encoder (reup.delta) rewrites an old file before comparing it with
its new partner; the receiver applies the same rewrite to its copy of the old
file while streaming it. Both sides must use this one function, so the result
is bit-identical. Scans every position (like Nix's reference scanner), taking
the leftmost match and continuing after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

HASH_LEN = 32
# Every position where 32 characters of Nix's base-32 alphabet start (lookahead: overlapping).
_CANDIDATE = re.compile(rb"(?=[0-9a-df-np-sv-z]{32})")


class HashRewriter:
    """Incremental rewriter: feed chunks, get rewritten chunks; output length == input length."""

    def __init__(self, mapping: Mapping[bytes, bytes]) -> None:
        for old, new in mapping.items():
            if len(old) != HASH_LEN or len(new) != HASH_LEN:
                raise ValueError("store hashes are 32 characters")
        self.mapping = mapping
        self.carry = b""  # the tail whose windows are not complete yet

    def feed(self, chunk: bytes) -> bytes:
        buf = bytearray(self.carry + chunk)
        limit = len(buf) - HASH_LEN  # last start position whose window is complete
        pos = 0
        if self.mapping:
            for m in _CANDIDATE.finditer(buf, pos):
                p = m.start()
                if p > limit:
                    break
                if p < pos:
                    continue
                new = self.mapping.get(bytes(buf[p : p + HASH_LEN]))
                if new is not None:
                    buf[p : p + HASH_LEN] = new
                    pos = p + HASH_LEN
        cut = max(limit + 1, pos, 0)
        self.carry = bytes(buf[cut:])
        return bytes(buf[:cut])

    def finish(self) -> bytes:
        out, self.carry = self.carry, b""
        return out


def rewrite_bytes(data: bytes, mapping: Mapping[bytes, bytes]) -> bytes:
    """The whole-buffer form of HashRewriter (same result); `data` itself if nothing matches,
    so a large file without store hashes is not copied."""
    out: bytearray | None = None
    pos = 0
    for m in _CANDIDATE.finditer(data):
        p = m.start()
        if p < pos:
            continue
        new = mapping.get(data[p : p + HASH_LEN])
        if new is not None:
            if out is None:
                out = bytearray(data)
            out[p : p + HASH_LEN] = new
            pos = p + HASH_LEN
    return data if out is None else bytes(out)


def rewrite_chunks(chunks: Iterable[bytes], mapping: Mapping[bytes, bytes]) -> Iterator[bytes]:
    rw = HashRewriter(mapping)
    for chunk in chunks:
        out = rw.feed(chunk)
        if out:
            yield out
    tail = rw.finish()
    if tail:
        yield tail
