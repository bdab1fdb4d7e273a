"""Fleet-scale benchmark (`make bench-fleet`): one real controller (`reup run`) against N simulated
devices served by one process (reup_lab.fakefleet, the receiver's protocol and stream reader).

For each fleet shape ("shared": 3 configurations; "unique": every device its own system, its hostname
in the closure) and size N: a fleet repo (flake + fleet.toml) in git, the fake fleet on one loopback
port (the SSH user names the device; one host key, as fleet.toml says), the controller started on
fresh state, then an update commit (the shared base changes, so every system does). Per phase:
time to the first and last acknowledgement and to settled (every device in sync on the commit),
controller CPU (own, and its children: nix, git), peak RSS, reconcile passes, SQLite size, /metrics
series, encodes against pushes, rollbacks. Results as a Markdown table with the growth exponent of
controller CPU between consecutive sizes (log(cpu2/cpu1) / log(n2/n1)).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from reup_lab import demofleet
from reup_lab.nixenv import NIX_CONFIG
from reup_lab.simdevice import free_port, generate_key

TICKS = os.sysconf("SC_CLK_TCK")

FLAKE = r'''{
  outputs = { self }: let
    system = "x86_64-linux";
    base = derivation {
      name = "base-@BASE@"; builder = "/bin/sh"; inherit system; salt = "@SALT@";
      args = [ "-c" "PATH=/usr/bin:/bin; mkdir -p $out/lib; seq 1 20000 | sed 's/$/ base @BASE@/' > $out/lib/libbase.txt" ];
    };
    mk = name: derivation {
      name = "nixos-system-${name}"; builder = "/bin/sh"; inherit system base; salt = "@SALT@";
      args = [ "-c" "PATH=/usr/bin:/bin; mkdir -p $out/bin $out/etc; ln -s $base $out/base; echo ${name} > $out/etc/hostname; echo @MARK@ > $out/etc/marker; printf '#!/bin/sh\\n' > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration" ];
    };
  in {
    nixosConfigurations = builtins.listToAttrs (map (n: { name = n; value.config.system.build.toplevel = mk n; })
      (builtins.fromJSON (builtins.readFile ./configs.json)));
  };
}
'''


@dataclass
class Phase:
    name: str
    seconds_first: float | None = None
    seconds_last: float | None = None
    seconds_settled: float | None = None
    cpu: float = 0.0
    children_cpu: float = 0.0
    passes: int = 0
    encodes: int = 0
    pushes: int = 0
    rollbacks: int = 0
    timed_out: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own user+system, reaped children's user+system) seconds of `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS, (int(fields[13]) + int(fields[14])) / TICKS


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return bytes(r.read())


def scrape(base: str) -> dict[str, float]:
    out = {}
    for line in get(base + "/metrics").decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def write_fleet(repo: str, n: int, shape: str, port: int, host_pub: str, base_version: str, mark: str = "0",
                salt: str = "") -> list[str]:
    """The fleet repo's files; `salt` (one per run) makes every run's systems new to the Nix store, so
    that evaluation and builds are measured for real, never found from an earlier run."""
    names = [f"d{i:05d}" for i in range(n)]
    assign = {d: (d if shape == "unique" else f"cfg-{i % 3}") for i, d in enumerate(names)}
    configs = sorted(set(assign.values()))
    Path(repo, "flake.nix").write_text(FLAKE.replace("@BASE@", base_version).replace("@MARK@", mark)
                                       .replace("@SALT@", salt))
    Path(repo, "configs.json").write_text(json.dumps(configs))
    lines = ["[rollout]\nconfirm_timeout = 60\n\n"]
    for d in names:
        lines.append(f'[devices.{d}]\nhost = "127.0.0.1"\nport = {port}\nuser = "{d}"\nhost_key = "{host_pub}"\n'
                     f'config = "{assign[d]}"\n\n')
    Path(repo, "fleet.toml").write_text("".join(lines))
    return names


def run_size(work: str, n: int, shape: str, timeout: float, max_connections: int,
             latency_max_n: int = 100) -> dict[str, Any]:
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "fakefleet.log"), "w") as fake_log, \
            open(os.path.join(work, "controller.log"), "w") as log:
        return _run_size(work, n, shape, timeout, max_connections, fake_log, log, latency_max_n)


def _run_size(work: str, n: int, shape: str, timeout: float, max_connections: int, fake_log: IO[str],
              log: IO[str], latency_max_n: int) -> dict[str, Any]:
    keys = os.path.join(work, "keys")
    os.makedirs(keys, exist_ok=True)
    host_pub = generate_key(os.path.join(keys, "host"))
    generate_key(os.path.join(keys, "client"))
    repo = os.path.join(work, "fleet")
    demofleet.init_repo(repo)
    port = free_port()
    salt = os.urandom(6).hex()
    write_fleet(repo, n, shape, port, host_pub, "1", salt=salt)
    c1 = demofleet.commit(repo, "fleet")
    events = os.path.join(work, "device-events.jsonl")
    ready = os.path.join(work, "fakefleet.pid")
    fake = subprocess.Popen([sys.executable, "-m", "reup_lab.fakefleet", "--port", str(port),
                             "--host-key", os.path.join(keys, "host"), "--client-key", os.path.join(keys, "client.pub"),
                             "--events", events, "--ready", ready], stderr=fake_log)
    http_port = free_port()
    Path(work, "reup.toml").write_text(
        f'[source]\nurl = "{repo}"\npoll_interval = 600\n\n[state]\ndir = "state"\n\n'
        f'[ssh]\nkey = "keys/client"\nmax_connections = {max_connections}\n\n[http]\nlisten = "127.0.0.1:{http_port}"\n')
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.time() + 30
    while not os.path.exists(ready):
        if time.time() > deadline or fake.poll() is not None:
            raise RuntimeError("fakefleet did not start")
        time.sleep(0.05)
    reup = os.path.join(os.path.dirname(sys.executable), "reup")
    start = time.time()
    # REUP_BENCH_PROFILE=1: the controller runs under cProfile (its main thread: the loop), written to
    # <work>/controller.prof when it stops, to find what grows with N.
    profile = ([sys.executable, "-m", "cProfile", "-o", os.path.join(work, "controller.prof")]
               if os.environ.get("REUP_BENCH_PROFILE") else [])
    ctrl = subprocess.Popen([*profile, reup, "run", "--config", os.path.join(work, "reup.toml")], stderr=log,
                            stdout=log, cwd=work)
    phases = []
    try:
        phases.append(measure(ctrl.pid, fake.pid, base, events, work, "fresh", c1, n, start, timeout))
        write_fleet(repo, n, shape, port, host_pub, "2", salt=salt)
        c2 = demofleet.commit(repo, "update the shared base")
        start = time.time()
        req = urllib.request.Request(base + "/webhook", data=b"{}", method="POST")
        urllib.request.urlopen(req, timeout=10).read()
        phases.append(measure(ctrl.pid, fake.pid, base, events, work, "update", c2, n, start, timeout))
        if n <= latency_max_n:
            # Commit-to-first-acknowledged: a tiny change (a marker file in each system, the shared base
            # as it was), timed from before `git commit`; the watcher sees the ref change, the webhook too.
            start = time.time()
            write_fleet(repo, n, shape, port, host_pub, "2", mark="1", salt=salt)
            c3 = demofleet.commit(repo, "a tiny change")
            req = urllib.request.Request(base + "/webhook", data=b"{}", method="POST")
            urllib.request.urlopen(req, timeout=10).read()
            phases.append(measure(ctrl.pid, fake.pid, base, events, work, "tiny commit", c3, n, start, timeout))
        metrics = scrape(base)
        rss = peak_rss_mib(ctrl.pid)
    finally:
        ctrl.send_signal(signal.SIGTERM)
        try:
            ctrl.wait(30)
        except subprocess.TimeoutExpired:
            ctrl.kill()
        fake.send_signal(signal.SIGTERM)
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
    db = os.path.join(work, "state", "reup.sqlite")
    sqlite_bytes = sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))
    return {"n": n, "shape": shape, "phases": phases, "rss_mib": rss, "series": len(metrics),
            "sqlite_mib": sqlite_bytes / 2**20}


def measure(pid: int, fake_pid: int, base: str, events: str, work: str, name: str, commit: str, n: int, start: float,
            timeout: float) -> Phase:
    cpu0, child0 = proc_cpu(pid)
    fake0 = proc_cpu(fake_pid)[0]
    m0 = scrape_or_empty(base)
    log0 = len(encode_lines(log_lines(work)))
    ev0 = os.path.getsize(events) if os.path.exists(events) else 0
    settled = None
    failures = 0
    while time.time() - start < timeout:
        time.sleep(0.5)
        try:
            st = json.loads(get(base + "/api/status?state=in_sync&limit=0"))
        except OSError:
            continue
        # In sync on the commit, and every device acknowledged in this phase (right after the commit is
        # recorded, devices still show in_sync on the previous one until the next pass plans them).
        if st.get("revision") == commit and st.get("total") == n and acks_since(events, ev0, start) >= n:
            settled = time.time() - start
            break
        if st.get("revision") == commit:
            failed = failed_devices(base)  # settled short: some devices failed (the table says how many)
            if failed and st.get("total", 0) + failed == n and acks_since(events, ev0, start) + failed >= n:
                failures = failed
                break
    cpu1, child1 = proc_cpu(pid)
    fake1 = proc_cpu(fake_pid)[0]
    m1 = scrape_or_empty(base)
    acks, rollbacks = [], 0
    with open(events, encoding="utf-8") as f:
        f.seek(ev0)
        for line in f:
            e = json.loads(line)
            if e["kind"] == "ack" and e["at"] >= start:
                acks.append(e["at"] - start)
            rollbacks += e["kind"] == "rollback"

    def delta(key: str) -> int:
        return int(m1.get(key, 0) - m0.get(key, 0))

    lines = log_lines(work)  # read once for the phase's encodes, evaluation and builds
    encodes = encode_lines(lines)[log0:]
    cpus = encode_cpu_ms(encodes)
    evaluated, built, builds = eval_and_builds(lines, commit, start)
    return Phase(name, min(acks) if acks else None, max(acks) if acks else None, settled, cpu1 - cpu0,
                 child1 - child0, delta("reup_reconcile_passes_total"), len(encodes),
                 delta('reup_device_updates_total{result="committed"}'), rollbacks,
                 delta('reup_device_updates_total{result="timed_out"}'),
                 {"acks": len(acks), "fake_cpu": fake1 - fake0, "encode_cpu_ms": cpus, "load": loadavg(),
                  "failed": failures, "evaluated": evaluated, "built": built, "builds": builds})


def log_time(line: str) -> float:
    """A controller log line's time (logging's default asctime, local time, milliseconds)."""
    stamp, _, millis = line[:23].partition(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def eval_and_builds(lines: list[str], commit: str, start: float) -> tuple[float | None, float | None, int]:
    """(seconds from `start` to `commit`'s targets recorded, to the last build of the phase finished,
    derivations built in the phase), from the controller's log."""
    evaluated, built, builds = None, None, 0
    for line in lines:
        if f"revision {commit[:12]}: " in line and line.endswith(" devices"):
            evaluated = log_time(line) - start
        elif evaluated is not None and "reup.loop.events: build /nix/store/" in line:
            built, builds = log_time(line) - start, builds + 1
        elif evaluated is not None and "reup.loop.events: revision " in line:
            break  # the next commit's phase
    return evaluated, built, builds


