"""The pure planner: (desired, observed, policy, now) -> a decision per device.

Called by the reconcile loop (controller.py) on every pass and by `reup plan`.
No I/O, no clock: everything it needs is in its arguments, so its decisions are
golden-tested in tests/unit/test_planner.py. Rules, per device, first match wins:

1. an error in the target (fleet.toml, evaluation)        -> failed, stay put
2. acknowledged toplevel == target toplevel               -> in_sync
3. a push in flight                                       -> its state (transferring/activating)
4. target not built: build failed at this revision        -> failed
                     build running or needed              -> building (+ Build, once per drv)
5. last push of this revision failed permanently          -> failed (quarantined until a new commit)
   ... rolled back or was not confirmed in time           -> rolled_back (quarantined likewise)
6. last push failed transiently MAX_TRANSIENT times       -> failed (gave up until a new commit)
   last push failed transiently, retry time not reached   -> unreachable/pending (+ Wait)
7. otherwise                                              -> pending + Push

Then the rollout rules (rollout.py) gate every Push, in wave order:
8. rollout halted (failure threshold, operator pause)     -> halted, nothing starts
9. an earlier wave short of its success condition          -> pending (+ Wait for the bake), or
                                                              halted when that wave settled short
10. outside the device's transfer windows (`schedules`)   -> pending, "waiting_for_window" (+ Wait for
                                                              the next opening); takes no slot
11. more than policy.max_parallel updating in the wave     -> pending (waiting for a slot)
Devices mid-update always finish (rule 3), so a new commit supersedes a running
rollout only for devices that have not started.

`probes` is the other decision of a pass: a device whose confirmation timed out
(quarantined by rule 5) decides by itself whether to roll back, so the loop asks
it for its status, when its attempt's retry time comes, until it says.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from reup.core.model import (
    AttemptKind,
    Build,
    Decision,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    Plan,
    Push,
    RolloutPolicy,
    Target,
    Wait,
)
from reup.core.rollout import MAX_TRANSIENT, Gate, assess, wave_index
from reup.core.windows import WAITING_FOR_WINDOW, Schedule

S = DeviceState
__all__ = ["MAX_TRANSIENT", "decide", "gated", "plan", "probes"]


def plan(desired: Desired, observed: Observed, policy: RolloutPolicy, now: float,
         schedules: Mapping[str, Schedule] | None = None) -> Plan:
    builds: list[str] = []
    # Waves in policy order, then by name, so that a limited budget goes to early waves first.
    names = sorted(desired.targets, key=lambda n: (wave_index(policy, desired.targets[n].wave), n))
    base: dict[str, Decision] = {}
    for name in names:
        target = desired.targets[name]
        decision = decide(target, observed.devices.get(name, DeviceObservation(name=name)), observed, now)
        if isinstance(decision.action, Build) and decision.action.drv_path not in builds:
            builds.append(decision.action.drv_path)
        base[name] = decision

    gate = assess(desired, observed, policy, now, base)
    in_flight: dict[int, int] = {}
    for name, obs in observed.devices.items():
        if obs.busy is not None and name in desired.targets:
            i = wave_index(policy, desired.targets[name].wave)
            in_flight[i] = in_flight.get(i, 0) + 1
    decisions: dict[str, Decision] = {}
    for name, decision in base.items():
        if isinstance(decision.action, Push):
            decision = gated(decision, wave_index(policy, desired.targets[name].wave), gate, policy, now,
                             schedules, in_flight)
        decisions[name] = decision
    return Plan(decisions=decisions, builds=tuple(builds), rollout=gate.rollout)


def gated(decision: Decision, i: int, gate: Gate, policy: RolloutPolicy, now: float,
          schedules: Mapping[str, Schedule] | None, in_flight: dict[int, int]) -> Decision:
    """Rules 8-11 for a device whose own rules say Push (in wave `i`); a push that goes ahead takes a
    slot of `in_flight` (devices updating per wave)."""
    name = decision.device
    if gate.halted is not None:
        return Decision(name, S.HALTED, None, "rollout halted: " + gate.halted)
    if i > gate.open_index and gate.blocked is not None:
        return Decision(name, S.HALTED, None, "rollout halted: " + gate.blocked)
    if i > gate.open_index:
        wait = Wait(gate.wait_until) if gate.wait_until is not None else None
        return Decision(name, S.PENDING, wait, gate.waiting, blocked_by=gate.stalled)
    if schedules and name in schedules and not schedules[name].is_open(now):
        return _outside_window(name, schedules[name], now)
    if policy.max_parallel > 0 and in_flight.get(i, 0) >= policy.max_parallel:
        return Decision(name, S.PENDING, None, "waiting for a free slot (rollout.max_parallel)")
    in_flight[i] = in_flight.get(i, 0) + 1
    return decision


def _outside_window(name: str, schedule: Schedule, now: float) -> Decision:
    opens = schedule.next_open(now)
    return Decision(name, S.PENDING, Wait(opens) if opens is not None else None,
                    f"{WAITING_FOR_WINDOW}: transfers only in {schedule.describe()}")


def decide(target: Target, obs: DeviceObservation, observed: Observed, now: float) -> Decision:
    """Rules 1-7: the device's decision before the rollout rules."""
    name = target.device
    if target.error is not None:
        return Decision(name, S.FAILED, None, target.error)
    assert target.toplevel is not None and target.drv_path is not None
    if obs.acked_toplevel == target.toplevel:
        return Decision(name, S.IN_SYNC, None, "acknowledged")
    if obs.busy is not None:
        return Decision(name, obs.busy, None, "update in flight")

    build = observed.builds.get(target.drv_path)
    if target.drv_path in observed.building:
        return Decision(name, S.BUILDING, None, "build in flight")
    if build is None or (not build.ok and build.commit != target.commit):
        return Decision(name, S.BUILDING, Build(target.drv_path), "target not built")
    if not build.ok:
        return Decision(name, S.FAILED, None, build.error or "build failed")

    attempt = obs.attempt
    if attempt is not None and attempt.commit == target.commit and attempt.toplevel == target.toplevel:
        if attempt.kind.quarantine is not None:
            return Decision(name, attempt.kind.quarantine, None, attempt.error)
        if attempt.kind == AttemptKind.TRANSIENT and attempt.failures >= MAX_TRANSIENT:
            return Decision(name, S.FAILED, None, f"gave up after {attempt.failures} attempts: {attempt.error}")
        if now < attempt.retry_at:
            state = S.UNREACHABLE if attempt.kind == AttemptKind.UNREACHABLE else S.PENDING
            return Decision(name, state, Wait(attempt.retry_at), attempt.error)
    if attempt is not None and attempt.kind == AttemptKind.UNREACHABLE:
        return Decision(name, S.UNREACHABLE, Push(name, target.commit, target.toplevel), "retrying: " + attempt.error)
    return Decision(name, S.PENDING, Push(name, target.commit, target.toplevel), "update needed")


def probes(desired: Desired, observed: Observed, now: float,
           in_flight: Set[str] = frozenset()) -> tuple[tuple[Push, ...], float | None]:
    """(status probes to start now, the earliest later probe time): one for each device whose last
    update of its current target timed out and whose retry time has come, unless it is busy or
    `in_flight` (a probe or push running). The later time is a wake-up for the loop."""
    due: list[Push] = []
    later: float | None = None
    for name, obs in sorted(observed.devices.items()):
        a, target = obs.attempt, desired.targets.get(name)
        if (a is None or a.kind != AttemptKind.TIMED_OUT or target is None or target.commit != a.commit
                or target.toplevel != a.toplevel or obs.busy is not None or name in in_flight):
            continue
        if now >= a.retry_at:
            due.append(Push(name, a.commit, a.toplevel))
        else:
            later = a.retry_at if later is None else min(later, a.retry_at)
    return tuple(due), later
