"""`reup demo`: the whole reup story on one machine, live, then cleaned up.

Called by the controller's cli/demo.py (`reup demo`, the README's `make demo`). It makes a
fleet repo from the offline flavor of fleet-repo-template/ (`reup init
--offline`), starts three simulated devices (lab.py: device roots behind real
sshd on 127.0.0.1) and the controller in this process (SQLite state, the metrics
endpoint), then: installs every device, commits a change to the `pi` system and
shows its rollout wave by wave as it happens (bytes sent against a full copy),
reverts the commit and shows the rollback, prints the bytes and metrics, and exits
0 if all three rollouts converged. Every run uses a new directory and free ports.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from typing import TextIO

from reup.cli.status import format_status
from reup.core.preview import human as human_size
from reup.io.template import git, init_fleet_repo
from reup.loop.controller import Controller
from reup.loop.events import (
    BuildFinished,
    DeviceStateChanged,
    DeviceUpdated,
    Event,
    RolloutChanged,
    TransferFinished,
)

from reup_lab.lab import Lab
from reup_lab.nixenv import NIX_CONFIG

# Device -> (configuration, wave): one x86 board and two Pis, pi-01 as the canary.
DEVICES = {"pi-01": ("pi", "canary"), "board-01": ("board", "main"), "pi-02": ("pi", "main")}
# The demo's change: a new sensord release with a shorter interval on every Pi.
CHANGE = (("version = \"1.4.0\"; interval = 5;", "version = \"1.5.0\"; interval = 2;"),)
STUCK = ("failed", "rolled_back", "unreachable", "halted")
SHOWN_METRICS = ("reup_devices{", "reup_device_updates_total", "reup_transfer_bytes_total", "reup_builds_total",
                 "reup_rollout_progress_ratio", "reup_source_revision_info")


class LiveView:
    """Event subscriber: one line per step of each device's update, as it happens."""

    def __init__(self, out: TextIO, start: float) -> None:
        self.out = out
        self.start = start
        self.last = ""

    def __call__(self, event: Event) -> None:
        line = None
        if isinstance(event, BuildFinished):
            name = event.drv_path.rsplit("/", 1)[-1].split("-", 1)[-1].removesuffix(".drv")
            line = f"built {name} ({event.result}, {event.seconds:.1f}s)"
        elif isinstance(event, RolloutChanged) and event.wave:
            line = (f"rollout: wave {event.wave}, {event.progress:.0%} of devices done"
                    + (f"; halted: {event.halted}" if event.halted else ""))
        elif isinstance(event, DeviceStateChanged) and event.old:
            line = f"{event.device:<9} {event.old} -> {event.new}"
        elif isinstance(event, TransferFinished):
            share = f"{event.stream_bytes / event.nar_bytes:.2%}" if event.nar_bytes else "-"
            line = (f"{event.device:<9} sent {human_size(event.stream_bytes)} for {human_size(event.nar_bytes)} of new store "
                    f"paths ({share}) in {event.seconds:.2f}s")
        elif isinstance(event, DeviceUpdated) and event.result != "retry":
            why = f": {event.error.strip().splitlines()[-1]}" if event.error else ""
            line = f"{event.device:<9} {event.result}{why}"
        if line and line != self.last:
            self.last = line
            print(f"  {event.at - self.start:6.1f}s  {line}", file=self.out, flush=True)


def demo_fleet_toml(template_toml: str, lab: Lab) -> str:
    """The template's fleet.toml with its [rollout] kept and its devices replaced by the lab's."""
    head = template_toml.split("\n[devices.", 1)[0].rstrip() + "\n\n"
    return head + "\n".join(lab.devices[n].fleet_entry(cfg, wave) for n, (cfg, wave) in DEVICES.items())


async def _until(ctrl: Controller, commit: str, timeout: float) -> bool:
    """Wait until every device settled on `commit`; True if all are in sync."""
    ctrl.request_fetch()  # the watchdog sees the commit too; this makes the demo independent of it
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ctrl.store.status()
        devices = status["devices"]
        if status["revision"] == commit and devices and all(d["commit"] == commit for d in devices):
            if all(d["state"] == "in_sync" and d["acknowledged"] == d["target"] for d in devices):
                return True
            if not ctrl.tasks and any(d["state"] in STUCK for d in devices):
                return False
        await asyncio.sleep(0.2)
    return False


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return "\n".join(ln for ln in text.splitlines() if ln.startswith(SHOWN_METRICS) and not ln.endswith(" 0.0"))


