"""The reconcile loop's background chores: GC roots, retention and the spacing of fleet snapshots.

Owned by the Controller (controller.py), one `Chores` per controller. Each pass calls `start` (a GC
root sync when the systems in use may have changed, retention now and then, each as an asyncio task
kept out of the pass, at most one of each at a time) and `snapshot_if_due`; `run()` asks `wakeups`
when it must wake for them. The controller marks the work due: `roots_due` when a new revision is
recorded, `snapshot_due` when a device changed state (a pass, or an outcome through the recorder).
Both the GC root sync and the fleet snapshot cost O(fleet), so each is spaced by a multiple of its
own measured duration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from reup.config.reup_toml import StateConfig
from reup.loop.events import DevicesSnapshot, EventBus, ReconcileError
from reup.loop.state import StateDB

log = logging.getLogger(__name__)
SNAPSHOT_EVERY = 1.0  # seconds at least between fleet snapshots (the reup_devices gauge, the progress line)
ROOTS_DUTY = 10  # GC root syncs at most 10% of the time
SNAPSHOT_DUTY = 20  # and at least this many times a snapshot's own cost (it is O(fleet)): under 5% of the time


class Chores:
    def __init__(self, store: StateDB, bus: EventBus, clock: Callable[[], float], cfg: StateConfig,
                 sync_roots: Callable[[set[str]], object]) -> None:
        """`sync_roots(needed)` keeps exactly those store paths alive (io.builder.GcRoots.sync); it runs
        in a worker thread."""
        self.store = store
        self.bus = bus
        self.clock = clock
        self.cfg = cfg
        self._sync_roots = sync_roots
        self.snapshot_due = True  # the first pass reports every device, and syncs the GC roots
        self.roots_due = True
        self.running: set[str] = set()  # background steps running (gcroots, prune)
        self.rooted: set[str] | None = None  # the systems the GC roots last synced keep
        self.next_roots = 0.0  # time.monotonic()
        self.next_prune = 0.0  # the controller's clock
        self.last_snapshot = 0.0  # time.monotonic()
        self.snapshot_every = SNAPSHOT_EVERY

    def start(self, now: float) -> None:
        """Work kept out of the pass, at most one of each at a time: GC roots when the set of distinct
        systems changed, and retention (pruning events, history and old revisions) now and then."""
        if "gcroots" not in self.running and self.roots_due and time.monotonic() >= self.next_roots:
            self.roots_due = False
            self._chore("gcroots", self._sync_gcroots())
        if "prune" not in self.running and now >= self.next_prune:
            self.next_prune = now + self.cfg.prune_interval
            self._chore("prune", self._prune(now))

    def snapshot_if_due(self) -> None:
        """After a pass: the snapshot a device change asked for, unless one was emitted too recently."""
        if self.snapshot_due and time.monotonic() >= self.last_snapshot + self.snapshot_every:
            self.emit_snapshot()

    def emit_snapshot(self) -> None:
        """Every device's state as one event (the reup_devices gauge, the progress line follow it), after
        passes that changed some, spaced by SNAPSHOT_EVERY and by SNAPSHOT_DUTY times its own cost."""
        self.snapshot_due = False
        self.roots_due = True
        start = time.monotonic()
        self.bus.emit(DevicesSnapshot(self.clock(), self.store.device_rows()))
        self.snapshot_every = min(30.0, max(SNAPSHOT_EVERY, SNAPSHOT_DUTY * (time.monotonic() - start)))
        self.last_snapshot = time.monotonic()

    def wakeups(self, *, once: bool) -> tuple[float | None, float | None]:
        """(snapshot, GC roots): when, on the controller's clock, a pending one may run; None if none is
        pending (`once`: a GC root sync alone never keeps `run --once` waiting)."""
        snapshot = (self.clock() + max(0.0, self.last_snapshot + self.snapshot_every - time.monotonic())
                    if self.snapshot_due else None)
        roots = (self.clock() + max(0.0, self.next_roots - time.monotonic())
                 if self.roots_due and not once else None)
        return snapshot, roots

    def _chore(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self.running.add(name)
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda _: self.running.discard(name))

    async def _prune(self, now: float) -> None:
        st = self.cfg
        try:
            counts = await asyncio.to_thread(self.store.prune, now, keep_days=st.keep_days,
                                             keep_revisions=st.keep_revisions)
            if any(counts.values()):
                log.info("retention: pruned %s", counts)
        except Exception as exc:  # retention is housekeeping: report, carry on
            self.bus.emit(ReconcileError(self.clock(), "retention", str(exc)))

    async def _sync_gcroots(self) -> None:
        start = time.monotonic()

        def sync() -> set[str]:
            needed = {p for p in self.store.toplevels_in_use() if os.path.exists(p)}  # built ones: per system
            if needed != self.rooted:
                self._sync_roots(needed)
            return needed

        try:
            self.rooted = await asyncio.to_thread(sync)
        except Exception as exc:  # roots are a safety net: report, carry on (tried again next pass)
            self.roots_due = True
            self.bus.emit(ReconcileError(self.clock(), "gcroots", str(exc)))
        finally:
            # A sync is O(distinct systems): with a system per device the set changes with every
            # acknowledgement, so syncs are spaced by ROOTS_DUTY times their own duration.
            self.next_roots = time.monotonic() + min(30.0, ROOTS_DUTY * (time.monotonic() - start))
