"""Golden cases of the planner's rollout rules: waves, bake time, max_parallel per wave, failure
threshold, pause/resume, supersede, quarantine and unreachable devices."""

from __future__ import annotations

from reup.core.model import (
    Attempt,
    AttemptKind,
    BuildResult,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    Plan,
    Push,
    RolloutControl,
    RolloutPolicy,
    Target,
    Wait,
)
from reup.core.planner import plan

C1, C2, C3 = "c1" * 20, "c2" * 20, "c3" * 20
S = DeviceState
WAVES = RolloutPolicy(waves=("canary", "rest"))
CANARY, REST = ("a", "b"), ("x", "y")


def top(dev: str, commit: str) -> str:
    return f"/nix/store/{dev}-{commit[:2]}-sys"


def desired(commit: str = C2) -> Desired:
    targets = {d: Target(d, commit, "canary" if d in CANARY else "rest", top(d, commit) + ".drv", top(d, commit))
               for d in (*CANARY, *REST)}
    return Desired(commit, 1.0, targets)


def observed(devices: dict[str, DeviceObservation], commit: str = C2, **kw: object) -> Observed:
    builds = {top(d, c) + ".drv": BuildResult(top(d, c) + ".drv", c, True, top(d, c))
              for d in (*CANARY, *REST) for c in (C1, C2, C3)}
    return Observed(devices={d: devices.get(d, DeviceObservation(d, top(d, C1), C1, acked_at=0.0))
                             for d in (*CANARY, *REST)}, builds=builds, **kw)  # type: ignore[arg-type]


def acked(dev: str, at: float, commit: str = C2) -> DeviceObservation:
    return DeviceObservation(dev, top(dev, commit), commit, acked_at=at)


def failed(dev: str, kind: AttemptKind, at: float = 50.0, commit: str = C2) -> DeviceObservation:
    return DeviceObservation(dev, top(dev, C1), C1, attempt=Attempt(commit, top(dev, commit), kind, f"{kind}!",
                                                                     since=at, at=at), acked_at=0.0)


def got(p: Plan) -> dict[str, tuple[str, object]]:
    return {n: (str(d.state), d.action) for n, d in p.decisions.items()}


def push(dev: str, commit: str = C2) -> tuple[str, Push]:
    return ("pending", Push(dev, commit, top(dev, commit)))


def test_second_wave_waits_for_the_first_to_commit() -> None:
    p = plan(desired(), observed({}), WAVES, 100.0)
    assert got(p) == {"a": push("a"), "b": push("b"), "x": ("pending", None), "y": ("pending", None)}
    assert "waiting for wave canary: 0 of 2" in p.decisions["x"].reason
    assert (p.rollout.wave, p.rollout.wave_index, p.rollout.halted, p.rollout.progress) == ("canary", 0, None, 0.0)
    assert not p.settled()
    # one canary committed, the other updating: still closed
    p = plan(desired(), observed({"a": acked("a", 90.0), "b": DeviceObservation("b", busy=S.CONFIRMING)}), WAVES, 100.0)
    assert got(p) == {"a": ("in_sync", None), "b": ("confirming", None), "x": ("pending", None), "y": ("pending", None)}
    assert [(w.name, w.devices, w.committed, w.updating) for w in p.rollout.waves] == [("canary", 2, 1, 1), ("rest", 2, 0, 0)]


def test_bake_time_counts_from_the_last_needed_commit() -> None:
    policy = RolloutPolicy(waves=("canary", "rest"), bake_time=30.0)
    obs = observed({"a": acked("a", 90.0), "b": acked("b", 95.0)})
    p = plan(desired(), obs, policy, 100.0)
    assert got(p)["x"] == ("pending", Wait(125.0)) and p.next_wakeup() == 125.0
    assert p.rollout.wave == "canary" and "baking" in p.decisions["x"].reason
    p = plan(desired(), obs, policy, 125.0)
    assert got(p) == {"a": ("in_sync", None), "b": ("in_sync", None), "x": push("x"), "y": push("y")}
    assert (p.rollout.wave, p.rollout.wave_index, p.rollout.progress) == ("rest", 1, 0.5)


