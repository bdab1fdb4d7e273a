"""The pure planner: (desired, observed, policy, now) -> a decision per device.

Called by the reconcile loop (controller.py) on every pass and by `reup plan`.
No I/O, no clock: everything it needs is in its arguments, so its decisions are
golden-tested in tests/test_planner.py. Rules, per device, first match wins:

1. an error in the target (fleet.toml, evaluation)        -> failed, stay put
2. acknowledged toplevel == target toplevel               -> in_sync
3. a push in flight                                       -> its state (transferring/activating)
4. target not built: build failed at this revision        -> failed
                     build running or needed              -> building (+ Build, once per drv)
5. last push of this revision failed permanently          -> failed (quarantined until a new commit)
6. last push failed transiently MAX_TRANSIENT times       -> failed (gave up until a new commit)
   last push failed transiently, retry time not reached   -> unreachable/pending (+ Wait)
7. otherwise                                              -> pending + Push, within policy.max_parallel

The rollout issue adds waves, thresholds and confirmation as further rules
between 5 and 7; `policy` and `now` are already here for them.
"""

from __future__ import annotations

from .fleet import RolloutPolicy
from .model import (
    Build,
    Decision,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    Plan,
    Push,
    Target,
    Wait,
)

S = DeviceState
# Consecutive transient failures (not unreachability) of one revision before giving up on it.
MAX_TRANSIENT = 5


def plan(desired: Desired, observed: Observed, policy: RolloutPolicy, now: float) -> Plan:
    decisions: dict[str, Decision] = {}
    builds: list[str] = []
    in_flight = sum(1 for o in observed.devices.values() if o.busy is not None)
    budget = policy.max_parallel - in_flight if policy.max_parallel > 0 else None

    # Waves in policy order, then by name, so that a limited budget goes to early waves first.
    order = {w: i for i, w in enumerate(policy.waves)}
    names = sorted(desired.targets, key=lambda n: (order.get(desired.targets[n].wave, len(order)), n))
    for name in names:
        target = desired.targets[name]
        obs = observed.devices.get(name, DeviceObservation(name=name))
        decision = _decide(target, obs, observed, now)
        if isinstance(decision.action, Build) and decision.action.drv_path not in builds:
            builds.append(decision.action.drv_path)
        if isinstance(decision.action, Push) and budget is not None:
            if budget <= 0:
                decision = Decision(name, S.PENDING, None, "waiting for a free slot (rollout.max_parallel)")
            budget -= 1
        decisions[name] = decision
    return Plan(decisions=decisions, builds=tuple(builds))


def _decide(target: Target, obs: DeviceObservation, observed: Observed, now: float) -> Decision:
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
        if attempt.kind == "permanent":
            return Decision(name, S.FAILED, None, attempt.error)
        if attempt.kind == "transient" and attempt.failures >= MAX_TRANSIENT:
            return Decision(name, S.FAILED, None, f"gave up after {attempt.failures} attempts: {attempt.error}")
        if now < attempt.retry_at:
            state = S.UNREACHABLE if attempt.kind == "unreachable" else S.PENDING
            return Decision(name, state, Wait(attempt.retry_at), attempt.error)
    if attempt is not None and attempt.kind == "unreachable":
        return Decision(name, S.UNREACHABLE, Push(name, target.commit, target.toplevel), "retrying: " + attempt.error)
    return Decision(name, S.PENDING, Push(name, target.commit, target.toplevel), "update needed")
