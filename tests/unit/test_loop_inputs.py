"""The planner's inputs kept in memory (loop/inputs.py) follow what the store wrote, on real SQLite:
a pass after one write re-reads that row alone, a forgotten or garbage-collected build leaves, and
another process's write makes the next pass read everything."""

from __future__ import annotations

import os

from reup.core.model import BuildResult, Target
from reup.loop.inputs import PlannerInputs
from reup.loop.state import StateDB


def test_inputs_follow_the_store(tmp_path: os.PathLike[str]) -> None:
    store = StateDB(str(tmp_path))
    out = os.path.join(tmp_path, "out")  # a build output that exists
    os.mkdir(out)
    store.record_revision("c1", 1.0, [Target(n, "c1", "default", "/d.drv", out) for n in ("a", "b")], None)
    inputs = PlannerInputs(store)
    observed, changed, _ = inputs.update({}, ())
    assert changed is None and set(observed.devices) == {"a", "b"}
    store.record_build(BuildResult("/d.drv", "c1", True, out), 1.0, 2.0)
    store.record_ack("a", "c1", out, 1, 3.0)
    observed, changed, builds = inputs.update({}, ())
    assert changed == {"a"} and builds == {"/d.drv"} and observed.devices["a"].acked_toplevel == out
    assert "/d.drv" in observed.builds
    store.forget_build("/d.drv")
    observed, changed, builds = inputs.update({}, ())
    assert changed == set() and "/d.drv" not in observed.builds
    other = StateDB(str(tmp_path))  # another process (`reup rollout pause`, a second connection)
    other.set_meta("rollout_paused", "1")
    other.close()
    _, changed, _ = inputs.update({}, ())
    assert changed is None
    store.close()
