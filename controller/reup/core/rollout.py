"""Rollout gating, pure: which waves may start devices, and whether the rollout is halted.

Called by the planner (planner.py) on every pass with the per-device decisions it
made without rollout rules. No I/O, no clock. For the current revision:

- a device is *committed* when its acknowledged toplevel is its target;
- it was *executed* at this revision when it acknowledged this commit, or an
  update of this commit failed, rolled back or timed out there (only outcomes
  after a `reup rollout resume` of this revision count);
- a device unreachable for `unreachable_after` seconds stops blocking its wave:
  it counts as failed (`unreachable_counts_as_failure`) or leaves the wave's count;
- the rollout halts when failed / max(executed, min_executed) >= failure_threshold
  (with at least one failure), or when the operator paused it;
- waves open in `policy.waves` order: wave i+1 opens once wave i has
  ceil(success_ratio x devices) committed and `bake_time` has passed since the
  last of those committed. A wave whose devices all settled short of that halts
  the later waves.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass

from reup.core.model import (
    SETTLED,
    AttemptKind,
    Build,
    Decision,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    Push,
    Rollout,
    RolloutPolicy,
    Target,
    WaveCounts,
)

MAX_TRANSIENT = 5  # consecutive transient failures of one revision before giving up on it


@dataclass(frozen=True)
class Gate:
    rollout: Rollout
    open_index: int  # devices of waves up to this index may start
    halted: str | None = None  # no device starts at all (failure threshold, pause)
    wait_until: float | None = None  # the open wave is baking until then
    blocked: str | None = None  # why later waves will not open without a change (halts them)
    waiting: str = ""  # why later waves wait
    stalled: str | None = None  # the open wave waits only on unreachable devices (named)


def wave_index(policy: RolloutPolicy, wave: str) -> int:
    """Position of `wave` in the policy; a wave not listed (no `waves` set) joins the last one."""
    return policy.waves.index(wave) if wave in policy.waves else len(policy.waves) - 1


@dataclass(frozen=True)
class Share:
    """One device's part in the gate's counts: `assess` folds every device's; the incremental planner
    (planner_incremental.py) takes a changed device's old share out of its `Tally` and puts the new one in."""

    wave: int
    unsettled: bool = False
    unreachable: bool = False  # unsettled because unreachable, and not busy (may stall its wave)
    updating: bool = False
    committed_at: float | None = None  # running its target (acknowledged then)
    executed: bool = False
    failed: bool = False
    excluded: bool = False  # unreachable for unreachable_after, leaving its wave's count
    recheck: float | None = None  # when `now` alone changes this share (unreachable_after)


def share(name: str, target: Target, obs: DeviceObservation, decision: Decision | None, policy: RolloutPolicy,
          now: float, cutoff: float, commit: str | None) -> Share:
    """The device's share of the gate's counts (see the module docstring)."""
    i = wave_index(policy, target.wave)
    unsettled = unreachable = False
    if decision is not None and (decision.state not in SETTLED or decision.state == DeviceState.UNREACHABLE
                                 or isinstance(decision.action, Push | Build)):
        unsettled = True
        unreachable = decision.state == DeviceState.UNREACHABLE and obs.busy is None
    updating = obs.busy is not None
    if target.error is None and obs.acked_toplevel == target.toplevel:
        executed = obs.acked_commit == commit and (obs.acked_at or 0.0) > cutoff
        return Share(i, unsettled, unreachable, updating, obs.acked_at or 0.0, executed)
    a = obs.attempt
    if a is None or a.commit != target.commit or a.toplevel != target.toplevel or a.at <= cutoff:
        return Share(i, unsettled, unreachable, updating)
    if a.kind.quarantines or (a.kind == AttemptKind.TRANSIENT and a.failures >= MAX_TRANSIENT):
        return Share(i, unsettled, unreachable, updating, executed=True, failed=True)
    if a.kind == AttemptKind.UNREACHABLE:
        if now - a.since >= policy.unreachable_after:
            counts = policy.unreachable_counts_as_failure
            return Share(i, unsettled, unreachable, updating, executed=counts, failed=counts, excluded=not counts)
        return Share(i, unsettled, unreachable, updating, recheck=a.since + policy.unreachable_after)
    return Share(i, unsettled, unreachable, updating)