def failed_devices(base: str) -> int:
    """Devices settled without their update (failed, rolled back): a phase that will not complete."""
    return sum(int(json.loads(get(f"{base}/api/status?state={state}&limit=0")).get("total", 0))
               for state in ("failed", "rolled_back"))


def acks_since(events: str, offset: int, start: float) -> int:
    with open(events, encoding="utf-8") as f:
        f.seek(offset)
        return sum(1 for line in f if '"ack"' in line and json.loads(line)["at"] >= start)


def scrape_or_empty(base: str) -> dict[str, float]:
    for _ in range(60):
        try:
            return scrape(base)
        except OSError:
            time.sleep(0.5)
    return {}


def log_lines(work: str) -> list[str]:
    """The controller's log so far."""
    try:
        return Path(work, "controller.log").read_text(errors="replace").splitlines()
    except OSError:
        return []


def encode_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "delta encoded:" in line]


def encode_cpu_ms(lines: list[str]) -> list[float]:
    """The CPU of each encode (its thread and its diffs' workers), as the controller logs it."""
    out = []
    for line in lines:
        _, sep, rest = line.partition(", cpu ")
        if sep:
            out.append(float(rest.split(" ms", 1)[0]))
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| shape | N | phase | evaluated s | built s (drvs) | first ack s | last ack s | settled s | ctrl CPU s | "
            "children CPU s | "
            "CPU ms/device | fake fleet CPU s | passes | encodes / pushes | encode CPU s | encode ms after the first | "
            "rollbacks | failed | timed out | peak RSS MiB | SQLite MiB | series | load avg |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        for p in r["phases"]:
            cpus = p.extra.get("encode_cpu_ms", [])
            rest = cpus[1:]  # the first encode of a phase makes the shared diffs; the others reuse them
            built = fmt(p.extra.get("built")) + f" ({p.extra.get('builds', 0)})"
            rows.append(f"| {r['shape']} | {r['n']} | {p.name} | {fmt(p.extra.get('evaluated'))} | {built} | "
                        f"{fmt(p.seconds_first)} | {fmt(p.seconds_last)} | "
                        f"{fmt(p.seconds_settled)} | {p.cpu:.1f} | {p.children_cpu:.1f} | "
                        f"{1000 * p.cpu / r['n']:.2f} | {p.extra['fake_cpu']:.1f} | {p.passes} | {p.encodes} / {p.pushes} | "
                        f"{sum(cpus) / 1000:.1f} | {fmt(sum(rest) / len(rest) if rest else None)} | {p.rollbacks} | "
                        f"{p.extra.get('failed', 0)} | "
                        f"{p.timed_out} | {r['rss_mib']:.0f} | {r['sqlite_mib']:.1f} | {r['series']} | "
                        f"{p.extra.get('load', '')} |")
    rows.append("")
    rows.append("Growth exponent of controller CPU between consecutive sizes (1.0 = linear in N):")
    rows.append("")
    for shape in sorted({r["shape"] for r in results}):
        rs = sorted((r for r in results if r["shape"] == shape), key=lambda r: r["n"])
        for phase in ("fresh", "update"):
            parts = []
            for a, b in zip(rs, rs[1:], strict=False):
                ca = next(p.cpu for p in a["phases"] if p.name == phase)
                cb = next(p.cpu for p in b["phases"] if p.name == phase)
                if ca > 0 and cb > 0:
                    parts.append(f"{a['n']}→{b['n']}: {math.log(cb / ca) / math.log(b['n'] / a['n']):.2f}")
            if parts:
                rows.append(f"- {shape}, {phase}: " + ", ".join(parts))
    return "\n".join(rows) + "\n"


