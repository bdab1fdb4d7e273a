"""`reup run`, `reup status`, `reup plan`, `reup init` and `reup demo`: the controller's subcommands.

Registered by cli.py through `register(subparsers)`. `run` drives controller.py
(with `--once` it exits when every device is settled: 0 if all are in sync);
`status` reads the SQLite state (no running controller needed); `plan` is a dry
run printing per device what would happen and the predicted stream bytes;
`demo` is demo.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .config import Config, load_config
from .errors import ConfigError, ReupError

if TYPE_CHECKING:
    from .state import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the GitOps controller")
    run.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    run.add_argument("--once", action="store_true",
                     help="reconcile until every device is in sync, failed or unreachable; exit 1 unless all in sync")
    run.add_argument("--shard", metavar="I/N",
                     help="manage only the devices of shard I of N (one replica per shard; docs/controller.md)")
    run.add_argument("--verbose", "-v", action="store_true")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="show the fleet's state")
    status.add_argument("--config", "-c", default="reup.toml")
    status.add_argument("--json", action="store_true", help="the same JSON as GET /api/status")
    status.set_defaults(func=cmd_status)

    plan = sub.add_parser("plan", help="dry run: what would happen to each device, and the predicted bytes")
    plan.add_argument("--config", "-c", default="reup.toml")
    plan.add_argument("--build", action="store_true", help="build missing targets (local store only) to predict bytes")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)

    init = sub.add_parser("init", help="start a fleet repo from the template (NixOS flake, fleet.toml, modules)")
    init.add_argument("dir", help="new or empty directory")
    init.add_argument("--offline", action="store_true",
                      help="the offline flavor: the same fleet from input-free derivations (no nixpkgs needed)")
    init.set_defaults(func=cmd_init)

    demo = sub.add_parser("demo", help="a local fleet of three simulated devices behind real sshd: install, "
                          "change, revert")
    demo.add_argument("--dir", help="work directory (default: a new temporary directory, removed at the end)")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=cmd_demo)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("asyncssh", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from .controller import Controller
    from .progress import TerminalProgress
    from .shard import parse_shard

    setup_logging(args.verbose)
    try:
        cfg = load_config(args.config)
        shard = parse_shard(args.shard) if args.shard else None
    except ConfigError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    ctrl = Controller(cfg, shard=shard)
    if sys.stderr.isatty():  # a progress bar instead of one log line per event
        ctrl.bus.subscribe(TerminalProgress())
        logging.getLogger("reup.events").setLevel(logging.WARNING)
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
        return rc
    except ReupError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
        ctrl.close()


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    devices = status["devices"]
    synced = sum(1 for d in devices if d["state"] == "in_sync")
    rev = (status.get("revision") or "none")[:12]
    lines = [f"revision {rev}: {synced}/{len(devices)} devices in sync"]
    if status.get("fleet_error"):
        lines.append(f"fleet.toml error: {status['fleet_error']}")
    from .rollout_cli import format_rollout

    lines += format_rollout(status)
    rows = [("DEVICE", "STATE", "WAVE", "GEN", "ACKNOWLEDGED", "TARGET", "UPDATED", "ERROR")]
    for d in devices:
        ago = f"{int(now - d['updated_at'])}s ago" if d.get("updated_at") else "-"
        err = (d.get("last_error") or "").strip().splitlines()
        rows.append((d["name"], d["state"], d["wave"], str(d.get("generation") or "-"), _short(d.get("acknowledged")),
                     _short(d.get("target")), ago, err[-1][:60] if err else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _short(path: str | None) -> str:
    if not path:
        return "-"
    base = path.rsplit("/", 1)[-1]
    return base[:8] + "…" + base[32:] if len(base) > 33 else base


@contextlib.contextmanager
def opened_store(config_path: str) -> Iterator[tuple[Config, Store]]:
    """The config and its state store, for the read-mostly commands (ConfigError: exit 2)."""
    from .state import Store

    cfg = load_config(config_path)
    store = Store(cfg.state.dir)
    try:
        yield cfg, store
    finally:
        store.close()


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with opened_store(args.config) as (_, store):
            status = store.status()
    except ConfigError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .planview import dry_run

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


def cmd_init(args: argparse.Namespace) -> int:
    from .nix import NixError
    from .template import init_fleet_repo

    try:
        commit = init_fleet_repo(args.dir, offline=args.offline)
    except (ConfigError, NixError) as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dir}: fleet repo at {commit[:12]}. Next: set each device's host and host_key in fleet.toml"
          + ("" if args.offline else ", the controller's key in hosts/common.nix")
          + ", commit, and point reup.toml's [source] url at it.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging(False)
    logging.getLogger("reup").setLevel(logging.WARNING)  # the demo prints its own live view
    return run_demo(args.dir, keep=args.keep)

