"""Pure parts of the bench harness: corpus tables, store names, inputs, report, Nix builders."""

from __future__ import annotations

from pathlib import Path

import pytest
from reup.io.nix import PathInfo

from bench import corpus, inputs, report
from bench.nixcmds import build_file_cmd, copy_to_cmd, export_cmd, store_verify_cmd

H = "0123456789abcdfghijklmnpqrsvwxyz"


def test_store_names() -> None:
    assert corpus.store_name(f"/nix/store/{H}-ruff-0.6.8") == "ruff-0.6.8"
    assert corpus.store_hash(f"/nix/store/{H}-ruff-0.6.8") == H
    assert corpus.split_name("python3.11-pydantic-core-2.23.3") == ("python3.11-pydantic-core", "2.23.3")
    assert corpus.split_name("libonig5-6.9.8-1") == ("libonig5", "6.9.8-1")
    assert corpus.split_name("system-path") == ("system-path", "")
    assert corpus.split_name("nixos-system-dev-g1") == ("nixos-system-dev-g1", "")


def test_generations_shape_the_scenarios() -> None:
    gens = corpus.generations()
    for spec in corpus.SCENARIOS:
        assert spec.target in gens and all(h in gens for h in spec.held)
    assert [s.number for s in corpus.SCENARIOS] == list(range(1, 12))
    assert corpus.describe_changes(gens["g0"], gens["g1"]) == "config.interval 60->30"
    assert corpus.describe_changes(gens["g5"], gens["g9"]) == "baseTag 1->2"
    g1, g5 = gens["g1"], gens["g5"]
    for key in ("gridapp", "pydanticCore", "libfoo", "ruff"):
        assert g1[key] != g5[key]
    for label, parent in corpus.PARENTS.items():
        assert label in gens and parent in gens


def test_resolve_scenarios_and_missing_paths() -> None:
    tops = {g: f"/nix/store/{H}-nixos-system-dev-{g}" for g in corpus.generations()}
    scs = corpus.resolve_scenarios(tops, [6, 7])
    assert [(s.number, s.held, s.target) for s in scs] == [
        (6, (), tops["g5"]),
        (7, (tops["g1"], tops["g5"]), tops["g1"]),
    ]
    info = {p: PathInfo(p, "sha256:0", 1, (), None) for p in "abc"}
    assert corpus.missing_paths(info, {"b": info["b"]}) == ["a", "c"]


def test_inputs_helpers(tmp_path: Path) -> None:
    assert inputs.wheel_glob("pydantic-core", "2.23.3") == "pydantic_core-2.23.3-*.whl"
    assert inputs.deb_version("jq_1.6-2.1+deb12u3_amd64.deb") == "1.6-2.1+deb12u3"
    argv = inputs.pip_download_cmd("ruff", "0.6.9", tmp_path)
    assert "--only-binary=:all:" in argv and "--no-deps" in argv and argv[-1] == "ruff==0.6.9"
    m = inputs.manifest_data(tmp_path, {"wheel:ruff:0.6.9": "ruff.whl", "deb:jq": "debs/jq_1.6-2_amd64.deb"})
    assert m["wheels"] == {"ruff": {"0.6.9": "ruff.whl"}}
    assert m["debs"] == {"jq": {"file": "debs/jq_1.6-2_amd64.deb", "version": "1.6-2"}}


def test_nix_bench_builders() -> None:
    argv = build_file_cmd("c.nix", ["g0", "g1"], argstr={"gens": "G", "manifest": "M"}, out_link="r/s",
                          options={"sandbox": "false"})
    assert argv[argv.index("--out-link") + 1] == "r/s" and "--no-link" not in argv
    assert argv[-5:] == ["M", "-f", "c.nix", "g0", "g1"]
    assert "--no-link" in build_file_cmd("c.nix", ["g0"])
    assert copy_to_cmd(["/nix/store/x"], "/tmp/root")[-4:] == ["--no-check-sigs", "--to", "/tmp/root", "/nix/store/x"]
    assert store_verify_cmd(["/nix/store/x"], store="/r")[-5:] == ["--no-trust", "--store", "/r", "-r", "/nix/store/x"]
    assert export_cmd(["/nix/store/x"]) == ["nix-store", "--export", "/nix/store/x"]


def _result(num: int, reup: int, best: int, ok: bool = True) -> report.ScenarioResult:
    r = report.ScenarioResult(num, f"s{num}", "g1", "g5", missing_paths=3, missing_nar_bytes=10_000,
                              changed_files=5, largest_new_file=1000, largest_new_partner=900,
                              largest_old_file=2000)
    r.baselines = {"export+zstd-19": (best * 2, 1.0), "files+bsdiff4": (best, 2.0)}
    r.reup_ok, r.reup_bytes, r.reup_encode_s, r.reup_repeat_s = ok, reup, 1.0, 0.5
    r.reup_apply_rss, r.reup_encode_rss = 1 << 20, 1 << 20
    r.reup_error = "" if ok else "boom"
    return r


def test_targets_and_render() -> None:
    results = [_result(1, 600, 1000), _result(2, 800, 1000), _result(9, 400, 1000), _result(4, 10, 100, ok=False),
               _result(6, 940, 1000), _result(7, 129, 10)]
    results[4].baselines["nars+xz-9e"] = (990, 1.0)
    checks = {c.target: c for c in report.check_targets(results)}
    assert "S1: reup <= 1x smallest baseline" not in checks  # a byte limit instead
    assert checks["S1: reup <= 640 B"].met is True
    assert checks["S2: reup <= 0.75x smallest baseline"].met is False  # 0.8x
    assert checks["S9: reup <= 0.5x smallest baseline"].met is True  # 0.4x
    assert checks["S6: reup <= 0.95x nars+xz-9e"].met is True  # 940 <= 940.5
    assert checks["S7: reup <= 128 B"].met is False
    assert checks["S4: reup <= 0.75x smallest baseline"].met is None
    assert checks["S4: encode <= 2x the time before issue 13"].met is None
    assert checks["S1: receiver peak RSS <= old+new largest file + 64 MiB"].met is True
    results = results[:4]
    md = report.render(results, {"whole run": "1 s"}, [["g0", "base", "1", "1 B", "1", "x (1 B)"]])
    assert "| 2 | s2 | g1 -> g5 | 3 (10000 B) | 2,000 | - | - | **1,000** | - | 800 | 0.800 |" in md
    assert "failed: boom" in md


def test_error_cells_and_kind_table() -> None:
    assert report.one_line("a\n  b | c") == "a b / c"
    assert len(report.one_line("x" * 500)) == 160
    r = _result(3, 10, 100)
    r.reup_kinds = {"literal": 7, "manifest": 3}
    md = report.render([r], {}, [])
    assert "| # | literal | manifest |" in md and "| 3 | 7 | 3 |" in md


def test_pinned_inputs_and_vendored_sources(tmp_path: Path) -> None:
    bad = tmp_path / "zstandard-0.23.0.tar.gz"
    bad.write_bytes(b"not the release")
    with pytest.raises(RuntimeError, match="pinned"):
        inputs.check_pin(bad)
    inputs.check_pin(tmp_path / "unpinned.whl")  # inputs without a pin are not checked
    m = inputs.manifest_data(tmp_path, {"sdist:zstandard:0.23.0": "zstandard-0.23.0.tar.gz"})
    assert m["vendored"] == {"zstd": {"1.5.6": "zstandard-0.23.0.tar.gz"}}
    argv = inputs.sdist_download_cmd("zstandard", "0.23.0", tmp_path)
    assert "--no-binary=:all:" in argv and argv[-1] == "zstandard==0.23.0"
