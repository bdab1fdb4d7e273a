"""`reup plan`: a dry run of the next reconcile pass, with predicted stream bytes.

Dispatched by cli/main.py. Fetches and evaluates the branch head without
recording it, runs the pure planner against the recorded observed state, and for
each device that would be pushed asks the device for its status over SSH and
encodes the stream it would get (into the delta cache, so a following
`reup run` reuses it). Devices are not changed; with `--build` missing targets
are built into the local Nix store first, otherwise their bytes are unknown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import replace
from typing import Any

from reup.cli.common import setup_logging
from reup.config.reup_toml import Config, load_config
from reup.core import planner
from reup.core.errors import ReupError
from reup.core.model import Build, BuildResult, Desired, Push, Wait
from reup.loop.controller import Controller


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = sub.add_parser("plan", help="dry run: what would happen to each device, and the predicted bytes")
    plan.add_argument("--config", "-c", default="reup.toml")
    plan.add_argument("--build", action="store_true", help="build missing targets (local store only) to predict bytes")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    setup_logging(False)
    logging.getLogger("reup").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config)
        rows = dry_run(cfg, build=args.build)
    except ReupError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        table = [("DEVICE", "STATE", "ACTION", "PREDICTED BYTES", "FULL (NAR) BYTES", "REASON")]
        for r in rows:
            table.append((r["device"], r["state"], r["action"], _num(r["stream_bytes"]), _num(r["nar_bytes"]),
                          (r["reason"] or "").strip().splitlines()[-1][:70] if r["reason"] else ""))
        widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table))
    return 0


def _num(n: int | None) -> str:
    return "-" if n is None else str(n)


def dry_run(cfg: Config, *, build: bool = False) -> list[dict[str, Any]]:
    ctrl = Controller(cfg)
    try:
        return asyncio.run(_dry_run(ctrl, build))
    finally:
        ctrl.close()


async def _dry_run(ctrl: Controller, build: bool) -> list[dict[str, Any]]:
    head = await asyncio.to_thread(ctrl.source.fetch)
    fleet, targets, _ = await asyncio.to_thread(ctrl.evaluate, head)
    ctrl.fleet = fleet or ctrl.fleet
    desired = Desired(head, ctrl.clock(), {t.device: t for t in targets})
    observed = ctrl.observe()
    extra = dict(observed.builds)
    for t in targets:  # already in the local store (built before, or by an earlier `plan --build`)
        if t.drv_path and t.toplevel and t.drv_path not in extra and os.path.exists(t.toplevel):
            extra[t.drv_path] = BuildResult(t.drv_path, head, True, t.toplevel)
    if build:
        for t in targets:
            if t.drv_path and t.drv_path not in extra:
                try:
                    out = await asyncio.to_thread(ctrl.builder.build, t.drv_path)
                    extra[t.drv_path] = BuildResult(t.drv_path, head, True, out)
                except ReupError as exc:
                    extra[t.drv_path] = BuildResult(t.drv_path, head, False, None, str(exc))
    observed = replace(observed, builds=extra)
    plan = planner.plan(desired, observed, ctrl.policy, ctrl.clock())
    rows = []
    for name, d in sorted(plan.decisions.items()):
        action = ("push" if isinstance(d.action, Push) else "build" if isinstance(d.action, Build)
                  else "wait" if isinstance(d.action, Wait) else "none")
        row: dict[str, Any] = {"device": name, "state": str(d.state), "action": action, "reason": d.reason,
                               "stream_bytes": None, "nar_bytes": None}
        if isinstance(d.action, Push) and ctrl.fleet and name in ctrl.fleet.devices:
            try:
                status = await ctrl.pusher.status(ctrl.fleet.devices[name])
                if status.current == d.action.toplevel:
                    row.update(action="adopt", stream_bytes=0, nar_bytes=0)
                else:
                    held = tuple(p for p in status.paths if os.path.exists(p))
                    entry = await asyncio.to_thread(ctrl.deltas.get, held, d.action.toplevel, status.staged, (),
                                                    status.codecs)
                    row.update(stream_bytes=entry.stream_bytes, nar_bytes=entry.nar_bytes)
            except ReupError as exc:
                row["reason"] = f"cannot predict: {exc}"
        rows.append(row)
    return rows
