"""The three baselines reup is measured against, on the same store contents.

Called by `bench.run` once per scenario with the held closure and the missing paths
(closure(target) minus closure(held)):

- (a) `nix-store --export` of the missing paths, compressed with `zstd -19` and `xz -9`
  (what `nix copy` moves);
- (b) reUpNix-style file dedup + bsdiff4 + zstd -19 (`bench.baseline_files`);
- (c) `zstd -19 --long=27 --patch-from=<tar of the held closure>` on the tar of the
  missing paths (whole-closure patch-from, issue 13's setting);
- (d) `xz -9e` of the missing paths' NARs (`nix-store --dump`, concatenated).

Each returns a `BaselineResult` with the output size and the encode seconds (building
the input archive included, since a sender has to do it too).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import baseline_files
from bench.nixcmds import export_cmd

METHODS = ("export+zstd-19", "export+xz-9", "nars+xz-9e", "files+bsdiff4", "zstd-patch-from")


@dataclass
class BaselineResult:
    method: str
    bytes: int
    seconds: float
    detail: dict[str, object] = field(default_factory=dict)


def _timed_run(argv: Sequence[str], *, stdin: str | None = None, stdout: str | None = None) -> float:
    t0 = time.perf_counter()
    fin = open(stdin, "rb") if stdin else subprocess.DEVNULL  # noqa: SIM115
    fout = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.run(list(argv), stdin=fin, stdout=fout, stderr=subprocess.PIPE, check=False)
    finally:
        for f in (fin, fout):
            if not isinstance(f, int):
                f.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-400:]}")
    return time.perf_counter() - t0


def export_archive(missing: Sequence[str], dest: Path) -> float:
    """Write `nix-store --export` of the missing paths; seconds taken."""
    return _timed_run(export_cmd(missing), stdout=str(dest))


def baseline_export(missing: Sequence[str], tmp: Path) -> list[BaselineResult]:
    """(a): the export archive through zstd -19 and through xz -9."""
    nar = tmp / "missing.export"
    t_export = export_archive(missing, nar)
    out = []
    for method, argv in (("export+zstd-19", ["zstd", "-19", "-q", "-c"]), ("export+xz-9", ["xz", "-9", "-c"])):
        comp = tmp / f"missing.export.{method}"
        t = _timed_run(argv, stdin=str(nar), stdout=str(comp))
        out.append(BaselineResult(method, comp.stat().st_size, t_export + t, {"archive_bytes": nar.stat().st_size}))
        comp.unlink()
    nar.unlink()
    return out


def baseline_nars_xz(missing: Sequence[str], tmp: Path) -> BaselineResult:
    """(d): the missing paths' NARs, concatenated, through xz -9e."""
    nars, comp = tmp / "missing.nars", tmp / "missing.nars.xz"
    seconds = 0.0
    with open(nars, "wb"):
        pass
    for path in sorted(missing):
        t0 = time.perf_counter()
        with open(nars, "ab") as out:
            subprocess.run(["nix-store", "--dump", path], stdout=out, check=True)
        seconds += time.perf_counter() - t0
    seconds += _timed_run(["xz", "-9e", "-T1", "-c"], stdin=str(nars), stdout=str(comp))
    result = BaselineResult("nars+xz-9e", comp.stat().st_size, seconds, {"nar_bytes": nars.stat().st_size})
    nars.unlink()
    comp.unlink()
    return result


def tar_cmd(paths: Sequence[str], dest: Path) -> list[str]:
    """A reproducible tar of store paths (relative to /, sorted, fixed owner and mtime)."""
    rel = [p.lstrip("/") for p in sorted(paths)]
    argv = ["tar", "--sort=name", "--mtime=@1", "--owner=0", "--group=0", "--numeric-owner"]
    argv += ["-C", "/", "-cf", str(dest)]
    return argv + (rel if rel else ["--files-from=/dev/null"])


def zstd_patch_cmd(new_tar: Path, old_tar: Path | None, dest: Path) -> list[str]:
    argv = ["zstd", "-19", "--long=27", "-q", "-f"]
    if old_tar is not None:
        argv.append(f"--patch-from={old_tar}")
    return argv + [str(new_tar), "-o", str(dest)]


def baseline_patch_from(held: Sequence[str], missing: Sequence[str], tmp: Path) -> BaselineResult:
    """(c): zstd -19 --long=27 with the tar of the held closure as the patch base."""
    old_tar = tmp / "held.tar" if held else None
    new_tar, out = tmp / "missing.tar", tmp / "missing.tar.zst"
    seconds = _timed_run(tar_cmd(missing, new_tar))
    if old_tar is not None:
        seconds += _timed_run(tar_cmd(held, old_tar))
    seconds += _timed_run(zstd_patch_cmd(new_tar, old_tar, out))
    result = BaselineResult(
        "zstd-patch-from",
        out.stat().st_size,
        seconds,
        {"new_tar_bytes": new_tar.stat().st_size, "old_tar_bytes": old_tar.stat().st_size if old_tar else 0},
    )
    for p in (old_tar, new_tar, out):
        if p is not None and p.exists():
            p.unlink()
    return result


def baseline_files_bsdiff(held: Sequence[str], missing: Sequence[str], tmp: Path) -> BaselineResult:
    """(b): reUpNix-style dedup + bsdiff4 + zstd -19."""
    dest = tmp / "files.bsdiff.zst"
    with open(dest, "wb") as f:
        st = baseline_files.encode(held, missing, f)
    os.unlink(dest)
    return BaselineResult(
        "files+bsdiff4",
        st.bytes,
        st.seconds,
        {"raw_bytes": st.raw_bytes, "ops": dict(st.ops), "op_bytes": dict(st.op_bytes)},
    )


def run_all(held: Sequence[str], missing: Sequence[str], tmp: Path) -> list[BaselineResult]:
    """Every baseline for one scenario; `held` is the held closure (all its store paths)."""
    tmp.mkdir(parents=True, exist_ok=True)
    results = baseline_export(missing, tmp)
    results.append(baseline_nars_xz(missing, tmp))
    results.append(baseline_files_bsdiff(held, missing, tmp))
    results.append(baseline_patch_from(held, missing, tmp))
    return results
