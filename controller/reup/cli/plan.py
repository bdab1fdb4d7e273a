"""`reup plan`: what a commit will do, before it happens.

With `--rev` (or `--base`, `--assume-base`, `--repo`, `--format markdown`) it plans
any revision of the fleet repo without contacting a device (cli/preview.py):
for a pull request's CI job, `--format markdown` is the comment to post.
Without them it is the dry run of the next reconcile pass described below.

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
from typing import TYPE_CHECKING, Any

from reup.cli.common import render_table
from reup.cli.preview import Source, plan_revision
from reup.config.reup_toml import Config, load_config
from reup.core import planner, preview
from reup.core.errors import ReupError, headline
from reup.core.model import Build, BuildResult, Desired, Push, Wait

if TYPE_CHECKING:
    from reup.loop.controller import Controller


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = sub.add_parser("plan", help="dry run: what would happen to each device, and the predicted bytes")
    plan.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    plan.add_argument("--build", action="store_true", help="build missing targets (local store only) to predict bytes")
    plan.add_argument("--json", action="store_true", help="same as --format json")
    plan.add_argument("--rev", help="plan this revision of the fleet repo (no SSH): branch, tag, HEAD~1, commit id")
    plan.add_argument("--base", help="...against the fleet as this revision left it (default: what the controller "
                                     "last knew, from its state directory)")
    plan.add_argument("--assume-base", metavar="TOPLEVEL", help="...against this system toplevel on every device")
    plan.add_argument("--repo", help="the fleet repo (default: source.url of --config)")
    plan.add_argument("--state", help="the controller's state directory (default: state.dir of --config, if present)")
    plan.add_argument("--format", choices=("table", "json", "markdown"), default=None,
                      help="table (default), json, or markdown for a pull-request comment")
    plan.set_defaults(func=cmd_plan)


def source_from_args(args: argparse.Namespace) -> Source:
    """The fleet repo and state dir from --repo/--state and the config (optional when --repo is given)."""
    cfg: Config | None = None
    if not args.repo or os.path.exists(args.config):
        cfg = load_config(args.config)
    url = os.path.abspath(args.repo) if args.repo else cfg.source.url if cfg else ""
    state = args.state or (cfg.state.dir if cfg else None)
    return Source(url, cfg.source.fleet_file if cfg else "fleet.toml", state,
                  tuple(sorted(cfg.build.nix_options.items())) if cfg else ())


def cmd_preview(args: argparse.Namespace, fmt: str) -> int:
    try:
        src = source_from_args(args)
        rev = args.rev or ("HEAD" if args.repo else load_config(args.config).source.branch)
        doc = plan_revision(src, rev, base=args.base, assume_base=args.assume_base, build=args.build)
    except ReupError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    if fmt == "json":
        print(json.dumps(doc, indent=1))
    elif fmt == "markdown":
        sys.stdout.write(preview.markdown(doc))
    else:
        sys.stdout.write(preview.table(doc))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if args.log_level == "info":  # the table is the output; records only when asked for
        logging.getLogger("reup").setLevel(logging.WARNING)
    fmt = args.format or ("json" if args.json else "table")
    if args.rev or args.base or args.assume_base or args.repo or args.state or fmt == "markdown":
        return cmd_preview(args, fmt)
    cfg = load_config(args.config)
    rows = dry_run(cfg, build=args.build)
    if fmt == "json":
        print(json.dumps(rows, indent=1))
    else:
        print(render_table(("DEVICE", "STATE", "ACTION", "PREDICTED BYTES", "FULL (NAR) BYTES", "REASON"),
                           [(r["device"], r["state"], r["action"], _num(r["stream_bytes"]), _num(r["nar_bytes"]),
                             headline(r["reason"])) for r in rows]))
    # A plan that ends in failures (evaluation, build, fleet.toml) is no plan to merge: exit 1, as `check`.
    return 1 if not rows or any(r["state"] == "failed" for r in rows) else 0


def _num(n: int | None) -> str:
    return "-" if n is None else str(n)


def dry_run(cfg: Config, *, build: bool = False) -> list[dict[str, Any]]:
    from reup.loop.controller import Controller  # asyncssh and all: only when planning

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
