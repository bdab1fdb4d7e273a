"""reup's own rows: encode (time, peak RSS, repeat), apply on a device root, verify.

Called by `bench.run` once per scenario. The encoder runs in a child process
(`bench.encode_child`) and the receiver as `reup-receive --root DIR --activate none`,
both measured with GNU time (wall seconds and peak RSS of the largest process in the
child's tree). The device root is populated with `nix copy --to DIR` of the held
closures plus NixOS profile links; the result is checked with
`nix store verify --no-trust --store DIR -r TARGET`. A size counts only if it applies and
verifies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from reup.io.nix import NixError, NixExecutor, init_store_cmd

from bench.nixcmds import copy_to_cmd, store_verify_cmd


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_rss: int  # bytes
    stdout: str
    stderr: str


GNU_TIME = "/usr/bin/time"


def measure(argv: Sequence[str], *, stdin: IO[bytes] | None = None, env: dict[str, str] | None = None) -> Measured:
    """Run a command; wall seconds and peak RSS of its process tree.

    The peak comes from GNU time (`%M`): a child forked straight from this (large) Python
    process would inherit its high-water RSS mark across exec, and ru_maxrss would report
    the harness's memory instead of the command's.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [GNU_TIME, "-f", "%M", "-o", rss.name, *argv],
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            env=env,
            check=False,
        )
        seconds = time.perf_counter() - t0
        lines = [ln for ln in rss.read().splitlines() if ln.strip()]
    peak_kib = int(lines[-1]) if lines and lines[-1].strip().isdigit() else 0
    return Measured(proc.returncode, seconds, peak_kib * 1024,
                    proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


@dataclass
class ReupRow:
    ok: bool = False
    error: str = ""
    bytes: int = 0
    encode_seconds: float = 0.0
    encode_peak_rss: int = 0
    repeat_seconds: float | None = None
    apply_seconds: float = 0.0
    apply_peak_rss: int = 0
    verified: bool = False
    stats: object = None
    encoder_file: str = ""
    repeat_via: str = ""
    receiver: dict[str, object] = field(default_factory=dict)


def run_encode(held: Sequence[str], target: str, out: Path, env: dict[str, str]) -> tuple[ReupRow, Measured]:
    """Encode for a device holding `held` (current generation first, the encoder's order)."""
    cache = out.parent / "delta-cache"
    if cache.exists():
        shutil.rmtree(cache)
    req = {"held": list(held), "target": target, "out": str(out), "cache_dir": str(cache)}
    m = measure([sys.executable, "-m", "bench.encode_child", json.dumps(req)], env=env)
    row = ReupRow(encode_seconds=m.seconds, encode_peak_rss=m.peak_rss)
    try:
        res = json.loads(m.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        row.error = f"encoder child exited {m.returncode}: {m.stderr.strip()[-300:]}"
        return row, m
    if not res.get("ok"):
        row.error = str(res.get("error"))
        return row, m
    row.encode_seconds = float(res["seconds"])  # the encode call itself, not interpreter start
    row.repeat_seconds = res.get("repeat_seconds")
    row.repeat_via = str(res.get("repeat_via", ""))
    row.stats = res.get("stats")
    row.encoder_file = str(res.get("module_file", ""))
    row.bytes = out.stat().st_size
    Path(str(out) + ".repeat").unlink(missing_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    return row, m


def make_device_root(root: Path, held: Sequence[str], executor: NixExecutor) -> None:
    """A device filesystem holding the closures of `held` (last = current generation).

    With nothing held it is a freshly installed NixOS device: an empty Nix database.
    """
    if root.exists():
        remove_tree(root)
    root.mkdir(parents=True)
    if not held:
        executor.run(init_store_cmd(str(root)))
        return
    executor.run(copy_to_cmd(held, str(root)), timeout=900)
    profiles = root / "nix/var/nix/profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    for i, top in enumerate(held, start=1):
        os.symlink(top, profiles / f"system-{i}-link")
    os.symlink(f"system-{len(held)}-link", profiles / "system")


def remove_tree(root: Path) -> None:
    """Store paths are read-only; make them writable, then delete."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    os.chmod(root, 0o755)
    shutil.rmtree(root)


def receiver_argv(root: Path) -> list[str]:
    # `python -m` (not the console script) so that PYTHONPATH selects the code measured.
    return [sys.executable, "-m", "reup_receiver.cli", "--root", str(root), "--activate", "none"]


def apply_and_verify(row: ReupRow, stream: Path, root: Path, target: str, executor: NixExecutor,
                     env: dict[str, str]) -> None:
    with open(stream, "rb") as f:
        m = measure(receiver_argv(root), stdin=f, env={**env, "REUP_ROOT": str(root)})
    row.apply_seconds, row.apply_peak_rss = m.seconds, m.peak_rss
    if m.returncode != 0:
        row.error = f"reup-receive exited {m.returncode}: {m.stderr.strip()[-300:]}"
        return
    try:
        row.receiver = json.loads(m.stdout)
    except json.JSONDecodeError:
        row.receiver = {"stdout": m.stdout[-300:]}
    try:
        executor.run(store_verify_cmd([target], store=str(root)), timeout=900)
    except NixError as exc:
        row.error = "nix store verify failed: " + (exc.stderr.strip().splitlines() or ["?"])[-1]
        return
    row.verified = True
    row.ok = True


def run_scenario(held: Sequence[str], target: str, work: Path, executor: NixExecutor,
                 env: dict[str, str]) -> ReupRow:
    """Encode, apply to a fresh device root and verify; the row records what failed.

    `held` is in generation order (last = the device's current one), as in the scenarios.
    """
    work.mkdir(parents=True, exist_ok=True)
    stream = work / "stream.reup"
    row, _ = run_encode(list(reversed(held)), target, stream, env)
    if row.error:
        return row
    root = work / "device"
    try:
        make_device_root(root, held, executor)
        apply_and_verify(row, stream, root, target, executor, env)
    finally:
        if root.exists():
            remove_tree(root)
        stream.unlink(missing_ok=True)
    return row
