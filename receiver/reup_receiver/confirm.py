"""Commit only after confirmation ("magic rollback"), on the device side.

A receive with a confirm timeout is *armed before it is switched* (docs/device-invariants.md,
invariant 1): the pending record (`nix/var/reup/pending.json`: the new generation, the last
confirmed one to return to, the deadline) is written durably and a detached watchdog (its own
session, no terminal, no SSH channel) has reported that it runs before `system` moves. A
receiver killed at any instant after that leaves a device the watchdog rolls back at the
deadline, or the next receiver call does if the device was down.

`confirm GEN [--check CMD]` runs the health check and commits; a failed check rolls back at
once. The rollback target is always the last confirmed generation (`confirmed.json`), and a
receive that arrives while a generation is pending is refused (exit PENDING), so an
unconfirmed generation never becomes a fallback. Every rollback is recorded in
`rollbacks.jsonl` with its reason. Used by receive.py, maintenance.py, cli.py.

Deadlines never depend on the wall clock alone: the record keeps the deadline on
CLOCK_BOOTTIME with the boot id, so a device whose clock jumps (no RTC, NTP syncing) still
counts the timeout it was given; after a reboot the remaining time is the wall-clock one, capped
at the timeout. `remaining` is what status and the receive answer report to the controller.

The health check is a shell command from the fleet's rollout policy. Running it needs no more
trust than the controller has already: it ships systems whose activation runs as root.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

from reup_receiver.boot import counted
from reup_receiver.device import Device, append_line, read_jsonl_last, write_atomic
from reup_receiver.errors import (
    ActivationFailed,
    HealthCheckFailed,
    NotPending,
    PendingConfirmation,
    Rebooting,
    ReceiveError,
)
from reup_receiver.generations import revert_to, run_activation
from reup_receiver.protocol import ACTIONS, BOOT_FAILED

WATCHDOG_ENV = "REUP_WATCHDOG"
# Test-only: seconds added to this process's wall clock (a device whose clock is off); never set
# on a real device. The boot-time clock, which the deadline runs on, is not affected.
CLOCK_SKEW_ENV = "REUP_TEST_CLOCK_SKEW"
Generation = tuple[int, str]


def wall_time() -> float:
    return time.time() + float(os.environ.get(CLOCK_SKEW_ENV) or 0)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _pending_file(device: Device) -> str:
    return os.path.join(device.state, "pending.json")


def _confirmed_file(device: Device) -> str:
    return os.path.join(device.state, "confirmed.json")


def _rollbacks_file(device: Device) -> str:
    return os.path.join(device.state, "rollbacks.jsonl")


# --- records ------------------------------------------------------------------------------------


def _generation(v: Any) -> Generation | None:
    if v is None:
        return None
    if (not isinstance(v, list) or len(v) != 2 or isinstance(v[0], bool) or not isinstance(v[0], int)
            or not isinstance(v[1], str)):
        raise ValueError("bad generation")
    return int(v[0]), str(v[1])


def _valid_record(data: Any) -> dict[str, Any]:
    """A pending record as written by `arm`; ValueError for anything else (a torn or foreign file)."""
    if not isinstance(data, dict):
        raise ValueError("not an object")
    gen, act = data.get("generation"), data.get("activate")
    if isinstance(gen, bool) or not isinstance(gen, int) or act not in ACTIONS:
        raise ValueError("bad generation or activation")
    for key in ("deadline", "timeout", "boot_deadline"):
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"bad {key}")
    _generation(data.get("previous"))
    return data


class _Broken(dict[str, Any]):
    """Stands for a pending record that exists but cannot be read: overdue at once."""


def read_pending(device: Device) -> dict[str, Any] | None:
    """The pending record; an unreadable one becomes an overdue record returning to the last
    confirmed generation (invariant 7), so it never blocks a later verb."""
    try:
        with open(_pending_file(device), "rb") as fh:
            raw = fh.read(1 << 16)
    except FileNotFoundError:
        return None
    try:
        return _valid_record(json.loads(raw))
    except ValueError:
        current = device.current()
        confirmed = last_confirmed(device, use_pending=False)
        failed = current[0] if current and confirmed and current[0] != confirmed[0] else None
        return _Broken(generation=failed, previous=list(confirmed) if confirmed else None,
                       activate="switch", deadline=0.0, timeout=0.0, boot_deadline=0.0, boot_id="")


def remaining(record: dict[str, Any]) -> float:
    """Seconds until the record's deadline, by the boot-time clock when still in the same boot."""
    if isinstance(record, _Broken):
        return 0.0
    if record.get("boot_id") and record.get("boot_id") == _boot_id():
        return float(record["boot_deadline"]) - _boottime()
    return min(float(record["deadline"]) - wall_time(), float(record["timeout"]))


