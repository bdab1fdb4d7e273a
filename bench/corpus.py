"""The benchmark corpus: device generations built with real Nix, and the 11 scenarios.

Called by `bench.run`. `build()` fetches the inputs (`bench.inputs`), writes the generation
table as JSON and builds `bench/nix/corpus.nix` with `nix build -f` through
`reup.io.nix.NixExecutor`, keeping GC roots under `bench/.work/roots/`. The pure parts
(generation table, scenario table, store-name parsing) are unit-tested.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reup.io.nix import NixExecutor, PathInfo, parse_build_json

from bench import inputs as inputs_mod
from bench.nixcmds import build_file_cmd

NIX_FILE = Path(__file__).parent / "nix" / "corpus.nix"
HASH_LEN = 32

_BASE_GEN: dict[str, Any] = {
    "config": {"interval": 60, "endpoint": "https://ingest.example.net/v1", "level": "info"},
    "gridapp": "1.0",
    "pydanticCore": "2.23.3",
    "libfoo": "1.5.5",
    "fooPatch": "5",
    "ruff": "0.6.8",
    "baseTag": "1",
    "urllib3": "2.2.2",
    "zstd": "1.5.5",
}
_APP_BUMP = {"gridapp": "1.1", "pydanticCore": "2.23.4"}
_LIB_BUMP = {"libfoo": "1.5.6", "fooPatch": "6"}
_BIG_BUMP = {"ruff": "0.6.9"}
_PY_RELEASE = {"urllib3": "2.2.3"}  # a real pure-Python patch release (issue 13)
_C_RELEASE = {"zstd": "1.5.6"}  # a real C library patch release, built from source


def generations() -> dict[str, dict[str, Any]]:
    """Each generation's versions and config (what corpus.nix builds), keyed by label."""
    g0 = dict(_BASE_GEN)
    g1 = {**g0, "config": {**g0["config"], "interval": 30}}  # config-only change
    g5 = {**g1, **_APP_BUMP, **_LIB_BUMP, **_BIG_BUMP}  # a channel bump
    return {
        "g0": g0,
        "g1": g1,
        "g2": {**g1, **_APP_BUMP},
        "g3": {**g1, **_LIB_BUMP},
        "g4": {**g1, **_BIG_BUMP},
        "g5": g5,
        "g9": {**g5, "baseTag": "2"},  # mass rebuild: libbase's derivation changes, not its bytes
        "g10": {**g1, **_PY_RELEASE},
        "g11": {**g1, **_C_RELEASE},
    }


