"""`reup run`: the GitOps controller (loop/controller.py); with `--once` it exits when every device is
settled: 0 if all are in sync.

Registered by cli/main.py.
"""


from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from reup.cli.status import format_status
from reup.core.errors import ConfigError, ReupError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the GitOps controller")
    run.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    run.add_argument("--once", action="store_true",
                     help="reconcile until every device is settled (in sync, failed, unreachable) or blocked behind "
                          "a wave of unreachable devices; exit 1 unless all are in sync")
    run.add_argument("--shard", metavar="I/N",
                     help="manage only the devices of shard I of N (one replica per shard; docs/controller.md)")
    run.add_argument("--verbose", "-v", action="store_true", help="the same as --log-level debug")
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from reup.cli.progress import TerminalProgress
    from reup.config.reup_toml import load_config
    from reup.core.shard import parse_shard
    from reup.loop.controller import Controller

    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    try:
        cfg = load_config(args.config)
        shard = parse_shard(args.shard) if args.shard else None
    except ConfigError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    ctrl = Controller(cfg, shard=shard)
    if sys.stderr.isatty():  # a progress bar instead of one log line per event
        ctrl.bus.subscribe(TerminalProgress())
        logging.getLogger("reup.loop.events").setLevel(logging.WARNING)
    try:
        server = ctrl.start_http()
    except OSError as exc:
        print(f"reup: http.listen {cfg.http.listen}: {exc.strerror}", file=sys.stderr)
        ctrl.close()
        return 2
    try:
        rc = asyncio.run(ctrl.run(once=args.once))
        if args.once:
            print(format_status(ctrl.store.status()))
            if ctrl.blocked:
                waits = sorted(set(ctrl.blocked.values()))
                print(f"--once: {len(ctrl.blocked)} device(s) left pending, blocked: {'; '.join(waits)}")
        return rc
    except ReupError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
        ctrl.close()