def pending(device: Device) -> dict[str, Any] | None:
    """The pending generation as status reports it (protocol.Pending)."""
    record = read_pending(device)
    if record is None or record.get("generation") is None:
        return None
    return {"generation": record["generation"], "deadline": record["deadline"],
            "remaining": round(max(0.0, remaining(record)), 3)}


def last_confirmed(device: Device, use_pending: bool = True) -> Generation | None:
    """The generation to fall back to: `confirmed.json`, else the pending record's target, else
    the current generation (a device that never ran with confirmation)."""
    try:
        with open(_confirmed_file(device), "rb") as fh:
            data = json.loads(fh.read(1 << 16))
        gen = _generation([data.get("generation"), data.get("toplevel")])
        if gen is not None and os.path.lexists(os.path.join(device.profiles, f"system-{gen[0]}-link")):
            return gen
    except (OSError, ValueError, AttributeError):
        pass
    if use_pending:
        record = read_pending(device)
        if record is not None and not isinstance(record, _Broken):
            return _generation(record.get("previous"))
    return device.current()


def mark_confirmed(device: Device, generation: Generation) -> None:
    write_atomic(_confirmed_file(device),
                 json.dumps({"generation": generation[0], "toplevel": generation[1]}).encode())


def last_rollback(device: Device) -> dict[str, Any] | None:
    last = read_jsonl_last(_rollbacks_file(device))
    return last if isinstance(last, dict) else None


def refuse_if_pending(device: Device) -> None:
    """Invariant 2: nothing switches while a generation awaits confirmation."""
    record = read_pending(device)
    if record is not None and record.get("generation") is not None:
        raise PendingConfirmation(
            f"generation {record['generation']} awaits confirmation ({max(0.0, remaining(record)):.0f} s left); "
            "confirm it or wait for its deadline")


# --- arming and switching -----------------------------------------------------------------------


def switch_armed(device: Device, toplevel: str, activate: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """Arm (durable record, watchdog running), then switch and activate. Returns (generation, record).

    Activation `reboot` of a generation that changes what boots installs a counted boot entry instead
    of activating (boot/counted.py; cli.py reboots once the answer is out); one that changes nothing
    that boots is switched at once."""
    running = device.current()
    changed = counted.changes(device, running, toplevel) if activate == "reboot" else ()
    if activate == "reboot" and not changed:
        activate = "switch"
    previous = last_confirmed(device)
    if previous is not None:
        mark_confirmed(device, previous)  # the fallback is named before anything moves
    number = device.add_generation(toplevel)
    record = {"generation": number, "toplevel": toplevel, "activate": activate,
              "previous": list(previous) if previous else None, "timeout": timeout,
              "deadline": wall_time() + timeout, "boot_id": _boot_id(), "boot_deadline": _boottime() + timeout}
    write_atomic(_pending_file(device), json.dumps(record).encode())
    try:
        _spawn_watchdog(device)
    except BaseException:  # not armed: undo the record and the link, nothing was switched
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_pending_file(device))
        device.drop_generation(number)
        raise
    try:
        if changed:
            try:
                counted.install(device, number, toplevel, running, changed)
            except (OSError, ValueError) as exc:
                raise ActivationFailed(f"activation failed (reboot): boot entry for generation {number}: "
                                       f"{exc}") from exc
            device.switch_to(number)
        else:
            device.switch_to(number)
            run_activation(device, toplevel, activate)
    except ReceiveError as exc:
        entry = _roll_back(device, record, f"activation failed: {exc}")
        raise type(exc)(f"{exc}; rolled back to generation {entry['restored']}") from exc
    return number, record


# The watchdog child imports the receiver through our own import path, .pth files included: wrappers
# such as nixpkgs' set sys.path inside the entry script, so a bare `python -m` child would not find
# the receiver or its codecs.
_WATCHDOG_BOOT = ("import os, site, sys\n"
                  "for p in os.environ.pop('REUP_SYS_PATH').split(os.pathsep):\n"
                  "    site.addsitedir(p)\n"
                  "from reup_receiver.cli import main\n"
                  "sys.exit(main(sys.argv[1:]))\n")


def child_env(device: Device) -> dict[str, str]:
    """The environment of processes that outlive the receive: no fault injection of the receiver."""
    from reup_receiver.faults import FAULT_ENV

    return {k: v for k, v in os.environ.items() if k != FAULT_ENV}


