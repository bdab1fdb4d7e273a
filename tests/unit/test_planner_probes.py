"""Golden cases of the pure decisions next to the planner: what each failure kind means
(`AttemptKind`), which devices to probe after a timed-out confirmation (`planner.probes`), and
which delta base to send from after a device reports one broken (`delta_base.after_broken_base`)."""

from __future__ import annotations

import pytest
from reup.core.delta_base import MAX_AVOIDED, DeltaBase, after_broken_base
from reup.core.model import (
    Attempt,
    AttemptKind,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    Push,
    Target,
    UpdateResult,
)
from reup.core.planner import probes
from reup.loop.metrics import UPDATE_RESULTS

K = AttemptKind
C1, C2 = "c1" * 20, "c2" * 20


# --- failure kinds -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "quarantine", "retryable", "result"), [
    (K.TRANSIENT, None, True, UpdateResult.RETRY),
    (K.UNREACHABLE, None, True, UpdateResult.UNREACHABLE),
    (K.PERMANENT, DeviceState.FAILED, False, UpdateResult.FAILED),
    (K.ROLLED_BACK, DeviceState.ROLLED_BACK, False, UpdateResult.ROLLED_BACK),
    (K.TIMED_OUT, DeviceState.ROLLED_BACK, False, UpdateResult.TIMED_OUT),
])
def test_what_each_failure_kind_means(kind: AttemptKind, quarantine: DeviceState | None, retryable: bool,
                                      result: UpdateResult) -> None:
    assert (kind.quarantine, kind.quarantines, kind.retryable, kind.result) == (
        quarantine, quarantine is not None, retryable, result)


def test_every_failure_kind_is_a_metric_label_except_a_retry() -> None:
    assert set(UPDATE_RESULTS) == {str(r) for r in UpdateResult} - {"retry"}
    assert {str(k.result) for k in AttemptKind if k.result.counted} <= set(UPDATE_RESULTS)
    assert [k for k in AttemptKind if k.quarantines == k.retryable] == []  # each is one or the other


# --- status probes after a timed-out confirmation --------------------------------------------------


def top(dev: str, commit: str = C2) -> str:
    return f"/nix/store/{dev}-{commit[:2]}-sys"


def timed_out(dev: str, retry_at: float, commit: str = C2, kind: AttemptKind = K.TIMED_OUT,
              busy: DeviceState | None = None) -> DeviceObservation:
    return DeviceObservation(dev, top(dev, C1), C1, busy=busy,
                             attempt=Attempt(commit, top(dev, commit), kind, "not delivered", retry_at=retry_at))


DESIRED = Desired(C2, 1.0, {d: Target(d, C2, "default", top(d) + ".drv", top(d)) for d in "abcdefg"})


def test_probes_devices_whose_confirmation_of_their_target_timed_out_when_due() -> None:
    observed = Observed(devices={
        "a": timed_out("a", 90.0),  # due
        "b": timed_out("b", 100.0),  # due (exactly now)
        "c": timed_out("c", 130.0),  # later: the next wake-up
        "d": timed_out("d", 120.0, commit=C1),  # an older revision's timeout: the target changed
        "e": timed_out("e", 0.0, kind=K.ROLLED_BACK),  # already decided
        "f": timed_out("f", 0.0, busy=DeviceState.TRANSFERRING),  # an update in flight
        "g": timed_out("g", 0.0),  # a probe already running
        "x": timed_out("x", 0.0),  # not in the fleet any more
    })
    assert probes(DESIRED, observed, 100.0, in_flight={"g"}) == (
        (Push("a", C2, top("a")), Push("b", C2, top("b"))), 130.0)


def test_no_timed_out_device_no_probe_no_wakeup() -> None:
    observed = Observed(devices={"a": DeviceObservation("a", top("a"), C2), "b": timed_out("b", 0.0, kind=K.TRANSIENT)})
    assert probes(DESIRED, observed, 100.0) == ((), None)
    assert probes(Desired(None), Observed(devices={"a": timed_out("a", 0.0)}), 100.0) == ((), None)


def test_probes_wait_for_the_earliest_retry_time() -> None:
    observed = Observed(devices={"a": timed_out("a", 150.0), "b": timed_out("b", 140.0)})
    assert probes(DESIRED, observed, 100.0) == ((), 140.0)
    assert probes(DESIRED, observed, 145.0) == ((Push("b", C2, top("b")),), 150.0)
    assert probes(DESIRED, observed, 145.0, in_flight={"b"}) == ((), 150.0)


# --- the delta base after a broken one ---------------------------------------------------------------

P, Q, R, S = (f"/nix/store/{c * 32}-x" for c in "pqrs")


@pytest.mark.parametrize(("base", "blamed", "following"), [
    # avoid the blamed path, up to MAX_AVOIDED of them
    (DeltaBase((P, Q), (R,)), P, DeltaBase((P, Q), (R,), (P,))),
    (DeltaBase((P, Q), (R,), (P,)), Q, DeltaBase((P, Q), (R,), (P, Q))),
    # then a full stream (nothing held, nothing staged, nothing to avoid)
    (DeltaBase((P, Q), (R,), (P, Q)), S, DeltaBase(())),
    # a path blamed again, or none named: a full stream at once
    (DeltaBase((P, Q), (), (P,)), P, DeltaBase(())),
    (DeltaBase((P, Q)), None, DeltaBase(())),
    # only staged paths: avoid the blamed one; nothing held to drop, so then give up
    (DeltaBase((), (R,)), R, DeltaBase((), (R,), (R,))),
    (DeltaBase((), (R,), (R, S)), P, None),
    # a full stream refused: nothing left to try
    (DeltaBase(()), P, None),
    (DeltaBase(()), None, None),
])
def test_after_a_broken_base(base: DeltaBase, blamed: str | None, following: DeltaBase | None) -> None:
    assert after_broken_base(base, blamed) == following


def test_a_device_blaming_every_base_gets_at_most_max_avoided_plus_two_streams() -> None:
    base: DeltaBase | None = DeltaBase((P, Q, R, S))
    sent = []
    while base is not None:
        sent.append(base)
        base = after_broken_base(base, next((p for p in base.held if p not in base.avoid), None))
    assert len(sent) == MAX_AVOIDED + 2 and sent[-1].full and sent[-2].avoid == (P, Q)
