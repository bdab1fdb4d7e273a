"""Golden cases of the pure planner: (desired, observed, policy, now) -> decision per device."""

from __future__ import annotations

from reup.core.model import (
    Attempt,
    AttemptKind,
    Build,
    BuildResult,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    Push,
    RolloutPolicy,
    Target,
    Wait,
)
from reup.core.planner import MAX_TRANSIENT, plan

C1, C2 = "c1" * 20, "c2" * 20
POLICY = RolloutPolicy()
S = DeviceState


def t(dev: str, n: int, commit: str = C2, wave: str = "default") -> Target:
    return Target(dev, commit, wave, f"/nix/store/{n}-sys.drv", f"/nix/store/{n}-sys")


def built(*ns: int, commit: str = C2) -> dict[str, BuildResult]:
    return {f"/nix/store/{n}-sys.drv": BuildResult(f"/nix/store/{n}-sys.drv", commit, True, f"/nix/store/{n}-sys") for n in ns}


def summary(desired: Desired, observed: Observed, policy: RolloutPolicy = POLICY, now: float = 100.0) -> dict[str, tuple[str, object]]:
    p = plan(desired, observed, policy, now)
    return {name: (str(d.state), d.action) for name, d in p.decisions.items()}


def test_fresh_fleet_builds_each_drv_once() -> None:
    desired = Desired(C2, 1.0, {"a": t("a", 1), "b": t("b", 1), "c": t("c", 2)})
    p = plan(desired, Observed(), POLICY, 100.0)
    assert p.builds == ("/nix/store/1-sys.drv", "/nix/store/2-sys.drv")
    assert {n: str(d.state) for n, d in p.decisions.items()} == {"a": "building", "b": "building", "c": "building"}
    assert not p.settled()


def test_build_in_flight_is_not_restarted() -> None:
    desired = Desired(C2, 1.0, {"a": t("a", 1)})
    p = plan(desired, Observed(building=frozenset({"/nix/store/1-sys.drv"})), POLICY, 100.0)
    assert p.builds == () and p.decisions["a"].state == S.BUILDING and p.decisions["a"].action is None


def test_built_targets_are_pushed_and_acked_are_in_sync() -> None:
    desired = Desired(C2, 1.0, {"a": t("a", 1), "b": t("b", 2)})
    observed = Observed(
        devices={"a": DeviceObservation("a", acked_toplevel="/nix/store/1-sys", acked_commit=C1)},
        builds=built(1, 2),
    )
    assert summary(desired, observed) == {
        "a": ("in_sync", None),
        "b": ("pending", Push("b", C2, "/nix/store/2-sys")),
    }


def test_only_changed_devices_act() -> None:
    # Commit 2 changes b only: a's drv was built for commit 1 and is acknowledged.
    desired = Desired(C2, 1.0, {"a": t("a", 1), "b": t("b", 3)})
    observed = Observed(
        devices={
            "a": DeviceObservation("a", "/nix/store/1-sys", C1),
            "b": DeviceObservation("b", "/nix/store/2-sys", C1),
        },
        builds=built(1, 2, commit=C1),
    )
    p = plan(desired, observed, POLICY, 100.0)
    assert p.builds == ("/nix/store/3-sys.drv",)
    assert p.decisions["a"].state == S.IN_SYNC and p.decisions["a"].action is None


def test_eval_error_fails_only_that_device() -> None:
    desired = Desired(C2, 1.0, {"a": t("a", 1), "b": Target("b", C2, error="error: boom")})
    p = plan(desired, Observed(builds=built(1)), POLICY, 100.0)
    assert p.decisions["b"].state == S.FAILED and p.decisions["b"].reason == "error: boom"
    assert p.decisions["b"].action is None
    assert isinstance(p.decisions["a"].action, Push)


def test_build_failure_fails_until_new_commit() -> None:
    failed = {"/nix/store/1-sys.drv": BuildResult("/nix/store/1-sys.drv", C1, False, None, "builder failed")}
    same = Desired(C1, 1.0, {"a": t("a", 1, C1)})
    assert summary(same, Observed(builds=failed)) == {"a": ("failed", None)}
    newer = Desired(C2, 1.0, {"a": t("a", 1, C2)})
    assert summary(newer, Observed(builds=failed)) == {"a": ("building", Build("/nix/store/1-sys.drv"))}


