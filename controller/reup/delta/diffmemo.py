"""A diff pool shared by every encode of one controller, remembering each file diff it made.

Used by the controller's encoder (cache.py `nix_encoder(..., memo=...)`), handed to
`encode(..., pool=...)`. Where every device has its own system (a hostname, a key),
the devices' streams differ in a few small paths; the big shared paths are diffed
against the same old files for every device. Store paths are immutable, so a diff
is a function of (old file, new file, the hash rewrites that occur in the old file,
the codecs): computed once, its result is reused by every later stream. The
stream's framing (table indices, literal stream) is still encoded per device by
encode.py; only the expensive part is shared.

It also keeps one process pool for the controller's life (encode.py starts one per
encode otherwise) and counts the CPU seconds its workers spent, so the controller
can report an encode's CPU, workers included (`cpu_seconds`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from reup.delta.codecs import diff_job

IDLE = 30.0  # seconds without a diff before the pool's workers stop


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Run in a worker: (its CPU seconds, the result)."""
    start = time.process_time()
    result = fn(*args)
    return time.process_time() - start, result


class DiffMemo(Executor):
    def __init__(self, workers: int | None = None, max_bytes: int = 64 << 20) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.max_bytes = max_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._done: OrderedDict[tuple[Any, ...], Future[Any]] = OrderedDict()  # LRU, by patch bytes
        self._bytes = 0
        self._owed: dict[int, float] = {}  # worker CPU seconds per submitting thread (an encode)
        self.hits = 0
        self.misses = 0
        # The pool stops after IDLE seconds without a diff: a controller killed with -9 leaves no idle
        # workers behind (multiprocessing's forkserver outlives a killed parent), and an idle one holds none.
        self._idle: threading.Timer | None = None
        self._running = 0

    # --- Executor -------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        key = self._key(fn, args) if not kwargs else None
        if key is not None:
            with self._lock:
                hit = self._done.get(key)
                if hit is not None:
                    self._done.move_to_end(key)
                    self.hits += 1
                    return hit
                self.misses += 1
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                                 mp_context=multiprocessing.get_context("forkserver"))
            pool = self._pool
        with self._lock:
            self._running += 1
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
        inner = pool.submit(_timed, fn, *args, **kwargs)
        outer: Future[Any] = Future()
        owner = threading.get_ident()

        def done(f: Future[tuple[float, Any]]) -> None:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self._idle = threading.Timer(IDLE, self._stop_if_idle)
                    self._idle.daemon = True
                    self._idle.start()
            exc = f.exception()
            if exc is not None:
                outer.set_exception(exc)
                return
            seconds, result = f.result()
            with self._lock:
                self._owed[owner] = self._owed.get(owner, 0.0) + seconds
                if key is not None:
                    self._remember(key, outer, result)
            outer.set_result(result)

        inner.add_done_callback(done)
        return outer

    def collect(self) -> float:
        """Worker CPU seconds owed to this thread's diffs (finished ones), reset to zero."""
        with self._lock:
            return self._owed.pop(threading.get_ident(), 0.0)

    def _stop_if_idle(self) -> None:
        with self._lock:
            if self._running:
                return
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    # --- the memo -----------------------------------------------------------------------

    @staticmethod
    def _key(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if fn is not diff_job or len(args) < 4:
            return None
        old_path, new_path, rewrites, new_sha, *rest = args
        try:  # only the rewrites that occur in the old file change its diff
            with open(old_path, "rb") as fh:
                old = fh.read()
        except OSError:
            return None
        relevant = tuple(sorted((o, n) for o, n in rewrites.items() if o in old))
        codecs = tuple(tuple(c) if c is not None else None for c in rest)
        return (bytes(old_path), bytes(new_path), relevant, bytes(new_sha), codecs)

    def _remember(self, key: tuple[Any, ...], future: Future[Any], result: Any) -> None:
        size = len(getattr(result, "data", b"")) + 256
        self._done[key] = future
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._done) > 1:
            _, old = self._done.popitem(last=False)
            self._bytes -= len(getattr(old.result(), "data", b"")) + 256
