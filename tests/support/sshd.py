"""Integration-test harness for the controller: simulated devices behind real sshd, a fleet repo,
and the `reup` command run as a real process.

The lab itself (keys, sshd processes, repo, reup.toml) is `reup_lab.lab.Lab`, shared
with `reup demo`; this module adds what tests need around it: running
`reup run [--once]` as a subprocess, waiting for a state, reading metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from reup.loop.state import StateDB
from reup_lab.lab import Lab
from reup_lab.simdevice import SimDevice, free_port, generate_key

__all__ = ["Lab", "SimDevice", "free_port", "generate_key", "metric", "parse_metrics", "reup_bin"]

BIN = os.path.dirname(sys.executable)


def reup_bin() -> str:
    return os.path.join(BIN, "reup")


def run_once(lab: Lab, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([reup_bin(), "run", "--once", "--config", lab.config_path],
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_controller(lab: Lab) -> subprocess.Popen[bytes]:
    log = open(os.path.join(lab.base, "controller.log"), "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen([reup_bin(), "run", "--config", lab.config_path], stdout=log, stderr=log)
    log.close()
    wait_for(lambda: _http_up(lab) or proc.poll() is not None, 30, "controller HTTP up")
    assert proc.poll() is None, controller_log(lab)
    return proc


class Controller:
    """The lab's `reup run` process, which a test may start, kill -9 and restart."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = start_controller(self.lab)
        return self.proc

    def kill(self) -> None:
        """kill -9, as a crash or an OOM killer would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


@contextlib.contextmanager
def controller_session(lab: Lab, *, start: bool = False, stop_lab: bool = True) -> Iterator[Controller]:
    """Runs a test's body around the lab's controller: on failure the controller's log is printed;
    in any case the controller is stopped and (unless `stop_lab` is false) the lab too."""
    ctl = Controller(lab)
    try:
        if start:
            ctl.start()
        yield ctl
    except BaseException:
        print(controller_log(lab))
        raise
    finally:
        ctl.stop()
        if stop_lab:
            lab.stop()


def controller_log(lab: Lab) -> str:
    try:
        with open(os.path.join(lab.base, "controller.log"), encoding="utf-8", errors="replace") as f:
            return f.read()[-6000:]
    except OSError:
        return ""


def _http_up(lab: Lab) -> bool:
    try:
        return lab.scrape("/healthz").strip() == "ok"
    except OSError:
        return False


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def store_status(lab: Lab) -> dict[str, Any]:
    store = StateDB(lab.state_dir)
    try:
        return store.status()
    finally:
        store.close()


def store_history(lab: Lab) -> list[dict[str, Any]]:
    store = StateDB(lab.state_dir)
    try:
        return store.history()
    finally:
        store.close()


def api_status(lab: Lab) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(lab.scrape("/api/status"))
    return result


def states(status: dict[str, Any]) -> dict[str, str]:
    return {d["name"]: d["state"] for d in status["devices"]}


def post(lab: Lab, path: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{lab.http_port}{path}", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{label="v",...}': value} for every sample line of a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        have = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p)) if rest else ""
        if have == want:
            return value
    return 0.0


def nix_verify(root: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nix", "--extra-experimental-features", "nix-command", "store", "verify", "--no-trust",
                           "--store", root, "-r", path], capture_output=True, text=True, check=False)
