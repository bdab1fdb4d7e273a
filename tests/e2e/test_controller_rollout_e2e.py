"""End-to-end safe rollouts (issue 5): simulated devices behind real sshd, real git, Nix and HTTP.

Each test is one scenario on its own lab (xdist spreads them); the steps inside a
test depend on each other. Kept lean: few devices, short confirm timeouts.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest
from reup.loop.controller import Controller
from reup_lab import demofleet
from support.sshd import (
    Lab,
    api_status,
    controller_session,
    metric,
    parse_metrics,
    reup_bin,
    run_once,
    states,
    store_history,
    store_status,
    wait_for,
)

pytestmark = pytest.mark.slow


def fleet(lab: Lab, rollout: str, waves: dict[str, str] | None = None) -> str:
    waves = waves or {}
    parts = [f"[rollout]\n{rollout}\n"]
    parts += [dev.fleet_entry(lab.device_configs.get(n), waves.get(n, "default")) for n, dev in lab.devices.items()]
    return "\n".join(parts)


def timeline(lab: Lab, name: str) -> list[tuple[float, float]]:
    """(begin, end) of each timed activation on the device."""
    path = os.path.join(lab.devices[name].root, "timeline")
    with open(path, encoding="ascii") as f:
        words = [line.split() for line in f.read().splitlines()]
    begins = [float(t) for w, t in words if w == "begin"]
    ends = [float(t) for w, t in words if w == "end"]
    return list(zip(begins, ends, strict=True))


def committed_at(lab: Lab, commit: str) -> dict[str, float]:
    return {str(h["device"]): float(h["at"]) for h in store_history(lab)
            if h["commit_id"] == commit and h["result"] == "committed"}


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([reup_bin(), *args, "--config", lab.config_path], capture_output=True, text=True,
                          timeout=60, check=False)


WAVES = {"d1": "canary", "d2": "canary", "d3": "rest", "d4": "rest"}


def test_waves_gate_and_max_parallel(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1", "d2", "d3", "d4"])
    lab.start()
    try:
        policy = 'waves = ["canary", "rest"]\nmax_parallel = 1\nbake_time = 2\nconfirm_timeout = 20'
        text = fleet(lab, policy, WAVES)
        c1 = lab.commit("first", {n: "1!timed" for n in WAVES}, fleet=text)
        r = run_once(lab)
        assert r.returncode == 0, r.stderr[-3000:]
        spans = sorted((b, e, n) for n in WAVES for b, e in timeline(lab, n))
        assert len(spans) == 4
        # max_parallel = 1: no two activations overlap, on any device
        for (_, end, _), (begin, _, _) in zip(spans, spans[1:], strict=False):
            assert begin >= end, spans
        # the second wave starts only after the first committed (confirmed) and baked 2 s
        acks = committed_at(lab, c1)
        first_wave_done = max(acks["d1"], acks["d2"])
        assert min(b for b, _, n in spans if n in ("d3", "d4")) >= first_wave_done + 2.0
        assert max(b for b, _, n in spans if n in ("d1", "d2")) < first_wave_done
        st = store_status(lab)
        assert st["rollout"]["wave"] == "rest" and st["rollout"]["progress"] == 1.0 and not st["rollout"]["halted"]
        assert st["rollout"]["waves"]["canary"]["committed"] == 2
        # every update went through confirmation: the devices hold no pending generation
        for n in WAVES:
            assert not os.path.exists(os.path.join(lab.devices[n].root, "nix/var/reup/pending.json"))
    finally:
        lab.stop()


def test_failing_activation_halts_then_revert_and_offline_device(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1", "d2", "d3", "d4"])
    lab.start()
    try:
        policy = 'waves = ["canary", "rest"]\nfailure_threshold = 0.5\nmin_executed = 2\nconfirm_timeout = 20'
        text = fleet(lab, policy, WAVES)
        lab.commit("first", {n: "1" for n in WAVES}, fleet=text)
        assert run_once(lab).returncode == 0

        # 1. A target whose activation fails everywhere: the canaries restore their previous
        #    generation, the rollout halts at the threshold, the second wave is never touched.
        c2 = lab.commit("all broken", {n: "2!fail" for n in WAVES}, fleet=text)
        r = run_once(lab)
        assert r.returncode == 1
        st = store_status(lab)
        assert states(st) == {"d1": "failed", "d2": "failed", "d3": "halted", "d4": "halted"}
        assert "failure threshold reached: 2 failed of 2 executed" in st["rollout"]["halted"]
        for n in ("d1", "d2"):
            assert lab.activations(n) == [f"switch {n} 1", f"switch {n} 2", f"switch {n} 1"]
        for n in ("d3", "d4"):
            assert lab.activations(n) == [f"switch {n} 1"]
        assert not [h for h in store_history(lab) if h["commit_id"] == c2 and h["device"] in ("d3", "d4")]
        r = cli(lab, "rollout", "status")
        assert r.returncode == 0 and "halted: failure threshold reached" in r.stdout, r.stdout
        r = cli(lab, "history", "d3")
        assert "-> halted: rollout halted: failure threshold" in r.stdout, r.stdout
        assert "update committed" in cli(lab, "history", "d1").stdout
        # `reup rollout resume` lifts the threshold halt, but the quarantined canaries are not retried,
        # so the canary wave stays short of its success_ratio and the second wave stays halted.
        r = cli(lab, "rollout", "resume")
        assert r.returncode == 0 and r.stdout.startswith("resumed"), r.stdout
        run_once(lab)
        st = store_status(lab)
        assert states(st)["d3"] == "halted" and "wave canary settled short" in st["rollout"]["halted"]
        assert [h["result"] for h in store_history(lab) if h["commit_id"] == c2] == ["permanent", "permanent"]

        # 2. The revert resumes: everything is in sync again without a transfer.
        demofleet.git(lab.repo, "revert", "--no-edit", "HEAD")
        r = run_once(lab)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not store_status(lab)["rollout"]["halted"]

        # 3. A device offline for three commits converges straight to the newest.
        lab.devices["d4"].stop()
        for v in ("3", "4", "5"):
            lab.commit(f"d4 to {v}", {"d1": "1", "d2": "1", "d3": "1", "d4": v}, fleet=text)
            r = run_once(lab)
            assert r.returncode == 1 and states(store_status(lab))["d4"] == "unreachable"
        lab.devices["d4"].start()
        r = run_once(lab)
        assert r.returncode == 0, r.stderr[-3000:]
        assert lab.activations("d4") == ["switch d4 1", "switch d4 5"]
    finally:
        lab.stop()


def test_health_check_and_lost_network_roll_back_on_the_device(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1", "d2"])
    lab.start()
    with controller_session(lab) as ctl:
        check = 'test \\"$(cat \\"$REUP_ROOT$REUP_TOPLEVEL/version\\")\\" != 2'
        text = fleet(lab, f'confirm_timeout = 6\nhealth_check = "{check}"')
        with open(lab.config_path, encoding="utf-8") as f:
            config = f.read()
        with open(lab.config_path, "w", encoding="utf-8") as f:  # probe a device that is back within seconds
            f.write(config.replace("retry_max = 30", "retry_max = 2"))
        lab.commit("first", {"d1": "1", "d2": "1"}, fleet=text)
        ctl.start()
        st1 = wait_for(lambda: (s := api_status(lab)) and states(s) == {"d1": "in_sync", "d2": "in_sync"} and s,
                       60, "first rollout")
        acked = {d["name"]: d["acknowledged"] for d in st1["devices"]}

        # 1. d1's new system fails the health check: the device rolls back at once, before the deadline.
        t0 = time.time()
        c2 = lab.commit("d1 unhealthy", {"d1": "2", "d2": "1"}, fleet=text)
        st2 = wait_for(lambda: (s := api_status(lab)) and s["revision"] == c2
                       and states(s)["d1"] == "rolled_back" and s, 30, "health check rollback")
        d1 = {d["name"]: d for d in st2["devices"]}["d1"]
        assert "health check failed" in d1["last_error"] and d1["acknowledged"] == acked["d1"]
        assert lab.activations("d1") == ["switch d1 1", "switch d1 2", "switch d1 1"]
        with open(os.path.join(lab.devices["d1"].root, "nix/var/reup/rollbacks.jsonl"), encoding="utf-8") as f:
            rb = json.loads(f.read().splitlines()[-1])
        assert "health check failed" in rb["reason"] and rb["time"] < t0 + 6 + 5  # well before a deadline lapse
        # The rolled-back update's stream crossed the wire too: the bytes metric counts it.
        committed = sum(int(h["stream_bytes"] or 0) for h in store_history(lab) if h["result"] == "committed")
        assert metric(parse_metrics(lab.scrape()), "reup_transfer_bytes_total", kind="delta") > committed

        # 2. d2's sshd goes away right after activation: it rolls back by itself at the deadline;
        #    the controller reports it, nothing is acknowledged.
        c3 = lab.commit("d2 to 3", {"d1": "1", "d2": "3!slow"}, fleet=text)
        wait_for(lambda: lab.activations("d2")[-1:] == ["switch d2 3"], 30, "d2 activating")
        lab.devices["d2"].stop()
        wait_for(lambda: lab.activations("d2")[-1:] == ["switch d2 1"], 30, "d2 rolled back by itself")
        st3 = wait_for(lambda: (s := api_status(lab)) and states(s)["d2"] == "rolled_back" and s, 30, "timed out")
        d2 = {d["name"]: d for d in st3["devices"]}["d2"]
        assert d2["acknowledged"] == acked["d2"] and "not delivered before the deadline" in d2["last_error"]
        assert [h["result"] for h in store_history(lab) if h["commit_id"] == c3] == ["timed_out"]
        log = os.path.join(lab.devices["d2"].root, "nix/var/reup/rollbacks.jsonl")
        wait_for(lambda: os.path.exists(log), 10, "the rollback recorded (after the re-activation)")
        with open(log, encoding="utf-8") as f:
            rb = json.loads(f.read().splitlines()[-1])
        assert rb["reason"] == "not confirmed before the deadline"

        # 3. d2 is reachable again: the controller reads its status and reports the rollback with
        #    the device's reason (history, last_error, metric) instead of leaving only `timed_out`.
        lab.devices["d2"].start()
        hist = wait_for(lambda: [h for h in store_history(lab) if h["commit_id"] == c3 and h["result"] == "rolled_back"],
                        30, "rollback read from the device")
        assert hist[0]["generation"] == rb["generation"] and hist[0]["device"] == "d2"
        assert hist[0]["error"] == "rolled back by the device: not confirmed before the deadline"
        timed_out = [h for h in store_history(lab) if h["commit_id"] == c3 and h["result"] == "timed_out"]
        assert timed_out[0]["generation"] == rb["generation"]
        d2 = {d["name"]: d for d in api_status(lab)["devices"]}["d2"]
        assert d2["last_error"] == "rolled back by the device: not confirmed before the deadline"
        assert d2["acknowledged"] == acked["d2"]
        assert "update rolled_back" in cli(lab, "history", "d2").stdout

        m = parse_metrics(lab.scrape())
        assert metric(m, "reup_device_updates_total", result="rolled_back") == 2  # d1's, then d2's
        assert metric(m, "reup_device_updates_total", result="timed_out") == 1
        assert metric(m, "reup_device_updates_total", result="committed") == 2
        # default policy (failure_threshold 1, min_executed 1): d2 alone executed c3, and failed
        assert metric(m, "reup_rollout_halted") == 1 and metric(m, "reup_rollout_wave") == 0
        assert "failure threshold reached: 1 failed of 1 executed" in api_status(lab)["rollout"]["halted"]
        assert metric(m, "reup_rollout_progress_ratio") == 0.5  # d1 (back on 1) runs c3's target, d2 does not
        assert metric(m, "reup_devices", state="rolled_back", wave="default") == 1
        results = [h["result"] for h in store_history(lab) if h["commit_id"] in (c2, c3)]
        assert sorted(results) == ["rolled_back", "rolled_back", "timed_out"]  # quarantined: each tried once
        assert lab.activations("d2") == ["switch d2 1", "switch d2 3", "switch d2 1"]
        assert states(api_status(lab)) == {"d1": "in_sync", "d2": "rolled_back"}


def _pending_generation(lab: Lab, name: str) -> int | None:
    try:
        with open(os.path.join(lab.devices[name].root, "nix/var/reup/pending.json"), encoding="utf-8") as f:
            return int(json.load(f)["generation"])
    except FileNotFoundError:
        return None


def test_restart_confirms_pending_and_late_confirmation_commits(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1"])
    lab.start()
    with open(lab.config_path, encoding="utf-8") as f:
        config = f.read()
    with open(lab.config_path, "w", encoding="utf-8") as f:  # probe a device that is back within seconds
        f.write(config.replace("retry_max = 30", "retry_max = 2"))
    dev = lab.devices["d1"]
    with controller_session(lab) as ctl:
        lab.commit("first", {"d1": "1"}, fleet=fleet(lab, "confirm_timeout = 20"))
        ctl.start()
        wait_for(lambda: states(api_status(lab)) == {"d1": "in_sync"}, 60, "first rollout")

        # 1. The controller is killed (-9) while generation 2 awaits confirmation and cannot be confirmed
        #    (sshd down). Restarted, it finds the pending generation running and confirms it: no re-send.
        c2 = lab.commit("to 2", {"d1": "2!slow"}, fleet=fleet(lab, "confirm_timeout = 20"))
        wait_for(lambda: lab.activations("d1")[-1:] == ["switch d1 2"], 30, "d1 activating 2")
        dev.stop()
        gen2 = wait_for(lambda: _pending_generation(lab, "d1"), 15, "generation 2 pending")
        ctl.kill()
        assert _pending_generation(lab, "d1") == gen2 and states(store_status(lab)) != {"d1": "in_sync"}
        dev.start()
        ctl.start()
        st = wait_for(lambda: (s := api_status(lab)) and states(s) == {"d1": "in_sync"} and s, 30, "confirmed")
        assert st["revision"] == c2 and st["devices"][0]["generation"] == gen2
        assert _pending_generation(lab, "d1") is None
        assert lab.activations("d1") == ["switch d1 1", "switch d1 2"]  # not sent again, not rolled back
        assert not os.path.exists(os.path.join(dev.root, "nix/var/reup/rollbacks.jsonl"))
        assert [h["result"] for h in store_history(lab) if h["commit_id"] == c2] == ["adopted"]

        # 2. A confirmation lands on the device but its answer is lost (here: confirmed on the device
        #    itself while sshd is down); the controller reports `timed_out`, then, once the device
        #    answers again, reads that the generation runs confirmed and counts it as committed.
        c3 = lab.commit("to 3", {"d1": "3!slow"}, fleet=fleet(lab, "confirm_timeout = 5"))
        wait_for(lambda: lab.activations("d1")[-1:] == ["switch d1 3"], 30, "d1 activating 3")
        dev.stop()
        gen3 = wait_for(lambda: (g := _pending_generation(lab, "d1")) and g != gen2 and g, 15, "generation 3 pending")
        # The pending record is written before the switch (armed before switched), so the receive
        # may still be activating and hold the device lock: retry while it is locked (exit 19).
        def confirm3() -> subprocess.CompletedProcess[str] | None:
            r = subprocess.run([dev.receiver, "--root", dev.root, "--confirm", str(gen3)], capture_output=True,
                               text=True, timeout=30, check=False)
            return None if r.returncode == 19 else r
        r = wait_for(confirm3, 10, "the receive to finish")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: [h for h in store_history(lab) if h["commit_id"] == c3 and h["result"] == "timed_out"],
                 20, "confirmation timed out")
        wait_for(lambda: states(api_status(lab)) == {"d1": "rolled_back"}, 10, "state from what the controller knows")
        dev.start()
        st = wait_for(lambda: (s := api_status(lab)) and states(s) == {"d1": "in_sync"} and s, 30, "committed")
        d1 = st["devices"][0]
        assert d1["generation"] == gen3 and d1["acknowledged_commit"] == c3 and d1["last_error"] is None
        assert [h["result"] for h in store_history(lab) if h["commit_id"] == c3] == ["timed_out", "committed"]
        assert lab.activations("d1") == ["switch d1 1", "switch d1 2", "switch d1 3"]
        m = parse_metrics(lab.scrape())  # the restarted controller's counters: c3 only
        assert metric(m, "reup_device_updates_total", result="timed_out") == 1
        assert metric(m, "reup_device_updates_total", result="committed") == 2  # c2 (adopted), c3
        assert metric(m, "reup_device_updates_total", result="rolled_back") == 0
        assert not api_status(lab)["rollout"]["halted"]


def _signed_commit(lab: Lab, message: str, version: str, key: str | None) -> str:
    """Commit d1 at `version`, signed with the SSH key `key` (None: unsigned)."""
    with open(os.path.join(lab.repo, "flake.nix"), "w", encoding="utf-8") as f:
        f.write(demofleet.flake_text({"d1": version}))
    with open(os.path.join(lab.repo, "fleet.toml"), "w", encoding="utf-8") as f:
        f.write(lab.fleet_toml())
    demofleet.git(lab.repo, "add", "-A")
    sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-S"] if key else ["commit"]
    demofleet.git(lab.repo, *sign, "-q", "-m", message)
    return demofleet.git(lab.repo, "rev-parse", "HEAD")


def test_require_signed_commits(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1"])
    lab.start()
    good, bad = os.path.join(str(tmp_path), "signer"), os.path.join(str(tmp_path), "intruder")
    for k in (good, bad):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k], check=True)
    with open(good + ".pub", encoding="ascii") as f:
        pub = " ".join(f.read().split()[:2])
    signers = os.path.join(str(tmp_path), "allowed_signers")
    with open(signers, "w", encoding="ascii") as f:
        f.write(f"demo@reup.invalid {pub}\n")
    with open(lab.config_path, encoding="utf-8") as f:
        text = f.read()
    with open(lab.config_path, "w", encoding="utf-8") as f:
        f.write(text.replace("[source]\n", f'[source]\nrequire_signed = true\nallowed_signers = "{signers}"\n', 1))

    def reconcile() -> tuple[int, dict[str, float]]:
        ctrl = Controller(lab.config())
        try:
            rc = asyncio.run(ctrl.run(once=True))
            reg = ctrl.metrics.registry
            return rc, {r: reg.get_sample_value("reup_commits_refused_total", {"reason": r}) or 0.0
                        for r in ("unsigned", "bad_signature")}
        finally:
            ctrl.close()

    try:
        c1 = _signed_commit(lab, "signed", "1", good)
        rc, refused = reconcile()
        assert rc == 0 and refused == {"unsigned": 0, "bad_signature": 0}
        assert store_status(lab)["revision"] == c1 and lab.activations("d1") == ["switch d1 1"]

        c2 = _signed_commit(lab, "unsigned", "2", None)
        rc, refused = reconcile()
        st = store_status(lab)
        assert refused["unsigned"] == 1 and st["revision"] == c1 and states(st) == {"d1": "in_sync"}
        assert st["refused"]["revision"] == c2 and st["refused"]["reason"] == "unsigned"
        assert "refused head" in cli(lab, "status").stdout

        c3 = _signed_commit(lab, "wrong key", "3", bad)
        rc, refused = reconcile()
        st = store_status(lab)
        assert refused["bad_signature"] == 1 and st["revision"] == c1
        assert st["refused"]["revision"] == c3 and st["refused"]["reason"] == "bad_signature"
        assert lab.activations("d1") == ["switch d1 1"]  # the fleet stays on the last good commit

        c4 = _signed_commit(lab, "signed again", "4", good)
        rc, _ = reconcile()
        st = store_status(lab)
        assert rc == 0 and st["revision"] == c4 and st["refused"] is None
        assert lab.activations("d1") == ["switch d1 1", "switch d1 4"]
    finally:
        lab.stop()
