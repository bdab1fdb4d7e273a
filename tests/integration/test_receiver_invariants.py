"""The receiver's invariants (docs/device-invariants.md, issue 11), one test or more each.

Faults are injected with the receiver's own hook (REUP_FAULT: SIGKILL to the receiver or
SIGHUP to its process group just before its N-th filesystem operation or subprocess start).
"""

from __future__ import annotations

import json
import os
import time

import pytest
from reup_receiver.errors import UnsafeName
from reup_receiver.format.model import check_store_name
from reup_receiver.protocol import ExitCode
from support.chaoskit import count_events, run_receiver, verify_generations
from support.nixflake import Generations
from support.receiverkit import StreamCache, copy_root, current_toplevel, profile_links, status

pytestmark = pytest.mark.slow

STATE = "nix/var/reup"


def wait_settled(root: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while os.path.exists(os.path.join(root, STATE, "pending.json")) and time.monotonic() < end:
        time.sleep(0.05)


def test_sighup_never_kills_a_receive(gen1_template: str, gens: Generations, streams: StreamCache,
                                      dev_tmp: str) -> None:
    """Invariant 1: a hangup (sshd losing the session while activation restarts the network) at any
    of the install, arm, switch and activate steps: the receive still finishes and stays armed."""
    stream = streams.get([gens.gen1], gens.gen2)
    probe = copy_root(gen1_template, os.path.join(dev_tmp, "probe"))
    n = count_events(probe, ["--confirm-timeout", "30"], stream)
    for k in range(max(1, n - 14), n + 1):
        root = copy_root(gen1_template, os.path.join(dev_tmp, f"hup{k}"))
        proc = run_receiver(root, ["--confirm-timeout", "30"], stream, f"hup:{k}")
        assert proc.returncode == 0, (k, n, proc.returncode, proc.stderr)
        assert current_toplevel(root) == gens.gen2
        assert status(root)["pending"]["generation"] == 2


def test_killed_after_any_step_rolls_back(gen1_template: str, gens: Generations, streams: StreamCache,
                                          dev_tmp: str) -> None:
    """Invariant 1: SIGKILL before each of the last steps (records, store, switch, arm, activate):
    the device was never switched, or it returns to generation 1 at the deadline."""
    stream = streams.get([gens.gen1], gens.gen2)
    probe = copy_root(gen1_template, os.path.join(dev_tmp, "probe"))
    n = count_events(probe, ["--confirm-timeout", "1"], stream)
    for k in range(max(1, n - 14), n + 1):
        root = copy_root(gen1_template, os.path.join(dev_tmp, f"kill{k}"))
        run_receiver(root, ["--confirm-timeout", "1"], stream, f"kill:{k}")
        wait_settled(root, 5)
        run_receiver(root, ["--status"], None)  # a watchdog that never started: the next call
        assert current_toplevel(root) == gens.gen1, (k, n, profile_links(root))
        assert verify_generations(root) is None


def test_receive_while_pending_is_refused(gen1_root: str, gens: Generations, streams: StreamCache) -> None:
    """Invariant 2: an unconfirmed generation never becomes the fallback, its deadline stays."""
    first = run_receiver(gen1_root, ["--confirm-timeout", "30"], streams.get([gens.gen1], gens.gen2))
    assert first.returncode == 0
    before = status(gen1_root)["pending"]
    proc = run_receiver(gen1_root, ["--confirm-timeout", "30"], streams.get([gens.gen2], gens.gen1))
    assert proc.returncode == ExitCode.PENDING, proc.stderr
    assert b"awaits confirmation" in proc.stderr
    after = status(gen1_root)["pending"]
    assert after["generation"] == before["generation"] and after["deadline"] == before["deadline"]
    assert 0 < after["remaining"] <= 30
    # the operator's rollback returns to the last confirmed generation
    assert run_receiver(gen1_root, ["--rollback"], None).returncode == 0
    assert current_toplevel(gen1_root) == gens.gen1


def test_gc_keeps_what_a_rollback_needs(gen1_root: str, gens: Generations, streams: StreamCache) -> None:
    """Invariant 3: gc --keep 1 while generation 2 is pending keeps generation 1 (the last confirmed),
    so the rollback at the deadline lands on a complete, verified system."""
    assert run_receiver(gen1_root, ["--confirm-timeout", "2"], streams.get([gens.gen1], gens.gen2)).returncode == 0
    gc = run_receiver(gen1_root, ["--gc", "--keep", "1"], None)
    assert gc.returncode == 0, gc.stderr
    assert "system-1-link" in profile_links(gen1_root)
    wait_settled(gen1_root, 8)
    assert current_toplevel(gen1_root) == gens.gen1
    assert verify_generations(gen1_root) is None


def test_gc_keep_counts_from_the_last_confirmed(gen1_root: str, gens: Generations,
                                                streams: StreamCache) -> None:
    assert run_receiver(gen1_root, [], streams.get([gens.gen1], gens.gen2)).returncode == 0
    assert run_receiver(gen1_root, ["--confirm-timeout", "30"], streams.get([gens.gen2], gens.gen1)).returncode == 0
    # generations 1, 2 (confirmed), 3 (pending): keep 1 = generation 2 and the pending 3
    assert run_receiver(gen1_root, ["--gc", "--keep", "1"], None).returncode == 0
    assert sorted(profile_links(gen1_root)) == ["system", "system-2-link", "system-3-link"]
    assert run_receiver(gen1_root, ["--rollback"], None).returncode == 0
    assert current_toplevel(gen1_root) == gens.gen2
    assert verify_generations(gen1_root) is None


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5", "0.5", "1e9", "86401"])
def test_confirm_timeout_is_bounded(gen1_root: str, value: str) -> None:
    """Invariant 8: a usage error, before anything is read or changed."""
    proc = run_receiver(gen1_root, ["--confirm-timeout", value], b"")
    assert proc.returncode == 2, (value, proc.stderr)
    assert b"confirm-timeout" in proc.stderr


def test_torn_pending_record_rolls_back(gen1_root: str, gens: Generations, streams: StreamCache) -> None:
    """Invariant 7: an unreadable pending record means 'back to the last confirmed generation',
    and never turns every later verb into an error."""
    assert run_receiver(gen1_root, ["--confirm-timeout", "60"], streams.get([gens.gen1], gens.gen2)).returncode == 0
    with open(os.path.join(gen1_root, STATE, "pending.json"), "w") as fh:
        fh.write('{"generation": 2, "dead')
    st = run_receiver(gen1_root, ["--status"], None)
    assert st.returncode == 0, st.stderr
    answer = json.loads(st.stdout)
    assert answer["pending"] is None and answer["last_rollback"]["reason"] == "pending record unreadable"
    assert current_toplevel(gen1_root) == gens.gen1
    assert verify_generations(gen1_root) is None


def test_torn_rollback_log_line_is_ignored(gen1_root: str, gens: Generations, streams: StreamCache) -> None:
    assert run_receiver(gen1_root, ["--confirm-timeout", "30"], streams.get([gens.gen1], gens.gen2)).returncode == 0
    assert run_receiver(gen1_root, ["--confirm", "2", "--check", "false"], None).returncode == 25
    with open(os.path.join(gen1_root, STATE, "rollbacks.jsonl"), "a") as fh:
        fh.write('{"generation": 7, "rea')
    st = run_receiver(gen1_root, ["--status"], None)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["last_rollback"]["generation"] == 2
    # a later rollback is appended on a line of its own, and read back
    assert run_receiver(gen1_root, ["--confirm-timeout", "30"], streams.get([gens.gen1], gens.gen2)).returncode == 0
    assert run_receiver(gen1_root, ["--rollback"], None).returncode == 0
    assert status(gen1_root)["last_rollback"]["reason"] == "rolled back by the rollback verb"


@pytest.mark.parametrize("name", [
    b"e" * 32 + b"-hello",  # 'e' is not in Nix's base-32 alphabet
    b"0" * 32 + b"-hel!lo",
    b"0" * 32 + b"-.hidden",
    b"0" * 32 + b"-" + b"a" * 212,
    b"0" * 32 + b"-sp ace",
])
def test_store_names_follow_nix(name: bytes) -> None:
    """Invariant 6: only names Nix itself accepts."""
    with pytest.raises(UnsafeName):
        check_store_name(name)
    check_store_name(b"0" * 32 + b"-" + b"a" * 211)
    check_store_name(b"0" * 32 + b"-py3.11-a+b_c?d=e")