def test_success_ratio_opens_the_next_wave_early() -> None:
    policy = RolloutPolicy(waves=("canary", "rest"), success_ratio=0.5)
    p = plan(desired(), observed({"a": acked("a", 90.0), "b": DeviceObservation("b", busy=S.TRANSFERRING)}), policy, 100.0)
    assert got(p)["x"] == push("x") and got(p)["y"] == push("y")


def test_max_parallel_is_per_wave_and_counts_updates_in_flight() -> None:
    policy = RolloutPolicy(waves=("canary", "rest"), max_parallel=1)
    p = plan(desired(), observed({"a": acked("a", 1.0), "b": acked("b", 2.0),
                                  "x": DeviceObservation("x", busy=S.ACTIVATING)}), policy, 100.0)
    assert got(p)["y"] == ("pending", None) and "max_parallel" in p.decisions["y"].reason
    p = plan(desired(), observed({}), RolloutPolicy(waves=("canary", "rest"), max_parallel=1), 100.0)
    assert got(p)["a"] == push("a") and got(p)["b"] == ("pending", None)


def test_failure_threshold_halts_everything_but_updates_in_flight() -> None:
    policy = RolloutPolicy(waves=("canary", "rest"), failure_threshold=0.5, min_executed=2)
    obs = observed({"a": failed("a", AttemptKind.ROLLED_BACK), "b": DeviceObservation("b", busy=S.ACTIVATING)})
    p = plan(desired(), obs, policy, 100.0)  # 1 failed / max(1 executed, min_executed 2) = 0.5
    assert got(p) == {"a": ("rolled_back", None), "b": ("activating", None), "x": ("halted", None), "y": ("halted", None)}
    assert p.rollout.halted and "failure threshold reached: 1 failed of 1 executed" in p.rollout.halted
    # no new device starts, even in an open wave: an unreachable device's retry waits too
    policy1 = RolloutPolicy(waves=("canary", "rest"), failure_threshold=0.5, min_executed=1, success_ratio=0.5)
    obs = observed({"a": failed("a", AttemptKind.PERMANENT), "b": acked("b", 60.0),
                    "x": DeviceObservation("x", attempt=Attempt(C2, top("x", C2), AttemptKind.UNREACHABLE, "down", since=90.0))})
    p = plan(desired(), obs, policy1, 100.0)  # 1 failed / 2 executed = 0.5
    assert got(p) == {"a": ("failed", None), "b": ("in_sync", None), "x": ("halted", None), "y": ("halted", None)}
    assert p.settled() and p.decisions["y"].reason.startswith("rollout halted: failure threshold")


def test_min_executed_keeps_one_early_failure_from_halting() -> None:
    policy = RolloutPolicy(waves=("canary", "rest"), failure_threshold=0.5, min_executed=4)
    p = plan(desired(), observed({"a": failed("a", AttemptKind.TIMED_OUT)}), policy, 100.0)  # 1 / max(1, 4) < 0.5
    assert got(p)["a"] == ("rolled_back", None) and got(p)["b"] == push("b") and p.rollout.halted is None


def test_resume_and_new_commit_lift_a_halt_without_unquarantining() -> None:
    policy = RolloutPolicy(waves=("canary", "rest"), success_ratio=0.5, failure_threshold=0.5)
    devs = {"a": failed("a", AttemptKind.ROLLED_BACK, at=50.0), "b": acked("b", 40.0)}
    assert plan(desired(), observed(devs), policy, 100.0).rollout.halted
    resumed = observed(devs, control=RolloutControl(resumed_commit=C2, resumed_at=60.0))
    p = plan(desired(), resumed, policy, 100.0)
    assert p.rollout.halted is None
    assert got(p) == {"a": ("rolled_back", None), "b": ("in_sync", None), "x": push("x"), "y": push("y")}
    # A resume of another revision does not count; a new commit (a fix) starts afresh and retries a.
    stale = observed(devs, control=RolloutControl(resumed_commit=C1, resumed_at=60.0))
    assert plan(desired(), stale, policy, 100.0).rollout.halted
    p = plan(desired(C3), observed(devs), policy, 100.0)
    assert p.rollout.halted is None and got(p)["a"] == push("a", C3)


