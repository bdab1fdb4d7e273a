"""The reconcile loop (controller.py) with fake executors: fast, deterministic checks of its
bookkeeping (adoption, unreachable devices coming back, a commit superseding a push in flight,
confirmations that time out and what the device then says). The fakes implement the loop's
injected interfaces (loop/executors.py: `DeviceExecutor`, `SystemBuilder`); mypy holds them to it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from reup.config.reup_toml import Config, SourceConfig, SshConfig, StateConfig
from reup.core.errors import PermanentError, TemporaryError, UnreachableError
from reup.core.model import AttemptKind, Device, DeviceState, Fleet, Push, RolloutPolicy, Target
from reup.core.outcomes import ProbeVerdict, Undecided, Updated, UpdateFailed, UpdateOutcome
from reup.io.answers import ConfirmTimeoutError, RolledBackError
from reup.io.ssh import PushOutcome
from reup.loop.controller import Controller
from reup.loop.executors import (
    DeviceExecutor,
    SystemBuilder,
    attempt_kind,
    execute_probe,
    execute_push,
)
from reup_receiver.protocol import Pending, StatusAnswer

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0d6u0xjBWm0m1u2q5Sg8jzxf9C2ri8Hc3tnrsY+q0a"
FLEET = "".join(f'[devices.{n}]\nhost = "h"\nhost_key = "{KEY}"\n' for n in ("a", "b"))


class FakeSource:
    def __init__(self) -> None:
        self.head = "c1"

    def fetch(self) -> str:
        return self.head

    def read_file(self, commit: str, path: str) -> str:
        return FLEET

    def flake_ref(self, commit: str) -> str:
        return f"fake#{commit}"

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


class FakeBuilder:
    """A SystemBuilder: each (device, commit) gets its own toplevel, a file under `store`."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.built: list[str] = []

    def evaluate(self, flake: str, fleet: Fleet, commit: str) -> list[Target]:
        return [Target(n, commit, "default", f"{self.store}/{n}-{commit}.drv", f"{self.store}/{n}-{commit}")
                for n in sorted(fleet.devices)]

    def build(self, drv: str) -> str:
        out = drv.removesuffix(".drv")
        open(out, "w").close()
        self.built.append(out)
        return out

    def build_many(self, drv_paths: list[str]) -> dict[str, str | PermanentError]:
        return {drv: self.build(drv) for drv in drv_paths}


class FakeRoots:
    def sync(self, needed: set[str]) -> tuple[list[str], list[str]]:
        return [], []


