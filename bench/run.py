"""`make bench`: build the corpus, run the baselines and reup on every scenario, write the report.

usage: python -m bench.run --out bench/results.md [--only 1,5] [--skip-reup] [--workdir bench/.work]
                           [--code HEAD|worktree] [--baselines-from results.json]

Runs from the repository root. Nix runs offline (no substituters, sandbox off) through
`reup.io.nix.NixExecutor`. Scenarios run one after another so that each timing has the
machine to itself. The encoder and receiver measured are those of a git ref (default
HEAD, extracted under the workdir), so uncommitted edits in the tree do not leak into the
published numbers; `--code worktree` measures the working tree instead. Also writes `<workdir>/results.json` with every measured number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from reup.io.nix import NixExecutor, PathInfo
from reup_lab.nixenv import extended_nix_config

from bench import baseline_files, baselines, corpus, reup_rows, storefs
from bench.report import ScenarioResult, fmt_bytes, render

NIX_OPTIONS = {"sandbox": "false", "substituters": ""}
REPO = Path(__file__).resolve().parent.parent


def nix_env() -> dict[str, str]:
    return {"NIX_CONFIG": extended_nix_config(os.environ.get("NIX_CONFIG"))}


def code_snapshot(ref: str, work: Path) -> tuple[str, list[str]]:
    """Extract controller/ and receiver/ at `ref`; return (description, PYTHONPATH entries)."""
    if ref == "worktree":
        return "working tree", []
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], capture_output=True, text=True,
                         check=True).stdout.strip()
    dest = (work / "code" / sha[:12]).resolve()
    if not dest.exists():
        tmp = dest.with_suffix(".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "controller", "receiver"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(dest)
    return f"git {sha[:12]}", [str(dest / "controller"), str(dest / "receiver")]


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def largest_with_partner(missing: Sequence[str], held: Sequence[str]) -> tuple[int, int]:
    """Size of the largest file of `missing`, and of its same-relative-path held partner."""
    st = storefs.tree_stats(missing)
    if not st.files:
        return 0, 0
    top = next(p for p in missing if st.largest_rel == p or st.largest_rel.startswith(p + "/"))
    old = baseline_files.pair_paths([top], held).get(top)
    if not old:
        return st.largest, 0
    partner = old + st.largest_rel[len(top):]
    return st.largest, (os.path.getsize(partner) if os.path.isfile(partner) else 0)


def inputs_line(workdir: Path) -> str:
    """What the corpus was built from, read back from the inputs manifest."""
    m = json.loads((workdir / "inputs" / "manifest.json").read_text())
    wheels = ", ".join(f"{d} {'/'.join(sorted(v))}" for d, v in sorted(m["wheels"].items()))
    debs = ", ".join(f"{p} {d['version']}" for p, d in sorted(m["debs"].items()))
    vendored = ", ".join(f"{lib} {'/'.join(sorted(v))} ({', '.join(sorted(v.values()))})"
                         for lib, v in sorted(m.get("vendored", {}).items()))
    return f"PyPI wheels: {wheels}; Debian packages: {debs}; C built by gcc in the derivations: " \
           "libbase, libfoo (versioned soname, RPATH), foo-tools, sensord" + \
           (f"; C libraries built from PyPI source archives: {vendored}, zstd-tools" if vendored else "")


def corpus_rows(c: corpus.Corpus) -> list[list[str]]:
    gens = corpus.generations()
    rows = []
    for label in sorted(c.toplevels):
        closure = c.closures[label]
        st = storefs.tree_stats(sorted(closure))
        parent = corpus.PARENTS.get(label)
        change = corpus.describe_changes(gens[parent], gens[label]) if parent else "base"
        largest = f"{os.path.basename(st.largest_rel)} ({fmt_bytes(st.largest)})"
        nar = sum(p.nar_size for p in closure.values())
        rows.append([label, change, str(len(closure)), fmt_bytes(nar), str(st.files), largest])
    return rows


Previous = dict[int, tuple[dict[str, tuple[int, float]], int]]  # scenario -> baselines, changed files


def load_previous(path: str) -> Previous:
    """Baseline rows of an earlier run's results.json (`--baselines-from`)."""
    if not path:
        return {}
    rows = json.loads(Path(path).read_text())
    return {int(r["number"]): ({m: (int(v[0]), float(v[1])) for m, v in r["baselines"].items()},
                               int(r.get("changed_files", 0))) for r in rows if r.get("baselines")}


