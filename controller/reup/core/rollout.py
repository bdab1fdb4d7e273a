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


def assess(desired: Desired, observed: Observed, policy: RolloutPolicy, now: float,
           decisions: Mapping[str, Decision]) -> Gate:
    control = observed.control
    cutoff = control.resumed_at if control.resumed_commit == desired.commit else -math.inf
    n_waves = len(policy.waves)
    devices = [0] * n_waves
    committed_at: list[list[float]] = [[] for _ in range(n_waves)]
    failed = [0] * n_waves
    updating = [0] * n_waves
    excluded = [0] * n_waves
    unsettled = [0] * n_waves
    unreachable: list[list[str]] = [[] for _ in range(n_waves)]
    executed = 0
    for name, target in desired.targets.items():
        i = wave_index(policy, target.wave)
        obs = observed.devices.get(name, DeviceObservation(name))
        devices[i] += 1
        d = decisions.get(name)
        if d is not None and (d.state not in SETTLED or d.state == DeviceState.UNREACHABLE
                              or isinstance(d.action, Push | Build)):
            unsettled[i] += 1
            if d.state == DeviceState.UNREACHABLE and obs.busy is None:
                unreachable[i].append(name)
        if obs.busy is not None:
            updating[i] += 1
        if target.error is None and obs.acked_toplevel == target.toplevel:
            committed_at[i].append(obs.acked_at or 0.0)
            if obs.acked_commit == desired.commit and (obs.acked_at or 0.0) > cutoff:
                executed += 1
            continue
        a = obs.attempt
        if a is None or a.commit != target.commit or a.toplevel != target.toplevel or a.at <= cutoff:
            continue
        if a.kind.quarantines or (a.kind == AttemptKind.TRANSIENT and a.failures >= MAX_TRANSIENT):
            failed[i] += 1
            executed += 1
        elif a.kind == AttemptKind.UNREACHABLE and now - a.since >= policy.unreachable_after:
            if policy.unreachable_counts_as_failure:
                failed[i] += 1
                executed += 1
            else:
                excluded[i] += 1

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
        done = sorted(committed_at[i])
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