class Tally:
    """The gate's counts per wave, as the sum of the devices' shares (add and remove keep it current)."""

    def __init__(self, n_waves: int) -> None:
        self.devices = [0] * n_waves
        self.committed_at: list[list[float]] = [[] for _ in range(n_waves)]  # kept sorted
        self.failed = [0] * n_waves
        self.updating = [0] * n_waves
        self.excluded = [0] * n_waves
        self.unsettled = [0] * n_waves
        self.unreachable: list[set[str]] = [set() for _ in range(n_waves)]
        self.executed = 0

    def add(self, name: str, s: Share, sign: int = 1) -> None:
        i = s.wave
        self.devices[i] += sign
        self.unsettled[i] += sign * s.unsettled
        if s.unreachable:
            (self.unreachable[i].add if sign > 0 else self.unreachable[i].discard)(name)
        self.updating[i] += sign * s.updating
        if s.committed_at is not None:
            if sign > 0:
                bisect.insort(self.committed_at[i], s.committed_at)
            else:
                del self.committed_at[i][bisect.bisect_left(self.committed_at[i], s.committed_at)]
        self.executed += sign * s.executed
        self.failed[i] += sign * s.failed
        self.excluded[i] += sign * s.excluded

    def remove(self, name: str, s: Share) -> None:
        self.add(name, s, -1)


def assess(desired: Desired, observed: Observed, policy: RolloutPolicy, now: float,
           decisions: Mapping[str, Decision]) -> Gate:
    tally = Tally(len(policy.waves))
    cutoff = resume_cutoff(desired, observed)
    for name, target in desired.targets.items():
        obs = observed.devices.get(name, DeviceObservation(name))
        tally.add(name, share(name, target, obs, decisions.get(name), policy, now, cutoff, desired.commit))
    return gate(tally, desired, observed, policy, now)


def resume_cutoff(desired: Desired, observed: Observed) -> float:
    """Outcomes at or before this time do not count (a `reup rollout resume` of this revision)."""
    control = observed.control
    return control.resumed_at if control.resumed_commit == desired.commit else -math.inf


def gate(tally: Tally, desired: Desired, observed: Observed, policy: RolloutPolicy, now: float) -> Gate:
    """The gate from the counts: O(waves)."""
    control = observed.control
    n_waves = len(policy.waves)
    devices, committed_at, failed, updating = tally.devices, tally.committed_at, tally.failed, tally.updating
    excluded, unsettled, unreachable, executed = tally.excluded, tally.unsettled, tally.unreachable, tally.executed

    total_failed = sum(failed)
    halted = None
    if control.paused:
        halted = "paused (reup rollout resume)"
    elif total_failed and total_failed / max(executed, policy.min_executed) >= policy.failure_threshold:
        halted = (f"failure threshold reached: {total_failed} failed of {executed} executed "
                  f"(failure_threshold {policy.failure_threshold:g}, min_executed {policy.min_executed})")

    open_index, wait_until, blocked, waiting, stalled = n_waves - 1, None, None, "", None
    for i, wave in enumerate(policy.waves[:-1]):
        needed = math.ceil(policy.success_ratio * (devices[i] - excluded[i]) - 1e-9)
        done = committed_at[i]  # sorted
        if len(done) >= needed:
            baked_at = (done[needed - 1] if needed > 0 else 0.0) + policy.bake_time
            if now >= baked_at:
                continue
            open_index, wait_until = i, baked_at
            waiting = f"wave {wave} baking until {baked_at:.0f}"
        else:
            open_index = i
            waiting = f"waiting for wave {wave}: {len(done)} of {needed} needed committed"
            if not unsettled[i]:
                blocked = f"wave {wave} settled short of success_ratio: {len(done)} of {needed} needed committed"
            elif len(unreachable[i]) == unsettled[i]:
                stalled = f"wave {wave} waits on unreachable {', '.join(sorted(unreachable[i]))}"
        break

    total = len(desired.targets)
    counts = tuple(
        WaveCounts(w, devices[i], len(committed_at[i]), failed[i], updating[i]) for i, w in enumerate(policy.waves)
    )
    rollout = Rollout(
        revision=desired.commit,
        wave=policy.waves[open_index] if total else None,
        wave_index=open_index,
        halted=halted or blocked,
        paused=control.paused,
        executed=executed,
        failed=total_failed,
        progress=sum(len(c) for c in committed_at) / total if total else 1.0,
        waves=counts,
        baking_until=wait_until,
    )
    return Gate(rollout, open_index, halted, wait_until, blocked, waiting, stalled)