def test_permanent_failure_is_quarantined_until_new_commit() -> None:
    attempt = Attempt(C1, "/nix/store/1-sys", AttemptKind.PERMANENT, "activation failed")
    observed = Observed(devices={"a": DeviceObservation("a", attempt=attempt)}, builds=built(1, commit=C1))
    assert summary(Desired(C1, 1.0, {"a": t("a", 1, C1)}), observed) == {"a": ("failed", None)}
    assert summary(Desired(C2, 1.0, {"a": t("a", 1, C2)}), observed) == {
        "a": ("pending", Push("a", C2, "/nix/store/1-sys"))
    }


def test_unreachable_waits_for_backoff_then_retries() -> None:
    attempt = Attempt(C2, "/nix/store/1-sys", AttemptKind.UNREACHABLE, "connection refused", failures=2, retry_at=150.0)
    observed = Observed(devices={"a": DeviceObservation("a", attempt=attempt)}, builds=built(1))
    desired = Desired(C2, 1.0, {"a": t("a", 1)})
    assert summary(desired, observed, now=100.0) == {"a": ("unreachable", Wait(150.0))}
    p = plan(desired, observed, POLICY, 100.0)
    assert p.settled() and p.next_wakeup() == 150.0
    assert summary(desired, observed, now=150.0) == {"a": ("unreachable", Push("a", C2, "/nix/store/1-sys"))}


def test_transient_failure_is_pending_not_settled() -> None:
    attempt = Attempt(C2, "/nix/store/1-sys", AttemptKind.TRANSIENT, "device locked", retry_at=150.0)
    observed = Observed(devices={"a": DeviceObservation("a", attempt=attempt)}, builds=built(1))
    p = plan(Desired(C2, 1.0, {"a": t("a", 1)}), observed, POLICY, 100.0)
    assert (p.decisions["a"].state, p.decisions["a"].action) == (S.PENDING, Wait(150.0))
    assert not p.settled()


def test_in_flight_push_keeps_its_state() -> None:
    observed = Observed(devices={"a": DeviceObservation("a", busy=S.ACTIVATING)}, builds=built(1))
    assert summary(Desired(C2, 1.0, {"a": t("a", 1)}), observed) == {"a": ("activating", None)}


def test_revert_to_acknowledged_generation_is_in_sync_without_build() -> None:
    # A device whose target went back to what it acknowledged needs nothing.
    observed = Observed(devices={"a": DeviceObservation("a", "/nix/store/1-sys", C1)})
    assert summary(Desired(C2, 1.0, {"a": t("a", 1)}), observed) == {"a": ("in_sync", None)}


def test_max_parallel_limits_pushes_in_wave_order() -> None:
    policy = RolloutPolicy(waves=("canary", "rest"), max_parallel=2)
    desired = Desired(C2, 1.0, {
        "z": t("z", 1, wave="canary"), "a": t("a", 1, wave="rest"), "b": t("b", 1, wave="rest"), "c": t("c", 1, wave="rest"),
    })
    observed = Observed(devices={"c": DeviceObservation("c", busy=S.TRANSFERRING)}, builds=built(1))
    got = summary(desired, observed, policy)
    assert got["z"] == ("pending", Push("z", C2, "/nix/store/1-sys"))  # canary first
    assert got["a"] == ("pending", None)  # no slot left: c is in flight, z took the other
    assert got["b"] == ("pending", None)
    assert got["c"] == ("transferring", None)


def test_no_revision_plans_nothing() -> None:
    p = plan(Desired(None), Observed(), POLICY, 0.0)
    assert p.decisions == {} and p.settled()


def test_transient_failures_give_up_but_unreachable_never_does() -> None:
    desired = Desired(C2, 1.0, {"a": t("a", 1)})
    flaky = Attempt(C2, "/nix/store/1-sys", AttemptKind.TRANSIENT, "corrupt", failures=MAX_TRANSIENT, retry_at=0.0)
    p = plan(desired, Observed(devices={"a": DeviceObservation("a", attempt=flaky)}, builds=built(1)), POLICY, 100.0)
    assert p.decisions["a"].state == S.FAILED and "gave up after 5 attempts: corrupt" in p.decisions["a"].reason
    offline = Attempt(C2, "/nix/store/1-sys", AttemptKind.UNREACHABLE, "refused", failures=50, retry_at=0.0)
    p = plan(desired, Observed(devices={"a": DeviceObservation("a", attempt=offline)}, builds=built(1)), POLICY, 100.0)
    assert p.decisions["a"].state == S.UNREACHABLE and isinstance(p.decisions["a"].action, Push)
