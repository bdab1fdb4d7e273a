"""`reup run --once` ends when every device is settled or blocked behind a wave of unreachable devices,
instead of waiting out `unreachable_after` (fake executors, real loop and SQLite)."""

from __future__ import annotations

import asyncio
import os
import time

from reup.core.model import Fleet, Target
from test_controller_loop import KEY, FakeBuilder, FakeSource, make

WAVES = (f'[rollout]\nwaves = ["canary", "rest"]\nunreachable_after = 600\n'
         f'[devices.a]\nhost = "h"\nhost_key = "{KEY}"\nwave = "canary"\n'
         f'[devices.b]\nhost = "h"\nhost_key = "{KEY}"\nwave = "rest"\n')


class WavesSource(FakeSource):
    def read_file(self, commit: str, path: str) -> str:
        return WAVES


class WavesBuilder(FakeBuilder):
    def evaluate(self, flake: str, fleet: Fleet, commit: str) -> list[Target]:
        return [Target(n, commit, fleet.devices[n].wave, f"{self.store}/{n}-{commit}.drv", f"{self.store}/{n}-{commit}")
                for n in sorted(fleet.devices)]


def test_once_ends_when_the_rest_is_blocked_behind_an_unreachable_canary(tmp_path: os.PathLike[str]) -> None:
    ctrl, _, _, pusher = make(str(tmp_path))
    ctrl.source = WavesSource()  # type: ignore[assignment]
    ctrl.builder = WavesBuilder(str(tmp_path))
    pusher.down.add("a")
    start = time.monotonic()
    try:
        assert asyncio.run(ctrl.run(once=True)) == 1
        assert time.monotonic() - start < 30  # not unreachable_after (600 s)
        assert ctrl.blocked == {"b": "wave canary waits on unreachable a"}
        assert pusher.sent == []
        states = {d["name"]: d["state"] for d in ctrl.store.status()["devices"]}
        assert states == {"a": "unreachable", "b": "pending"}
    finally:
        ctrl.close()