def test_pause_holds_every_start() -> None:
    p = plan(desired(), observed({}, control=RolloutControl(paused=True)), WAVES, 100.0)
    assert {n: s for n, (s, _) in got(p).items()} == {"a": "halted", "b": "halted", "x": "halted", "y": "halted"}
    assert p.rollout.paused and p.rollout.halted == "paused (reup rollout resume)"
    assert all(d.action is None for d in p.decisions.values())


def test_new_commit_supersedes_not_started_devices_only() -> None:
    # a is mid-update to C2's system; b has not started: it goes straight to C3's.
    obs = observed({"a": DeviceObservation("a", top("a", C1), C1, busy=S.TRANSFERRING), "b": acked("b", 1.0, C1)})
    p = plan(desired(C3), obs, WAVES, 100.0)
    assert got(p)["a"] == ("transferring", None) and got(p)["b"] == push("b", C3)


def test_quarantine_until_a_new_commit() -> None:
    for kind, state in ((AttemptKind.ROLLED_BACK, "rolled_back"), (AttemptKind.TIMED_OUT, "rolled_back"),
                        (AttemptKind.PERMANENT, "failed")):
        obs = observed({"a": failed("a", kind)})
        assert got(plan(desired(), obs, RolloutPolicy(), 100.0))["a"] == (state, None)
        assert got(plan(desired(C3), obs, RolloutPolicy(), 100.0))["a"] == push("a", C3)


def test_unreachable_device_stops_blocking_its_wave_after_unreachable_after() -> None:
    down = {"a": acked("a", 10.0),
            "b": DeviceObservation("b", attempt=Attempt(C2, top("b", C2), AttemptKind.UNREACHABLE, "refused", failures=3,
                                                        retry_at=130.0, since=20.0, at=95.0))}
    policy = RolloutPolicy(waves=("canary", "rest"), unreachable_after=100.0)
    p = plan(desired(), observed(down), policy, 100.0)  # unreachable for 80 s: the wave waits
    assert got(p) == {"a": ("in_sync", None), "b": ("unreachable", Wait(130.0)), "x": ("pending", None),
                      "y": ("pending", None)}
    p = plan(desired(), observed(down), policy, 121.0)  # 101 s: it leaves the wave's count
    assert got(p)["x"] == push("x") and got(p)["b"] == ("unreachable", Wait(130.0)) and p.rollout.halted is None
    counted = RolloutPolicy(waves=("canary", "rest"), unreachable_after=100.0, unreachable_counts_as_failure=True,
                            failure_threshold=0.5)
    p = plan(desired(), observed(down), counted, 121.0)  # now a failure: 1 of 2 executed
    assert p.rollout.halted and got(p)["x"] == ("halted", None)


def test_wave_settled_short_of_success_halts_later_waves() -> None:
    p = plan(desired(), observed({"a": failed("a", AttemptKind.PERMANENT), "b": acked("b", 5.0)}), WAVES, 100.0)
    assert got(p)["x"] == ("halted", None) and "wave canary settled short" in (p.rollout.halted or "")
    assert p.settled()


def test_devices_behind_an_unreachable_canary_are_blocked_so_run_once_can_end() -> None:
    down = {"a": DeviceObservation("a", acked_toplevel=top("a", C2), acked_commit=C2, acked_at=10.0),
            "b": DeviceObservation("b", attempt=Attempt(C2, top("b", C2), AttemptKind.UNREACHABLE, "refused", failures=1,
                                                        retry_at=130.0, since=20.0, at=20.0))}
    policy = RolloutPolicy(waves=("canary", "rest"), unreachable_after=600.0)
    p = plan(desired(), observed(down), policy, 100.0)
    assert p.decisions["b"].state == S.UNREACHABLE and not p.settled() and p.quiescent()
    assert p.blocked() == {"x": "wave canary waits on unreachable b", "y": "wave canary waits on unreachable b"}
    # a canary still to be pushed is no block: the wave can move without anybody's retry
    fresh = {"a": DeviceObservation("a"), **{k: v for k, v in down.items() if k != "a"}}
    p2 = plan(desired(), observed(fresh), policy, 100.0)
    assert p2.blocked() == {} and not p2.quiescent()
