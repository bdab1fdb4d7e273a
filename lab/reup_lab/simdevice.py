"""Simulated devices: a device root directory behind a real OpenSSH `sshd` on 127.0.0.1.

Used by `reup demo` (demo.py) and the integration tests (tests/support/sshd.py).
Each device gets its own host key, sshd config and `authorized_keys` entry with
`restrict,command="reup-receive --root DIR --ssh-command"`, so the controller
talks to it exactly as to a real device. Needs /usr/sbin/sshd and ssh-keygen.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from reup.io.nix import NixExecutor, init_store_cmd

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def generate_key(path: str) -> str:
    """Create an ed25519 key pair at `path` (if missing); return the public key line."""
    if not os.path.exists(path):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "reup", "-f", path], check=True)
    with open(path + ".pub", encoding="ascii") as f:
        return " ".join(f.read().split()[:2])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receiver_command() -> str:
    """The `reup-receive` next to the running Python (the venv's), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "reup-receive")
    return local if os.path.exists(local) else (shutil.which("reup-receive") or "reup-receive")


@dataclass
class SimDevice:
    name: str
    base: str  # this device's directory: root/, sshd config and keys
    client_pubkey: str
    receiver: str = field(default_factory=receiver_command)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return os.path.join(self.base, "root")

    @property
    def host_key(self) -> str:
        return generate_key(os.path.join(self.base, "ssh_host_ed25519_key"))

    def prepare(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        if shutil.which("nix-store") and not os.path.exists(os.path.join(self.root, "nix/var/nix/db/db.sqlite")):
            NixExecutor().run(init_store_cmd(self.root))  # a device with a Nix database, as NixOS has
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        self.host_key  # noqa: B018 - generates the host key
        command = f"{self.receiver} --root {self.root} --ssh-command"
        with open(os.path.join(self.base, "authorized_keys"), "w", encoding="ascii") as f:
            f.write(f'restrict,command="{command}" {self.client_pubkey}\n')
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {os.path.join(self.base, 'ssh_host_ed25519_key')}",
            f"PidFile {os.path.join(self.base, 'sshd.pid')}",
            f"AuthorizedKeysFile {os.path.join(self.base, 'authorized_keys')}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin yes",
            "LogLevel ERROR",
            f"SetEnv PATH={os.path.dirname(self.receiver)}:/usr/bin:/bin",
        ]
        with open(os.path.join(self.base, "sshd_config"), "w", encoding="ascii") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if not os.path.exists(os.path.join(self.base, "sshd_config")):
            self.prepare()
        log = open(os.path.join(self.base, "sshd.log"), "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", os.path.join(self.base, "sshd_config")], stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd for {self.name} exited: {self.read_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd for {self.name} did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def read_log(self) -> str:
        try:
            with open(os.path.join(self.base, "sshd.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def fleet_entry(self, config: str | None = None, wave: str = "default") -> str:
        """This device's `[devices.<name>]` table for fleet.toml."""
        user = getpass.getuser()
        lines = [
            f"[devices.{self.name}]",
            'host = "127.0.0.1"',
            f"port = {self.port}",
            f'user = "{user}"',
            f'host_key = "{self.host_key}"',
            f'wave = "{wave}"',
        ]
        if config:
            lines.append(f'config = "{config}"')
        return "\n".join(lines) + "\n"
