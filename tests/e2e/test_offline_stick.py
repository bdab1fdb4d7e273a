"""Updates on a USB stick, end to end: `reup export` for two devices the controller cannot reach,
`reup-receive --from-file` on each device root (a directory stands in for the stick), `reup import`
of the signed receipts; and the bundles a device must refuse: a wrong key, another device's stream,
a replay, a truncated file, plus a forged receipt the controller must refuse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest
from reup_lab.simdevice import generate_key
from reup_receiver.protocol import ExitCode
from support.receiverkit import RECEIVE, current_toplevel
from support.sshd import Lab, reup_bin, run_once, store_history, store_status

pytestmark = pytest.mark.slow
HEALTH = 'test -s "$REUP_ROOT/activations"'


def reup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([reup_bin(), *args], capture_output=True, text=True, timeout=300, check=False)


def apply(lab: Lab, name: str, stick: str, signers: str, as_device: str | None = None) -> subprocess.CompletedProcess[str]:
    dev = lab.devices[name]
    return subprocess.run([RECEIVE, "--root", dev.root, "--from-file", stick, "--device", as_device or name,
                           "--allowed-signers", signers, "--host-key", os.path.join(dev.base, "ssh_host_ed25519_key")],
                          capture_output=True, text=True, timeout=120, check=False)


def receipts(stick: str, name: str) -> list[dict[str, Any]]:
    d = os.path.join(stick, "reup", name)
    out = []
    for n in sorted(os.listdir(d)):
        if n.startswith("receipt-") and n.endswith(".json"):
            with open(os.path.join(d, n), encoding="utf-8") as f:
                out.append(json.load(f))
    return out


def only(stick: str, name: str, suffix: str) -> str:
    d = os.path.join(stick, "reup", name)
    return os.path.join(d, next(n for n in os.listdir(d) if n.startswith("bundle-") and n.endswith(suffix)))


def test_stick_round_trip_and_refusals(tmp_path: os.PathLike[str]) -> None:
    base = str(tmp_path)
    lab = Lab(base, ["a", "b"])
    lab.start()
    try:
        lab.commit("first", {"a": "1", "b": "1"}, fleet=lab.fleet_toml(f"health_check = '{HEALTH}'"))
        assert run_once(lab).returncode == 0
        lab.stop()  # from now on the devices have no link
        c2 = lab.commit("second", {"a": "2", "b": "2"}, fleet=lab.fleet_toml(f"health_check = '{HEALTH}'"))
        run_once(lab)
        st = {d["name"]: d for d in store_status(lab)["devices"]}
        assert st["a"]["commit"] == c2 and st["a"]["state"] != "in_sync"
        targets = {n: st[n]["target"] for n in ("a", "b")}
        olds = {n: current_toplevel(lab.devices[n].root) for n in ("a", "b")}

        stick = os.path.join(base, "stick")
        exported = reup("export", "a", "b", "-o", stick, "--config", lab.config_path)
        assert exported.returncode == 0, exported.stderr
        signers = os.path.join(base, "allowed_signers")
        with open(signers, "w", encoding="ascii") as f:
            f.write(f"reup-controller {lab.client_pubkey}\n")

        # A wrong key: the same envelope signed by a key the device does not trust.
        wrong = os.path.join(base, "stick-wrong")
        shutil.copytree(stick, wrong)
        other = os.path.join(base, "other_key")
        generate_key(other)
        env = only(wrong, "a", ".json")
        subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", other, "-n", "reup-bundle", env], check=True,
                       capture_output=True, input=b"y\n")
        run = apply(lab, "a", wrong, signers)
        assert run.returncode == ExitCode.BAD_SIGNATURE and "bad-signature" in run.stderr, run.stderr
        assert receipts(wrong, "a")[-1]["outcome"] == "refused"

        # Another device's stream: b's bundle put where a looks for its own.
        swapped = os.path.join(base, "stick-swapped")
        shutil.copytree(os.path.join(stick, "reup", "b"), os.path.join(swapped, "reup", "a"))
        run = apply(lab, "a", swapped, signers)
        assert run.returncode == ExitCode.BAD_SIGNATURE and "for device 'b'" in run.stderr, run.stderr

        # A truncated stream.
        cut = os.path.join(base, "stick-cut")
        shutil.copytree(stick, cut)
        stream = only(cut, "a", ".stream")
        os.truncate(stream, os.path.getsize(stream) // 2)
        run = apply(lab, "a", cut, signers)
        assert run.returncode == 11 and "truncated" in run.stderr, run.stderr
        assert current_toplevel(lab.devices["a"].root) == olds["a"]  # nothing changed so far

        # The real thing, on both devices.
        for name in ("a", "b"):
            run = apply(lab, name, stick, signers)
            assert run.returncode == 0, run.stderr
            answer = json.loads(run.stdout)
            assert answer["outcome"] == "committed" and answer["toplevel"] == targets[name]
            assert current_toplevel(lab.devices[name].root) == targets[name]
            assert not os.path.exists(os.path.join(lab.devices[name].root, "nix/var/reup/pending.json"))

        # A replay of the bundle just applied (and so of any older one): refused, the receipt stays.
        run = apply(lab, "a", stick, signers)
        assert run.returncode == ExitCode.BAD_SIGNATURE and "replay" in run.stderr, run.stderr
        outcomes = [r["outcome"] for r in receipts(stick, "a")]
        assert sorted(outcomes) == ["committed", "refused"]

        # A forged receipt (b's, edited) on a copy of the stick: the controller refuses it.
        forged = os.path.join(base, "stick-forged")
        shutil.copytree(stick, forged)
        d = os.path.join(forged, "reup", "b")
        rpath = os.path.join(d, next(n for n in os.listdir(d) if n.startswith("receipt-") and n.endswith(".json")))
        with open(rpath, encoding="utf-8") as f:
            r = json.load(f)
        r["generation"] = 99
        with open(rpath, "w", encoding="utf-8") as f:
            json.dump(r, f, sort_keys=True)
        bad = reup("import", forged, "--config", lab.config_path)
        assert bad.returncode == 1 and "refused receipt" in bad.stdout, bad.stdout + bad.stderr

        imported = reup("import", stick, "--config", lab.config_path)
        assert imported.returncode == 0, imported.stdout + imported.stderr
        st = {d["name"]: d for d in store_status(lab)["devices"]}
        for name in ("a", "b"):
            assert st[name]["acknowledged"] == targets[name] and st[name]["acknowledged_commit"] == c2
        assert any(h["device"] == "b" and h["commit_id"] == c2 and h["result"] == "committed"
                   for h in store_history(lab))
        assert reup("import", stick, "--config", lab.config_path).returncode == 0  # idempotent
        assert sum(1 for h in store_history(lab) if h["commit_id"] == c2 and h["result"] == "committed") == 2
        assert run_once(lab).returncode == 0  # the controller now counts them in sync
        assert {d["name"]: d["state"] for d in store_status(lab)["devices"]} == {"a": "in_sync", "b": "in_sync"}
    finally:
        lab.stop()