def _spawn_watchdog(device: Device) -> None:
    """Start the detached watchdog and wait until it reports that it runs."""
    argv = [sys.executable, "-c", _WATCHDOG_BOOT, "--root", device.root, "--watchdog"]
    env = {**child_env(device), WATCHDOG_ENV: "1", "REUP_SYS_PATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, env=env)
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    proc.stdout.close()
    if ready.strip() != b"armed":
        raise ReceiveError("the confirmation watchdog did not start; not switching")


def _roll_back(device: Device, record: dict[str, Any], reason: str) -> dict[str, Any]:
    """Under the device lock: return to the record's (last confirmed) generation and record why."""
    previous = _generation(record.get("previous"))
    failed = record.get("generation")
    error = None
    try:
        if previous is not None:
            link = os.path.join(device.profiles, f"system-{previous[0]}-link")
            if not os.path.lexists(link):
                device.add_link(previous[0], previous[1])
        current = device.current()
        if previous is not None and current is not None and current[0] == previous[0]:
            if failed is not None and failed != previous[0]:
                device.drop_generation(int(failed))  # never switched: nothing to re-activate
        elif failed is not None:
            revert_to(device, previous, int(failed), str(record["activate"]))
        if previous is not None:
            mark_confirmed(device, previous)
    except Exception as exc:  # keep going: the record must say what happened
        error = str(exc)
    entry = {"generation": failed, "reason": reason, "time": wall_time(),
             "restored": previous[0] if previous else None, "error": error}
    append_line(_rollbacks_file(device), json.dumps(entry))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_pending_file(device))
    return entry


def expire_overdue(device: Device) -> dict[str, Any] | None:
    """Under the device lock: roll back a pending generation whose deadline has passed."""
    record = read_pending(device)
    if record is None or remaining(record) > 0:
        return None
    reason = ("pending record unreadable" if isinstance(record, _Broken)
              else "not confirmed before the deadline")
    return _roll_back(device, record, reason)


def expire_if_overdue(device: Device) -> None:
    """Cheap check for every verb: take the lock only when a deadline has passed."""
    record = read_pending(device)
    if record is not None and remaining(record) <= 0:
        with device.lock(wait=True):
            expire_overdue(device)


def roll_back_pending(device: Device, reason: str) -> dict[str, Any] | None:
    """Under the device lock: roll back a pending generation now (the rollback verb)."""
    record = read_pending(device)
    return None if record is None else _roll_back(device, record, reason)


def confirm(device: Device, generation: int, check: str | None) -> dict[str, Any]:
    with device.lock():
        expire_overdue(device)
        record = read_pending(device)
        if record is not None and record.get("activate") == "reboot":
            _boot_trial_gate(device, generation)
            record = read_pending(device)
        if record is None or record.get("generation") != generation:
            last = last_rollback(device)
            why = (f"; generation {last['generation']} was rolled back: {last['reason']}"
                   if last and last.get("generation") == generation else "")
            raise NotPending(f"generation {generation} is not awaiting confirmation{why}")
        if check:
            current = device.current()
            env = {**child_env(device), "REUP_ROOT": device.root, "REUP_GENERATION": str(generation),
                   "REUP_TOPLEVEL": current[1] if current else ""}
            try:
                proc = subprocess.run(["/bin/sh", "-c", check], env=env, capture_output=True, text=True,
                                      check=False, timeout=max(1.0, remaining(record)),
                                      stdin=subprocess.DEVNULL, start_new_session=True)
                code, detail = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
            except subprocess.TimeoutExpired:
                code, detail = -1, "timed out at the deadline"
            if code != 0:
                entry = _roll_back(device, record, f"health check failed (exit {code}): {detail}")
                raise HealthCheckFailed(f"health check failed; rolled back to generation {entry['restored']}: {detail}")
        current = device.current()
        mark_confirmed(device, (generation, str(record.get("toplevel") or (current[1] if current else ""))))
        if record.get("activate") == "reboot":
            counted.bless(device, generation)  # only now: the new kernel came up and passed the check
        os.unlink(_pending_file(device))
        return {"confirmed": generation}


def watchdog(device: Device) -> dict[str, Any]:
    """The detached process: report that it runs, wait for the deadline, roll back unless confirmed."""
    with contextlib.suppress(OSError):
        os.write(1, b"armed\n")
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    while True:
        settled = settle_boot(device)  # a boot entry on trial that did not come up (after the handshake)
        if settled is not None:
            return {"watchdog": "rolled_back", **settled}
        record = read_pending(device)
        if record is None:
            return {"watchdog": "confirmed"}
        delay = remaining(record)
        if delay > 0:
            time.sleep(min(delay + 0.05, 2.0))  # short polls: a confirmed or removed record ends it soon
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
    record = read_pending(device)
    if counted.trial(device) is None and (record is None or record.get("activate") != "reboot"):
        return None
    with device.lock(wait=True):  # the watchdog may be settling it right now: wait for its record
        return _settle_boot_locked(device)


def _settle_boot_locked(device: Device) -> dict[str, Any] | None:
    verdict, trial = counted.judge(device)
    if verdict != "boot_failed" or trial is None:
        return None
    record = read_pending(device)
    if record is None or record.get("generation") != int(trial["generation"]):
        # Received without a confirm timeout: the trial alone says what to undo.
        record = {"generation": trial["generation"], "deadline": 0.0, "timeout": 0.0, "activate": "reboot",
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
