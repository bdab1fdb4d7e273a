"""The reconcile loop's builds: the systems a pass found due, built as asyncio tasks, at most
`[build] max_parallel` at a time, one `nix build` of many installables per batch when many are due.

Owned by the Controller (controller.py): each pass hands `start` the derivations the planner wants
built; the tasks go through the controller's `spawn` (so `run()` waits for and cancels them with its
other executors). `building` is what is in flight; the planner's inputs read it as observed state.
Each build's outcome goes to the recorder (record.py); a broken Nix is not hammered (a deferred
build holds its slot a while).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from reup.core.errors import TemporaryError
from reup.core.model import BuildResult
from reup.core.outcomes import BuildDeferred, Built
from reup.loop.events import EventBus, ReconcileError
from reup.loop.executors import SystemBuilder, execute_build
from reup.loop.record import OutcomeRecorder

BUILD_BATCH = 100  # derivations per `nix build` when many systems are due at once


class BuildRunner:
    def __init__(self, max_parallel: int, recorder: OutcomeRecorder, bus: EventBus, clock: Callable[[], float],
                 *, builder: Callable[[], SystemBuilder], spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        """`builder()` is read at each build (tests replace the controller's); `spawn` starts a task."""
        self.max_parallel = max_parallel
        self.recorder = recorder
        self.bus = bus
        self.clock = clock
        self.builder = builder
        self.spawn = spawn
        self.building: set[str] = set()  # derivations being built
        self._slots = asyncio.Semaphore(max_parallel)

    def start(self, drvs: Iterable[str], commit: str) -> None:
        """Build `drvs` (none of them in `building`) for `commit`."""
        due = [drv for drv in drvs if drv not in self.building]
        self.building.update(due)
        if len(due) <= self.max_parallel:
            for drv in due:
                self.spawn(self._build(drv, commit))
        else:  # many systems (one per device): one `nix build` of many installables per batch
            for i in range(0, len(due), BUILD_BATCH):
                self.spawn(self._build_batch(due[i:i + BUILD_BATCH], commit))

    async def _build(self, drv: str, commit: str) -> None:
        try:
            async with self._slots:
                outcome = await execute_build(self.builder(), drv, commit)
                self.recorder.build(outcome)
                if isinstance(outcome, BuildDeferred):
                    await asyncio.sleep(5)  # holding the slot: a broken Nix is not hammered
        finally:
            self.building.discard(drv)

    async def _build_batch(self, drvs: list[str], commit: str) -> None:
        try:
            async with self._slots:
                start = time.monotonic()
                try:
                    results = await asyncio.to_thread(self.builder().build_many, drvs)
                except TemporaryError as exc:
                    self.bus.emit(ReconcileError(self.clock(), "build", str(exc)))
                    await asyncio.sleep(5)
                    return
                seconds = time.monotonic() - start
                for drv, out in results.items():
                    result = (BuildResult(drv, commit, True, out) if isinstance(out, str)
                              else BuildResult(drv, commit, False, None, str(out)))
                    self.recorder.build(Built(result, seconds))
        finally:
            self.building.difference_update(drvs)
