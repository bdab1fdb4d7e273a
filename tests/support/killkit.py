"""Controller kill -9 at random instants of a rollout, on real sshd devices: the fault campaign's
`controller-kill` part (issue 11), run by tests/chaos/test_chaos.py.

A lab (reup_lab.lab: device roots behind real OpenSSH sshd, the forced-command receiver) and a
fleet repo whose every commit changes each device's system by a few hundred KiB of
incompressible data, so that a rollout spends real time in each phase: fetch and evaluation,
build (real Nix), transfer (limited by each device's `max_rate`), activation (1 s), health check
(1 s) and confirmation. Each fault: commit a new version, start `reup run --once` in its own
process group, SIGKILL the whole group at a seeded random instant of the rollout's measured
duration, then check:

- every device, once no receiver holds its lock: `system` resolves and every `system-N-link`
  passes `nix store verify --no-trust -r --store ROOT` (chaoskit.verify_generations);
- on every other fault the controller stays down past the confirmation deadline, so a pending
  generation must be rolled back by the device's own watchdog (chaoskit.settle: else the device
  counts as *unconfirmed*); on the others the restarted controller must confirm it in time;
- the controller restarted on the same state dir (`reup run --once`) exits 0 and leaves every
  device in sync on the commit (its `version`, no pending generation, state `in_sync`);
- a device that kept a verified partial stream when the controller died gets only the rest of it
  (the bytes the restarted controller logs as sent = the stream's size - the kept offset), when the restarted
  controller sends that same stream.

The fault's kind is what the controller was doing when it died, by the events in its log (fetch,
evaluation, build, delta encoding, sending, confirmation, finishing).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from reup.loop.state import StateDB
from reup_lab import demofleet
from reup_lab.lab import Lab
from reup_lab.nixenv import nix_env

from support.chaoskit import Results, run_receiver, settle, verify_generations
from support.receiverkit import current_toplevel

CONFIRM_TIMEOUT = 8  # activation (1 s) + health check (1 s) + confirmation, with room on a loaded machine
MAX_RATE = 300_000  # bytes/s to each device: a version's delta (~0.7 MB) takes about 2 s
STRATA = 8
KIND = "controller SIGKILL during a rollout on real sshd devices"

# Each configuration: a shared base, a version file, an activation script that takes 1 s, and
# 150,000 seeded random numbers (~1.5 MB, ~0.7 MB as a delta: checkpoints at every 256 KiB, so a
# kill mid-transfer leaves a partial to resume) that change with every version, in a file named by
# the version (a new file, not a patch: the encoder does not spend seconds diffing random data).
_FLAKE = r'''{
  description = "reup chaos fleet";
  outputs = { self }: let
    system = "x86_64-linux";
    base = derivation {
      name = "base-1"; builder = "/bin/sh"; inherit system;
      args = [ "-c" "PATH=/usr/bin:/bin; mkdir -p $out/lib; seq 1 30000 > $out/lib/numbers" ];
    };
    mk = name: version: derivation {
      name = "nixos-system-${name}-${version}"; builder = "/bin/sh"; inherit system base;
      act = "#!/bin/sh\necho \"$1 ${name} ${version}\" >> \"$REUP_ROOT/activations\"\nsleep 1\n";
      args = [ "-c" "PATH=/usr/bin:/bin; mkdir -p $out/bin $out/share; echo ${version} > $out/version; ln -s $base $out/base; awk -v s=${version} 'BEGIN { srand(s); for (i = 0; i < 150000; i++) printf \"%d\\n\", rand() * 1000000000 }' > $out/share/blob-${version}; printf '%s' \"$act\" > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration" ];
    };
  in {
    nixosConfigurations = {
@CONFIGS@    };
  };
}
'''


def flake_text(names: list[str], version: int) -> str:
    configs = "".join(f'      "{n}" = {{ config.system.build.toplevel = mk "{n}" "{version}"; }};\n' for n in names)
    return _FLAKE.replace("@CONFIGS@", configs)


@dataclass
class KillLab:
    """A lab of `names` and the controller runs against it."""

    lab: Lab
    names: list[str]
    version: int = 0
    runs: int = 0

    def fleet(self) -> str:
        policy = (f'confirm_timeout = {CONFIRM_TIMEOUT}\nhealth_check = "sleep 1"\n'
                  "max_parallel = 0\nsuccess_ratio = 1.0\n")
        parts = [f"[rollout]\n{policy}"]
        for name, dev in self.lab.devices.items():
            parts.append(dev.fleet_entry(name) + f"\nmax_rate = {MAX_RATE}\n")
        return "\n".join(parts)

    def commit(self) -> str:
        self.version += 1
        with open(os.path.join(self.lab.repo, "flake.nix"), "w", encoding="utf-8") as f:
            f.write(flake_text(self.names, self.version))
        with open(os.path.join(self.lab.repo, "fleet.toml"), "w", encoding="utf-8") as f:
            f.write(self.fleet())
        demofleet.git(self.lab.repo, "add", "-A")
        demofleet.git(self.lab.repo, "commit", "-q", "-m", f"version {self.version}")
        return demofleet.git(self.lab.repo, "rev-parse", "HEAD")

    def start_controller(self) -> subprocess.Popen[bytes]:
        """`reup run --once`, in its own process group (its builds and encoders die with it)."""
        self.runs += 1
        log = open(os.path.join(self.lab.base, f"controller-{self.runs}.log"), "wb")  # noqa: SIM115
        reup = os.path.join(os.path.dirname(sys.executable), "reup")
        proc = subprocess.Popen([reup, "run", "--once", "--config", self.lab.config_path], stdout=log,
                                stderr=subprocess.STDOUT, env=nix_env(), start_new_session=True)
        log.close()
        return proc

    def log_tail(self) -> str:
        with open(os.path.join(self.lab.base, f"controller-{self.runs}.log"), "rb") as fh:
            return fh.read()[-1500:].decode("utf-8", "replace")


def lab(base: str, names: list[str]) -> Iterator[KillLab]:
    """A started lab with the chaos fleet repo (a generator: use with contextlib.contextmanager)."""
    the_lab = Lab(base, names)
    the_lab.start()
    try:
        yield KillLab(the_lab, names)
    finally:
        the_lab.stop()


def _device_rows(kl: KillLab) -> list[dict[str, object]]:
    store = StateDB(kl.lab.state_dir)
    try:
        rows: list[dict[str, object]] = store.status()["devices"]
        return rows
    finally:
        store.close()


# What the killed controller had got to, by the events its log shows (the latest phase any device
# reached): the receive verb answers after the device activated, so "sending" includes activation.
_PHASES = (("finishing", "rollout settled"), ("confirming (health check, confirmation)", "-> confirming"),
           ("sending the stream (the device receives and activates)", "delta encoded"),
           ("encoding a delta", "-> transferring"), ("building", "-> building"),
           ("evaluating", "events: revision "))


def phase(kl: KillLab) -> str:
    with open(os.path.join(kl.lab.base, f"controller-{kl.runs}.log"), encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    return next((name for name, mark in _PHASES if mark in text), "starting (fetch)")


def wait_unlocked(root: str, timeout: float = 120) -> bool:
    """Wait until no receiver holds the device's lock (one may outlive the controller's kill:
    it finishes what it has, as when sshd drops the session)."""
    path = os.path.join(root, "nix/var/reup/lock")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not os.path.exists(path):
            return True
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        time.sleep(0.1)
    return False


def resume_point(root: str) -> tuple[str, int] | None:
    proc = run_receiver(root, ["--status"], None)
    if proc.returncode != 0:
        return None
    resume = json.loads(proc.stdout.decode().strip().splitlines()[-1]).get("resume")
    return (str(resume["stream_id"]), int(resume["offset"])) if resume else None


def stream_size(state_dir: str, stream_id: str) -> int | None:
    """The size of the controller's cached stream with this id (its last 32 bytes)."""
    for dirpath, _dirs, files in os.walk(os.path.join(state_dir, "deltas")):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    fh.seek(-32, os.SEEK_END)
                    if fh.read(32).hex() == stream_id:
                        return os.path.getsize(path)
            except OSError:
                continue
    return None


