"""Recording what executors report: each outcome becomes state (SQLite) and events, in one place.

The loop's side of kopf-style executors: the reconcile loop (controller.py) hands
every outcome an executor (executors.py) returned to `OutcomeRecorder`, which
writes it to the state store (state.py) and emits its events (events.py; metrics
and logs subscribe). How a failure is recorded (retry time, result label) follows
its `AttemptKind`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from reup.core.model import DeviceState, UpdateResult
from reup.core.outcomes import (
    BuildDeferred,
    BuildOutcome,
    Paused,
    Updated,
    UpdateFailed,
    UpdateOutcome,
)
from reup.loop.events import (
    BuildFinished,
    DeviceStateChanged,
    DeviceUpdated,
    EventBus,
    ReconcileError,
)
from reup.loop.state import StateDB


class OutcomeRecorder:
    def __init__(self, store: StateDB, bus: EventBus, clock: Callable[[], float], *, retry_max: float,
                 snapshot: Callable[[], None]) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.retry_max = retry_max
        self.snapshot = snapshot  # every device's state as an event, after an update committed
        self.probe_failures: dict[str, int] = {}  # consecutive probes that got no verdict, per device

    def backoff(self, failures: int) -> float:
        """Jittered exponential, capped by `[ssh] retry_max`."""
        return min(self.retry_max, 2.0 ** failures) * random.uniform(0.5, 1.0)

    def build(self, outcome: BuildOutcome) -> None:
        now = self.clock()
        if isinstance(outcome, BuildDeferred):
            self.bus.emit(ReconcileError(now, "build", outcome.error))
            return
        result = outcome.result
        if not result.ok:
            self.bus.emit(ReconcileError(now, "build", result.error or "build failed"))
        self.store.record_build(result, outcome.seconds, self.clock())
        self.bus.emit(BuildFinished(self.clock(), result.drv_path, "success" if result.ok else "failure",
                                    outcome.seconds, result.toplevel, result.error))

    def update(self, outcome: UpdateOutcome, seen_at: float, busy: DeviceState | None = None) -> None:
        """Record an update's outcome; `busy` is the device's phase while it ran (its old state)."""
        now = self.clock()
        push = outcome.push
        name = push.device
        if isinstance(outcome, Updated):
            old_state = str(busy or self.store.device_state(name) or DeviceState.PENDING)
            self.store.record_ack(name, push.commit, push.toplevel, outcome.generation, now, outcome.stream_bytes,
                                  outcome.nar_bytes, "adopted" if outcome.adopted else "committed")
            current = self.store.desired().targets.get(name)
            superseded = current is not None and current.toplevel != push.toplevel
            self.bus.emit(DeviceStateChanged(now, name, old_state, str(DeviceState.IN_SYNC), outcome.reason))
            self.bus.emit(DeviceUpdated(now, name, UpdateResult.SUPERSEDED if superseded else UpdateResult.COMMITTED,
                                        push.commit, push.toplevel, adopted=outcome.adopted,
                                        seconds_since_seen=now - seen_at if seen_at else None))
            self.snapshot()
        elif isinstance(outcome, UpdateFailed):
            kind = outcome.kind
            if outcome.internal is not None:
                self.bus.emit(ReconcileError(now, "push", outcome.internal, name))

            def retry_delay(failures: int) -> float:  # a quarantined revision is not retried; a timed-out one is probed now
                return 0.0 if kind.quarantines else self.backoff(failures)

            self.store.record_failure(name, push.commit, push.toplevel, kind, outcome.error, now, retry_delay,
                                      outcome.generation)
            self.bus.emit(DeviceUpdated(now, name, kind.result, push.commit, push.toplevel, error=outcome.error))
            self.bus.emit(ReconcileError(now, "push", outcome.error, name))
        elif isinstance(outcome, Paused):
            return  # the planner holds the device until its window opens: nothing to record
        elif outcome.verdict.ask_again:
            failures = self.probe_failures[name] = self.probe_failures.get(name, 0) + 1
            self.store.set_retry(name, now + self.backoff(failures))
        else:  # no trace of the generation on the device: it stays timed out, asked no more
            self.store.set_retry(name, float("inf"))
