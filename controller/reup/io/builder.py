"""Evaluate and build device systems, and keep their GC roots: the controller's Nix executor.

Called by the reconcile loop (controller.py) and `reup plan`; every Nix call goes
through `reup.io.nix.NixExecutor`. `evaluate` makes one `nix eval` for the whole
fleet (drvPath and outPath of each device's toplevel); if that fails or a device
throws, each failing device is evaluated alone to get its own error text, so one
broken device never fails the others. `build` realises one drvPath with
`nix build --json --no-link`, keeping a failed build's output in
`<state>/logs`. `GcRoots` keeps one indirect root in `<state>/gcroots` per distinct
needed system (batched `nix-store --add-root` calls, only when the set changes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess

from reup.core.errors import PermanentError, TemporaryError
from reup.core.model import Fleet, Target
from reup.io.nix import (
    TOPLEVEL_OF_NAME_APPLY,
    TOPLEVELS_OF_NAMES_APPLY,
    NixError,
    NixExecutor,
    add_roots_cmd,
    parse_toplevels,
)

log = logging.getLogger(__name__)


def nix_error_text(exc: NixError) -> str:
    lines = [ln for ln in exc.stderr.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-12:]) or str(exc)


class Builder:
    def __init__(self, nix: NixExecutor, *, timeout: float = 3600.0, log_dir: str | None = None,
                 chunk: int = 2000) -> None:
        self.nix = nix
        self.chunk = max(1, chunk)
        self.timeout = timeout
        self.log_dir = log_dir

    def _save_log(self, drv_path: str, text: str) -> str | None:
        """Keep a failed build's whole Nix output as `<log_dir>/<drv name>.log`; returns the file."""
        if not self.log_dir:
            return None
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, os.path.basename(drv_path) + ".log")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def evaluate(self, flake: str, fleet: Fleet, commit: str) -> list[Target]:
        """One Target per device of `fleet` at `commit`: drvPath and toplevel, or the error.

        Each distinct configuration is evaluated once; names go to Nix as data in a file
        (`eval_names_json`), `chunk` configurations per `nix eval` so that memory stays bounded."""
        configs = sorted({dev.config for dev in fleet.devices.values()})
        results: dict[str, tuple[str, str] | str] = {}
        for i in range(0, len(configs), self.chunk):
            part = configs[i:i + self.chunk]
            try:
                value = self.nix.eval_names_json(f"{flake}#nixosConfigurations", TOPLEVELS_OF_NAMES_APPLY, part)
                found = parse_toplevels(value)
            except (NixError, ValueError) as exc:
                log.warning("evaluation of %d configurations failed, evaluating them one by one: %s", len(part), exc)
                found = {}
            for config in part:
                got = found.get(config)
                results[config] = got if got is not None else self._evaluate_one(flake, config)
        targets = []
        for name, dev in sorted(fleet.devices.items()):
            res = results[dev.config]
            if isinstance(res, str):
                targets.append(Target(name, commit, dev.wave, error=res))
            else:
                targets.append(Target(name, commit, dev.wave, res[0], res[1]))
        return targets

    def _evaluate_one(self, flake: str, config: str) -> tuple[str, str] | str:
        """(drvPath, outPath) of one configuration, or its evaluation error text."""
        try:
            value = self.nix.eval_names_json(f"{flake}#nixosConfigurations", TOPLEVEL_OF_NAME_APPLY, [config])
        except NixError as exc:
            return "evaluation failed: " + nix_error_text(exc)
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return str(value[0]), str(value[1])
        return f"evaluation failed: nixosConfigurations.{json.dumps(config, ensure_ascii=False)} has no usable toplevel"

    def build_many(self, drv_paths: list[str]) -> dict[str, str | PermanentError]:
        """Build many derivations with one `nix build --keep-going` (Nix schedules them: `max-jobs`,
        remote builders); {drv: output or its error}. If the batch fails, each unbuilt one is built
        alone for its own error (the others are then already valid: those builds are no-ops)."""
        if len(drv_paths) == 1:
            try:
                return {drv_paths[0]: self.build(drv_paths[0])}
            except PermanentError as exc:
                return {drv_paths[0]: exc}
        try:
            outputs = self.nix.build_drvs(drv_paths)
        except NixError as exc:
            log.warning("batch build of %d systems failed, building them one by one: %s", len(drv_paths),
                        nix_error_text(exc).splitlines()[-1:])
            out: dict[str, str | PermanentError] = {}
            for drv in drv_paths:
                try:
                    out[drv] = self.build(drv)
                except PermanentError as err:
                    out[drv] = err
            return out
        result: dict[str, str | PermanentError] = {}
        for drv in drv_paths:
            path = outputs.get(drv, {}).get("out")
            result[drv] = path if path else PermanentError(f"build of {drv} returned no 'out' output")
        return result

    def build(self, drv_path: str) -> str:
        """Build one derivation; return its output path. Build errors are permanent for the revision."""
        try:
            outputs = self.nix.build([drv_path])
        except NixError as exc:
            log_file = self._save_log(drv_path, exc.stderr)
            where = f" (full log: {log_file})" if log_file else ""
            raise PermanentError(f"build failed{where}: " + nix_error_text(exc)) from exc
        except subprocess.TimeoutExpired as exc:
            raise TemporaryError(f"build of {drv_path} timed out") from exc
        out = outputs[0].get("out") if outputs else None
        if not out:
            raise PermanentError(f"build of {drv_path} returned no 'out' output: {outputs!r}")
        return out


