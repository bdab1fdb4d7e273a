"""The fault campaign (issue 11): every fault, then the device checked against its invariants.

Faults, each on a fresh copy of a real device root (real Nix database, real `reup-receive`):

- `kill@N` / `hup@N`: SIGKILL to the receiver, or SIGHUP to its process group (as sshd sends
  when the session drops), just before its N-th filesystem operation or subprocess start, for
  every N of a scenario (REUP_FAULT, reup_receiver/faults.py): receive (plain, with
  confirmation, with a replaced path), rollback, confirm, gc;
- `random-kill`: SIGKILL at a random moment of a receive with confirmation;
- `truncate` / `bitflip`: the stream cut or one bit flipped at a random offset;
- `enospc`: the device on a tmpfs too small for the update (random size).

After each fault: `system` resolves to a generation that passes
`nix store verify --no-trust -r --store ROOT`, every `system-N-link` verifies, a pending
generation is rolled back by the watchdog at its deadline (else: *unconfirmed*), every staged
path is complete and verified (so a re-send need not carry it), and re-sending the stream
succeeds. Used by tests/chaos/test_chaos.py (the campaign) (reduced in `make test`, full in `make chaos`).
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from reup_lab.nixenv import nix_env
from reup_receiver.format.nar import nar_hash_tree
from reup_receiver.protocol import EXITS, ExitCode

from support.nixflake import Generations
from support.receiverkit import RECEIVE, SCRATCH, copy_root, current_toplevel, profile_links

CONFIRM_TIMEOUT = 1.0  # the receiver's minimum: faults with a pending generation wait this long


def _head() -> str:
    """The commit under test, taken when the campaign starts (the worktree may move on meanwhile)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=False).stdout.strip() or "unknown"