# Which generation each one was derived from (for describing the changes).
PARENTS = {"g1": "g0", "g2": "g1", "g3": "g1", "g4": "g1", "g5": "g1", "g9": "g5", "g10": "g1", "g11": "g1"}


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """`ruff 0.6.8->0.6.9, config.interval 60->30` (keys whose values differ)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            parts += [f"{key}.{k} {a.get(k)}->{b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            parts.append(f"{key} {a}->{b}")
    return ", ".join(parts) or "none"


@dataclass(frozen=True)
class ScenarioSpec:
    number: int
    title: str
    held: tuple[str, ...]  # generation labels whose closures the device holds (last = current)
    target: str  # generation label


SCENARIOS: tuple[ScenarioSpec, ...] = (
    ScenarioSpec(1, "config-only change", ("g0",), "g1"),
    ScenarioSpec(2, "application version bump", ("g1",), "g2"),
    ScenarioSpec(3, "shared library bump, dependents rebuilt", ("g1",), "g3"),
    ScenarioSpec(4, "large binary version bump", ("g1",), "g4"),
    ScenarioSpec(5, "2+3+4 together (channel bump)", ("g1",), "g5"),
    ScenarioSpec(6, "fresh install", (), "g5"),
    ScenarioSpec(7, "rollback, old generation still held", ("g1", "g5"), "g1"),
    ScenarioSpec(8, "rollback after the old generation was GC'd", ("g5",), "g1"),
    ScenarioSpec(9, "mass rebuild (base library hash only)", ("g5",), "g9"),
    ScenarioSpec(10, "pure-Python library patch release (.py + .pyc)", ("g1",), "g10"),
    ScenarioSpec(11, "C library patch release from source, two dependents", ("g1",), "g11"),
)


@dataclass(frozen=True)
class Scenario:
    """One benchmark case with store paths resolved."""

    number: int
    title: str
    held: tuple[str, ...]  # toplevel store paths the device holds (closures)
    target: str  # target toplevel store path


@dataclass
class Corpus:
    toplevels: dict[str, str]  # label -> toplevel store path
    inputs_dir: Path
    closures: dict[str, dict[str, PathInfo]] = field(default_factory=dict)

    def scenarios(self, only: Sequence[int] | None = None) -> list[Scenario]:
        return resolve_scenarios(self.toplevels, only)


def resolve_scenarios(toplevels: Mapping[str, str], only: Sequence[int] | None = None) -> list[Scenario]:
    out = []
    for spec in SCENARIOS:
        if only and spec.number not in only:
            continue
        held = tuple(toplevels[g] for g in spec.held)
        out.append(Scenario(spec.number, spec.title, held, toplevels[spec.target]))
    return out


# --- store names (pure) ------------------------------------------------------


def store_name(path: str) -> str:
    """`/nix/store/<hash>-ruff-0.6.8` -> `ruff-0.6.8` (the name without the hash)."""
    base = os.path.basename(path.rstrip("/"))
    if len(base) <= HASH_LEN + 1 or base[HASH_LEN] != "-":
        raise ValueError(f"not a store path: {path}")
    return base[HASH_LEN + 1 :]


def store_hash(path: str) -> str:
    return os.path.basename(path.rstrip("/"))[:HASH_LEN]


_VERSION_START = re.compile(r"-(?![A-Za-z])")


def split_name(name: str) -> tuple[str, str]:
    """Nix's parseDrvName: the version starts at the first '-' not followed by a letter."""
    m = _VERSION_START.search(name)
    if not m:
        return name, ""
    return name[: m.start()], name[m.end() :]


def missing_paths(target_closure: Mapping[str, PathInfo], held_closure: Mapping[str, PathInfo]) -> list[str]:
    """closure(target) minus closure(held), sorted."""
    return sorted(p for p in target_closure if p not in held_closure)


# --- building ----------------------------------------------------------------


def build(workdir: Path, executor: NixExecutor, *, log: bool = True) -> Corpus:
    """Fetch inputs, build every generation with Nix, return the toplevels (GC-rooted)."""
    inp = inputs_mod.fetch(workdir, log=log)
    gens = generations()
    gens_file = workdir / "generations.json"
    gens_file.write_text(json.dumps(gens, indent=1, sort_keys=True))
    roots = workdir / "roots"
    roots.mkdir(parents=True, exist_ok=True)
    labels = sorted(gens)
    argv = build_file_cmd(
        str(NIX_FILE),
        labels,
        argstr={"manifest": str(inp.manifest.resolve()), "gens": str(gens_file.resolve())},
        out_link=str(roots / "system"),
        options=executor.options,
    )
    outputs = parse_build_json(executor.run(argv, timeout=1800))
    toplevels = {label: out["out"] for label, out in zip(labels, outputs, strict=True)}
    return Corpus(toplevels=toplevels, inputs_dir=inp.dir)


def load_closures(corpus: Corpus, executor: NixExecutor) -> None:
    """Fill corpus.closures[label] with the closure of each generation's toplevel."""
    for label, top in corpus.toplevels.items():
        corpus.closures[label] = executor.closure([top])


def closure_of(paths: Sequence[str], executor: NixExecutor) -> dict[str, PathInfo]:
    return executor.closure(list(paths)) if paths else {}
