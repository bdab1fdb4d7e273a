"""Fleet-scale bookkeeping of the reconcile loop (issue 12): the work of one acknowledgement and of one
settled pass does not grow with the fleet. Counted on the real SQLite state (statements and SQLite VM
steps, via sqlite3's trace and progress hooks) at two fleet sizes, with the fake executors of
test_controller_loop; plus retention and /api/status paging of StateDB."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import test_controller_loop as loop_tests
from reup.core.model import Push
from reup.core.outcomes import Updated
from reup.loop.controller import Controller
from reup.loop.events import DevicesSnapshot, Event
from reup.loop.http import status_page
from reup.loop.state import StateDB

KEY = loop_tests.KEY


@contextmanager
def counting(db: StateDB) -> Iterator[dict[str, Any]]:
    """Statements run and SQLite VM steps (in units of 100) while the block runs."""
    seen: dict[str, Any] = {"statements": [], "steps": 0}

    def step() -> int:
        seen["steps"] += 1
        return 0

    db.db.set_trace_callback(seen["statements"].append)
    db.db.set_progress_handler(step, 100)
    try:
        yield seen
    finally:
        db.db.set_trace_callback(None)
        db.db.set_progress_handler(None, 0)


def settled_controller(tmp: str, n: int) -> Controller:
    fleet = "".join(f'[devices.d{i:05d}]\nhost = "h"\nhost_key = "{KEY}"\n' for i in range(n))
    ctrl, src, _, _ = loop_tests.make(tmp)
    src.read_file = lambda commit, path: fleet  # type: ignore[method-assign]
    assert asyncio.run(ctrl.run(once=True)) == 0
    return ctrl


def ack_and_pass_cost(tmp: str, n: int) -> tuple[int, ...]:
    """(statements, VM steps/100, snapshots) of one acknowledgement; (statements, snapshots) of one pass."""
    ctrl = settled_controller(tmp, n)
    snapshots: list[Event] = []
    ctrl.bus.subscribe(lambda e: snapshots.append(e) if isinstance(e, DevicesSnapshot) else None)
    try:
        desired = ctrl.store.desired()
        name = "d00001"
        push = Push(name, desired.commit or "", desired.targets[name].toplevel or "")
        ctrl.store.desired()  # warm, as in a running loop
        with counting(ctrl.store) as ack:
            ctrl.recorder.update(Updated(push, 2), desired.seen_at)
        ack_snapshots = len(snapshots)
        assert ctrl.store.device_state(name) == "in_sync"

        async def one_pass() -> None:
            ctrl._wake = asyncio.Event()
            await ctrl.step()

        ctrl._next_poll = float("inf")
        ctrl.chores.next_prune = float("inf")
        ctrl.chores.next_roots = float("inf")  # GC roots sync in a background thread, spaced: not the pass's work
        # Nor are the snapshot and the GC roots' sync it triggers (O(fleet), at most once a second).
        ctrl.chores.last_snapshot = float("inf")
        ctrl.chores.roots_due = False
        with counting(ctrl.store) as handled:  # the pass that handles the acknowledgement
            asyncio.run(one_pass())
        ctrl.chores.last_snapshot = 0.0
        asyncio.run(one_pass())  # settles the snapshot flag left by the acknowledgement
        with counting(ctrl.store) as pas:
            asyncio.run(one_pass())
        return (len(ack["statements"]), ack["steps"], ack_snapshots, len(pas["statements"]), len(snapshots),
                ctrl.planner.decided, len(handled["statements"]), handled["steps"])
    finally:
        ctrl.close()


def test_acknowledgement_and_pass_cost_do_not_grow_with_the_fleet(tmp_path: os.PathLike[str]) -> None:
    small = ack_and_pass_cost(os.path.join(tmp_path, "small"), 20)
    large = ack_and_pass_cost(os.path.join(tmp_path, "large"), 600)
    ack_statements, ack_steps, ack_snapshots, pass_statements = small[:4]
    # One acknowledgement: the same handful of indexed statements, no snapshot of the fleet.
    assert large[0] == ack_statements <= 12, (small, large)
    assert ack_snapshots == large[2] == 0
    # SQLite's own work per acknowledgement stays flat (indexed lookups: O(log N)), 30x the devices.
    assert large[1] <= 2 * max(ack_steps, 5), (small, large)
    # A settled pass runs the same statements whatever the fleet size (each table read once or so).
    assert large[3] == pass_statements <= 10, (small, large)
    # The pass that handles an acknowledgement re-decides that device alone (the incremental planner)
    # and reads only its row: the same statements and flat SQLite work, 30x the devices.
    assert small[5] == large[5] == 0  # the settled pass decided nobody
    assert large[6] == small[6] <= 14, (small, large)
    assert large[7] <= 2 * max(small[7], 5), (small, large)


def test_a_pass_after_an_acknowledgement_decides_that_device_alone(tmp_path: os.PathLike[str]) -> None:
    for n in (20, 600):
        ctrl = settled_controller(os.path.join(tmp_path, str(n)), n)
        try:
            desired = ctrl.store.desired()
            push = Push("d00003", desired.commit or "", desired.targets["d00003"].toplevel or "")
            ctrl.recorder.update(Updated(push, 2), desired.seen_at)
            ctrl._next_poll = ctrl.chores.next_prune = float("inf")

            async def one_pass(c: Controller) -> None:
                c._wake = asyncio.Event()
                await c.step()

            asyncio.run(one_pass(ctrl))
            assert ctrl.planner.decided == 1, n
        finally:
            ctrl.close()


def test_status_paging_and_filters(tmp_path: os.PathLike[str]) -> None:
    ctrl = settled_controller(str(tmp_path), 30)
    try:
        full = ctrl.store.status()
        assert full["total"] == 30 and len(full["devices"]) == 30
        page = ctrl.store.status(offset=10, limit=5)
        assert page["total"] == 30 and [d["name"] for d in page["devices"]] == [f"d{i:05d}" for i in range(10, 15)]
        assert ctrl.store.status(state="in_sync", limit=1)["total"] == 30
        assert ctrl.store.status(state="failed")["total"] == 0
        assert ctrl.store.status(wave="default", offset=29)["devices"][0]["name"] == "d00029"
        assert status_page("/api/status?offset=5&limit=2&state=in_sync") == {"offset": 5, "limit": 2, "state": "in_sync"}
    finally:
        ctrl.close()


def test_retention_prunes_old_events_history_and_revisions(tmp_path: os.PathLike[str]) -> None:
    ctrl = settled_controller(str(tmp_path), 3)
    db = ctrl.store
    try:
        now = db.revision()[1] if db.revision() else 0.0  # type: ignore[index]
        targets = list(db.desired().targets.values())
        for i in range(5):  # older revisions, seen before the current one
            db._exec("INSERT INTO revisions(commit_id, seen_at) VALUES(?, ?)", (f"old{i}", now - 100 - i))
            for t in targets:
                db._exec("INSERT INTO targets(commit_id, device, wave) VALUES(?, ?, 'default')", (f"old{i}", t.device))
        db.log_event("Old", "d00000", {}, at=now - 40 * 86400)
        before = len(db.events())
        counts = db.prune(now + 1, keep_days=30, keep_revisions=3)
        assert counts["events"] == 1 and len(db.events()) == before - 1
        assert counts["revisions"] == 3 and counts["targets"] == 9
        kept = {r["commit_id"] for r in db._exec("SELECT commit_id FROM revisions")}
        assert kept == {db.revision()[0], "old0", "old1"}  # type: ignore[index]
        assert len(db.desired().targets) == 3  # the current revision stays whole
    finally:
        ctrl.close()




def test_ssh_transfers_are_bounded_and_confirmations_do_not_queue_behind_them() -> None:
    from reup.core.model import Device
    from reup.io.ssh import PushOutcome, SshPusher

    pusher = SshPusher(deltas=None, key=None, max_connections=3)  # type: ignore[arg-type]
    running, peak, confirmed = [0], [0], []

    async def transfer(dev: Device, toplevel: str, *args: Any) -> PushOutcome:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.05)
        running[0] -= 1
        return PushOutcome(toplevel, 1)

    async def scenario() -> None:
        pusher._push_once = transfer  # type: ignore[method-assign,assignment]
        devices = [Device(f"d{i}", "h", KEY) for i in range(12)]
        pushes = [asyncio.create_task(pusher.push(d, "/nix/store/x")) for d in devices]
        await asyncio.sleep(0.01)
        # With every transfer slot taken, a confirmation slot is still free at once.
        async with pusher._slots(confirm=True):
            confirmed.append(running[0])
        await asyncio.gather(*pushes)

    asyncio.run(scenario())
    assert peak[0] == 3 and confirmed == [3]