async def _story(lab: Lab, ctrl: Controller, metrics_url: str, out: TextIO) -> bool:
    runner = asyncio.ensure_future(ctrl.run())
    commits: list[str] = []

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    async def rollout(title: str) -> bool:
        """Roll out the repo's head; True when every device is in sync on it."""
        commits.append(git(lab.repo, "rev-parse", "HEAD"))
        say(f"\n== {commits[-1][:12]} {title} ==")
        done = await _until(ctrl, commits[-1], 300)
        say(format_status(ctrl.store.status()))
        return done

    try:
        ok = await rollout("first install: every device gets its whole system")
        pi = os.path.join(lab.repo, "hosts", "pi.nix")
        with open(pi, encoding="utf-8") as f:
            text = f.read()
        for old, new in CHANGE:
            text = text.replace(old, new)
        with open(pi, "w", encoding="utf-8") as f:
            f.write(text)
        git(lab.repo, "commit", "-q", "-am", "pi: sensord 1.5.0, 2 s interval")
        ok = await rollout("a change to the pi system: canary pi-01 first, then pi-02; board-01 keeps its system") and ok
        git(lab.repo, "revert", "--no-edit", "HEAD")
        ok = await rollout("git revert: rolling back is one more commit") and ok

        say("\n== bytes on the wire ==")
        for h in ctrl.store.history():
            if h["result"] == "committed" and h["commit_id"] in commits:
                step = ("install", "change", "revert")[commits.index(str(h["commit_id"]))]
                say(f"{h['device']:<9} {step:<8} {human_size(int(h['stream_bytes'] or 0)):>10} sent, "
                    f"{human_size(int(h['nar_bytes'] or 0)):>10} as full NARs of the missing paths")
        say(f"\n== {metrics_url} (served while the controller runs) ==")
        say(await asyncio.to_thread(_scrape, metrics_url))
        for name in DEVICES:
            say(f"{name} activations: {lab.activations(name)}")
        return ok
    finally:
        ctrl.stop()
        await runner


def run_demo(workdir: str | None = None, *, keep: bool = False, out: TextIO = sys.stdout) -> int:
    if workdir and os.path.exists(workdir) and os.listdir(workdir):
        print(f"reup: {workdir} exists and is not empty: the demo needs a new or empty directory", file=sys.stderr)
        return 2
    os.environ.setdefault("NIX_CONFIG", NIX_CONFIG)
    base = workdir or tempfile.mkdtemp(prefix="reup-demo-")
    lab = Lab(base, list(DEVICES), poll_interval=30)
    ctrl = None
    server = None
    try:
        lab.start(init_repo=False)
        print(f"reup demo in {base}\n  devices: " + ", ".join(
            f"{n} ({cfg}, wave {wave}) ssh 127.0.0.1:{lab.devices[n].port}" for n, (cfg, wave) in DEVICES.items()),
            file=out)
        init_fleet_repo(lab.repo, offline=True, commit=False)
        with open(os.path.join(lab.repo, "fleet.toml"), encoding="utf-8") as f:
            template_toml = f.read()
        with open(os.path.join(lab.repo, "fleet.toml"), "w", encoding="utf-8") as f:
            f.write(demo_fleet_toml(template_toml, lab))
        git(lab.repo, "add", "-A")
        git(lab.repo, "commit", "-q", "-m", "fleet from reup init --offline, with the demo's devices")
        ctrl = Controller(lab.config())
        ctrl.bus.subscribe(LiveView(out, time.time()))
        server = ctrl.start_http()
        metrics_url = f"http://127.0.0.1:{lab.http_port}/metrics"
        print(f"  fleet repo: {lab.repo}\n  controller state: {lab.state_dir}/reup.sqlite\n"
              f"  metrics: {metrics_url}", file=out, flush=True)
        ok = asyncio.run(_story(lab, ctrl, metrics_url, out))
        print(f"\ndemo {'succeeded' if ok else 'FAILED'}", file=out)
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()
        if ctrl is not None:
            ctrl.close()
        lab.stop()
        if keep:
            print(f"kept {base} (reup status --config {lab.config_path})", file=out)
        elif workdir is None:
            shutil.rmtree(base, ignore_errors=True)
