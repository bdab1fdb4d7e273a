"""The incremental planner (core/planner_incremental.py) decides as the planner does: random histories
(acknowledgements, failures of every kind, pushes starting and ending, builds, time passing, waves,
bake time, max_parallel, failure threshold, pause) are replayed through both, pass by pass, telling the
incremental one only which devices and builds changed. And a pass re-decides only those devices."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from reup.core.model import (
    Attempt,
    AttemptKind,
    BuildResult,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    RolloutControl,
    RolloutPolicy,
    Target,
)
from reup.core.planner import plan
from reup.core.planner_incremental import IncrementalPlanner

C1, C2 = "c1" * 20, "c2" * 20
POLICIES = [
    RolloutPolicy(),
    RolloutPolicy(waves=("canary", "rest"), bake_time=5.0),
    RolloutPolicy(waves=("canary", "mid", "rest"), max_parallel=2, success_ratio=0.5),
    RolloutPolicy(waves=("canary", "rest"), failure_threshold=0.3, min_executed=2, unreachable_after=20.0,
                  unreachable_counts_as_failure=True),
    RolloutPolicy(waves=("canary", "rest"), unreachable_after=10.0, success_ratio=0.6),
]


def top(config: str, commit: str) -> str:
    return f"/nix/store/{config}-{commit[:2]}-sys"


def fleet(n: int, policy: RolloutPolicy, commit: str) -> Desired:
    waves = policy.waves
    targets = {}
    for i in range(n):
        name = f"d{i:03d}"
        config = f"cfg{i % 4}"
        error = "eval failed" if i % 17 == 5 else None
        targets[name] = Target(name, commit, waves[min(i % 5, len(waves) - 1)], None if error else top(config, commit) + ".drv",
                               None if error else top(config, commit), error)
    return Desired(commit, 1.0, targets)


def compare(full: object, inc: object) -> None:
    assert full.decisions == dict(inc.decisions)  # type: ignore[attr-defined]
    assert set(full.builds) == set(inc.builds)  # type: ignore[attr-defined]
    assert full.rollout == inc.rollout  # type: ignore[attr-defined]
    assert full.next_wakeup() == inc.next_wakeup()  # type: ignore[attr-defined]
    assert full.settled() == inc.settled()  # type: ignore[attr-defined]
    assert sorted(p.device for p in full.pushes()) == sorted(p.device for p in inc.pushes())  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", range(25))
def test_incremental_plans_equal_full_plans(seed: int) -> None:
    rnd = random.Random(seed)
    policy = POLICIES[seed % len(POLICIES)]
    desired = fleet(40, policy, C1)
    devices = {n: DeviceObservation(n) for n in desired.targets}
    builds: dict[str, BuildResult] = {}
    building: set[str] = set()
    control = RolloutControl()
    inc = IncrementalPlanner()
    now = 100.0
    changed: set[str] | None = None
    builds_changed: set[str] = set()
    for step in range(150):
        observed = Observed(devices=dict(devices), builds=dict(builds), building=frozenset(building), control=control)
        full = plan(desired, observed, policy, now)
        got = inc.plan(desired, observed, policy, now, changed=changed, builds_changed=builds_changed)
        compare(full, got)
        changed, builds_changed = set(), set()
        # What the loop would do: build, start pushes; then random outcomes.
        for drv in full.builds:
            if rnd.random() < 0.5:
                ok = rnd.random() < 0.9
                builds[drv] = BuildResult(drv, desired.commit or "", ok, drv[:-4] if ok else None, None if ok else "no")
                builds_changed.add(drv)
            else:
                building.add(drv)
        for drv in list(building):
            if rnd.random() < 0.5:
                building.discard(drv)
                builds[drv] = BuildResult(drv, desired.commit or "", True, drv[:-4])
                builds_changed.add(drv)
        for p in full.pushes():  # the loop starts every push it is given
            devices[p.device] = replace(devices[p.device], busy=DeviceState.TRANSFERRING)
            changed.add(p.device)
        for name, obs in list(devices.items()):
            if obs.busy is None or rnd.random() < 0.5:
                continue
            t = desired.targets[name]
            r = rnd.random()
            if r < 0.6:
                devices[name] = DeviceObservation(name, t.toplevel, t.commit, None, None, now)
            else:
                kind = rnd.choice(list(AttemptKind))
                old = obs.attempt
                failures = old.failures + 1 if old and old.toplevel == t.toplevel else 1
                since = old.since if old and old.kind == kind and old.toplevel == t.toplevel else now
                retry = now + rnd.choice([0.0, 3.0, 8.0, float("inf") if kind.quarantines else 4.0])
                devices[name] = replace(obs, busy=None, attempt=Attempt(t.commit, t.toplevel or "", kind, "x", failures,
                                                                         retry, since, now))
            changed.add(name)
        if rnd.random() < 0.03:
            control = RolloutControl(paused=not control.paused)
        if step == 90:  # a new revision: every system changes
            desired = fleet(40, policy, C2)
        now += rnd.choice([0.5, 1.0, 2.5, 6.0])


def test_a_pass_decides_only_the_changed_devices() -> None:
    """Per-pass work independent of N: one acknowledgement re-decides one device, at 100 or 5,000."""
    counts = []
    for n in (100, 5000):
        desired = fleet(n, RolloutPolicy(), C1)
        builds = {t.drv_path: BuildResult(t.drv_path, C1, True, t.toplevel) for t in desired.targets.values() if t.drv_path}
        devices = {name: DeviceObservation(name, busy=DeviceState.CONFIRMING) for name in desired.targets}
        inc = IncrementalPlanner()
        inc.plan(desired, Observed(devices=devices, builds=builds), RolloutPolicy(), 10.0)
        assert inc.decided == n
        name = "d001"
        t = desired.targets[name]
        devices[name] = DeviceObservation(name, t.toplevel, C1, None, None, 11.0)
        p = inc.plan(desired, Observed(devices=devices, builds=builds), RolloutPolicy(), 11.0, changed={name})
        assert p.decisions[name].state == DeviceState.IN_SYNC and list(p.changed) == [name]
        counts.append(inc.decided)
        assert p.rollout.waves[0].committed == 1
    assert counts == [1, 1]