def run_scenario(sc: corpus.Scenario, labels: dict[str, str], closures: dict[str, dict[str, PathInfo]],
                 executor: NixExecutor, env: dict[str, str], work: Path, skip_reup: bool,
                 previous: Previous | None = None) -> ScenarioResult:
    by_top = {top: lab for lab, top in labels.items()}
    held_closure: dict[str, PathInfo] = {}
    for top in sc.held:
        held_closure.update(closures[by_top[top]])
    missing = corpus.missing_paths(closures[by_top[sc.target]], held_closure)
    held_paths = sorted(held_closure)
    big_new, big_partner = largest_with_partner(missing, held_paths)
    res = ScenarioResult(
        number=sc.number, title=sc.title, held="+".join(by_top[t] for t in sc.held),
        target=by_top[sc.target], missing_paths=len(missing),
        missing_nar_bytes=sum(closures[by_top[sc.target]][p].nar_size for p in missing),
        changed_files=0, largest_new_file=big_new, largest_new_partner=big_partner,
        largest_old_file=storefs.tree_stats(held_paths).largest,
    )
    reused = (previous or {}).get(sc.number)
    if reused:  # --baselines-from: the bytes are deterministic, the seconds are the old run's
        res.baselines, res.changed_files = dict(reused[0]), reused[1]
    for b in [] if reused else baselines.run_all(held_paths, missing, work / "baselines"):
        res.baselines[b.method] = (b.bytes, b.seconds)
        log(f"S{sc.number} {b.method}: {b.bytes} B in {b.seconds:.2f} s")
        if b.method == "files+bsdiff4":
            ops = b.detail.get("ops", {})
            assert isinstance(ops, dict)
            res.changed_files = int(ops.get("bsdiff", 0)) + int(ops.get("literal", 0))
    if skip_reup:
        res.reup_error = "skipped (--skip-reup)"
        return res
    row = reup_rows.run_scenario(sc.held, sc.target, work / "reup", executor, env)
    res.reup_ok, res.reup_error, res.reup_bytes = row.ok, row.error, row.bytes
    res.reup_encode_s, res.reup_repeat_s, res.reup_encode_rss = row.encode_seconds, row.repeat_seconds, row.encode_peak_rss
    res.reup_apply_s, res.reup_apply_rss = row.apply_seconds, row.apply_peak_rss
    res.reup_repeat_via = row.repeat_via
    if isinstance(row.stats, dict) and isinstance(row.stats.get("bytes_by_kind"), dict):
        res.reup_kinds = {str(k): int(v) for k, v in row.stats["bytes_by_kind"].items()}
    if row.encoder_file:
        log(f"S{sc.number} encoder module: {row.encoder_file}; repeat via {row.repeat_via}")
    log(f"S{sc.number} reup: {'ok' if row.ok else 'FAILED ' + row.error} {row.bytes} B, "
        f"encode {row.encode_seconds:.2f} s, apply {row.apply_seconds:.2f} s")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results.md")
    ap.add_argument("--workdir", default="bench/.work")
    ap.add_argument("--only", default="", help="comma-separated scenario numbers")
    ap.add_argument("--skip-reup", action="store_true", help="baselines only")
    ap.add_argument("--code", default="HEAD", help="git ref whose encoder/receiver to measure, or 'worktree'")
    ap.add_argument("--baselines-from", default="",
                    help="an earlier run's results.json: reuse its baselines (quick reup iterations)")
    args = ap.parse_args(argv)
    only = [int(x) for x in args.only.split(",") if x]
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = Path(args.workdir)
    code_desc, code_path = code_snapshot(args.code, work)
    pypath = [*code_path, str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, **nix_env(), "PYTHONPATH": os.pathsep.join(filter(None, pypath))}
    executor = NixExecutor(options=NIX_OPTIONS, env=nix_env())
    t0 = time.perf_counter()
    c = corpus.build(work, executor)
    corpus.load_closures(c, executor)
    build_s = time.perf_counter() - t0
    log(f"corpus built in {build_s:.1f} s: " + ", ".join(f"{k}={v}" for k, v in sorted(c.toplevels.items())))
    previous = load_previous(args.baselines_from)
    results = [run_scenario(sc, c.toplevels, c.closures, executor, env, work / "tmp", args.skip_reup, previous)
               for sc in c.scenarios(only)]
    total = time.perf_counter() - started
    meta = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
                   f"{executor.run(['nix', '--version']).strip()}",
        "corpus inputs": inputs_line(work),
        "corpus build (Nix, inputs cached)": f"{build_s:.1f} s",
        "whole run": f"{total:.0f} s",
        "1-min load average at start / end (other work on the machine skews times)":
            f"{load_start:.2f} / {os.getloadavg()[0]:.2f}",
        "encoder and receiver measured": code_desc,
    }
    if args.baselines_from:
        meta["baselines"] = f"reused from {args.baselines_from} (bytes exact; their seconds are that run's)"
    Path(args.out).write_text(render(results, meta, corpus_rows(c)))
    (work / "results.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    log(f"wrote {args.out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
