"""`reup status [DEVICE]`: the fleet's state, or one device's whole story, from the SQLite state (no
running controller needed); and the tables that `reup run --once`, `reup rollout` and the demo print.

Registered by cli/main.py.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from reup.cli.common import ago, opened_store, render_table, when
from reup.core.errors import headline

HISTORY = 10  # recent events in `reup status DEVICE`


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="show the fleet's state, or one device's",
                            description="The fleet's state from the controller's state directory (no running "
                                        "controller needed); with DEVICE, that device's whole story.")
    status.add_argument("device", nargs="?", metavar="DEVICE",
                        help="one device: state, target, acknowledged, last error in full, recent events")
    status.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    status.add_argument("--json", action="store_true", help="print JSON: the same document as GET /api/status")
    status.set_defaults(func=cmd_status)


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    devices = status["devices"]
    synced = sum(1 for d in devices if d["state"] == "in_sync")
    rev = (status.get("revision") or "none")[:12]
    lines = [f"revision {rev}: {synced}/{len(devices)} devices in sync"]
    if status.get("fleet_error"):
        lines.append(f"fleet.toml error: {status['fleet_error']}")
    lines += format_rollout(status)
    rows = [(d["name"], d["state"], d["wave"], str(d.get("generation") or "-"), _short(d.get("acknowledged")),
             _short(d.get("target")), ago(d.get("updated_at"), now), headline(d.get("last_error")))
            for d in devices]
    lines.append(render_table(("DEVICE", "STATE", "WAVE", "GEN", "ACKNOWLEDGED", "TARGET", "UPDATED", "ERROR"),
                              rows))
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
        return lines + (["rollout paused (reup rollout resume)"] if status.get("paused") else [])
    lines.append(f"rollout {(r.get('revision') or 'none')[:12]}: wave {r.get('wave')} (#{r.get('wave_index')}), "
                 f"{100 * float(r.get('progress') or 0):.0f}% done, {r.get('failed')} failed of "
                 f"{r.get('executed')} executed" + (", paused" if r.get("paused") else ""))
    if r.get("halted"):
        lines.append(f"halted: {r['halted']}")
    for name, w in (r.get("waves") or {}).items():
        lines.append(f"  wave {name}: {w['committed']}/{w['devices']} committed, {w['failed']} failed, "
                     f"{w['updating']} updating")
    return lines


def event_row(e: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """(time, event, bytes, duration, detail) of one history event, for people."""
    d = e["data"]
    kind = e["kind"]
    size = dur = ""
    if kind == "DeviceStateChanged":
        name, detail = "state", f"{d.get('old') or 'new'} -> {d.get('new')}" + (
            f": {headline(d['reason'])}" if d.get("reason") else "")
    elif kind == "DeviceUpdated":
        name = f"update {d.get('result')}"
        detail = f"{str(d.get('commit'))[:12]} {_short(d.get('toplevel'))}" + (
            f": {headline(d['error'])}" if d.get("error") else "")
        size = str(d["stream_bytes"]) if d.get("stream_bytes") else ""
        dur = f"{float(d['seconds']):.1f}s" if d.get("seconds") else ""
    elif kind == "TransferFinished":
        name, detail = "sent", f"a full copy would be {d.get('nar_bytes')} bytes"
        size, dur = str(d.get("stream_bytes")), f"{float(d.get('seconds') or 0):.1f}s"
    else:
        name = kind
        detail = headline(str(d.get("error") or "")) or ", ".join(f"{k}={v}" for k, v in sorted(d.items())
                                                                     if k not in ("at", "device"))[:200]
    return when(e["at"]), name, size, dur, detail


def format_device(status: dict[str, Any], name: str, events: list[dict[str, Any]],
                  now: float | None = None) -> str:
    dev = next((d for d in status["devices"] if d["name"] == name), None)
    if dev is None:
        known = ", ".join(d["name"] for d in status["devices"][:10])
        raise LookupError(f"no device {name!r} in the current revision" + (f" (devices: {known}, ...)" if known
                                                                            else ""))
    lines = [f"device {name}: {dev['state']} (wave {dev['wave']}, updated {ago(dev.get('updated_at'), now)})",
             f"  target:       {dev.get('target') or '-'}" + (f" @ {dev['commit'][:12]}" if dev.get("commit") else ""),
             f"  acknowledged: {dev.get('acknowledged') or '-'}"
             + (f" (generation {dev['generation']})" if dev.get("generation") else "")]
    if dev.get("last_error"):
        lines.append("  last error:")
        lines += [f"    {ln}" for ln in str(dev["last_error"]).splitlines()]
    if events:
        lines.append(f"  recent events (last {min(HISTORY, len(events))} of {len(events)}):")
        table = render_table(("TIME", "EVENT", "BYTES", "DURATION", "DETAIL"),
                             [event_row(e) for e in events[-HISTORY:]])
        lines += [f"    {ln}" for ln in table.splitlines()]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    with opened_store(args.config) as (_, store):
        status = store.status()
        events = store.device_events(args.device) if args.device else []
    if args.device:
        dev = next((d for d in status["devices"] if d["name"] == args.device), None)
        if args.json:
            print(json.dumps({"device": dev, "events": events}, indent=1))
            return 0 if dev else 1
        try:
            print(format_device(status, args.device, events))
        except LookupError as exc:
            print(f"reup: {exc.args[0]}")
            return 1
        return 0
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0