BEGIN, END = "<!-- bench-fleet: begin -->", "<!-- bench-fleet: end -->"


def splice(document: str | None, text: str) -> str:
    """The results document with `text` between its markers (the prose around them is kept), or
    `text` alone for a new file or one without markers."""
    if document is None or BEGIN not in document or END not in document.split(BEGIN, 1)[1]:
        return text
    head, rest = document.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100,1000,3000,10000")
    p.add_argument("--shapes", default="shared,unique")
    p.add_argument("--unique-sizes", default=None, help="sizes for the unique shape (default: --sizes)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per phase")
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--latency-max-n", type=int, default=100,
                   help="sizes up to this also time a tiny commit to its first acknowledgement")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    p.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    os.environ.setdefault("NIX_CONFIG", NIX_CONFIG)
    top = args.work or tempfile.mkdtemp(prefix="reup-bench-fleet-")
    results = []
    for shape in args.shapes.split(","):
        sizes = args.unique_sizes if shape == "unique" and args.unique_sizes else args.sizes
        for n in (int(s) for s in sizes.split(",")):
            t = time.time()
            r = run_size(os.path.join(top, f"{shape}-{n}"), n, shape, args.timeout, args.max_connections,
                         args.latency_max_n)
            results.append(r)
            print(f"{shape} N={n}: {time.time() - t:.0f}s wall", file=sys.stderr, flush=True)
            print(table([r]), file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    text = f"Measured at commit {commit or '?'}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n" + table(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(splice(out.read_text() if out.exists() else None, text))
    if not args.work:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
