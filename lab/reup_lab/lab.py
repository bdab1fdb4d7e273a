"""The lab: simulated devices behind real sshd, a local fleet repo and a reup.toml, in one directory.

Used by `reup demo` (demo.py) and the integration tests (tests/support/sshd.py).
The lab is: an SSH client key, N simulated devices (simdevice.py: a device root
behind its own `sshd` on 127.0.0.1 with the `reup-receive --ssh-command` forced
command), a local fleet repo (demofleet.py's test fleet, or one the caller makes)
and a reup.toml with SQLite state, the metrics endpoint on a free port.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping

from reup.config.reup_toml import Config, load_config

from reup_lab import demofleet
from reup_lab.simdevice import SimDevice, free_port, generate_key

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

    def start(self, *, init_repo: bool = True) -> None:
        """Start the devices' sshd and write reup.toml; `init_repo=False` leaves the repo to the caller."""
        for dev in self.devices.values():
            dev.prepare()
            dev.start()
        if init_repo:
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
