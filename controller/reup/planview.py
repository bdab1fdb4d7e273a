"""`reup plan`: a dry run of the next reconcile pass, with predicted stream bytes.

Called by controller_cli.py. Fetches and evaluates the branch head without
recording it, runs the pure planner against the recorded observed state, and for
each device that would be pushed asks the device for its status over SSH and
encodes the stream it would get (into the delta cache, so a following
`reup run` reuses it). Devices are not changed; with `--build` missing targets
are built into the local Nix store first, otherwise their bytes are unknown.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

from . import planner
from .config import Config
from .controller import Controller
from .errors import ReupError
from .model import Build, BuildResult, Desired, Push, Wait


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
