"""End-to-end: the controller against 4 simulated devices behind real sshd, real git, Nix and HTTP.

Each test is one scenario on its own lab (so xdist can spread them): the steps
inside a test depend on each other, which is why they are not separate tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from reup_lab import demofleet
from support.sshd import (
    Lab,
    api_status,
    controller_session,
    metric,
    nix_verify,
    parse_metrics,
    post,
    reup_bin,
    run_once,
    states,
    store_history,
    store_status,
    wait_for,
)

pytestmark = pytest.mark.slow
ALL_IN_SYNC = {"d1": "in_sync", "d2": "in_sync", "d3": "in_sync", "d4": "in_sync"}


def converged(lab: Lab, commit: str, expect: dict[str, str] | None = None) -> dict[str, object] | None:
    st = api_status(lab)
    if st["revision"] != commit or states(st) != (expect or ALL_IN_SYNC):
        return None
    return st


def pushes_at(lab: Lab, commit: str) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    for h in store_history(lab):
        if h["commit_id"] == commit and h["result"] == "committed":
            out.setdefault(str(h["device"]), []).append(h)
    return out


def test_rollout_changes_metrics_revert_and_eval_error(tmp_path: os.PathLike[str]) -> None:
    # d3 and d4 share one configuration: its toplevel is built once.
    # Commits are seen through watchdog (asserted below: within 2 s); the 10 s poll is a safety net.
    lab = Lab(str(tmp_path), ["d1", "d2", "d3", "d4"], poll_interval=10,
              device_configs={"d1": "d1", "d2": "d2", "d3": "shared", "d4": "shared"})
    lab.start()
    with controller_session(lab) as ctl:
        c1 = lab.commit("first", {"d1": "1", "d2": "1", "shared": "1"})
        ctl.start()

        # 1. First commit: every device installs from scratch and reaches in_sync; nix store verify passes.
        st1 = wait_for(lambda: converged(lab, c1), 120, "first rollout")
        for dev in st1["devices"]:
            assert dev["acknowledged"] == dev["target"] and dev["generation"] == 1
            check = nix_verify(lab.devices[dev["name"]].root, dev["acknowledged"])
            assert check.returncode == 0, check.stderr
        assert lab.activations("d1") == ["switch d1 1"]
        assert lab.activations("d4") == ["switch shared 1"]
        m1 = parse_metrics(lab.scrape())
        assert metric(m1, "reup_builds_total", result="success") == 3  # d1, d2, shared once
        first = pushes_at(lab, c1)
        assert sorted(first) == ["d1", "d2", "d3", "d4"]
        assert all(int(h["nar_bytes"]) > 0 for hs in first.values() for h in hs)  # type: ignore[call-overload]

        # 2. A commit changing two devices: only those are built and pushed; reconciling starts within 2 s.
        t_commit = time.time()
        c2 = lab.commit("d1 and d2 to 2", {"d1": "2", "d2": "2", "shared": "1"})
        st2 = wait_for(lambda: converged(lab, c2), 60, "second rollout")
        assert st2["revision_seen_at"] - t_commit < 2.0
        assert sorted(pushes_at(lab, c2)) == ["d1", "d2"]
        assert lab.activations("d1") == ["switch d1 1", "switch d1 2"]
        assert lab.activations("d3") == ["switch shared 1"]
        assert lab.activations("d4") == ["switch shared 1"]

        # 3. Scrape /metrics over HTTP: counters and gauges match what happened.
        m2 = wait_for(lambda: (m := parse_metrics(lab.scrape()))
                      and metric(m, "reup_devices", state="in_sync", wave="default") == 4 and m, 10, "gauges")
        history = [h for h in store_history(lab) if h["result"] == "committed"]
        assert metric(m2, "reup_builds_total", result="success") == 5
        assert metric(m2, "reup_builds_total", result="failure") == 0
        assert metric(m2, "reup_device_updates_total", result="committed") == 6 == len(history)
        assert metric(m2, "reup_device_updates_total", result="failed") == 0
        assert metric(m2, "reup_devices", state="in_sync", wave="default") == 4
        assert metric(m2, "reup_devices", state="failed", wave="default") == 0
        assert metric(m2, "reup_transfer_bytes_total", kind="delta") == sum(int(h["stream_bytes"]) for h in history)
        assert metric(m2, "reup_transfer_bytes_total", kind="full_equivalent") == sum(int(h["nar_bytes"]) for h in history)
        assert metric(m2, "reup_delta_ratio_count") == 6
        assert 0 < metric(m2, "reup_delta_ratio_sum") < 6
        assert metric(m2, "reup_update_duration_seconds_count") == 6
        assert metric(m2, "reup_build_duration_seconds_count") == 5
        assert metric(m2, "reup_source_revision_info", revision=c2) == 1
        assert metric(m2, "reup_source_revision_info", revision=c1) == 0
        assert metric(m2, "reup_git_fetches_total", result="success") >= 2
        assert metric(m2, "reup_last_reconcile_timestamp_seconds") >= t_commit
        assert not any(k.startswith("reup_reconcile_errors_total{") and v for k, v in m2.items())
        assert not any(k.startswith("reup_device_info") for k in m2)  # opt-in only

        # 4. Revert: the two devices go back to generation 1's toplevels, and the bytes sent are tiny.
        demofleet.git(lab.repo, "revert", "--no-edit", "HEAD")
        c3 = demofleet.git(lab.repo, "rev-parse", "HEAD")
        st3 = wait_for(lambda: converged(lab, c3), 60, "revert rollout")
        by_name = {d["name"]: d for d in st3["devices"]}
        for name in ("d1", "d2"):
            assert by_name[name]["acknowledged"] == {d["name"]: d for d in st1["devices"]}[name]["acknowledged"]
        reverted = pushes_at(lab, c3)
        assert sorted(reverted) == ["d1", "d2"]
        for name, hs in reverted.items():
            assert int(hs[0]["stream_bytes"]) < 1024, (name, hs)  # type: ignore[call-overload]
        assert lab.activations("d1")[-1] == "switch d1 1"
        m3 = parse_metrics(lab.scrape())
        assert metric(m3, "reup_builds_total", result="success") == 5  # nothing rebuilt

        # 5. An evaluation error for one device: only it fails, with the error; the others stay in sync.
        c4 = lab.commit("break d2", {"d1": "1", "d2": "!eval", "shared": "1"})
        expect = {**ALL_IN_SYNC, "d2": "failed"}
        st4 = wait_for(lambda: converged(lab, c4, expect), 60, "eval-error revision")
        d2 = {d["name"]: d for d in st4["devices"]}["d2"]
        assert "configuration d2 is broken" in d2["last_error"]
        assert d2["acknowledged"] == by_name["d2"]["acknowledged"]  # stays on what it runs
        m4 = wait_for(lambda: (m := parse_metrics(lab.scrape()))
                      and metric(m, "reup_devices", state="failed", wave="default") == 1 and m, 10, "gauges")
        assert metric(m4, "reup_reconcile_errors_total", stage="eval") == 1
        assert metric(m4, "reup_devices", state="in_sync", wave="default") == 3

        # 6. An activation that fails is permanent: the device is failed (the receiver restored its
        #    previous generation), it is not retried for this revision, and a fix converges it.
        c5 = lab.commit("d1 fails", {"d1": "4!fail", "d2": "1", "shared": "1"})
        st5 = wait_for(lambda: converged(lab, c5, {**ALL_IN_SYNC, "d1": "failed"}), 60, "failed activation")
        d1 = {d["name"]: d for d in st5["devices"]}["d1"]
        assert "activation" in d1["last_error"] and d1["acknowledged"] == by_name["d1"]["acknowledged"]
        time.sleep(1.5)
        failures = [h for h in store_history(lab) if h["device"] == "d1" and h["commit_id"] == c5]
        assert [h["result"] for h in failures] == ["permanent"]  # quarantined: pushed once
        assert lab.activations("d1")[-2:] == ["switch d1 4", "switch d1 1"]  # tried, then re-activated 1
        c6 = lab.commit("d1 fixed", {"d1": "4", "d2": "1", "shared": "1"})
        wait_for(lambda: converged(lab, c6), 60, "fixed revision")
        assert lab.activations("d1")[-1] == "switch d1 4"
        m6 = parse_metrics(lab.scrape())
        assert metric(m6, "reup_device_updates_total", result="failed") == 1

        # 7. A malformed fleet.toml fails the commit for every device, which all stay where they are;
        #    fixing it needs no transfer at all.
        pushes_before = len(store_history(lab))
        c7 = demofleet.commit(lab.repo, "typo", fleet=lab.fleet_toml() + "\n[devices.d9]\nhots = 1\n")
        st7 = wait_for(lambda: converged(lab, c7, {n: "failed" for n in ALL_IN_SYNC}), 30, "fleet.toml error")
        assert all("fleet.toml" in d["last_error"] for d in st7["devices"]) and st7["fleet_error"]
        assert metric(parse_metrics(lab.scrape()), "reup_reconcile_errors_total", stage="fleet") == 4
        c8 = demofleet.commit(lab.repo, "fix typo", fleet=lab.fleet_toml())
        wait_for(lambda: converged(lab, c8), 30, "fleet.toml fixed")
        assert len(store_history(lab)) == pushes_before

        # 8. A build error fails only the device(s) using that system, with the builder's message.
        c9 = lab.commit("d2 does not build", {"d1": "4", "d2": "5!build", "shared": "1"})
        st9 = wait_for(lambda: converged(lab, c9, {**ALL_IN_SYNC, "d2": "failed"}), 30, "build failure")
        assert "the build of d2 5 broke" in {d["name"]: d for d in st9["devices"]}["d2"]["last_error"]
        assert metric(parse_metrics(lab.scrape()), "reup_builds_total", result="failure") == 1
        assert os.listdir(os.path.join(lab.state_dir, "logs"))

        # The webhook is accepted and triggers a fetch; GC roots cover targets and acknowledged toplevels only.
        before = metric(parse_metrics(lab.scrape()), "reup_git_fetches_total", result="success")
        assert post(lab, "/webhook") == 202
        wait_for(lambda: metric(parse_metrics(lab.scrape()), "reup_git_fetches_total", result="success") > before,
                 5, "webhook fetch")
        final = {d["name"]: d for d in api_status(lab)["devices"]}
        # One root per distinct system (d2's unbuilt target has none); nothing else is kept.
        wait_for(lambda: gc_roots(lab.state_dir) == {d["acknowledged"] for d in final.values()}, 5, "GC roots")
        assert by_name["d2"]["acknowledged"] in gc_roots(lab.state_dir)


def test_unreachable_device_and_kill_9_restart(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1", "d2", "d3", "d4"])
    lab.start()
    with controller_session(lab) as ctl:
        # 1. One device's sshd is down: the others converge, it shows unreachable, `run --once` exits 1.
        c1 = lab.commit("first", {"d1": "1", "d2": "1", "d3": "1", "d4": "1"})
        lab.devices["d4"].stop()
        r = run_once(lab)
        assert r.returncode == 1, r.stderr[-3000:]
        st = store_status(lab)
        assert states(st) == {**ALL_IN_SYNC, "d4": "unreachable"}
        d4 = {d["name"]: d for d in st["devices"]}["d4"]
        assert "unreachable" in d4["last_error"] and d4["acknowledged"] is None

        # ... and converges once its sshd is back.
        lab.devices["d4"].start()
        r = run_once(lab)
        assert r.returncode == 0, r.stderr[-3000:]
        assert states(store_status(lab)) == ALL_IN_SYNC
        assert lab.activations("d4") == ["switch d4 1"]
        assert sorted(pushes_at(lab, c1)) == ["d1", "d2", "d3", "d4"]

        # 2. kill -9 mid-rollout (d4 activates slowly), restart: it completes without re-sending to
        #    devices that acknowledged.
        c2 = lab.commit("all to 2", {"d1": "2", "d2": "2", "d3": "2", "d4": "2!slow"})
        ctl.start()

        def mid_rollout() -> bool:
            pushed = pushes_at(lab, c2)
            return sorted(pushed) == ["d1", "d2", "d3"] and lab.activations("d4")[-1:] == ["switch d4 2"]

        wait_for(mid_rollout, 60, "d1-d3 acknowledged while d4 activates")
        ctl.kill()
        assert "d4" not in pushes_at(lab, c2)
        r = run_once(lab)
        assert r.returncode == 0, r.stderr[-3000:]
        assert states(store_status(lab)) == ALL_IN_SYNC
        after = pushes_at(lab, c2)
        for name in ("d1", "d2", "d3"):
            assert len(after[name]) == 1  # acknowledged before the kill: not sent again
            assert lab.activations(name) == [f"switch {name} 1", f"switch {name} 2"]  # not re-activated
        assert lab.activations("d4")[:2] == ["switch d4 1", "switch d4 2"]
        d4_rows = [h for h in store_history(lab) if h["device"] == "d4" and h["commit_id"] == c2]
        assert [h["result"] for h in d4_rows][-1] in ("committed", "adopted")

        # 3. `reup plan` (dry run) predicts the stream bytes of a change; `reup status` shows the fleet.
        lab.commit("d1 to 3", {"d1": "3", "d2": "2", "d3": "2", "d4": "2!slow"})
        r = subprocess.run([reup_bin(), "plan", "--build", "--json", "--config", lab.config_path],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        plan = {row["device"]: row for row in json.loads(r.stdout)}
        assert plan["d1"]["action"] == "push" and 0 < plan["d1"]["stream_bytes"] < plan["d1"]["nar_bytes"]
        assert {plan[n]["action"] for n in ("d2", "d3", "d4")} == {"none"}
        assert lab.activations("d1")[-1] == "switch d1 2"  # a dry run changes nothing
        r = subprocess.run([reup_bin(), "status", "--config", lab.config_path],
                           capture_output=True, text=True, timeout=60, check=True)
        assert r.stdout.splitlines()[0] == f"revision {c2[:12]}: 4/4 devices in sync"
        r = subprocess.run([reup_bin(), "status", "--json", "--config", lab.config_path],
                           capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(r.stdout) == store_status(lab)

        # 4. A device that lost a file of a path it reports: the receiver names the missing base,
        #    the controller re-encodes without that path, and the update still goes through.
        d1_current = {d["name"]: d for d in store_status(lab)["devices"]}["d1"]["acknowledged"]
        broken = os.path.join(lab.devices["d1"].root, d1_current.lstrip("/"), "version")
        os.chmod(os.path.dirname(broken), 0o755)
        os.unlink(broken)
        r = run_once(lab)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "re-encoding without " + d1_current in r.stderr
        assert lab.activations("d1")[-1] == "switch d1 3"


def gc_roots(state_dir: str) -> set[str]:
    """The store paths the controller's GC roots keep (links in its newest roots directory)."""
    top = os.path.join(state_dir, "gcroots")
    gens = sorted((int(n) for n in os.listdir(top) if n.isdigit()), reverse=True)
    if not gens:
        return set()
    d = os.path.join(top, str(gens[0]))
    return {os.readlink(os.path.join(d, n)) for n in os.listdir(d) if os.path.islink(os.path.join(d, n))}
