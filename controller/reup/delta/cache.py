"""The delta cache: streams from the encoder, keyed by (held, target, staged), in `<state>/deltas`.

Called by the SSH transport (io/ssh.py, a `StreamSource` to it) and `reup plan` (which only needs the
size). Several devices holding the same generation share one encoded stream;
the cache keeps the newest `max_entries` streams. The encoder is
`reup.delta.encode.encode(held, target, out, staged)` (out: a file path)
unless one is injected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reup_receiver.format.wire import DIGEST_SIZE
from reup_receiver.format.wire import VERSION as STREAM_VERSION

from reup import __version__
from reup.io.nix import NixExecutor

if TYPE_CHECKING:  # `reup delta` starts light: the diff pool's codecs are imported when encoding
    from reup.delta.diffmemo import DiffMemo
    from reup.delta.literalmemo import LiteralMemo

log = logging.getLogger(__name__)

# encoder(held, target, out, staged, avoid, codecs) -> stats with .stream_bytes and .nar_bytes;
# codecs: the patch codecs the device can apply (None: all).
Encoder = Callable[[Sequence[str], str, str, Sequence[str], Sequence[str], Sequence[str] | None], Any]
# Streams of an older encoder or format are not reused after an upgrade.
CACHE_VERSION = f"{__version__}/{STREAM_VERSION}"
PRUNE_EVERY = 5.0  # seconds


def nix_encoder(nix: NixExecutor | None = None, memo: DiffMemo | None = None,
                literals: LiteralMemo | None = None) -> Encoder:
    """The real encoder, running its Nix queries through `nix` and, with `memo` (the controller's), its
    diffs on that shared pool that remembers them; with `literals`, literal groups of paths an earlier
    stream carried are compressed once. Its stats carry `cpu_seconds`: the encoding thread's
    CPU plus its diffs' worker CPU (not its `nix path-info` children)."""

    def encoder(held: Sequence[str], target: str, out: str, staged: Sequence[str], avoid: Sequence[str],
                codecs: Sequence[str] | None) -> Any:
        from reup_receiver.protocol import stream_version

        from reup.delta.encode import encode
        from reup.delta.pycsolid import allowed_codecs

        allowed = allowed_codecs(codecs)
        version = stream_version(codecs)  # an older receiver reads version 1
        start = time.thread_time()
        if memo is not None:
            memo.collect()  # what an earlier encode on this thread left
        stats = encode(held, target, out, staged=staged, executor=nix, avoid=avoid, allowed_codecs=allowed,
                       version=version, pool=memo, literal_memo=literals)
        stats.cpu_seconds = time.thread_time() - start + (memo.collect() if memo is not None else 0.0)
        return stats

    return encoder


class DeltaCache:
    @dataclass(frozen=True)
    class Entry:
        path: str
        stream_bytes: int
        nar_bytes: int
        cached: bool

    def __init__(self, directory: str, encoder: Encoder | None = None, max_entries: int = 64,
                 min_age: float = 600.0, prune_every: float = PRUNE_EVERY) -> None:
        self.dir = directory
        self.encoder = encoder or nix_encoder()
        self.max_entries = max_entries
        # A stream used in the last `min_age` seconds may be being sent: never pruned, even when more
        # than `max_entries` are (a fleet where every device has its own system).
        self.min_age = min_age
        self._lock = threading.Lock()
        self._prune_lock = threading.Lock()
        self._next_prune = 0.0
        self.prune_every = prune_every
        self._building: dict[str, threading.Lock] = {}
        os.makedirs(directory, exist_ok=True)

    @staticmethod
    def key(held: Sequence[str], target: str, staged: Sequence[str], avoid: Sequence[str] = (),
            codecs: Sequence[str] | None = None) -> str:
        # held keeps its order: the encoder pairs against its first entries first.
        blob = json.dumps([CACHE_VERSION, list(dict.fromkeys(held)), target, sorted(set(staged)),
                           sorted(set(avoid)), sorted(set(codecs)) if codecs is not None else None]).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def get(self, held: Sequence[str], target: str, staged: Sequence[str] = (),
            avoid: Sequence[str] = (), codecs: Sequence[str] | None = None) -> DeltaCache.Entry:
        """The stream for a device holding `held` (its current generation first), encoded once."""
        key = self.key(held, target, staged, avoid, codecs)
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with lock:  # two devices needing the same stream encode it once
            stream, meta = os.path.join(self.dir, key + ".stream"), os.path.join(self.dir, key + ".json")
            if os.path.exists(stream) and os.path.exists(meta):
                with open(meta, encoding="utf-8") as f:
                    m = json.load(f)
                os.utime(stream)
                return self.Entry(stream, int(m["stream_bytes"]), int(m["nar_bytes"]), True)
            tmp = stream + ".tmp"
            stats = self.encoder(list(held), target, tmp, list(staged), list(avoid),
                                 list(codecs) if codecs is not None else None)
            size = os.path.getsize(tmp)
            stream_bytes = int(getattr(stats, "stream_bytes", size) or size)
            nar_bytes = int(getattr(stats, "nar_bytes", 0) or 0)
            os.replace(tmp, stream)
            cpu = getattr(stats, "cpu_seconds", None)  # the fleet benchmark counts these lines and sums the CPU
            log.info("delta encoded: %s (%d bytes%s)", target, stream_bytes,
                     f", cpu {1000 * cpu:.1f} ms" if isinstance(cpu, float) else "")
            with open(meta, "w", encoding="utf-8") as f:
                json.dump({"stream_bytes": stream_bytes, "nar_bytes": nar_bytes, "target": target}, f)
            self._prune()
            return self.Entry(stream, stream_bytes, nar_bytes, False)

    def find(self, stream_id: str, target: str) -> DeltaCache.Entry | None:
        """The cached stream with this id (its trailer digest) for `target`: the one a device keeps a
        partial of, so an interrupted transfer resumes with the very same bytes (transfer.py)."""
        for name in os.listdir(self.dir):
            if not name.endswith(".stream"):
                continue
            stream = os.path.join(self.dir, name)
            try:
                with open(stream[: -len(".stream")] + ".json", encoding="utf-8") as f:
                    m = json.load(f)
                if m.get("target") == target and _trailer_digest(stream) == stream_id:
                    os.utime(stream)
                    return self.Entry(stream, int(m["stream_bytes"]), int(m["nar_bytes"]), True)
            except (OSError, ValueError, KeyError):
                continue
        return None

    def _prune(self) -> None:
        # A prune lists the whole directory, which min_age can make large (a stream per device):
        # once every `prune_every` seconds, not after every encode.
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + self.prune_every
        with self._prune_lock:  # one at a time: two encodes pruning together saw each other's deletions
            streams = []
            for n in os.listdir(self.dir):
                if n.endswith(".stream"):
                    with contextlib.suppress(FileNotFoundError):
                        streams.append((os.path.getmtime(os.path.join(self.dir, n)), os.path.join(self.dir, n)))
            streams.sort(reverse=True)
            cutoff = time.time() - self.min_age
            for mtime, old in streams[self.max_entries:]:
                if mtime >= cutoff:
                    continue
                for path in (old, old[: -len(".stream")] + ".json"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)


def _trailer_digest(path: str) -> str:
    """A stream's id (reup_receiver.resume.stream_id, not imported: `reup delta` starts light)."""
    with open(path, "rb") as f:
        f.seek(-DIGEST_SIZE, os.SEEK_END)
        return f.read(DIGEST_SIZE).hex()
