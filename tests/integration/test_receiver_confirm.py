"""Commit only after confirmation, on the device (issue 5): deadline, health check, watchdog.

A receive with `--confirm-timeout` arms a deadline held by a detached watchdog
process; `--confirm GEN [--check CMD]` commits; a failed check or a missed
deadline rolls the device back to its previous generation on its own and
records why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from reup_lab.nixenv import nix_env
from support.nixflake import Generations
from support.receiverkit import (
    StreamCache,
    assert_one_line_error,
    current_toplevel,
    profile_links,
    read_activations,
    receive,
    status,
)

pytestmark = pytest.mark.slow


def armed(root: str, gens: Generations, streams: StreamCache, timeout: float) -> int:
    run = receive(root, streams.get([gens.gen1], gens.gen2), "--confirm-timeout", str(timeout))
    assert run.returncode == 0, run.stderr
    result = run.json()
    assert result["confirm_deadline"] > time.time()
    assert status(root)["pending"]["generation"] == result["generation"]
    return int(result["generation"])


def wait_until(pred: object, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_confirmed_generation_stays(gen1_root: str, gens: Generations, streams: StreamCache) -> None:
    gen = armed(gen1_root, gens, streams, 30)
    run = receive(gen1_root, None, "--confirm", str(gen), "--check", 'test -n "$REUP_TOPLEVEL"')
    assert run.returncode == 0, run.stderr
    assert run.json() == {"confirmed": gen}
    st = status(gen1_root)
    assert st["pending"] is None and st["last_rollback"] is None
    assert current_toplevel(gen1_root) == gens.gen2
    # a second confirmation has nothing to confirm
    assert_one_line_error(receive(gen1_root, None, "--confirm", str(gen)), 24, "not awaiting")


def test_failed_health_check_rolls_back_at_once(gen1_root: str, gens: Generations,
                                                streams: StreamCache) -> None:
    gen = armed(gen1_root, gens, streams, 30)
    run = receive(gen1_root, None, "--confirm", str(gen), "--check", "echo broken >&2; exit 3")
    assert_one_line_error(run, 25, "health check failed", "broken")
    st = status(gen1_root)
    assert current_toplevel(gen1_root) == gens.gen1 and st["pending"] is None
    assert st["last_rollback"]["generation"] == gen
    assert "health check failed (exit 3)" in st["last_rollback"]["reason"]
    assert f"system-{gen}-link" not in profile_links(gen1_root)
    assert read_activations(gen1_root)[-1] == f"switch {gens.gen1}"  # previous re-activated


def test_missed_deadline_rolls_back_by_itself(gen1_root: str, gens: Generations,
                                              streams: StreamCache) -> None:
    """Nobody confirms: the detached watchdog (not the finished receive) rolls back."""
    gen = armed(gen1_root, gens, streams, 3.0)
    assert current_toplevel(gen1_root) == gens.gen2
    wait_until(lambda: current_toplevel(gen1_root) == gens.gen1, 15)
    st = status(gen1_root)
    assert st["pending"] is None
    assert st["last_rollback"]["reason"] == "not confirmed before the deadline"
    assert read_activations(gen1_root)[-1] == f"switch {gens.gen1}"
    # the late confirmation is refused with the reason
    run = receive(gen1_root, None, "--confirm", str(gen))
    assert_one_line_error(run, 24, "rolled back", "not confirmed before the deadline")


def test_watchdog_runs_under_a_wrapped_interpreter(gen1_root: str, gens: Generations,
                                                   streams: StreamCache) -> None:
    """As under nixpkgs' wrappers: the receiver is importable only through sys.path set in the entry
    script (not PYTHONPATH, not the interpreter's own site-packages); the detached watchdog, a new
    `python -m` process, must still start and roll back."""
    base = getattr(sys, "_base_executable", sys.executable)
    sitedirs = [p for p in sys.path if p.endswith("site-packages")]
    script = ("import site, sys\n" + "".join(f"site.addsitedir({d!r})\n" for d in sitedirs)
              + "from reup_receiver.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {k: v for k, v in nix_env().items() if k != "PYTHONPATH"}
    bare = subprocess.run([base, "-c", "import reup_receiver"], capture_output=True, env=env, check=False)
    assert bare.returncode != 0, "the base interpreter must not see the receiver for this test to mean anything"
    run = subprocess.run([base, "-c", script, "--root", gen1_root, "--confirm-timeout", "3"],
                         input=streams.get([gens.gen1], gens.gen2), capture_output=True, env=env, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert current_toplevel(gen1_root) == gens.gen2
    wait_until(lambda: current_toplevel(gen1_root) == gens.gen1, 15)
    assert status(gen1_root)["last_rollback"]["reason"] == "not confirmed before the deadline"


def test_deadline_passed_while_device_was_down(gen1_root: str, gens: Generations,
                                               streams: StreamCache) -> None:
    """The watchdog died with the device; the next receiver call rolls back first."""
    gen = armed(gen1_root, gens, streams, 3.0)  # armed before the switch: the deadline runs during activation too
    watchdogs = subprocess.run(["pgrep", "-f", "--", f"--root {os.path.abspath(gen1_root)} --watchdog"],
                               capture_output=True, text=True, check=False).stdout.split()
    assert watchdogs, "the watchdog runs detached from the receive"
    for pid in watchdogs:
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(3.2)
    assert current_toplevel(gen1_root) == gens.gen2  # nobody acted yet
    st = status(gen1_root)
    assert current_toplevel(gen1_root) == gens.gen1
    assert st["last_rollback"]["generation"] == gen
