"""`reup status`: the fleet's state from the SQLite state (no running controller needed), and the tables
that `reup run --once`, `reup rollout` and the demo print.

Registered by cli/main.py.
"""


from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from reup.cli.common import opened_store
from reup.core.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="show the fleet's state")
    status.add_argument("--config", "-c", default="reup.toml")
    status.add_argument("--json", action="store_true", help="the same JSON as GET /api/status")
    status.set_defaults(func=cmd_status)


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    devices = status["devices"]
    synced = sum(1 for d in devices if d["state"] == "in_sync")
    rev = (status.get("revision") or "none")[:12]
    lines = [f"revision {rev}: {synced}/{len(devices)} devices in sync"]
    if status.get("fleet_error"):
        lines.append(f"fleet.toml error: {status['fleet_error']}")
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


def format_rollout(status: dict[str, Any]) -> list[str]:
    r = status.get("rollout")
    lines = []
    if status.get("refused"):
        ref = status["refused"]
        lines.append(f"refused head {ref['revision'][:12]} ({ref['reason']}): {ref['error']}")
    if not r:
        return lines
    lines.append(f"rollout {(r.get('revision') or 'none')[:12]}: wave {r.get('wave')} (#{r.get('wave_index')}), "
                 f"{100 * float(r.get('progress') or 0):.0f}% done, {r.get('failed')} failed of "
                 f"{r.get('executed')} executed" + (", paused" if r.get("paused") else ""))
    if r.get("halted"):
        lines.append(f"halted: {r['halted']}")
    for name, w in (r.get("waves") or {}).items():
        lines.append(f"  wave {name}: {w['committed']}/{w['devices']} committed, {w['failed']} failed, "
                     f"{w['updating']} updating")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with opened_store(args.config) as (_, store):
            status = store.status()
    except ConfigError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


