"""`reup run --shard i/n`: the pure assignment (golden cases, balance, minimal movement), and two
controller replicas on one fleet repo, each updating only its own devices through real sshd."""

from __future__ import annotations

import os
import subprocess

import pytest
from reup.config.fleet_toml import parse_fleet
from reup.core.errors import ConfigError
from reup.core.shard import Shard, parse_shard, select, shard_of
from support.sshd import Lab, free_port, metric, parse_metrics, reup_bin


def test_parse_shard() -> None:
    assert parse_shard("0/1") == Shard(0, 1)
    assert parse_shard("2/3") == Shard(2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0", "/2", "0/"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_assignment_is_stable_balanced_and_moves_little() -> None:
    # Golden: the assignment is part of the deployment contract (replicas must agree across versions).
    golden = {name: shard_of(name, 4) for name in ("board-01", "pi-01", "pi-02", "gw-01")}
    assert golden == {"board-01": 1, "pi-01": 0, "pi-02": 0, "gw-01": 1}  # sha256("i:name"), highest wins
    names = [f"device-{i:05d}" for i in range(4000)]
    counts = [0] * 4
    for n in names:
        counts[shard_of(n, 4)] += 1
    assert all(800 <= c <= 1200 for c in counts), counts
    # Going from 4 to 5 replicas moves only the devices the new replica takes.
    moved = [n for n in names if shard_of(n, 4) != shard_of(n, 5)]
    assert all(shard_of(n, 5) == 4 for n in moved)
    assert 600 <= len(moved) <= 1000


def test_select_keeps_policy_and_partitions() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0d6u0xjBWm0m1u2q5Sg8jzxf9C2ri8Hc3tnrsY+q0a"
    text = "[rollout]\nmax_parallel = 3\n" + "".join(
        f'[devices.d{i}]\nhost = "10.0.0.{i}"\nhost_key = "{key}"\n' for i in range(20))
    fleet = parse_fleet(text)
    parts = [select(fleet, Shard(i, 3)) for i in range(3)]
    assert sorted(n for p in parts for n in p.devices) == sorted(fleet.devices)
    assert all(p.rollout == fleet.rollout for p in parts)
    assert select(fleet, Shard()) is fleet


@pytest.mark.slow
def test_two_replicas_split_the_fleet(tmp_path: os.PathLike[str]) -> None:
    names = ["d1", "d2", "d3", "d4", "d5", "d6"]
    lab = Lab(str(tmp_path), names, device_configs={n: "shared" for n in names})
    lab.start()
    try:
        lab.commit("first", {"shared": "1"})
        with open(lab.config_path, encoding="utf-8") as f:
            base = f.read()
        owners = {n: shard_of(n, 2) for n in names}
        assert set(owners.values()) == {0, 1}  # both replicas have work
        for i in (0, 1):
            port = free_port()
            cfg = os.path.join(lab.base, f"reup-{i}.toml")
            with open(cfg, "w", encoding="utf-8") as f:
                f.write(base.replace(lab.state_dir, f"{lab.state_dir}-{i}")
                        .replace(f"127.0.0.1:{lab.http_port}", f"127.0.0.1:{port}"))
            proc = subprocess.run([reup_bin(), "run", "--once", "--shard", f"{i}/2", "--config", cfg],
                                  capture_output=True, text=True, timeout=180, check=False)
            assert proc.returncode == 0, proc.stderr[-3000:]
            mine = sorted(n for n, s in owners.items() if s == i)
            # The status table lists this replica's devices only, all in sync.
            listed = sorted(ln.split()[0] for ln in proc.stdout.splitlines() if ln.startswith("d"))
            assert listed == mine
            assert all(" in_sync " in ln for ln in proc.stdout.splitlines() if ln.startswith("d"))
            for n in names:
                assert lab.activations(n) == (["switch shared 1"] if owners[n] <= i else [])
        bad = subprocess.run([reup_bin(), "run", "--once", "--shard", "2/2", "--config", lab.config_path],
                             capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode == 2 and "--shard" in bad.stderr
    finally:
        lab.stop()


def test_shard_and_fetch_health_metrics() -> None:
    from prometheus_client import generate_latest
    from reup.loop.events import GitFetched
    from reup.loop.metrics import Metrics

    m = Metrics(shard=(1, 3), poll_interval=30)
    m(GitFetched(1000.0, "success", revision="abc"))
    m(GitFetched(1060.0, "error", error="unreachable"))
    samples = parse_metrics(generate_latest(m.registry).decode())
    assert metric(samples, "reup_shard_info", shard="1", shards="3") == 1
    assert metric(samples, "reup_source_poll_interval_seconds") == 30
    assert metric(samples, "reup_git_last_success_timestamp_seconds") == 1000.0  # the error does not move it
    assert metric(samples, "reup_git_fetches_total", result="error") == 1