@dataclass
class Results:
    commit: str = field(default_factory=_head)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    broken: list[str] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)
    recovered: int = 0
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    receiver_survived_hup: int = 0
    expired_by_next_call: int = 0
    controller_resumed: int = 0  # restarted controllers that sent only the rest of a kept partial
    controller_missed: int = 0  # controller runs that ended before their kill instant (no fault)

    @property
    def total(self) -> int:
        return sum(self.faults.values())

    def markdown(self, seconds: float, seed: int) -> str:
        with open("/proc/loadavg") as fh:
            load = " ".join(fh.read().split()[:3])
        lines = ["# Fault campaign results", "",
                 f"`make chaos`, seed {seed}, commit {self.commit}: {self.total} faults in {seconds:.0f} s, "
                 f"load average at the end {load} "
                 "(tests/support/chaoskit.py describes each kind and the checks after it).", "",
                 "| fault kind | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(self.faults.items())]
        lines += ["", "| outcome | count |", "|---|---:|",
                  f"| faults | {self.total} |",
                  f"| devices left broken | {len(self.broken)} |",
                  f"| devices left unconfirmed past the deadline | {len(self.unconfirmed)} |",
                  f"| recovered (re-send succeeded, every generation verifies) | {self.recovered} |",
                  f"| receivers that survived a SIGHUP and finished | {self.receiver_survived_hup} |",
                  f"| pending generations expired by the next call instead of the watchdog | "
                  f"{self.expired_by_next_call} |",
                  f"| restarted controllers that sent only the rest of a partial the device kept | "
                  f"{self.controller_resumed} |",
                  f"| controller runs that ended before their kill instant (re-drawn, not counted) | "
                  f"{self.controller_missed} |",
                  "", "| refusal (exit code) | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(self.refusals.items())]
        if self.broken or self.unconfirmed:
            lines += ["", "Failures:", ""] + [f"- {x}" for x in self.broken + self.unconfirmed]
        return "\n".join(lines) + "\n"


def run_receiver(root: str, args: Sequence[str], stream: bytes | None, fault: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """`reup-receive --root ROOT ARGS` in its own process group (a SIGHUP fault hits only it)."""
    env = nix_env()
    env.pop("REUP_FAULT", None)
    if fault:
        env["REUP_FAULT"] = fault
    return subprocess.run([RECEIVE, "--root", root, *args], input=stream or b"", capture_output=True,
                          env=env, timeout=timeout, start_new_session=True, check=False)


def count_events(root: str, args: Sequence[str], stream: bytes | None) -> int:
    fd, path = tempfile.mkstemp(prefix="reup-count-")
    os.close(fd)
    try:
        proc = run_receiver(root, args, stream, f"count:{path}")
        assert proc.returncode == 0, proc.stderr
        with open(path) as fh:
            return int(fh.read())
    finally:
        os.unlink(path)


def exit_name(code: int) -> str:
    try:
        return f"{EXITS[ExitCode(code)][0]} ({code})"
    except (ValueError, KeyError):
        return f"signal {-code}" if code < 0 else f"exit {code}"


# --- the checks after a fault ---------------------------------------------------------------------


def _pending(root: str) -> bool:
    return os.path.exists(os.path.join(root, "nix/var/reup/pending.json"))


def verify_generations(root: str) -> str | None:
    """None if `system` resolves and every generation verifies; else what is wrong."""
    links = profile_links(root)
    if "system" not in links or links["system"] not in links:
        return f"system does not resolve: {links}"
    tops = sorted({t for n, t in links.items() if re.fullmatch(r"system-\d+-link", n)})
    proc = subprocess.run(["nix", "store", "verify", "--no-trust", "-r", "--store", root, *tops],
                          env=nix_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"nix store verify failed: {proc.stderr.strip()[-400:]}"
    return None


def verify_staged(root: str) -> str | None:
    done = os.path.join(root, "nix/store/.reup-staging/done")
    if not os.path.isdir(done):
        return None
    for name in os.listdir(done):
        if name.endswith(".json") and os.path.lexists(os.path.join(done, name[:-5])):
            with open(os.path.join(done, name)) as fh:
                rec = json.load(fh)
            if nar_hash_tree(os.path.join(done, name[:-5]))[0].hex() != rec["narHash"]:
                return f"staged path {name[:-5]} does not match its record"
    return None


def settle(root: str, res: Results, label: str) -> None:
    """A pending generation must be rolled back by the watchdog at its deadline (its timeout from
    now is an upper bound; 3 s of grace for the watchdog's poll and a loaded machine)."""
    if not _pending(root):
        return
    try:
        with open(os.path.join(root, "nix/var/reup/pending.json")) as fh:
            timeout = float(json.load(fh)["timeout"])
    except (OSError, ValueError, KeyError, TypeError):
        timeout = 0.0  # unreadable: the next call must roll back at once
    end = time.monotonic() + timeout + 3.0
    while _pending(root) and time.monotonic() < end:
        time.sleep(0.05)
    if _pending(root):
        # The watchdog did not act (the kill came before it started): the next call must.
        run_receiver(root, ["--status"], None)
        if _pending(root):
            res.unconfirmed.append(f"{label}: still pending after its deadline")
            return
        res.expired_by_next_call += 1


def check_after(root: str, stream: bytes, target: str, res: Results, label: str,
                resend_args: Sequence[str] = (), starts_broken: bool = False) -> None:
    settle(root, res, label)
    problem = (None if starts_broken else verify_generations(root)) or verify_staged(root)
    if problem:
        res.broken.append(f"{label}: {problem}")
        return
    proc = run_receiver(root, list(resend_args), stream)
    if proc.returncode != 0 or current_toplevel(root) != target:
        res.broken.append(f"{label}: re-send failed ({exit_name(proc.returncode)}): {proc.stderr.decode()[-300:]}")
        return
    settle(root, res, label + " (re-send)")
    problem = verify_generations(root)
    if problem:
        res.broken.append(f"{label} after re-send: {problem}")
        return
    res.recovered += 1


# --- scenarios -------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """A verb run on a device prepared by `prepare`; after a fault, `stream` brings it to `target`."""

    name: str
    prepare: Callable[[str], None]  # makes the device root (before the faulty run)
    args: list[str]
    stdin: bytes | None
    stream: bytes  # the re-send after the fault
    target: str
    starts_broken: bool = False  # the device holds a damaged path before the fault (replace)


def scenarios(gens: Generations, gen1_template: str, stream12: bytes, stream_full: bytes,
              stream_held2: bytes) -> list[Scenario]:
    def on_gen1(root: str) -> None:
        copy_root(gen1_template, root)

    def on_gen2(root: str) -> None:
        copy_root(gen1_template, root)
        assert run_receiver(root, [], stream12).returncode == 0

    def pending_gen2(root: str) -> None:
        copy_root(gen1_template, root)
        assert run_receiver(root, ["--confirm-timeout", "3"], stream12).returncode == 0

    def broken_data(root: str) -> None:  # gen2 installed, then one of its files damaged
        on_gen2(root)
        target = os.path.join(root, gens.parts["data"].lstrip("/"), "share/numbers.txt")
        os.chmod(os.path.dirname(target), 0o755)
        os.chmod(target, 0o644)
        with open(target, "r+b") as fh:
            fh.write(b"X")

    return [
        Scenario("receive", on_gen1, [], stream12, stream12, gens.gen2),
        Scenario("receive-confirm", on_gen1, ["--confirm-timeout", str(CONFIRM_TIMEOUT)], stream12,
                 stream12, gens.gen2),
        Scenario("receive-replace", broken_data, [], stream_full, stream_full, gens.gen2, starts_broken=True),
        Scenario("rollback", on_gen2, ["--rollback"], None, stream12, gens.gen2),
        Scenario("confirm", pending_gen2, ["--confirm", "2"], None, stream12, gens.gen2),
        # after gc, the controller encodes from what the device reports (here: generation 2 alone)
        Scenario("gc", on_gen2, ["--gc", "--keep", "1"], None, stream_held2, gens.gen2),
    ]


def _scratch() -> str:
    return tempfile.mkdtemp(prefix="reup-chaos-", dir=SCRATCH)


def deterministic(sc: Scenario, signal_kind: str, points: Sequence[int] | None, res: Results) -> None:
    """kill@N or hup@N for each N in `points` (None: every event of the scenario)."""
    d = _scratch()
    try:
        probe = os.path.join(d, "probe")
        sc.prepare(probe)
        n = count_events(probe, sc.args, sc.stdin)
        for k in (points if points is not None else range(1, n + 1)):
            if k > n:
                continue
            root = os.path.join(d, f"{signal_kind}{k}")
            sc.prepare(root)
            proc = run_receiver(root, sc.args, sc.stdin, f"{signal_kind}:{k}")
            res.faults[f"{signal_kind} before operation N ({sc.name})"] += 1
            if proc.returncode > 0:
                res.refusals[exit_name(proc.returncode)] += 1
            if signal_kind == "hup" and proc.returncode == 0:
                res.receiver_survived_hup += 1
            check_after(root, sc.stream, sc.target, res, f"{sc.name} {signal_kind}@{k}/{n}",
                        starts_broken=sc.starts_broken)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def random_kills(sc: Scenario, count: int, rng: random.Random, res: Results) -> None:
    d = _scratch()
    try:
        for i in range(count):
            root = os.path.join(d, f"r{i}")
            sc.prepare(root)
            env = nix_env()
            proc = subprocess.Popen([RECEIVE, "--root", root, *sc.args], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
            assert proc.stdin is not None
            proc.stdin.write(sc.stdin or b"")
            proc.stdin.close()
            time.sleep(rng.uniform(0, 0.25))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            res.faults[f"random SIGKILL ({sc.name})"] += 1
            check_after(root, sc.stream, sc.target, res, f"{sc.name} random-kill #{i}")
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def damaged_streams(sc: Scenario, count: int, rng: random.Random, res: Results) -> None:
    assert sc.stdin is not None
    d = _scratch()
    try:
        for i in range(count):
            data = bytearray(sc.stdin)
            if i % 2:
                kind = "truncation"
                data = data[: rng.randrange(len(data))]
            else:
                kind = "bit flip"
                off = rng.randrange(len(data))
                data[off] ^= 1 << rng.randrange(8)
            root = os.path.join(d, f"s{i}")
            sc.prepare(root)
            proc = run_receiver(root, sc.args, bytes(data))
            res.faults[f"{kind} ({sc.name})"] += 1
            if proc.returncode == 0:
                res.broken.append(f"{sc.name} {kind} #{i}: a damaged stream was accepted")
            else:
                res.refusals[exit_name(proc.returncode)] += 1
            check_after(root, sc.stream, sc.target, res, f"{sc.name} {kind} #{i}")
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Tmpfs:
    path: str

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", self.path], check=True)


def tmpfs(size: int) -> Iterator[Tmpfs]:
    d = tempfile.mkdtemp(prefix="reup-chaos-fs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], check=True)
    try:
        yield Tmpfs(d)
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


def disk_full(sc: Scenario, gen1_template: str, count: int, rng: random.Random, res: Results) -> None:
    """The device on a tmpfs of a random size between 'gen1 fits' and 'gen2 fits as well'."""
    import contextlib

    used = int(subprocess.run(["du", "-sb", gen1_template], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    with contextlib.contextmanager(tmpfs)(64 << 20) as fs:
        for i in range(count):
            root = os.path.join(fs.path, "device")
            shutil.rmtree(root, ignore_errors=True)
            fs.resize(64 << 20)
            sc.prepare(root)
            size = used + rng.randrange(0, 3 << 20)
            fs.resize(max(size, used + (256 << 10)))
            proc = run_receiver(root, sc.args, sc.stdin)
            res.faults[f"ENOSPC: small tmpfs ({sc.name})"] += 1
            if proc.returncode:
                res.refusals[exit_name(proc.returncode)] += 1
            settle(root, res, f"{sc.name} enospc #{i}")
            problem = verify_generations(root) or verify_staged(root)
            if problem:
                res.broken.append(f"{sc.name} enospc #{i}: {problem}")
                continue
            fs.resize(64 << 20)  # room again: the same stream must go through
            check_after(root, sc.stream, sc.target, res, f"{sc.name} enospc #{i}")
        shutil.rmtree(os.path.join(fs.path, "device"), ignore_errors=True)