class FakePusher:
    """A DeviceExecutor whose devices are entries in dicts: what each runs, its generations, whether a
    generation awaits confirmation, and its last rollback."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.running: dict[str, str] = {}  # what each device runs
        self.generations: dict[str, list[tuple[int, str]]] = {}
        self.pending: dict[str, int] = {}  # the generation awaiting confirmation
        self.rollbacks: dict[str, dict[str, object]] = {}  # the device's last_rollback record
        self.unconfirmable: set[str] = set()  # confirmations that never arrive in time
        self.sent: list[tuple[str, str]] = []
        self.confirmed: list[tuple[str, int, str | None]] = []
        self.probed: list[str] = []
        self.gate: asyncio.Event | None = None

    async def push(self, dev: Device, toplevel: str, *, activation: str = "switch",
                   on_phase: Callable[[DeviceState], None] = lambda s: None, confirm_timeout: float = 0.0,
                   on_sent: Callable[[int, int, float], None] = lambda sent, nar, seconds: None) -> PushOutcome:
        if dev.name in self.down:
            raise UnreachableError(f"{dev.name} unreachable: connection refused")
        if self.running.get(dev.name) == toplevel:
            return PushOutcome(toplevel, 1, adopted=True)
        on_phase(DeviceState.TRANSFERRING)
        if self.gate is not None:
            await self.gate.wait()
        self.sent.append((dev.name, toplevel))
        on_sent(10, 100, 0.0)
        self.running[dev.name] = toplevel
        generation = len(self.sent)
        self.generations.setdefault(dev.name, []).append((generation, toplevel))
        deadline = None
        if confirm_timeout > 0:
            self.pending[dev.name] = generation
            deadline = time.time() + confirm_timeout
        return PushOutcome(toplevel, generation, stream_bytes=10, nar_bytes=100, confirm_deadline=deadline)

    async def confirm(self, dev: Device, toplevel: str, generation: int, deadline: float,
                      check: str | None) -> None:
        if dev.name in self.unconfirmable:
            raise ConfirmTimeoutError(f"confirmation of generation {generation} not delivered", generation)
        self.pending.pop(dev.name, None)
        self.confirmed.append((dev.name, generation, check))

    async def status(self, dev: Device, attempts: int | None = None) -> StatusAnswer:
        self.probed.append(dev.name)
        if dev.name in self.down:
            raise UnreachableError(f"{dev.name} unreachable: connection refused")
        pending = self.pending.get(dev.name)
        return StatusAnswer(self.running.get(dev.name), tuple(self.generations.get(dev.name, ())),
                            pending=Pending(pending, 0.0) if pending is not None else None,
                            last_rollback=self.rollbacks.get(dev.name))

    def settle(self, name: str, *, commit: bool) -> None:
        """The device decides on its pending generation: keep it (confirmed late) or roll it back."""
        generation = self.pending.pop(name)
        if not commit:
            older = [t for g, t in self.generations[name] if g < generation]
            self.running[name] = older[-1] if older else ""
            self.rollbacks[name] = {"generation": generation, "reason": "not confirmed before the deadline"}


def make(tmp: str, builder: SystemBuilder | None = None,
         pusher: DeviceExecutor | None = None) -> tuple[Controller, FakeSource, FakeBuilder, FakePusher]:
    cfg = Config(source=SourceConfig(url=tmp, poll_interval=0.2), state=StateConfig(dir=os.path.join(tmp, "state")),
                 ssh=SshConfig(retry_max=0.3))
    fake_builder, fake_pusher = FakeBuilder(tmp), FakePusher()
    ctrl = Controller(cfg, builder=builder or fake_builder, executor=pusher or fake_pusher)
    src = FakeSource()
    ctrl.source, ctrl.gcroots = src, FakeRoots()  # type: ignore[assignment]
    return ctrl, src, fake_builder, fake_pusher


async def until(pred: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def states(ctrl: Controller) -> dict[str, str]:
    return {d["name"]: d["state"] for d in ctrl.store.status()["devices"]}


def test_device_already_running_target_is_adopted(tmp_path: os.PathLike[str]) -> None:
    ctrl, _, _, pusher = make(str(tmp_path))
    pusher.running["a"] = f"{tmp_path}/a-c1"
    try:
        assert asyncio.run(ctrl.run(once=True)) == 0
        assert pusher.sent == [("b", f"{tmp_path}/b-c1")]
        assert sorted((h["device"], h["result"]) for h in ctrl.store.history()) == [("a", "adopted"), ("b", "committed")]
        text = ctrl.metrics.registry.get_sample_value("reup_transfer_bytes_total", {"kind": "delta"})
        assert text == 10  # only b's transfer
        assert ctrl.metrics.registry.get_sample_value("reup_device_updates_total", {"result": "committed"}) == 2
    finally:
        ctrl.close()


def test_unreachable_device_converges_when_back_without_restart(tmp_path: os.PathLike[str]) -> None:
    ctrl, _, _, pusher = make(str(tmp_path))
    pusher.down.add("b")

    async def scenario() -> None:
        task = asyncio.create_task(ctrl.run())
        await until(lambda: states(ctrl) == {"a": "in_sync", "b": "unreachable"})
        assert "connection refused" in (ctrl.store.status()["devices"][1]["last_error"] or "")
        pusher.down.clear()  # its sshd is back: the backoff retry gets it
        await until(lambda: states(ctrl) == {"a": "in_sync", "b": "in_sync"})
        ctrl.stop()
        assert await task == 0

    try:
        asyncio.run(scenario())
        assert [h["result"] for h in ctrl.store.history() if h["device"] == "b"][-1] == "committed"
        assert (ctrl.metrics.registry.get_sample_value("reup_device_updates_total", {"result": "unreachable"}) or 0) >= 1
    finally:
        ctrl.close()


def test_new_commit_supersedes_push_in_flight(tmp_path: os.PathLike[str]) -> None:
    ctrl, src, builder, pusher = make(str(tmp_path))
    pusher.gate = asyncio.Event()

    async def scenario() -> None:
        assert pusher.gate is not None
        task = asyncio.create_task(ctrl.run())
        await until(lambda: states(ctrl) == {"a": "transferring", "b": "transferring"})
        src.head = "c2"
        ctrl.request_fetch()
        await until(lambda: ctrl.store.revision() is not None and ctrl.store.revision()[0] == "c2")  # type: ignore[index]
        assert states(ctrl) == {"a": "transferring", "b": "transferring"}  # in flight: they finish first
        pusher.gate.set()
        await until(lambda: all(d["acknowledged"] and d["acknowledged"].endswith("-c2")
                                for d in ctrl.store.status()["devices"]))
        ctrl.stop()
        assert await task == 0

    try:
        asyncio.run(scenario())
        assert sorted(pusher.sent[:2]) == [("a", f"{tmp_path}/a-c1"), ("b", f"{tmp_path}/b-c1")]
        assert sorted(pusher.sent[2:]) == [("a", f"{tmp_path}/a-c2"), ("b", f"{tmp_path}/b-c2")]
        assert len(builder.built) == 4
        # the c1 updates finished after c2 changed the targets: superseded, then c2 committed
        reg = ctrl.metrics.registry
        assert reg.get_sample_value("reup_device_updates_total", {"result": "superseded"}) == 2
        assert reg.get_sample_value("reup_device_updates_total", {"result": "committed"}) == 2
    finally:
        ctrl.close()



def test_timed_out_confirmation_is_probed_until_the_device_decides(tmp_path: os.PathLike[str]) -> None:
    """Both confirmations time out; the loop asks each device (still pending: again later) until one
    says it kept the generation (committed) and the other that it rolled it back."""
    ctrl, src, _, pusher = make(str(tmp_path))
    pusher.unconfirmable |= {"a", "b"}
    # the first timeout must not halt the rollout before the second device starts
    src.read_file = lambda commit, path: "[rollout]\nmin_executed = 3\n" + FLEET  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.create_task(ctrl.run())
        await until(lambda: states(ctrl) == {"a": "rolled_back", "b": "rolled_back"})
        await until(lambda: pusher.probed.count("a") >= 2 and pusher.probed.count("b") >= 2)
        assert states(ctrl) == {"a": "rolled_back", "b": "rolled_back"}  # pending: no verdict yet
        pusher.settle("a", commit=True)
        pusher.settle("b", commit=False)
        await until(lambda: states(ctrl) == {"a": "in_sync", "b": "rolled_back"}
                    and [h["result"] for h in ctrl.store.history() if h["device"] == "b"][-1] == "rolled_back")
        probes = len(pusher.probed)
        await asyncio.sleep(0.8)  # settled: neither is asked again
        assert len(pusher.probed) == probes
        ctrl.stop()
        await task

    try:
        asyncio.run(scenario())
        history = {d: [h["result"] for h in ctrl.store.history() if h["device"] == d] for d in ("a", "b")}
        assert history == {"a": ["timed_out", "committed"], "b": ["timed_out", "rolled_back"]}
        b = ctrl.store.status()["devices"][1]
        assert "not confirmed before the deadline" in (b["last_error"] or "")
        reg = ctrl.metrics.registry
        assert [reg.get_sample_value("reup_device_updates_total", {"result": r}) for r in
                ("timed_out", "rolled_back", "committed")] == [2, 1, 1]
        assert pusher.confirmed == []
    finally:
        ctrl.close()


def test_confirmation_runs_the_policy_health_check(tmp_path: os.PathLike[str]) -> None:
    ctrl, src, _, pusher = make(str(tmp_path))
    src.read_file = lambda commit, path: '[rollout]\nhealth_check = "true"\n' + FLEET  # type: ignore[method-assign]
    try:
        assert asyncio.run(ctrl.run(once=True)) == 0
        assert sorted((d, check) for d, _, check in pusher.confirmed) == [("a", "true"), ("b", "true")]
        assert pusher.pending == {}
    finally:
        ctrl.close()


def test_executors_return_outcomes_and_record_nothing(tmp_path: os.PathLike[str]) -> None:
    """The executors alone, on the fake device executor: each failure kind, an internal error, and a
    timed-out confirmation's generation come back as values (no store, no bus involved)."""
    dev = Device("a", "h", KEY)
    push = Push("a", "c1", f"{tmp_path}/a-c1")
    policy = RolloutPolicy(confirm_timeout=5.0)
    phases: list[DeviceState] = []

    async def run(pusher: FakePusher) -> UpdateOutcome:
        return await execute_push(pusher, dev, push, policy, on_phase=phases.append, on_sent=lambda *a: None)

    ok = FakePusher()
    assert asyncio.run(run(ok)) == Updated(push, 1, 10, 100)
    assert phases == [DeviceState.TRANSFERRING, DeviceState.CONFIRMING] and ok.confirmed == [("a", 1, None)]
    down = FakePusher()
    down.down.add("a")
    assert asyncio.run(run(down)) == UpdateFailed(push, AttemptKind.UNREACHABLE, "a unreachable: connection refused")
    late = FakePusher()
    late.unconfirmable.add("a")
    failed = asyncio.run(run(late))
    assert isinstance(failed, UpdateFailed) and (failed.kind, failed.generation) == (AttemptKind.TIMED_OUT, 1)
    assert asyncio.run(execute_probe(late, dev, push, 1)) == Undecided(
        push, ProbeVerdict.PENDING, "generation 1 still awaits confirmation")
    late.settle("a", commit=False)
    rolled = asyncio.run(execute_probe(late, dev, push, 1))
    assert isinstance(rolled, UpdateFailed) and rolled.kind == AttemptKind.ROLLED_BACK

    class Buggy(FakePusher):
        async def push(self, dev: Device, toplevel: str, **kw: Any) -> PushOutcome:
            raise KeyError("encoder bug")

    bug = asyncio.run(run(Buggy()))
    assert isinstance(bug, UpdateFailed) and bug.kind == AttemptKind.PERMANENT and bug.internal == "KeyError: 'encoder bug'"
    for exc, kind in ((TemporaryError("locked"), AttemptKind.TRANSIENT), (PermanentError("no"), AttemptKind.PERMANENT),
                      (RolledBackError("rb"), AttemptKind.ROLLED_BACK), (UnreachableError("x"), AttemptKind.UNREACHABLE)):
        assert attempt_kind(exc) == kind
