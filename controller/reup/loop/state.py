"""The controller's durable state: one SQLite database (WAL) in the state directory.

Holds revisions (commits seen), targets (per commit and device: drvPath,
toplevel or error), builds (per drvPath), devices (state, acknowledged
generation, last failed attempt and its retry time), history (every push
outcome) and events. Written by the reconcile loop (controller.py) after each
executor outcome, so that after `kill -9` a restart carries on from here; read by
`reup status`, `/api/status` and the planner's inputs (`desired`, `observed`).
Thread-safe: one connection guarded by a lock (the HTTP server reads from its thread).
The connection and schema are in sqlite_store.py, the read-only reports (status pages,
history, events) in state_reports.py; this module adds the writes and the planner's inputs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from reup.core.errors import bounded
from reup.core.model import (
    Attempt,
    AttemptKind,
    BuildResult,
    Decision,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    RolloutControl,
    Target,
)
from reup.loop.state_reports import StateReports


class StateDB(StateReports):
    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self._desired: Desired | None = None  # the current revision's targets: they change only in record_revision
        # Rows of devices and builds as observed() last read them, valid while `_version` (bumped by every
        # write to those tables) is unchanged: a pass reads each table once, however often it asks.
        self._rows: tuple[int, list[sqlite3.Row], list[sqlite3.Row]] | None = None
        # What changed since the loop last asked (`take_changes`): the devices whose planner inputs this
        # connection wrote, the builds, or everything (a new revision, a reset, another process's write).
        self._changed: set[str] = set()
        self._changed_all = True
        self._builds_changed: set[str] = set()
        self._data_version: int | None = None

    # --- revisions ------------------------------------------------------------

    def has_targets(self, commit: str) -> bool:
        return bool(self._exec("SELECT 1 FROM revisions WHERE commit_id=?", (commit,)))

    def record_revision(self, commit: str, seen_at: float, targets: Iterable[Target], fleet_error: str | None) -> None:
        """Store the evaluated targets of `commit` and make it the current revision, atomically."""
        stmts: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT OR REPLACE INTO revisions(commit_id, seen_at, fleet_error) VALUES(?, ?, ?)", (commit, seen_at, fleet_error)),
            ("DELETE FROM targets WHERE commit_id=?", (commit,)),
        ]
        names = []
        for t in targets:
            names.append(t.device)
            stmts.append((
                "INSERT INTO targets(commit_id, device, wave, drv_path, toplevel, error) VALUES(?, ?, ?, ?, ?, ?)",
                (commit, t.device, t.wave, t.drv_path, t.toplevel, t.error),
            ))
            stmts.append((
                "INSERT INTO devices(name, wave, state, target_toplevel, target_commit, updated_at) VALUES(?, ?, 'pending', ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET wave=excluded.wave, target_toplevel=excluded.target_toplevel, "
                "target_commit=excluded.target_commit, active=1",
                (t.device, t.wave, t.toplevel, commit, seen_at),
            ))
        marks = ",".join("?" * len(names))
        stmts.append((f"UPDATE devices SET active=0 WHERE name NOT IN ({marks})", tuple(names)))
        stmts.append(("INSERT INTO meta(key, value) VALUES('revision', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (commit,)))
        self._desired = None
        self._tx(stmts)
        self._changed_all = True

    def complete_revision(self, commit: str, at: float) -> bool:
        """Mark `commit` fully rolled out; True the first time."""
        rows = self._exec("SELECT completed_at FROM revisions WHERE commit_id=?", (commit,))
        if not rows or rows[0]["completed_at"] is not None:
            return False
        self._exec("UPDATE revisions SET completed_at=? WHERE commit_id=?", (at, commit))
        return True

    # --- planner inputs -------------------------------------------------------

    def desired(self, commit: str | None = None) -> Desired:
        """The targets of `commit` (default: the current revision, read from SQLite once per revision)."""
        if commit is None:
            cached = self._desired
            if cached is not None and cached.commit == self.get_meta("revision"):
                return cached
            rev = self.revision()
            if rev is None:
                return Desired(commit=None)
            commit, seen_at = rev
        else:
            rows = self._exec("SELECT seen_at FROM revisions WHERE commit_id=?", (commit,))
            seen_at = float(rows[0]["seen_at"]) if rows else 0.0
        rows = self._exec("SELECT * FROM targets WHERE commit_id=? ORDER BY device", (commit,))
        targets = {
            r["device"]: Target(r["device"], commit, r["wave"], r["drv_path"], r["toplevel"], r["error"]) for r in rows
        }
        desired = Desired(commit=commit, seen_at=seen_at, targets=MappingProxyType(targets))
        if commit == self.get_meta("revision"):
            self._desired = desired
        return desired

    def observed(self, busy: Mapping[str, DeviceState], building: Iterable[str] = ()) -> Observed:
        devices = {}
        states = {}
        with self._lock:
            if self._rows is None or self._rows[0] != self._version:
                self._rows = (self._version, self._exec("SELECT * FROM devices WHERE active=1"),
                              self._exec("SELECT * FROM builds"))
            device_rows, build_rows = self._rows[1], self._rows[2]
        for r in device_rows:
            states[r["name"]] = (r["state"], r["last_error"])
            devices[r["name"]] = _observation(r, busy.get(r["name"]))
        builds = {
            r["drv_path"]: _build_result(r) for r in build_rows
        }
        with self._lock:
            self._observed_states = states  # the pass's set_states compares with these, unless a write came between
        return Observed(devices=devices, builds=builds, building=frozenset(building), control=self.rollout_control())

    def rollout_control(self) -> RolloutControl:
        resumed = json.loads(self.get_meta("rollout_resumed") or "{}")
        return RolloutControl(paused=self.get_meta("rollout_paused") == "1", resumed_commit=resumed.get("commit"),
                              resumed_at=float(resumed.get("at") or 0.0))

    def take_changes(self) -> tuple[set[str] | None, set[str]]:
        """(devices whose planner inputs changed since the last call, or None: maybe any; build results
        changed since), for the incremental planner. Another process's write to the database (SQLite's
        data_version) counts as any."""
        with self._lock:
            version = int(self.db.execute("PRAGMA data_version").fetchone()[0])
            names: set[str] | None = self._changed
            if self._changed_all or version != self._data_version:
                names = None
            builds = self._builds_changed
            self._changed, self._builds_changed, self._changed_all = set(), set(), False
            self._data_version = version
            return names, builds

    def _mark(self, device: str | None = None, build: str | None = None) -> None:
        """Note a write to a device's planner inputs or a build result, for the next take_changes
        (under the lock it swaps them under: an executor thread's mark is never lost)."""
        with self._lock:
            if device is not None:
                self._changed.add(device)
            if build is not None:
                self._builds_changed.add(build)

    def _rows_of(self, select: str, names: Iterable[str], where: str = "", key: str = "name") -> list[sqlite3.Row]:
        """Rows of `select` for the given keys, by primary key, in chunks (SQLite's variable limit)."""
        keys = list(names)
        out: list[sqlite3.Row] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            out += self._exec(f"{select} WHERE {where}{key} IN ({','.join('?' * len(chunk))})", chunk)
        return out

    def observations(self, names: Iterable[str] | None = None) -> dict[str, DeviceObservation]:
        """The planner's view of the given active devices (all active ones: None), busy left unset."""
        rows = (self._exec("SELECT * FROM devices WHERE active=1") if names is None
                else self._rows_of("SELECT * FROM devices", names, "active=1 AND "))
        return {r["name"]: _observation(r, None) for r in rows}

    def build_results(self, drvs: Iterable[str] | None = None) -> dict[str, BuildResult]:
        """Build results of the given drv paths (all: None)."""
        rows = (self._exec("SELECT * FROM builds") if drvs is None
                else self._rows_of("SELECT * FROM builds", drvs, key="drv_path"))
        return {r["drv_path"]: _build_result(r) for r in rows}

    def pause_rollout(self, paused: bool, at: float, commit: str | None = None) -> None:
        """`reup rollout pause` (paused) or `resume` (also lifts a halt of `commit` from now on)."""
        self.set_meta("rollout_paused", "1" if paused else "0")
        if not paused and commit:
            self.set_meta("rollout_resumed", json.dumps({"commit": commit, "at": at}))

    # --- executor outcomes ----------------------------------------------------

    def record_build(self, result: BuildResult, seconds: float, at: float) -> None:
        self._mark(build=result.drv_path)
        self._write(
            "INSERT OR REPLACE INTO builds(drv_path, commit_id, ok, toplevel, error, seconds, finished_at) VALUES(?, ?, ?, ?, ?, ?, ?)",
            (result.drv_path, result.commit, int(result.ok), result.toplevel, result.error, seconds, at),
        )

    def forget_build(self, drv_path: str) -> None:
        self._mark(build=drv_path)
        self._write("DELETE FROM builds WHERE drv_path=?", (drv_path,))

    def record_ack(self, device: str, commit: str, toplevel: str, generation: int | None, at: float,
                   stream_bytes: int = 0, nar_bytes: int = 0, result: str = "committed") -> None:
        self._mark(device)
        self._tx([
            ("UPDATE devices SET acked_toplevel=?, acked_commit=?, acked_generation=?, acked_at=?, state='in_sync', "
             "last_error=NULL, updated_at=?, attempt_commit=NULL, attempt_toplevel=NULL, attempt_kind=NULL, "
             "attempt_error=NULL, attempt_failures=0, retry_at=0 WHERE name=?",
             (toplevel, commit, generation, at, at, device)),
            ("INSERT INTO history(device, commit_id, toplevel, generation, result, stream_bytes, nar_bytes, at) "
             "VALUES(?, ?, ?, ?, ?, ?, ?, ?)", (device, commit, toplevel, generation, result, stream_bytes, nar_bytes, at)),
        ])

    def record_failure(self, device: str, commit: str, toplevel: str, kind: AttemptKind, error: str, at: float,
                       retry_delay: Callable[[int], float] | float, generation: int | None = None) -> int:
        """Record a failed push; returns the consecutive failures of this (commit, toplevel)."""
        rows = self._exec("SELECT attempt_commit, attempt_toplevel, attempt_failures, attempt_kind, attempt_since "
                          "FROM devices WHERE name=?", (device,))
        same = bool(rows) and rows[0]["attempt_commit"] == commit and rows[0]["attempt_toplevel"] == toplevel
        failures = (int(rows[0]["attempt_failures"]) if same else 0) + 1
        since = float(rows[0]["attempt_since"]) if same and rows[0]["attempt_kind"] == kind else at
        delay = retry_delay(failures) if callable(retry_delay) else retry_delay
        self._mark(device)
        self._tx([
            ("UPDATE devices SET attempt_commit=?, attempt_toplevel=?, attempt_kind=?, attempt_error=?, "
             "attempt_failures=?, retry_at=?, last_error=?, updated_at=?, attempt_since=?, attempt_at=? WHERE name=?",
             (commit, toplevel, str(kind), bounded(error), failures, at + delay, bounded(error), at, since, at, device)),
            ("INSERT INTO history(device, commit_id, toplevel, generation, result, error, at) VALUES(?, ?, ?, ?, ?, ?, ?)",
             (device, commit, toplevel, generation, str(kind), error, at)),
        ])
        return failures

    def attempt_generation(self, device: str, commit: str, toplevel: str, kind: AttemptKind) -> int | None:
        """The generation the device gave the last `kind` outcome of (commit, toplevel), if it said."""
        rows = self._exec("SELECT generation FROM history WHERE device=? AND commit_id=? AND toplevel=? AND result=? "
                          "ORDER BY id DESC LIMIT 1", (device, commit, toplevel, str(kind)))
        return int(rows[0]["generation"]) if rows and rows[0]["generation"] is not None else None

    def set_retry(self, device: str, at: float) -> None:
        self._mark(device)
        self._write("UPDATE devices SET retry_at=? WHERE name=?", (at, device))

    def device_state(self, device: str) -> str | None:
        rows = self._exec("SELECT state FROM devices WHERE name=?", (device,))
        return str(rows[0]["state"]) if rows else None

    def reset_retry_timers(self) -> None:
        """On start-up every device gets one immediate attempt (quarantined revisions stay)."""
        kept = [str(k) for k in AttemptKind if k.quarantines]
        self._write(f"UPDATE devices SET retry_at=0 WHERE attempt_kind NOT IN ({','.join('?' * len(kept))})", kept)
        self._changed_all = True

    def set_states(self, decisions: Iterable[Decision], at: float) -> list[tuple[str, str, str]]:
        """Persist each device's planned state; returns (device, old, new) for those that changed."""
        changed = []
        with self._lock:
            current = self._observed_states
            self._observed_states = None
        decisions = list(decisions)
        if current is None:  # only these devices' rows (a pass of the incremental planner gives the changed ones)
            current = {r["name"]: (r["state"], r["last_error"]) for r in self._rows_of(
                "SELECT name, state, last_error FROM devices", [d.device for d in decisions])}
        stmts: list[tuple[str, tuple[Any, ...]]] = []
        for d in decisions:
            old, old_err = current.get(d.device, ("", None))
            err = bounded(d.reason) if d.state in (DeviceState.FAILED, DeviceState.UNREACHABLE, DeviceState.ROLLED_BACK,
                                          DeviceState.HALTED) else (
                old_err if d.state == DeviceState.PENDING else None)
            if old != d.state or err != old_err:
                stmts.append(("UPDATE devices SET state=?, last_error=?, updated_at=? WHERE name=?", (str(d.state), err, at, d.device)))
                if old != d.state:
                    changed.append((d.device, old, str(d.state)))
        if stmts:
            self._tx(stmts)
        return changed

    # --- retention ------------------------------------------------------------

    def prune(self, now: float, *, keep_days: float = 30.0, keep_revisions: int = 100) -> dict[str, int]:
        """Drop events and history older than `keep_days`, and the targets (and builds) of revisions beyond
        the newest `keep_revisions`; the current revision and what devices acknowledged stay. Returns counts."""
        cutoff = now - keep_days * 86400.0
        current = self.get_meta("revision") or ""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                events = self.db.execute("DELETE FROM events WHERE at < ?", (cutoff,)).rowcount
                history = self.db.execute("DELETE FROM history WHERE at < ?", (cutoff,)).rowcount
                old = [r["commit_id"] for r in self.db.execute(
                    "SELECT commit_id FROM revisions WHERE commit_id != ? ORDER BY seen_at DESC LIMIT -1 OFFSET ?",
                    (current, max(0, keep_revisions - 1)))]
                targets = 0
                for commit in old:
                    targets += self.db.execute("DELETE FROM targets WHERE commit_id=?", (commit,)).rowcount
                    self.db.execute("DELETE FROM builds WHERE commit_id=? AND drv_path NOT IN "
                                    "(SELECT drv_path FROM targets WHERE drv_path IS NOT NULL)", (commit,))
                    self.db.execute("DELETE FROM revisions WHERE commit_id=?", (commit,))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            if targets:
                self._changed_all = True  # builds of old revisions went
        return {"events": events, "history": history, "revisions": len(old), "targets": targets}


def _build_result(r: sqlite3.Row) -> BuildResult:
    return BuildResult(r["drv_path"], r["commit_id"], bool(r["ok"]), r["toplevel"], r["error"])


def _observation(r: sqlite3.Row, busy: DeviceState | None) -> DeviceObservation:
    attempt = None
    if r["attempt_kind"]:
        attempt = Attempt(r["attempt_commit"], r["attempt_toplevel"], AttemptKind(r["attempt_kind"]), r["attempt_error"] or "",
                          r["attempt_failures"], r["retry_at"], r["attempt_since"], r["attempt_at"])
    return DeviceObservation(r["name"], r["acked_toplevel"], r["acked_commit"], busy, attempt, r["acked_at"])
