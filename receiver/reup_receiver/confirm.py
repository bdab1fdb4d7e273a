"""Commit only after confirmation ("magic rollback"), on the device side.

After an activation with a confirm timeout, the receiver arms a deadline: it
writes `nix/var/reup/pending.json` and starts a detached watchdog process (its
own session, no terminal, no SSH channel), so the deadline holds when the SSH
session, sshd or the network goes away. The controller then connects again,
and `confirm GEN [--check CMD]` runs the health check and, if it passes,
commits the generation. A failed check rolls back at once; a missed deadline
rolls back when the watchdog wakes, or at the next receiver call if the device
was down. Every rollback is recorded in `nix/var/reup/rollbacks.jsonl` with
its reason, which `--status` reports. Used by receive.py, cli.py.

The health check is a shell command from the fleet's rollout policy. Running
it needs no more trust than the controller has already: it ships systems
whose activation runs as root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from reup_receiver.boot import counted
from reup_receiver.device import Device, write_atomic
from reup_receiver.errors import HealthCheckFailed, NotPending, Rebooting
from reup_receiver.generations import revert_to
from reup_receiver.protocol import BOOT_FAILED

WATCHDOG_ENV = "REUP_WATCHDOG"


def _pending_file(device: Device) -> str:
    return os.path.join(device.state, "pending.json")


def _rollbacks_file(device: Device) -> str:
    return os.path.join(device.state, "rollbacks.jsonl")


def pending(device: Device) -> dict[str, Any] | None:
    try:
        with open(_pending_file(device)) as fh:
            data: dict[str, Any] = json.load(fh)
            return data
    except FileNotFoundError:
        return None


def last_rollback(device: Device) -> dict[str, Any] | None:
    try:
        with open(_rollbacks_file(device)) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return None
    return json.loads(lines[-1]) if lines else None


def arm(device: Device, generation: int, previous: tuple[int, str] | None, activate: str,
        timeout: float) -> float:
    """Record the pending generation and start the watchdog; returns the deadline (epoch s)."""
    deadline = time.time() + timeout
    record = {"generation": generation, "deadline": deadline, "activate": activate,
              "previous": list(previous) if previous else None}
    write_atomic(_pending_file(device), json.dumps(record).encode())
    _spawn_watchdog(device)
    return deadline


# The watchdog child imports the receiver through our own import path, .pth files included: wrappers
# such as nixpkgs' set sys.path inside the entry script, so a bare `python -m` child would not find
# the receiver or its codecs.
_WATCHDOG_BOOT = ("import os, site, sys\n"
                  "for p in os.environ.pop('REUP_SYS_PATH').split(os.pathsep):\n"
                  "    site.addsitedir(p)\n"
                  "from reup_receiver.cli import main\n"
                  "sys.exit(main(sys.argv[1:]))\n")


def _spawn_watchdog(device: Device) -> None:
    argv = [sys.executable, "-c", _WATCHDOG_BOOT, "--root", device.root, "--watchdog"]
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                     env={**os.environ, WATCHDOG_ENV: "1", "REUP_SYS_PATH": os.pathsep.join(p for p in sys.path if p)})


def _roll_back(device: Device, record: dict[str, Any], reason: str) -> dict[str, Any]:
    """Under the device lock: undo the pending generation and record why."""
    previous = record.get("previous")
    error = None
    try:
        revert_to(device, (int(previous[0]), str(previous[1])) if previous else None,
                  int(record["generation"]), str(record["activate"]))
    except Exception as exc:  # keep going: the record must say what happened
        error = str(exc)
    entry = {"generation": record["generation"], "reason": reason, "time": time.time(),
             "restored": previous[0] if previous else None, "error": error}
    with open(_rollbacks_file(device), "a") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.unlink(_pending_file(device))
    return entry


def expire_overdue(device: Device) -> dict[str, Any] | None:
    """Under the device lock: roll back a pending generation whose deadline has passed."""
    record = pending(device)
    if record is None or time.time() < float(record["deadline"]):
        return None
    return _roll_back(device, record, "not confirmed before the deadline")


def expire_if_overdue(device: Device) -> None:
    """Cheap check for every verb: take the lock only when a deadline has passed."""
    record = pending(device)
    if record is not None and time.time() >= float(record["deadline"]):
        with device.lock(wait=True):
            expire_overdue(device)


def confirm(device: Device, generation: int, check: str | None) -> dict[str, Any]:
    with device.lock():
        expire_overdue(device)
        record = pending(device)
        if record is not None and record.get("activate") == "reboot":
            _boot_trial_gate(device, generation)
            record = pending(device)
        if record is None or int(record["generation"]) != generation:
            last = last_rollback(device)
            why = (f"; generation {last['generation']} was rolled back: {last['reason']}"
                   if last and int(last["generation"]) == generation else "")
            raise NotPending(f"generation {generation} is not awaiting confirmation{why}")
        if check:
            current = device.current()
            env = {**os.environ, "REUP_ROOT": device.root, "REUP_GENERATION": str(generation),
                   "REUP_TOPLEVEL": current[1] if current else ""}
            proc = subprocess.run(["/bin/sh", "-c", check], env=env, capture_output=True, text=True,
                                  check=False, timeout=max(1.0, float(record["deadline"]) - time.time()))
            if proc.returncode != 0:
                detail = (proc.stderr.strip().splitlines() or [""])[-1]
                entry = _roll_back(device, record, f"health check failed (exit {proc.returncode}): {detail}")
                raise HealthCheckFailed(f"health check failed; rolled back to generation {entry['restored']}: {detail}")
        if record.get("activate") == "reboot":
            counted.bless(device, generation)  # only now: the new kernel came up and passed the check
        os.unlink(_pending_file(device))
        return {"confirmed": generation}


def watchdog(device: Device) -> dict[str, Any]:
    """The detached process: wait for the deadline, then roll back unless confirmed."""
    while True:
        record = pending(device)
        if record is None:
            return {"watchdog": "confirmed"}
        delay = float(record["deadline"]) - time.time()
        if delay > 0:
            time.sleep(min(delay + 0.05, 60.0))
            continue
        with device.lock(wait=True):
            entry = expire_overdue(device)
        if entry is not None:
            return {"watchdog": "rolled_back", **entry}


# --- activation `reboot`: a generation on trial in the boot loader (reup_receiver.boot) ----------


def settle_boot(device: Device) -> dict[str, Any] | None:
    """For every verb: if a generation on trial did not boot within its tries (the loader booted
    the previous entry), roll it back with reason `boot_failed`. Takes the lock only while a
    generation is on trial."""
    record = pending(device)
    if counted.trial(device) is None and (record is None or record.get("activate") != "reboot"):
        return None
    with device.lock(wait=True):  # the watchdog may be settling it right now: wait for its record
        return _settle_boot_locked(device)


def _settle_boot_locked(device: Device) -> dict[str, Any] | None:
    verdict, trial = counted.judge(device)
    if verdict != "boot_failed" or trial is None:
        return None
    record = pending(device)
    if record is None or int(record["generation"]) != int(trial["generation"]):
        # Received without a confirm timeout: the trial alone says what to undo.
        record = {"generation": trial["generation"], "deadline": 0.0, "activate": "reboot",
                  "previous": trial["previous"]}
        write_atomic(_pending_file(device), json.dumps(record).encode())
    return _roll_back(device, record, BOOT_FAILED)


def _boot_trial_gate(device: Device, generation: int) -> None:
    """Under the lock, in `confirm`: the device must run the generation on trial before its check."""
    verdict, trial = counted.judge(device)
    if trial is None or int(trial["generation"]) != generation:
        return
    if verdict == "not_rebooted":
        raise Rebooting(f"generation {generation} awaits the reboot into its boot entry")
    if verdict == "boot_failed":
        _settle_boot_locked(device)