def sent_bytes(kl: KillLab) -> dict[str, int]:
    """Stream bytes the last controller run sent to each device (its log's transfer lines: the
    history keeps the stream's size, the log what went over the wire)."""
    sent: dict[str, int] = {}
    with open(os.path.join(kl.lab.base, f"controller-{kl.runs}.log"), encoding="utf-8", errors="replace") as fh:
        for m in re.finditer(r"device (\S+): sent (\d+) bytes", fh.read()):
            sent[m[1]] = sent.get(m[1], 0) + int(m[2])
    return sent


def converge(kl: KillLab, commit: str, res: Results, label: str, timeout: float = 600) -> bool:
    """Run the controller to the end on the same state; every device must then be in sync."""
    proc = kl.start_controller()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        res.broken.append(f"{label}: the restarted controller did not finish in {timeout:.0f} s: {kl.log_tail()}")
        return False
    if code != 0:
        res.broken.append(f"{label}: the restarted controller exited {code}: {kl.log_tail()}")
        return False
    for name in kl.names:
        root = kl.lab.devices[name].root
        settle(root, res, f"{label} {name} (after the restart)")
        top = current_toplevel(root)
        try:
            with open(os.path.join(root, str(top).lstrip("/"), "version")) as fh:
                version = int(fh.read())
        except (OSError, ValueError):
            version = -1
        if version != kl.version:
            res.broken.append(f"{label} {name}: on version {version} after the restart, not {kl.version}")
            return False
    rows = {str(r["name"]): r for r in _device_rows(kl)}
    out_of_sync = {n: (r["state"], r.get("commit")) for n, r in rows.items()
                   if r["state"] != "in_sync" or r.get("commit") != commit}
    if out_of_sync:
        res.broken.append(f"{label}: the controller's state is not in sync on {commit[:8]}: {out_of_sync}")
        return False
    return True


