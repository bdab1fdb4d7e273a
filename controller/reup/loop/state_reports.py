"""What the controller's state says to people: `reup status`, `/api/status`, the fleet page, history.

Read-only queries over the state database (sqlite_store.py): pages of devices with filters, events
and push history, aggregates for the gauges, and what the fleet page shows. StateDB (state.py) adds the
writes and the planner's inputs; the loop, the web server and the CLI call these through it.
"""

from __future__ import annotations

import json
from typing import Any

from reup.loop.sqlite_store import SqliteStore


class StateReports(SqliteStore):
    def history(self, device: str | None = None) -> list[dict[str, Any]]:
        if device is None:
            rows = self._exec("SELECT * FROM history ORDER BY id")
        else:
            rows = self._exec("SELECT * FROM history WHERE device=? ORDER BY id", (device,))
        return [dict(r) for r in rows]

    def device_events(self, device: str) -> list[dict[str, Any]]:
        """The device's history: state changes, update outcomes and errors, oldest first."""
        rows = self._exec("SELECT * FROM events WHERE device=? ORDER BY id", (device,))
        return [{**dict(r), "data": json.loads(r["data"] or "{}")} for r in rows]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        rows = self._exec("SELECT * FROM events" + (" WHERE kind=?" if kind else "") + " ORDER BY id", (kind,) if kind else ())
        return [{**dict(r), "data": json.loads(r["data"] or "{}")} for r in rows]

    def status(self, *, offset: int = 0, limit: int | None = None, state: str | None = None,
               wave: str | None = None) -> dict[str, Any]:
        """The fleet's state for `reup status` and `/api/status`: a page of devices (by name; `offset`,
        `limit`), optionally only those in `state` and/or `wave`; `total` counts the matching devices."""
        rev = self.revision()
        paused = self.get_meta("rollout_paused") == "1"
        fleet_error = None
        if rev is not None:
            rows = self._exec("SELECT fleet_error FROM revisions WHERE commit_id=?", (rev[0],))
            fleet_error = rows[0]["fleet_error"] if rows else None
        where, args = "active=1", list[str]()
        if state is not None:
            where, args = where + " AND state=?", [*args, state]
        if wave is not None:
            where, args = where + " AND wave=?", [*args, wave]
        page = f" LIMIT {int(limit)} OFFSET {max(0, int(offset))}" if limit is not None else (
            f" LIMIT -1 OFFSET {int(offset)}" if offset else "")
        devices = [
            {
                "name": r["name"],
                "state": r["state"],
                "wave": r["wave"],
                "target": r["target_toplevel"],
                "acknowledged": r["acked_toplevel"],
                "commit": r["target_commit"],
                "acknowledged_commit": r["acked_commit"],
                "generation": r["acked_generation"],
                "last_error": r["last_error"],
                "updated_at": r["updated_at"],
            }
            for r in self._exec(f"SELECT * FROM devices WHERE {where} ORDER BY name{page}", args)
        ]
        total = len(devices) if limit is None and not offset else int(
            self._exec(f"SELECT COUNT(*) AS n FROM devices WHERE {where}", args)[0]["n"])
        return {
            "revision": rev[0] if rev else None,
            "revision_seen_at": rev[1] if rev else None,
            "fleet_error": fleet_error,
            # The pause as `reup rollout pause` left it, even before a controller's next pass.
            "rollout": _with_pause(json.loads(self.get_meta("rollout") or "null"), paused),
            "paused": paused,
            "refused": json.loads(self.get_meta("refused") or "null"),
            "total": total,
            "offset": offset,
            "devices": devices,
        }

    def device_rows(self) -> tuple[tuple[str, str, str, str], ...]:
        """(name, state, wave, acknowledged generation) of each active device, by name."""
        rows = self._exec("SELECT name, state, wave, acked_generation FROM devices WHERE active=1 ORDER BY name")
        return tuple((r[0], r[1], r[2], str(r[3] or "")) for r in rows)

    def state_counts(self) -> dict[tuple[str, str], int]:
        """{(state, wave): devices} of the active devices, counted by SQLite (the reup_devices gauge)."""
        rows = self._exec("SELECT state, wave, COUNT(*) AS n FROM devices WHERE active=1 GROUP BY state, wave")
        return {(str(r["state"]), str(r["wave"])): int(r["n"]) for r in rows}

    def toplevels_in_use(self) -> set[str]:
        """Each distinct system some active device targets or acknowledged (what GC roots keep)."""
        rows = self._exec("SELECT target_toplevel AS p FROM devices WHERE active=1 AND target_toplevel IS NOT NULL "
                          "UNION SELECT acked_toplevel FROM devices WHERE active=1 AND acked_toplevel IS NOT NULL")
        return {str(r["p"]) for r in rows}

    def bytes_sent(self) -> dict[str, int]:
        """{device: stream bytes of its last update that sent any}."""
        rows = self._exec("SELECT device, stream_bytes FROM history WHERE id IN (SELECT MAX(id) FROM history "
                          "WHERE stream_bytes IS NOT NULL AND stream_bytes > 0 GROUP BY device)")
        return {str(r["device"]): int(r["stream_bytes"]) for r in rows}

    def recent_device_events(self, device: str, limit: int = 50) -> list[dict[str, Any]]:
        """The device's last `limit` events, oldest first."""
        rows = self._exec("SELECT * FROM (SELECT * FROM events WHERE device=? ORDER BY id DESC LIMIT ?) ORDER BY id",
                          (device, limit))
        return [{**dict(r), "data": json.loads(r["data"] or "{}")} for r in rows]



def _with_pause(rollout: dict[str, Any] | None, paused: bool) -> dict[str, Any] | None:
    return None if rollout is None else {**rollout, "paused": paused}
