"""The executors of the reconcile loop: run one planned action, return its outcome (kopf style).

`execute_build` runs a Build through a `SystemBuilder`, `execute_push` a Push
through a `DeviceExecutor` (push, then confirm when the generation awaits
confirmation), `execute_probe` asks a device what became of a generation whose
confirmation timed out. They return `core.outcomes` values and never touch the
state store or the event bus: the loop (controller.py) records outcomes through
record.py; the loop's progress hooks (`on_phase`, `on_sent`) are the only way back
while an executor runs.

The two interfaces are what the loop is given, comin style: `io.ssh.SshPusher` and
`io.builder.Builder` in production, fakes in tests/unit/test_controller_loop.py.

A `timed_out` update (the confirmation could not be delivered before the device's
deadline) is not the end of the story: the device decides by itself. The planner
(`planner.probes`) says when to ask; `judge_timed_out` reads the device's `status`:
the generation rolled back (`last_rollback` names it) -> rolled back with the
device's reason; it runs and is no longer pending -> committed; still pending ->
ask again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from reup_receiver.protocol import StatusAnswer

from reup.core.errors import PermanentError, ReupError, TemporaryError, UnreachableError
from reup.core.model import (
    AttemptKind,
    BuildResult,
    Device,
    DeviceState,
    Fleet,
    Push,
    RolloutPolicy,
    Target,
)
from reup.core.outcomes import (
    BuildDeferred,
    BuildOutcome,
    Built,
    Paused,
    ProbeVerdict,
    Undecided,
    Updated,
    UpdateFailed,
    UpdateOutcome,
)
from reup.io.answers import ConfirmTimeoutError, RolledBackError
from reup.io.ssh import PushOutcome, SentHook
from reup.io.transfer import TransferPaused

log = logging.getLogger(__name__)

PhaseHook = Callable[[DeviceState], None]


class DeviceExecutor(Protocol):
    """The operations the loop runs on a device (`io.ssh.SshPusher`)."""

    async def push(self, dev: Device, toplevel: str, *, activation: str = "switch",
                   on_phase: PhaseHook = ..., confirm_timeout: float = 0.0,
                   on_sent: SentHook = ...) -> PushOutcome: ...

    async def confirm(self, dev: Device, toplevel: str, generation: int, deadline: float,
                      check: str | None) -> None: ...

    async def status(self, dev: Device, attempts: int | None = None) -> StatusAnswer: ...


class SystemBuilder(Protocol):
    """Evaluation and builds of device systems (`io.builder.Builder`)."""

    def evaluate(self, flake: str, fleet: Fleet, commit: str) -> list[Target]: ...

    def build(self, drv: str) -> str: ...

    def build_many(self, drv_paths: list[str]) -> dict[str, str | PermanentError]: ...


def attempt_kind(exc: ReupError) -> AttemptKind:
    """The failure kind of an error a device executor raised."""
    if isinstance(exc, UnreachableError):
        return AttemptKind.UNREACHABLE
    if isinstance(exc, TemporaryError):
        return AttemptKind.TRANSIENT
    if isinstance(exc, RolledBackError):
        return AttemptKind.ROLLED_BACK
    if isinstance(exc, ConfirmTimeoutError):
        return AttemptKind.TIMED_OUT
    return AttemptKind.PERMANENT


async def execute_build(builder: SystemBuilder, drv: str, commit: str) -> BuildOutcome:
    start = time.monotonic()
    try:
        out = await asyncio.to_thread(builder.build, drv)
        result = BuildResult(drv, commit, True, out)
    except PermanentError as exc:
        result = BuildResult(drv, commit, False, None, str(exc))
    except TemporaryError as exc:
        return BuildDeferred(drv, str(exc))
    return Built(result, time.monotonic() - start)


async def execute_push(executor: DeviceExecutor, dev: Device, push: Push, policy: RolloutPolicy, *,
                       on_phase: PhaseHook, on_sent: SentHook) -> UpdateOutcome:
    """Bring `dev` to the push's target under `policy` (activation, confirmation, health check)."""
    try:
        out = await executor.push(dev, push.toplevel, activation=policy.activation, on_phase=on_phase,
                                  confirm_timeout=policy.confirm_timeout, on_sent=on_sent)
        if out.generation is not None and out.confirm_deadline is not None:
            on_phase(DeviceState.CONFIRMING)
            await executor.confirm(dev, push.toplevel, out.generation, out.confirm_deadline, policy.health_check)
    except TransferPaused:
        return Paused(push)
    except (TemporaryError, PermanentError) as exc:
        generation = exc.generation if isinstance(exc, ConfirmTimeoutError) else None
        return UpdateFailed(push, attempt_kind(exc), str(exc), generation)
    except Exception as exc:  # an encoder or protocol bug: do not retry blindly
        log.exception("push to %s failed", push.device)
        bug = f"{type(exc).__name__}: {exc}"
        return UpdateFailed(push, AttemptKind.PERMANENT, f"internal error: {bug}", internal=bug)
    return Updated(push, out.generation, out.stream_bytes, out.nar_bytes, out.adopted)


def judge_timed_out(status: StatusAnswer, toplevel: str, generation: int | None) -> tuple[ProbeVerdict, str]:
    """What became of a generation whose confirmation timed out: (verdict, detail), the verdict one of
    ROLLED_BACK, COMMITTED, PENDING (still awaiting confirmation) or UNKNOWN."""
    rb = status.last_rollback
    if generation is not None and rb is not None and rb.get("generation") == generation:
        return ProbeVerdict.ROLLED_BACK, str(rb.get("reason") or "rolled back")
    if generation is not None and status.pending is not None and status.pending.generation == generation:
        return ProbeVerdict.PENDING, f"generation {generation} still awaits confirmation"
    gen = status.generation_of(toplevel)
    if status.current == toplevel and status.pending is None and (generation is None or gen == generation):
        return ProbeVerdict.COMMITTED, f"generation {gen} runs, confirmed"
    return ProbeVerdict.UNKNOWN, f"generation {generation} neither runs nor was rolled back"


async def execute_probe(executor: DeviceExecutor, dev: Device, push: Push, generation: int | None) -> UpdateOutcome:
    """Ask `dev` (one connection) what became of `generation` of the push, whose confirmation timed out."""
    try:
        status = await executor.status(dev, attempts=1)
    except ReupError as exc:
        verdict, detail = ProbeVerdict.UNREACHABLE, str(exc)
    else:
        verdict, detail = judge_timed_out(status, push.toplevel, generation)
    log.info("%s: timed-out generation %s: %s (%s)", push.device, generation, verdict, detail)
    if verdict == ProbeVerdict.ROLLED_BACK:
        return UpdateFailed(push, AttemptKind.ROLLED_BACK, f"rolled back by the device: {detail}", generation)
    if verdict == ProbeVerdict.COMMITTED:
        return Updated(push, generation, reason="confirmed after the confirmation timed out")
    return Undecided(push, verdict, detail)
