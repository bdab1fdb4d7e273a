"""Safe-rollout pieces without devices: confirm/receive commands, status parsing, reup.toml signing
keys, judging a timed-out generation, and the reconcile loop's pause/resume, supersede and
unreachable_after accounting with fake executors."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from dataclasses import replace
from typing import Any

import pytest
from reup.config.reup_toml import parse_config
from reup.core.errors import ConfigError
from reup.core.model import Device, Fleet, Target
from reup.core.outcomes import ProbeVerdict
from reup.io.answers import parse_receive, parse_status
from reup.io.ssh import PushOutcome
from reup.loop.controller import Controller
from reup.loop.executors import judge_timed_out
from reup_receiver.protocol import Pending, StatusAnswer, confirm_command, receive_command
from test_controller_loop import KEY, FakeBuilder, FakePusher, make, states, until


def test_confirm_and_receive_commands() -> None:
    assert receive_command("boot", 60) == "receive --activate boot --confirm-timeout 60"
    assert receive_command("switch", 0) == "receive --activate switch"
    cmd = confirm_command(7, 'test "$(cat $REUP_ROOT/x)" != 2; echo \'q\'')
    assert shlex.split(cmd) == ["confirm", "7", "--check", 'test "$(cat $REUP_ROOT/x)" != 2; echo \'q\'']
    assert confirm_command(3) == "confirm 3"


def test_status_and_receive_json_with_confirmation() -> None:
    st = parse_status(json.dumps({"current": "/nix/store/x", "generations": [{"number": 2, "toplevel": "/nix/store/x"}],
                                  "pending": {"generation": 2, "deadline": 123.5},
                                  "last_rollback": {"generation": 1, "reason": "r", "time": 1.0, "restored": None}}))
    assert (st.pending, st.last_rollback and st.last_rollback["reason"]) == (Pending(2, 123.5), "r")
    assert parse_status('{"current": null, "pending": null}').pending is None
    assert parse_receive('{"toplevel": "/nix/store/x", "generation": 2, "confirm_deadline": 99.0}').confirm_deadline == 99.0


def test_require_signed_needs_a_trust_root() -> None:
    with pytest.raises(ConfigError, match="require_signed needs"):
        parse_config('[source]\nurl = "/r"\nrequire_signed = true\n')
    cfg = parse_config('[source]\nurl = "/r"\nrequire_signed = true\nallowed_signers = "signers"\n', base_dir="/etc/reup")
    assert cfg.source.allowed_signers == "/etc/reup/signers"


def test_pause_holds_and_resume_releases(tmp_path: os.PathLike[str]) -> None:
    ctrl, _, _, pusher = make(str(tmp_path))
    ctrl.store.pause_rollout(True, 0.0)
    try:
        assert asyncio.run(ctrl.run(once=True)) == 1
        assert states(ctrl) == {"a": "halted", "b": "halted"} and pusher.sent == []
        assert ctrl.store.status()["rollout"]["paused"] is True
        assert ctrl.metrics.registry.get_sample_value("reup_rollout_halted") == 1
        ctrl.store.pause_rollout(False, 1.0, "c1")
        assert asyncio.run(ctrl.run(once=True)) == 0
        assert len(pusher.sent) == 2 and ctrl.metrics.registry.get_sample_value("reup_rollout_halted") == 0
        kinds = [e["data"]["new"] for e in ctrl.store.device_events("a") if e["kind"] == "DeviceStateChanged"]
        assert kinds[0] == "building" and "halted" in kinds and kinds[-1] == "in_sync"
    finally:
        ctrl.close()


def test_judging_a_timed_out_generation_from_the_device_status() -> None:
    top, old = "/nix/store/" + "a" * 32 + "-new", "/nix/store/" + "b" * 32 + "-old"
    gens = ((1, old), (2, top))
    rolled = StatusAnswer(old, ((1, old),), last_rollback={"generation": 2, "reason": "not confirmed before the deadline"})
    assert judge_timed_out(rolled, top, 2) == (ProbeVerdict.ROLLED_BACK, "not confirmed before the deadline")
    assert judge_timed_out(StatusAnswer(top, gens), top, 2)[0] == "committed"
    assert judge_timed_out(StatusAnswer(top, gens, pending=Pending(2, 0.0)), top, 2)[0] == "pending"
    # an older rollback record is not this generation's; a device running something else says nothing
    older = StatusAnswer(old, ((1, old),), last_rollback={"generation": 1, "reason": "x"})
    assert judge_timed_out(older, top, 2)[0] == "unknown"
    assert judge_timed_out(StatusAnswer(top, ((3, top),)), top, 2)[0] == "unknown"  # re-installed since


WAVE_FLEET = "".join(f'[devices.{n}]\nhost = "h"\nhost_key = "{KEY}"\nwave = "{w}"\n'
                     for n, w in (("a", "canary"), ("b", "canary"), ("c", "rest")))


class WaveBuilder(FakeBuilder):
    def evaluate(self, flake: str, fleet: Fleet, commit: str) -> list[Target]:
        return [replace(t, wave=fleet.devices[t.device].wave) for t in super().evaluate(flake, fleet, commit)]


class TimedPusher(FakePusher):
    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}

    async def push(self, dev: Device, toplevel: str, **kw: Any) -> PushOutcome:
        self.started.setdefault(dev.name, time.time())
        return await super().push(dev, toplevel, **kw)


def unreachable_scenario(tmp: str, policy: str) -> tuple[Controller, TimedPusher]:
    """a, b in wave canary, c in wave rest; b never answers."""
    pusher = TimedPusher()
    ctrl, src, _, _ = make(tmp, builder=WaveBuilder(tmp), pusher=pusher)
    text = f'[rollout]\nwaves = ["canary", "rest"]\nunreachable_after = 1.5\n{policy}\n' + WAVE_FLEET
    src.read_file = lambda commit, path: text  # type: ignore[method-assign]
    pusher.down.add("b")
    return ctrl, pusher


def since_unreachable(ctrl: Controller, name: str) -> float:
    attempt = ctrl.observe().devices[name].attempt
    assert attempt is not None and attempt.kind == "unreachable"
    return attempt.since


def test_device_unreachable_past_unreachable_after_stops_blocking_its_wave(tmp_path: os.PathLike[str]) -> None:
    ctrl, pusher = unreachable_scenario(str(tmp_path), "")

    async def scenario() -> None:
        task = asyncio.create_task(ctrl.run())
        await until(lambda: states(ctrl) == {"a": "in_sync", "b": "unreachable", "c": "pending"})
        assert "c" not in pusher.started and time.time() < since_unreachable(ctrl, "b") + 1.5
        assert ctrl.store.status()["rollout"]["wave"] == "canary"
        await until(lambda: states(ctrl).get("c") == "in_sync", timeout=15)
        ctrl.stop()
        await task

    try:
        asyncio.run(scenario())
        # c started only once b had been unreachable for unreachable_after; b left the wave's count
        assert pusher.started["c"] >= since_unreachable(ctrl, "b") + 1.5
        rollout = ctrl.store.status()["rollout"]
        assert states(ctrl)["b"] == "unreachable" and not rollout["halted"] and rollout["failed"] == 0
        assert rollout["wave"] == "rest" and rollout["waves"]["canary"]["committed"] == 1
    finally:
        ctrl.close()


def test_device_unreachable_past_unreachable_after_counts_as_failure(tmp_path: os.PathLike[str]) -> None:
    ctrl, pusher = unreachable_scenario(str(tmp_path), "unreachable_counts_as_failure = true\nfailure_threshold = 0.5")

    async def scenario() -> None:
        task = asyncio.create_task(ctrl.run())
        await until(lambda: states(ctrl) == {"a": "in_sync", "b": "unreachable", "c": "pending"})
        rollout = ctrl.store.status()["rollout"]
        assert time.time() < since_unreachable(ctrl, "b") + 1.5
        assert rollout["failed"] == 0 and "failure threshold" not in (rollout["halted"] or "")
        await until(lambda: states(ctrl).get("c") == "halted", timeout=15)
        assert time.time() >= since_unreachable(ctrl, "b") + 1.5
        ctrl.stop()
        await task

    try:
        asyncio.run(scenario())
        rollout = ctrl.store.status()["rollout"]
        assert rollout["failed"] == 1 and rollout["executed"] == 2 and rollout["waves"]["canary"]["failed"] == 1
        assert "failure threshold reached: 1 failed of 2 executed" in rollout["halted"]
        assert "c" not in pusher.started and ctrl.metrics.registry.get_sample_value("reup_rollout_halted") == 1
    finally:
        ctrl.close()
