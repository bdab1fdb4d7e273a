"""The fault campaign: a reduced run in `make test`, the full one (>= 1,000 faults) in `make chaos`.

`REUP_CHAOS=full` (set by `make chaos`) runs every kill point of every scenario with both
signals, plus random kills, damaged streams, small filesystems and controller kills during a
rollout on real sshd devices (tests/support/killkit.py), and writes
tests/chaos/results.md. Without it, a sample of each kind runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time

import pytest
from support import chaoskit as campaign
from support import killkit
from support.chaoskit import Results, Scenario
from support.nixflake import Generations
from support.receiverkit import StreamCache, host

FULL = os.environ.get("REUP_CHAOS") == "full"
# A comma-separated subset of the parts (scenario names, "random", "damaged", "enospc",
# "controller-kill"): re-running one.
ONLY = set(filter(None, (os.environ.get("REUP_CHAOS_ONLY") or "").split(",")))
SEED = int(os.environ.get("REUP_CHAOS_SEED") or 11)
RESULTS = os.path.join(os.path.dirname(__file__), "results.md")


def _replace_stream(gens: Generations, streams: StreamCache, out_dir: str) -> bytes:
    from reup.delta.encode import encode

    out = os.path.join(out_dir, "replace.reup")
    encode([gens.gen2], gens.gen2, out, avoid=[gens.parts["data"]])
    with open(out, "rb") as fh:
        return fh.read()


def _scenarios(gens: Generations, streams: StreamCache, gen1_template: str,
               tmp: str) -> dict[str, Scenario]:
    stream12 = streams.get([gens.gen1], gens.gen2)
    replace = _replace_stream(gens, streams, tmp)
    held2 = streams.get([gens.gen2], gens.gen2)
    out = {s.name: s for s in campaign.scenarios(gens, gen1_template, stream12, replace, held2)}
    out["receive-replace"].stream = replace
    return out


def _points(n: int, k: int) -> list[int]:
    """k kill points spread over 1..n, the last ones (install, switch, arm, activate) always in."""
    tail = list(range(max(1, n - 12), n + 1))
    step = max(1, n // k)
    return sorted(set(range(1, n + 1, step)) | set(tail))


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_chaos(gens: Generations, streams: StreamCache, gen1_template: str, tmp_path: os.PathLike[str]) -> None:
    rng = random.Random(SEED)
    res = Results()
    scs = _scenarios(gens, streams, gen1_template, str(tmp_path))
    start = time.monotonic()
    for name, sc in scs.items():
        if ONLY and name not in ONLY:
            continue
        for sig in ("kill", "hup"):
            if FULL:
                campaign.deterministic(sc, sig, None, res)
            elif name in ("receive-confirm", "receive-replace") or sig == "kill":
                campaign.deterministic(sc, sig, [2, 40, 90] if name.startswith("receive") else [1, 3], res)
    if not ONLY or "random" in ONLY:
        campaign.random_kills(scs["receive-confirm"], 100 if FULL else 2, rng, res)
    if not ONLY or "damaged" in ONLY:
        campaign.damaged_streams(scs["receive"], 200 if FULL else 4, rng, res)
    if not ONLY or "enospc" in ONLY:
        campaign.disk_full(scs["receive"], gen1_template, 30 if FULL else 2, rng, res)
    if not ONLY or "controller-kill" in ONLY:
        with contextlib.contextmanager(killkit.lab)(os.path.join(tmp_path, "kill-lab"), ["k1", "k2", "k3"]) as kl:
            killkit.controller_kills(kl, 24 if FULL else 2, random.Random(SEED), res, calibrate=FULL)
    seconds = time.monotonic() - start
    report = res.markdown(seconds, SEED)
    print(report)
    if FULL:
        with open(RESULTS if not ONLY else RESULTS[:-3] + "-" + "-".join(sorted(ONLY)) + ".md", "w") as fh:
            fh.write(report)
        assert ONLY or res.total >= 1000, res.total
    assert not res.broken, res.broken
    assert not res.unconfirmed, res.unconfirmed
    assert res.recovered == res.total


def test_replace_keeps_a_valid_path(gen1_root: str, gens: Generations, streams: StreamCache,
                                    tmp_path: os.PathLike[str]) -> None:
    """Invariant 4: `replace` on a path whose copy verifies changes nothing (same inode); on a
    broken copy it swaps in the good one and `nix store verify` passes."""
    stream12 = streams.get([gens.gen1], gens.gen2)
    assert campaign.run_receiver(gen1_root, [], stream12).returncode == 0
    data = host(gen1_root, gens.parts["data"])
    before = os.lstat(data).st_ino
    replace = _replace_stream(gens, streams, str(tmp_path))
    assert campaign.run_receiver(gen1_root, [], replace).returncode == 0
    assert os.lstat(data).st_ino == before  # valid: never replaced
    target = os.path.join(data, "share/numbers.txt")
    os.chmod(os.path.dirname(target), 0o755)
    os.chmod(target, 0o644)
    with open(target, "r+b") as fh:
        fh.write(b"X")
    assert campaign.verify_generations(gen1_root) is not None
    proc = campaign.run_receiver(gen1_root, [], replace)
    assert proc.returncode == 0, proc.stderr
    assert os.lstat(data).st_ino != before
    assert campaign.verify_generations(gen1_root) is None
    verify = subprocess.run(["nix", "store", "verify", "--no-trust", "--store", gen1_root, gens.parts["data"]],
                            capture_output=True, check=False)
    assert verify.returncode == 0
