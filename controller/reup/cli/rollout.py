"""`reup rollout status|pause|resume` and `reup history DEVICE`: the rollout's controls and a device's history.

Registered by cli.py. They work on the state database (no running controller
needed): `pause` and `resume` are read by the controller on its next pass (and
a running controller is nudged through `POST /webhook` on `[http] listen`);
`resume` also lifts a halt of the current revision (failures before it no
longer count towards `failure_threshold`; quarantined devices stay so until a
new commit). `history` lists the device's events: state changes, update
outcomes and errors, oldest first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import urllib.request
from typing import TYPE_CHECKING

from reup.cli.common import opened_store, render_table
from reup.cli.status import event_row, format_rollout

if TYPE_CHECKING:
    from reup.config.reup_toml import Config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = sub.add_parser("rollout", help="show, pause or resume the rollout of the current revision")
    rollout.add_argument("action", choices=("status", "pause", "resume"), metavar="ACTION",
                         help="status: show the rollout; pause: no device starts an update; resume: go on "
                              "(also lifts a failure-threshold halt of the current revision)")
    rollout.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    rollout.add_argument("--json", action="store_true", help="print JSON")
    rollout.set_defaults(func=cmd_rollout)

    history = sub.add_parser("history", help="a device's state changes and update outcomes")
    history.add_argument("device", metavar="DEVICE", help="the device's name in fleet.toml")
    history.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    history.add_argument("--json", action="store_true", help="print the raw events as JSON")
    history.set_defaults(func=cmd_history)


def _nudge(cfg: Config) -> None:
    """Wake a running controller (best effort)."""
    if cfg.http.listen:
        host, port = cfg.http.host_port
        req = urllib.request.Request(f"http://{host}:{port}/webhook", data=b"{}", method="POST")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=2).close()


def cmd_rollout(args: argparse.Namespace) -> int:
    with opened_store(args.config) as (cfg, store):
        if args.action != "status":
            rev = store.revision()
            store.pause_rollout(args.action == "pause", time.time(), rev[0] if rev else None)
            _nudge(cfg)
        status = store.status()
    if args.json:
        print(json.dumps({"rollout": status["rollout"], "refused": status["refused"], "paused": status["paused"]},
                         indent=1))
    else:
        lines = format_rollout(status) or ["no rollout yet"]
        if args.action != "status":
            lines.insert(0, "paused" if status["paused"] else "resumed")
        print("\n".join(lines))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with opened_store(args.config) as (_, store):
        events = store.device_events(args.device)
    if args.json:
        print(json.dumps(events, indent=1))
        return 0
    if not events:
        print(f"reup: no history for {args.device}", file=sys.stderr)
        return 1
    print(render_table(("TIME", "EVENT", "BYTES", "DURATION", "DETAIL"), [event_row(e) for e in events]))
    return 0
