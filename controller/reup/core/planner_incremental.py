"""The planner run incrementally: each pass re-decides only the devices whose inputs changed.

Called by the reconcile loop (loop/controller.py) on every pass, instead of `planner.plan`, with the
names of the devices whose observation changed since the last pass (an acknowledgement, a failure,
a push starting or ending) and the build results that changed. Pure like the planner (no I/O, no
clock: `now` is an argument) and built from its parts: `planner.decide` (rules 1-7) per device,
the rollout's per-device `Share`s summed in a `Tally` (so the gate costs O(waves), not O(devices)),
and `planner.gated` (rules 8-11) for the devices whose own rules say Push. Its decisions are the
planner's (tests/unit/test_planner_incremental.py replays random histories through both).

What makes a device's decision change without a write to its row is time: its retry time (a Wait),
its `unreachable_after`: such devices are re-decided when their time comes (a heap of deadlines).
A new revision, policy, schedule set or operator control re-plans everything. Push-gating revisits
every device waiting to push (not only changed ones) when the gate itself changed, with
`rollout.max_parallel` (slots go in wave and name order) and with transfer windows (they open with
time). A pass costs O(changed devices + due deadlines), plus O(devices waiting to push) in those cases.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from reup.core.model import (
    SETTLED,
    AttemptKind,
    Build,
    Decision,
    Desired,
    DeviceObservation,
    Observed,
    Plan,
    Push,
    RolloutPolicy,
    Wait,
)
from reup.core.planner import decide, gated
from reup.core.rollout import Share, Tally, gate, resume_cutoff, share, wave_index
from reup.core.windows import Schedule


@dataclass(frozen=True)
class PassPlan(Plan):
    """A pass's plan: `decisions` holds every device's (a live mapping, read it during the pass);
    `changed` the devices decided in this pass; the per-pass questions are answered without a scan."""

    changed: Mapping[str, Decision] = field(default_factory=dict)
    wakeup: float | None = None
    unsettled: int = 0  # devices not settled, or with a build or push to start

    def pushes(self) -> list[Push]:
        """Pushes decided in this pass (a device's Push only lasts until its push starts)."""
        return [d.action for d in self.changed.values() if isinstance(d.action, Push)]

    def next_wakeup(self) -> float | None:
        return self.wakeup

    def settled(self) -> bool:
        return not self.builds and not self.unsettled


def _unsettled(d: Decision) -> bool:
    return d.state not in SETTLED or isinstance(d.action, Build | Push)


class IncrementalPlanner:
    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._key: tuple[object, ...] | None = None
        self.base: dict[str, Decision] = {}  # rules 1-7
        self.final: dict[str, Decision] = {}  # after the rollout rules
        self.shares: dict[str, Share] = {}
        self.tally = Tally(1)
        self.candidates: set[str] = set()  # devices whose own rules say Push
        self.building_for: dict[str, set[str]] = {}  # drv -> devices whose own rules say Build
        self.by_drv: dict[str, set[str]] = {}  # drv -> devices targeting it
        self.timed_out: set[str] = set()  # devices whose last attempt timed out (for `planner.probes`)
        self._deadlines: list[tuple[float, str]] = []  # when time alone may change a device's decision
        self._waits: list[tuple[float, str]] = []  # Wait actions (next_wakeup), checked lazily
        self._unsettled: set[str] = set()
        self._gate: tuple[object, ...] | None = None
        self._building: frozenset[str] = frozenset()
        self.decided = 0  # devices decided by the last pass (tests count them)

    def plan(self, desired: Desired, observed: Observed, policy: RolloutPolicy, now: float,
             schedules: Mapping[str, Schedule] | None = None, changed: Iterable[str] | None = None,
             builds_changed: Iterable[str] = ()) -> PassPlan:
        """Plan the pass. `changed`: devices whose observation changed since the last call (None: any,
        re-plan all); `builds_changed`: drv paths whose build result changed."""
        key = (desired.commit, id(desired.targets), policy, id(schedules) if schedules else None, observed.control)
        names: set[str]
        if changed is None or key != self._key:
            self._reset(desired, policy, key)
            names = set(desired.targets)
        else:
            names = {n for n in changed if n in desired.targets}
            for drv in set(builds_changed) | (observed.building ^ self._building):
                names |= self.by_drv.get(drv, set())
            while self._deadlines and self._deadlines[0][0] <= now:
                names.add(heapq.heappop(self._deadlines)[1])
        self._building = observed.building
        cutoff = resume_cutoff(desired, observed)
        for name in names:
            self._decide(name, desired, observed, policy, now, cutoff)
        self.decided = len(names)

        g = gate(self.tally, desired, observed, policy, now)
        signature = (g.halted, g.open_index, g.blocked, g.wait_until, g.waiting, g.stalled)
        if signature != self._gate or policy.max_parallel > 0 or schedules:
            self._gate = signature
            regate = sorted(self.candidates, key=lambda n: (wave_index(policy, desired.targets[n].wave), n))
        else:
            regate = [n for n in names if n in self.candidates]
        in_flight = {i: n for i, n in enumerate(self.tally.updating) if n}
        out: dict[str, Decision] = {}
        for name in regate:
            out[name] = gated(self.base[name], self.shares[name].wave, g, policy, now, schedules, in_flight)
        for name in names:
            if name not in self.candidates:
                out[name] = self.base[name]
        for name, d in out.items():
            self.final[name] = d
            if _unsettled(d):
                self._unsettled.add(name)
            else:
                self._unsettled.discard(name)
            if isinstance(d.action, Wait):
                heapq.heappush(self._waits, (d.action.until, name))
        return PassPlan(decisions=self.final, builds=tuple(d for d, users in self.building_for.items() if users),
                        rollout=g.rollout, changed=out, wakeup=self._next_wait(), unsettled=len(self._unsettled))

    def _reset(self, desired: Desired, policy: RolloutPolicy, key: tuple[object, ...]) -> None:
        self._clear()
        self._key = key
        self.tally = Tally(len(policy.waves))
        for name, t in desired.targets.items():
            if t.drv_path is not None:
                self.by_drv.setdefault(t.drv_path, set()).add(name)

    def _decide(self, name: str, desired: Desired, observed: Observed, policy: RolloutPolicy, now: float,
                cutoff: float) -> None:
        target = desired.targets[name]
        obs = observed.devices.get(name, DeviceObservation(name=name))
        old = self.base.get(name)
        if old is not None and isinstance(old.action, Build):
            self.building_for[old.action.drv_path].discard(name)
        d = self.base[name] = decide(target, obs, observed, now)
        if isinstance(d.action, Build):
            self.building_for.setdefault(d.action.drv_path, set()).add(name)
        if isinstance(d.action, Push):
            self.candidates.add(name)
        else:
            self.candidates.discard(name)
        a = obs.attempt
        if a is not None and a.kind == AttemptKind.TIMED_OUT:
            self.timed_out.add(name)
        else:
            self.timed_out.discard(name)
        s = share(name, target, obs, d, policy, now, cutoff, desired.commit)
        previous = self.shares.get(name)
        if previous is not None:
            self.tally.remove(name, previous)
        self.tally.add(name, s)
        self.shares[name] = s
        # Time alone changes the decision at a retry time, and the share at unreachable_after.
        if a is not None and now < a.retry_at < math.inf:
            heapq.heappush(self._deadlines, (a.retry_at, name))
        if s.recheck is not None:
            heapq.heappush(self._deadlines, (s.recheck, name))

    def _next_wait(self) -> float | None:
        while self._waits:
            until, name = self._waits[0]
            d = self.final.get(name)
            if d is not None and isinstance(d.action, Wait) and d.action.until == until:
                return until
            heapq.heappop(self._waits)  # that device's decision has changed since
        return None
