"""Update executors of the reconcile loop and the recording of their outcomes (a Controller mixin).

`_push` runs one planned Push through the SSH executor (push.py) and records the
outcome in the store and as events (committed, superseded, failed, rolled_back,
timed_out, unreachable, retry). A `timed_out` update (the confirmation could not
be delivered before the device's deadline) is not the end of the story: the
device decides by itself. So while a device's last update of its current
target is `timed_out`, `_probe_timeouts` asks the device for its `status` (one
connection per try, jittered exponential backoff capped by `[ssh] retry_max`)
and `judge_timed_out` reads the answer: the generation rolled back
(`last_rollback` names it) -> `rolled_back` with the device's reason; the
generation runs and is no longer pending (it was confirmed after all) ->
`committed`; still pending -> ask again later.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

from reup_receiver.protocol import StatusAnswer

from reup.config.reup_toml import Config
from reup.core.errors import PermanentError, ReupError, TemporaryError, UnreachableError
from reup.core.model import QUARANTINE, Desired, DeviceState, Fleet, Push, RolloutPolicy
from reup.io.ssh import ConfirmTimeoutError, RolledBackError, SshPusher
from reup.io.transfer import TransferPaused
from reup.loop.events import (
    DeviceStateChanged,
    DeviceUpdated,
    EventBus,
    ReconcileError,
    TransferFinished,
)
from reup.loop.state import StateDB

log = logging.getLogger(__name__)


def judge_timed_out(status: StatusAnswer, toplevel: str, generation: int | None) -> tuple[str, str]:
    """What became of a generation whose confirmation timed out: (verdict, detail), verdict one of
    "rolled_back", "committed", "pending" (still awaiting confirmation) or "unknown"."""
    rb = status.last_rollback
    if generation is not None and rb is not None and rb.get("generation") == generation:
        return "rolled_back", str(rb.get("reason") or "rolled back")
    if generation is not None and status.pending is not None and status.pending.generation == generation:
        return "pending", f"generation {generation} still awaits confirmation"
    gen = status.generation_of(toplevel)
    if status.current == toplevel and status.pending is None and (generation is None or gen == generation):
        return "committed", f"generation {gen} runs, confirmed"
    return "unknown", f"generation {generation} neither runs nor was rolled back"


class UpdateExecutor:
    """Mixed into `Controller`, which provides these attributes."""

    cfg: Config
    clock: Callable[[], float]
    store: StateDB
    bus: EventBus
    pusher: SshPusher
    fleet: Fleet | None
    busy: dict[str, DeviceState]
    probing: set[str]  # devices with a status probe in flight
    probe_failures: dict[str, int]  # consecutive probes that got no verdict, per device

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        raise NotImplementedError

    def _snapshot(self) -> None:
        raise NotImplementedError

    @property
    def policy(self) -> RolloutPolicy:
        return self.fleet.rollout if self.fleet else RolloutPolicy()

    def _backoff(self, failures: int) -> float:
        """Jittered exponential, capped by `[ssh] retry_max`."""
        return min(self.cfg.ssh.retry_max, 2.0 ** failures) * random.uniform(0.5, 1.0)

    def _phase(self, device: str) -> Callable[[DeviceState], None]:
        def on_phase(state: DeviceState) -> None:
            self.busy[device] = state
            self.wake()

        return on_phase

    def _sent(self, device: str) -> Callable[[int, int, float], None]:
        def on_sent(stream_bytes: int, nar_bytes: int, seconds: float) -> None:
            self.bus.emit(TransferFinished(self.clock(), device, stream_bytes, nar_bytes, seconds))

        return on_sent

    async def _push(self, push: Push, seen_at: float) -> None:
        name = push.device
        try:
            dev = self.fleet.devices.get(name) if self.fleet else None
            if dev is None:
                return
            try:
                policy = self.policy
                outcome = await self.pusher.push(dev, push.toplevel, activation=policy.activation,
                                                 on_phase=self._phase(name), confirm_timeout=policy.confirm_timeout,
                                                 health_check=policy.health_check, on_sent=self._sent(name))
            except TransferPaused:
                return  # its window closed: the planner holds it until the next opening (not a failure)
            except (TemporaryError, PermanentError) as exc:
                kind = ("unreachable" if isinstance(exc, UnreachableError)
                        else "transient" if isinstance(exc, TemporaryError)
                        else "rolled_back" if isinstance(exc, RolledBackError)
                        else "timed_out" if isinstance(exc, ConfirmTimeoutError) else "permanent")
                generation = exc.generation if isinstance(exc, ConfirmTimeoutError) else None
                self._push_failed(push, kind, str(exc), generation)
                return
            except Exception as exc:  # an encoder or protocol bug: do not retry blindly
                log.exception("push to %s failed", name)
                self.bus.emit(ReconcileError(self.clock(), "push", f"{type(exc).__name__}: {exc}", name))
                self._push_failed(push, "permanent", f"internal error: {type(exc).__name__}: {exc}")
                return
            self._committed(push, outcome.generation, seen_at, outcome.stream_bytes, outcome.nar_bytes,
                            outcome.adopted, "acknowledged")
        finally:
            self.busy.pop(name, None)

    def _committed(self, push: Push, generation: int | None, seen_at: float, stream_bytes: int = 0,
                   nar_bytes: int = 0, adopted: bool = False, reason: str = "acknowledged") -> None:
        now = self.clock()
        name = push.device
        old_state = str(self.busy.get(name) or self.store.device_state(name) or DeviceState.PENDING)
        self.store.record_ack(name, push.commit, push.toplevel, generation, now,
                              stream_bytes, nar_bytes, "adopted" if adopted else "committed")
        current = self.store.desired().targets.get(name)
        result = "superseded" if current is not None and current.toplevel != push.toplevel else "committed"
        self.bus.emit(DeviceStateChanged(now, name, old_state, str(DeviceState.IN_SYNC), reason))
        self.bus.emit(DeviceUpdated(now, name, result, push.commit, push.toplevel,
                                    seconds_since_seen=now - seen_at if seen_at else None, adopted=adopted))
        self._snapshot()

    def _push_failed(self, push: Push, kind: str, error: str, generation: int | None = None) -> None:
        now = self.clock()

        def backoff(failures: int) -> float:  # a quarantined revision is not retried; a timed-out one is probed now
            return 0.0 if kind in QUARANTINE else self._backoff(failures)

        self.store.record_failure(push.device, push.commit, push.toplevel, kind, error, now, backoff, generation)
        result = {"permanent": "failed", "unreachable": "unreachable", "rolled_back": "rolled_back",
                  "timed_out": "timed_out"}.get(kind, "retry")
        self.bus.emit(DeviceUpdated(now, push.device, result, push.commit, push.toplevel, error=error))
        self.bus.emit(ReconcileError(now, "push", error, push.device))

    # --- what became of a timed-out confirmation ----------------------------------

    def _probe_timeouts(self, desired: Desired, now: float) -> float | None:
        """Start a status probe for each device whose update of its target timed out and is due;
        returns the earliest later probe time (a wake-up for the loop)."""
        later = None
        for name, obs in self.store.observed(self.busy).devices.items():
            a, target = obs.attempt, desired.targets.get(name)
            if (a is None or a.kind != "timed_out" or target is None or target.commit != a.commit
                    or target.toplevel != a.toplevel or name in self.busy or name in self.probing):
                continue
            if now >= a.retry_at:
                self.probing.add(name)
                self._spawn(self._probe(Push(name, a.commit, a.toplevel), desired.seen_at))
            else:
                later = a.retry_at if later is None else min(later, a.retry_at)
        return later

    async def _probe(self, push: Push, seen_at: float) -> None:
        name = push.device
        verdict = "unknown"
        try:
            dev = self.fleet.devices.get(name) if self.fleet else None
            if dev is None:
                return
            generation = self.store.attempt_generation(name, push.commit, push.toplevel, "timed_out")
            try:
                status = await self.pusher.status(dev, attempts=1)
            except ReupError as exc:
                verdict, detail = "unreachable", str(exc)
            else:
                verdict, detail = judge_timed_out(status, push.toplevel, generation)
            log.info("%s: timed-out generation %s: %s (%s)", name, generation, verdict, detail)
            if verdict == "rolled_back":
                self._push_failed(push, "rolled_back", f"rolled back by the device: {detail}", generation)
            elif verdict == "committed":
                self._committed(push, generation, seen_at, reason="confirmed after the confirmation timed out")
            elif verdict in ("pending", "unreachable"):  # ask again later
                failures = self.probe_failures[name] = self.probe_failures.get(name, 0) + 1
                self.store.set_retry(name, self.clock() + self._backoff(failures))
            else:  # no trace of the generation on the device: it stays timed out, asked no more
                self.store.set_retry(name, float("inf"))
        finally:
            self.probing.discard(name)
            if verdict not in ("pending", "unreachable"):
                self.probe_failures.pop(name, None)
            self.wake()
