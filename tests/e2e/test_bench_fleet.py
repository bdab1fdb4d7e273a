"""The fleet-scale benchmark, reduced (bench/fleet.py, `make bench-fleet`): a real `reup run` against 40
devices of one fakefleet process, fresh state then an update commit, in both fleet shapes."""

from __future__ import annotations

import os

import pytest

from bench import fleet


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["shared", "unique"])
def test_bench_fleet_reduced(tmp_path: os.PathLike[str], shape: str) -> None:
    n = 40
    r = fleet.run_size(os.path.join(tmp_path, shape), n, shape, timeout=240, max_connections=8)
    fresh, update, tiny = r["phases"]  # small fleets also time a tiny commit to its first acknowledgement
    assert tiny.seconds_first is not None and tiny.seconds_settled is not None and tiny.extra["acks"] == n, tiny
    for p in (fresh, update):
        assert p.seconds_settled is not None, p
        assert p.extra["acks"] == n and p.pushes == n and p.rollbacks == 0 and p.timed_out == 0, p
        assert p.seconds_first is not None and p.seconds_last is not None and p.seconds_first <= p.seconds_last
        assert p.passes >= 1 and p.cpu > 0
        # Every run's systems are new to the store (a salt per run): evaluated, then really built.
        assert p.extra["evaluated"] is not None and 0 <= p.extra["evaluated"] <= p.extra["built"] <= p.seconds_settled
        assert p.extra["builds"] == (3 if shape == "shared" else n), p  # one per distinct system
        # Shared configurations: one encode per configuration; unique systems: one per device.
        assert p.encodes == (3 if shape == "shared" else n), p
    assert 0 < r["sqlite_mib"] < 10 and r["series"] > 20
    text = fleet.table([r])
    assert f"| {shape} | {n} | fresh |" in text and f"| {shape} | {n} | update |" in text
