"""Gathering the facts of a plan without devices: `reup plan --rev` and `reup check`.

Called by cli/plan.py and cli/check.py. Reads the fleet repo at any revision
(io/revisions.py), evaluates every device with the controller's own Builder,
takes each device's base from the `--base` revision, an `--assume-base` toplevel
or what the controller last knew (its state directory, read-only), and predicts
stream bytes with the real encoder for targets already in the local store (or
built with `--build`). No SSH: this runs in a pull request's CI job.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from reup.config.fleet_toml import parse_fleet
from reup.core import preview
from reup.core.errors import ConfigError, ReupError, headline
from reup.core.model import Fleet, Target
from reup.delta.cache import DeltaCache, nix_encoder
from reup.io.builder import Builder
from reup.io.nix import NixExecutor
from reup.io.revisions import Revisions


@dataclass(frozen=True)
class Source:
    """Where a plan reads from: the fleet repo, its fleet file, the controller's state dir (if any)."""

    url: str
    fleet_file: str = "fleet.toml"
    state_dir: str | None = None
    nix_options: tuple[tuple[str, str], ...] = ()


@contextlib.contextmanager
def workspace(src: Source) -> Iterator[tuple[Revisions, str]]:
    """The revisions mirror and a delta cache dir: in the state dir when there is one, else temporary."""
    with tempfile.TemporaryDirectory(prefix="reup-plan-") as tmp:
        base = src.state_dir if src.state_dir and os.path.isdir(src.state_dir) else tmp
        yield Revisions(src.url, os.path.join(base, "plan-repo.git")), os.path.join(base, "deltas")


def load_fleet(revs: Revisions, commit: str, fleet_file: str) -> Fleet:
    text = revs.read_file(commit, fleet_file)
    if text is None:
        raise ConfigError(f"{fleet_file}: missing at {commit[:12]}")
    return parse_fleet(text, where=fleet_file)


def evaluate(revs: Revisions, builder: Builder, commit: str, fleet_file: str) -> tuple[Fleet, list[Target]]:
    fleet = load_fleet(revs, commit, fleet_file)
    return fleet, builder.evaluate(revs.flake_ref(commit), fleet, commit)


def acknowledged(state_dir: str | None) -> dict[str, str]:
    """{device: acknowledged toplevel} as the controller last recorded it (read-only; {} without state)."""
    path = os.path.join(state_dir, "reup.sqlite") if state_dir else ""
    if not path or not os.path.exists(path):
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT name, acked_toplevel FROM devices WHERE acked_toplevel IS NOT NULL").fetchall()
    finally:
        db.close()
    return {str(n): str(t) for n, t in rows}


def plan_revision(src: Source, rev: str, *, base: str | None = None, assume_base: str | None = None,
                  build: bool = False) -> dict[str, Any]:
    """The plan of `rev` (see reup.core.preview.report)."""
    nix = NixExecutor(options=dict(src.nix_options))
    builder = Builder(nix)
    with workspace(src) as (revs, delta_dir):
        commit = revs.resolve(rev)
        fleet, targets = evaluate(revs, builder, commit, src.fleet_file)
        base_info: dict[str, Any] | None = None
        removed: list[str] = []
        if base is not None:
            base_commit = revs.resolve(base)
            base_fleet, base_targets = evaluate(revs, builder, base_commit, src.fleet_file)
            bases = {t.device: (t.toplevel, t.drv_path) for t in base_targets if t.error is None}
            removed = sorted(set(base_fleet.devices) - set(fleet.devices))
            base_info = _info(revs, base_commit)
            origin = "base"
        elif assume_base is not None:
            bases = {t.device: (assume_base, None) for t in targets}
            origin = "assume"
        else:
            bases = {d: (p, None) for d, p in acknowledged(src.state_dir).items()}
            origin = "state"
        facts = []
        for t in targets:
            b, b_drv = bases.get(t.device, (None, None))
            f = preview.DeviceFacts(t, b, origin if b else None)
            if t.error is None and preview.change_of(f) != preview.UNCHANGED:
                f = _predict(f, b_drv, builder, DeltaCache(delta_dir, nix_encoder(nix)), build)
            else:
                f = replace(f, built=t.toplevel is not None and os.path.exists(t.toplevel))
            facts.append(f)
        return preview.report(_info(revs, commit), facts, fleet.rollout.waves, base=base_info,
                              assume_base=assume_base, removed=removed)


def _info(revs: Revisions, commit: str) -> dict[str, Any]:
    i = revs.info(commit)
    return {"commit": i.commit, "author": i.author, "message": i.message, "time": i.time}


def _predict(f: preview.DeviceFacts, base_drv: str | None, builder: Builder, deltas: DeltaCache,
             build: bool) -> preview.DeviceFacts:
    t = f.target
    assert t.toplevel is not None and t.drv_path is not None
    built = os.path.exists(t.toplevel)
    if not built and build:
        try:
            builder.build(t.drv_path)
            built = True
        except ReupError as exc:
            return replace(f, note="build failed: " + headline(str(exc)))
    if not built:
        return replace(f, note="not built")
    if f.base is not None and not os.path.exists(f.base) and build and base_drv:
        with contextlib.suppress(ReupError):
            builder.build(base_drv)
    if f.base is not None and not os.path.exists(f.base):
        return replace(f, built=True, note="base not in the local store")
    try:
        entry = deltas.get((f.base,) if f.base else (), t.toplevel)
    except (ReupError, OSError, RuntimeError) as exc:  # NixError is a RuntimeError
        return replace(f, built=True, note=f"cannot encode: {headline(str(exc))}")
    return replace(f, built=True, stream_bytes=entry.stream_bytes, full_bytes=entry.nar_bytes)