class GcRoots:
    """Indirect GC roots for the distinct systems the controller needs, one per store path.

    `sync(paths)` makes a fresh directory `<root_dir>/<n>/` whose links `r`, `r-2`, ... are made by one
    `nix-store --add-root <dir>/r --indirect --realise P...` per `batch` paths (so N devices sharing
    3 systems cost 3 roots and one call), records the set in `<n>/paths.json`, then drops the older
    directories (Nix forgets indirect roots whose link is gone). Nothing is done while the set is unchanged.
    """

    def __init__(self, nix: NixExecutor, root_dir: str, *, batch: int = 500) -> None:
        self.nix = nix
        self.dir = root_dir
        self.batch = max(1, batch)
        os.makedirs(root_dir, exist_ok=True)

    def _generations(self) -> list[int]:
        return sorted(int(n) for n in os.listdir(self.dir) if n.isdigit())

    def current(self) -> set[str]:
        """The store paths the newest complete root directory keeps."""
        for gen in reversed(self._generations()):
            try:
                with open(os.path.join(self.dir, str(gen), "paths.json"), encoding="utf-8") as f:
                    return set(json.load(f))
            except (OSError, ValueError):
                continue
        return set()

    def sync(self, needed: set[str]) -> tuple[list[str], list[str]]:
        """Keep exactly the existing paths of `needed` alive; returns (added, dropped) store paths."""
        have = self.current()
        keep = {p for p in needed if os.path.exists(p)}  # unbuilt: nothing to keep
        if keep == have:
            return [], []
        gens = self._generations()
        new = os.path.join(self.dir, str((gens[-1] if gens else 0) + 1))
        os.makedirs(new)
        ordered = sorted(keep)
        for i in range(0, len(ordered), self.batch):
            part = ordered[i:i + self.batch]
            self.nix.run(add_roots_cmd(part, os.path.join(new, f"r{i // self.batch}")))
        with open(os.path.join(new, "paths.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(ordered, f)
        os.replace(os.path.join(new, "paths.json.tmp"), os.path.join(new, "paths.json"))
        for gen in gens:  # the new set is rooted: the old links can go
            shutil.rmtree(os.path.join(self.dir, str(gen)), ignore_errors=True)
        for name in os.listdir(self.dir):  # roots of the first controller version: one link per device
            if os.path.islink(os.path.join(self.dir, name)):
                os.unlink(os.path.join(self.dir, name))
        return sorted(keep - have), sorted(have - keep)
