"""The reconcile loop (controller.py) with fake executors: fast, deterministic checks of its
bookkeeping (adoption, unreachable devices coming back, a commit superseding a push in flight)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from reup.config.reup_toml import Config, SourceConfig, SshConfig, StateConfig
from reup.core.errors import UnreachableError
from reup.core.model import Device, DeviceState, Fleet, Target
from reup.io.ssh import PushOutcome
from reup.loop.controller import Controller

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
    """Each (device, commit) gets its own toplevel: a file under `store`."""

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

    def build_many(self, drvs: list[str]) -> dict[str, str | Exception]:
        return {drv: self.build(drv) for drv in drvs}


class FakeRoots:
    def sync(self, needed: set[str]) -> tuple[list[str], list[str]]:
        return [], []


class FakePusher:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.running: dict[str, str] = {}  # what each device runs
        self.sent: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None

    async def push(self, dev: Device, toplevel: str, *, activation: str = "switch",
                   on_phase: Callable[[DeviceState], None] = lambda s: None, confirm_timeout: float = 0.0,
                   health_check: str | None = None,
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
        return PushOutcome(toplevel, len(self.sent), stream_bytes=10, nar_bytes=100)


def make(tmp: str) -> tuple[Controller, FakeSource, FakeBuilder, FakePusher]:
    cfg = Config(source=SourceConfig(url=tmp, poll_interval=0.2), state=StateConfig(dir=os.path.join(tmp, "state")),
                 ssh=SshConfig(retry_max=0.3))
    ctrl = Controller(cfg)
    src, builder, pusher = FakeSource(), FakeBuilder(tmp), FakePusher()
    ctrl.source, ctrl.builder, ctrl.pusher, ctrl.gcroots = src, builder, pusher, FakeRoots()  # type: ignore[assignment]
    return ctrl, src, builder, pusher


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

