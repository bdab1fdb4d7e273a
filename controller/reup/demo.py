"""`reup demo`: a whole reup setup on one machine, and two rollouts through it.

Called by controller_cli.py (`reup demo`, `make demo`); its `Lab` is also the
integration tests' harness (tests/support/sshd.py). The lab is: an SSH client
key, N simulated devices (simdevice.py: a device root behind its own `sshd` on
127.0.0.1 with the `reup-receive --ssh-command` forced command), a local fleet
repo (demofleet.py) and a reup.toml with SQLite state in the work directory.
The demo commits a first revision, reconciles until every device is in sync,
commits a second revision changing some devices, reconciles again, and prints
the status, the bytes sent and a few metrics. Exit 0 when both rollouts converge.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Mapping

from . import demofleet
from .config import Config, load_config
from .controller import Controller
from .controller_cli import format_status
from .simdevice import SimDevice, free_port, generate_key

DEMO_NIX_OPTIONS = {"sandbox": "false", "substituters": ""}


class Lab:
    """Simulated devices + fleet repo + reup.toml under `base`."""

    def __init__(self, base: str, names: list[str], *, http_port: int | None = None,
                 poll_interval: float = 60.0, device_configs: Mapping[str, str] | None = None) -> None:
        self.base = os.path.abspath(base)
        os.makedirs(self.base, exist_ok=True)
        self.key = os.path.join(self.base, "id_ed25519")
        self.client_pubkey = generate_key(self.key)
        self.devices = {n: SimDevice(n, os.path.join(self.base, "devices", n), self.client_pubkey) for n in names}
        self.device_configs = dict(device_configs or {n: n for n in names})
        self.repo = os.path.join(self.base, "fleet")
        self.state_dir = os.path.join(self.base, "state")
        self.http_port = http_port or free_port()
        self.config_path = os.path.join(self.base, "reup.toml")
        self.poll_interval = poll_interval

    def start(self) -> None:
        for dev in self.devices.values():
            dev.prepare()
            dev.start()
        demofleet.init_repo(self.repo)
        options = ", ".join(f'{k} = "{v}"' for k, v in DEMO_NIX_OPTIONS.items())
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(
                f'[source]\nurl = "{self.repo}"\nbranch = "main"\npoll_interval = {self.poll_interval}\n\n'
                f'[state]\ndir = "{self.state_dir}"\n\n[build]\nmax_parallel = 2\nnix_options = {{ {options} }}\n\n'
                f'[ssh]\nkey = "{self.key}"\nconnect_timeout = 5\nattempts = 2\nretry_max = 30\n\n'
                f'[http]\nlisten = "127.0.0.1:{self.http_port}"\n'
            )

    def stop(self) -> None:
        for dev in self.devices.values():
            dev.stop()

    def fleet_toml(self, rollout: str = "") -> str:
        parts = [f"[rollout]\n{rollout}\n"] if rollout else []
        parts += [dev.fleet_entry(self.device_configs.get(name)) for name, dev in self.devices.items()]
        return "\n".join(parts)

    def commit(self, message: str, configs: Mapping[str, str], *, fleet: str | None = None) -> str:
        return demofleet.commit(self.repo, message, configs=configs, fleet=fleet if fleet is not None else self.fleet_toml())

    def config(self) -> Config:
        return load_config(self.config_path)

    def activations(self, name: str) -> list[str]:
        path = os.path.join(self.devices[name].root, "activations")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()

    def scrape(self, path: str = "/metrics") -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as resp:
            return str(resp.read().decode())


def _reconcile(cfg: Config, *, serve: bool = False) -> tuple[int, str, str]:
    """One `reup run --once`; returns (exit code, status table, selected metrics)."""
    ctrl = Controller(cfg)
    server = ctrl.start_http() if serve else None
    try:
        rc = asyncio.run(ctrl.run(once=True))
        status = format_status(ctrl.store.status())
        metrics = ""
        if server is not None:
            host, port = server.address
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            keep = ("reup_devices{", "reup_device_updates_total", "reup_transfer_bytes_total", "reup_builds_total",
                    "reup_source_revision_info", "reup_delta_ratio_sum", "reup_delta_ratio_count")
            metrics = "\n".join(ln for ln in text.splitlines() if ln.startswith(keep) and not ln.endswith(" 0.0"))
        return rc, status, metrics
    finally:
        if server is not None:
            server.stop()
        ctrl.close()


def run_demo(workdir: str | None = None, *, devices: int = 4, keep: bool = False) -> int:
    os.environ.setdefault("NIX_CONFIG", demofleet.NIX_CONFIG)
    base = workdir or tempfile.mkdtemp(prefix="reup-demo-")
    names = [f"dev-{i}" for i in range(1, devices + 1)]
    # dev-1 is the gateway, the last one the camera, the ones between share the sensor system.
    configs = {n: ("gateway" if i == 0 else "camera" if i == len(names) - 1 and i > 1 else "sensor")
               for i, n in enumerate(names)}
    lab = Lab(base, names, device_configs=configs)
    out = sys.stdout
    try:
        print(f"reup demo in {base}: {devices} devices behind sshd on 127.0.0.1 "
              f"(ports {', '.join(str(d.port) for d in lab.devices.values())})", file=out)
        lab.start()
        c1 = lab.commit("first fleet revision", {"gateway": "1.0", "sensor": "1.0", "camera": "1.0"})
        print(f"\n== commit {c1[:12]}: first install of every device ==", file=out, flush=True)
        rc1, status, _ = _reconcile(lab.config())
        print(status, file=out)
        c2 = lab.commit("sensor 1.1", {"gateway": "1.0", "sensor": "1.1", "camera": "1.0"})
        print(f"\n== commit {c2[:12]}: the sensor system changes ==", file=out, flush=True)
        rc2, status, metrics = _reconcile(lab.config(), serve=True)
        print(status, file=out)
        print("\n== what was sent ==", file=out)
        from .state import Store

        store = Store(lab.state_dir)
        for h in store.history():
            if h["result"] in ("committed", "adopted"):
                print(f"{h['device']:<8} {h['commit_id'][:12]}  {h['stream_bytes']:>9} bytes sent "
                      f"(a full copy of the missing paths: {h['nar_bytes']} bytes)", file=out)
        store.close()
        print("\n== metrics (second rollout) ==\n" + metrics, file=out)
        for name in names:
            print(f"{name} activations: {lab.activations(name)}", file=out)
        ok = rc1 == 0 and rc2 == 0
        print(f"\ndemo {'succeeded' if ok else 'FAILED'}", file=out)
        return 0 if ok else 1
    finally:
        lab.stop()
        if workdir is None and not keep:
            shutil.rmtree(base, ignore_errors=True)
        elif keep:
            print(f"kept {base} (reup status --config {lab.config_path})", file=out)
