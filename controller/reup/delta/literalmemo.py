"""Literal groups shared by every encode of one controller: fresh installs of per-device systems.

Used by the controller's encoder (cache.py `nix_encoder`), handed to `encode(..., literal_memo=...)`.
Where every device has its own system (a hostname, a key in its closure), a fresh device's stream
is the whole closure as literal content, and all but a few small paths are the same for every
device. Compressing that shared part (LZMA2 at preset 9e) is nearly all of an encode's CPU.

Two things are remembered:
- which store paths an earlier stream of this controller already carried (`seen`): encode.py puts
  those first, and literal.py closes an LZMA group where they end, so the shared part forms the
  same groups in every device's stream;
- each LZMA group's compressed bytes, keyed by the codec, dictionary size and the SHA-256 of every
  file in the group, in order (`get`/`put`). Compression is deterministic, so the bytes a hit
  returns are exactly what compressing again would give; a store path rebuilt with other content
  after a GC has other hashes and never hits.

Bounded: at most `max_bytes` of compressed groups (least recently used go first) and `max_paths`
remembered paths. Thread-safe: the controller encodes on several threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

MAX_BYTES = 256 << 20
MAX_PATHS = 1 << 20


def group_key(codec: int, dict_log: int, shas: Sequence[bytes]) -> bytes:
    """What a group's compressed bytes are a function of (the files' full SHA-256s, in order)."""
    h = hashlib.sha256(bytes([codec, dict_log]))
    for sha in shas:
        h.update(sha)
    return h.digest()


class LiteralMemo:
    def __init__(self, max_bytes: int = MAX_BYTES, max_paths: int = MAX_PATHS) -> None:
        self.max_bytes = max_bytes
        self.max_paths = max_paths
        self._groups: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._paths: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def seen(self, path: str) -> bool:
        with self._lock:
            return path in self._paths

    def note(self, paths: Iterable[str]) -> None:
        """Paths a stream just carried."""
        with self._lock:
            for p in paths:
                self._paths[p] = None
                self._paths.move_to_end(p)
            while len(self._paths) > self.max_paths:
                self._paths.popitem(last=False)

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._groups.get(key)
            if data is None:
                self.misses += 1
                return None
            self._groups.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._groups.pop(key, None)
            self._bytes += len(data) - (len(old) if old is not None else 0)
            self._groups[key] = data
            while self._bytes > self.max_bytes:
                _, dropped = self._groups.popitem(last=False)
                self._bytes -= len(dropped)