def controller_kills(kl: KillLab, count: int, rng: random.Random, res: Results, calibrate: bool = True) -> None:
    """`count` controller kills (runs that finish before their instant are re-drawn, up to twice).

    The kill instants are drawn over the duration of a delta rollout measured first (`calibrate`;
    without it, over the first rollout's, a full copy: shorter, for the reduced campaign)."""
    start = time.monotonic()
    if not converge(kl, kl.commit(), res, "controller-kill first rollout"):
        return
    if calibrate:
        start = time.monotonic()
        if not converge(kl, kl.commit(), res, "controller-kill calibration"):
            return
    duration = time.monotonic() - start
    strata = min(STRATA, count)
    for i in range(count):
        label = f"controller-kill #{i}"
        commit = kl.commit()
        for _attempt in range(3):
            proc = kl.start_controller()
            # stratified over the rollout's duration, so that every phase gets its share of kills
            instant = duration * ((i % strata) + rng.random()) / strata
            try:
                proc.wait(instant)
                res.controller_missed += 1  # finished before its instant: try again, on the same commit (no-op)
                kl.commit()
                commit = demofleet.git(kl.lab.repo, "rev-parse", "HEAD")
                continue
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            break
        else:
            continue
        kind = phase(kl)
        res.faults[f"{KIND}: {kind}"] += 1
        if not _check_devices(kl, res, f"{label} ({kind}, at {instant:.1f} s)", wait_deadline=bool(i % 2)):
            continue
        kept = {n: resume_point(kl.lab.devices[n].root) for n in kl.names}
        if not converge(kl, commit, res, f"{label} ({kind})"):
            continue
        if not _resumed(kl, kept, res, label):
            continue
        problem = next((p for n in kl.names if (p := verify_generations(kl.lab.devices[n].root))), None)
        if problem:
            res.broken.append(f"{label} after the restart: {problem}")
            continue
        res.recovered += 1


def _check_devices(kl: KillLab, res: Results, label: str, wait_deadline: bool) -> bool:
    for name in kl.names:
        root = kl.lab.devices[name].root
        if not wait_unlocked(root):
            res.broken.append(f"{label} {name}: a receiver still holds the device's lock after 120 s")
            return False
        if wait_deadline:  # the controller stays down: the device's watchdog must act alone
            settle(root, res, f"{label} {name}")
        problem = verify_generations(root)
        if problem:
            res.broken.append(f"{label} {name}: {problem}")
            return False
    return True


def _resumed(kl: KillLab, kept: Mapping[str, tuple[str, int] | None], res: Results,
             label: str) -> bool:
    sent = sent_bytes(kl)
    for name, point in kept.items():
        if point is None or point[1] == 0 or name not in sent:
            continue
        size = stream_size(kl.lab.state_dir, point[0])
        if size is None:
            continue  # the stream was not cached when the controller died: a new one, from the start
        if sent[name] == size - point[1]:
            res.controller_resumed += 1
        elif sent[name] == size:
            res.broken.append(f"{label} {name}: re-sent all {size} bytes although the device kept {point[1]}")
            return False
    return True
