"""`reup export DEVICE... -o DIR` and `reup import DIR`: updates carried on a USB stick.

Export writes, for each device, the stream from its acknowledged generation to its target at the
current revision, signed with the controller's SSH key (reup.io.offline); the device applies it
with `reup-receive --from-file` and writes a signed receipt; import verifies each receipt against
the device's host key in fleet.toml and records a committed one as an acknowledgement, as a push
over SSH would. Registered by cli/main.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from reup.cli.common import setup_logging
from reup.config.reup_toml import load_config
from reup.core.errors import ConfigError, ReupError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    exp = sub.add_parser("export", help="write signed update bundles for devices to a directory (a USB stick)")
    exp.add_argument("devices", nargs="+", metavar="DEVICE", help="devices (names in fleet.toml) to write bundles for")
    exp.add_argument("-o", "--output", required=True, metavar="DIR", help="where to write them (the stick)")
    exp.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    exp.set_defaults(func=cmd_export)
    imp = sub.add_parser("import", help="record the signed receipts devices wrote to a directory (a USB stick)")
    imp.add_argument("directory", metavar="DIR", help="the directory (the stick) holding the receipts")
    imp.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    imp.set_defaults(func=cmd_import)


def cmd_export(args: argparse.Namespace) -> int:
    from reup.io.offline import write_bundle
    from reup.loop.controller import (
        Controller,  # only when run: `reup` starts fast for other commands
    )

    setup_logging()
    try:
        cfg = load_config(args.config)
        if not cfg.ssh.key:
            raise ConfigError("reup export signs with [ssh] key; none is configured")
        ctl = Controller(cfg)
        status = ctl.store.status()
        if status["revision"] is None:
            raise ConfigError("no revision yet: run the controller once first")
        fleet = ctl.load_fleet(status["revision"])
        rows = {d["name"]: d for d in status["devices"]}
        for name in args.devices:
            row = rows.get(name)
            if row is None or row["target"] is None:
                raise ConfigError(f"{name}: no built target at revision {status['revision'][:12]}")
            base = row["acknowledged"]
            entry = ctl.deltas.get([base] if base else [], row["target"])
            policy = fleet.rollout
            bundle = write_bundle(args.output, name, entry.path, key=cfg.ssh.key, sequence=time.time_ns(),
                                  toplevel=row["target"], commit=row["commit"], base=base, activate=policy.activation,
                                  confirm_timeout=policy.confirm_timeout, health_check=policy.health_check)
            print(f"{name}: {bundle.stream_bytes} bytes -> {bundle.envelope}")
    except (ReupError, OSError) as exc:
        print(f"reup export: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from reup.io.offline import read_receipts
    from reup.loop.controller import Controller

    setup_logging()
    try:
        cfg = load_config(args.config)
        ctl = Controller(cfg)
        status = ctl.store.status()
        if status["revision"] is None:
            raise ConfigError("no revision yet: run the controller once first")
        fleet = ctl.load_fleet(status["revision"])
        seen = set(json.loads(ctl.store.get_meta("offline_receipts") or "[]"))
        failed = 0
        for r in read_receipts(args.directory, {n: d.host_key for n, d in fleet.devices.items()}):
            key = f"{r.device}/{r.sequence}/{r.outcome}"
            if r.outcome == "invalid":
                failed += 1
                print(f"{r.device}: refused receipt: {r.error}")
                continue
            if key in seen:
                continue
            seen.add(key)
            now = time.time()
            if r.outcome == "committed" and r.commit and r.toplevel:
                ctl.store.record_ack(r.device, r.commit, r.toplevel, r.generation, now)
                print(f"{r.device}: acknowledged generation {r.generation} ({r.toplevel})")
            else:
                ctl.store.log_event("offline_receipt", r.device, {"outcome": r.outcome, "error": r.error,
                                                                  "sequence": r.sequence}, now)
                print(f"{r.device}: {r.outcome}: {r.error}")
        ctl.store.set_meta("offline_receipts", json.dumps(sorted(seen)))
    except (ReupError, OSError) as exc:
        print(f"reup import: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 1 if failed else 0
