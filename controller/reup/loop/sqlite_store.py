"""The SQLite connection under the controller's state (`StateDB`): schema, lock, meta and revision keys.

One connection in WAL mode, guarded by a lock (the HTTP server reads from its thread); every query
goes through `_exec`, and writes to the tables the planner's inputs are cached from through `_write`
or `_tx`, which bump the version those caches are checked against. Base of state_reports.StateReports
and state.StateDB; nothing else uses it directly.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revisions(
  commit_id TEXT PRIMARY KEY, seen_at REAL NOT NULL, fleet_error TEXT, completed_at REAL);
CREATE TABLE IF NOT EXISTS targets(
  commit_id TEXT NOT NULL, device TEXT NOT NULL, wave TEXT NOT NULL, drv_path TEXT, toplevel TEXT,
  error TEXT, PRIMARY KEY(commit_id, device));
CREATE TABLE IF NOT EXISTS builds(
  drv_path TEXT PRIMARY KEY, commit_id TEXT NOT NULL, ok INTEGER NOT NULL, toplevel TEXT, error TEXT,
  seconds REAL, finished_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS devices(
  name TEXT PRIMARY KEY, wave TEXT NOT NULL DEFAULT 'default', state TEXT NOT NULL DEFAULT 'pending',
  target_toplevel TEXT, target_commit TEXT,
  acked_toplevel TEXT, acked_commit TEXT, acked_generation INTEGER, acked_at REAL,
  last_error TEXT, updated_at REAL,
  attempt_commit TEXT, attempt_toplevel TEXT, attempt_kind TEXT, attempt_error TEXT,
  attempt_failures INTEGER NOT NULL DEFAULT 0, retry_at REAL NOT NULL DEFAULT 0,
  active INTEGER NOT NULL DEFAULT 1, attempt_since REAL NOT NULL DEFAULT 0, attempt_at REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS history(
  id INTEGER PRIMARY KEY, device TEXT NOT NULL, commit_id TEXT, toplevel TEXT, generation INTEGER,
  result TEXT NOT NULL, error TEXT, stream_bytes INTEGER, nar_bytes INTEGER, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, device TEXT, data TEXT);
CREATE INDEX IF NOT EXISTS history_device ON history(device, commit_id);
CREATE INDEX IF NOT EXISTS history_at ON history(at);
CREATE INDEX IF NOT EXISTS events_device ON events(device);
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE INDEX IF NOT EXISTS devices_active ON devices(active, name);
"""



class SqliteStore:
    """The connection and its lock; every query goes through `_exec`, `_write` or `_tx`."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "reup.sqlite")
        self._lock = threading.RLock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(devices)")}
        for column in ("attempt_since", "attempt_at"):  # databases of the first controller version
            if column not in columns:
                self.db.execute(f"ALTER TABLE devices ADD COLUMN {column} REAL NOT NULL DEFAULT 0")
        # Bumped by every write to `devices` or `builds` (StateDB caches their rows against it).
        self._version = 0
        self._observed_states: dict[str, tuple[str, str | None]] | None = None  # from observed(), for set_states

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, tuple(args)).fetchall()

    def _write(self, sql: str, args: Iterable[Any] = ()) -> None:
        """A write to `devices` or `builds` (what `observed` caches)."""
        with self._lock:
            self._version += 1
            self.db.execute(sql, tuple(args))

    def _tx(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._version += 1
            self._observed_states = None  # every write of a state or error goes through here
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        rows = self._exec("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0]["value"]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def revision(self) -> tuple[str, float] | None:
        commit = self.get_meta("revision")
        if commit is None:
            return None
        rows = self._exec("SELECT seen_at FROM revisions WHERE commit_id=?", (commit,))
        return commit, float(rows[0]["seen_at"]) if rows else 0.0

    def log_event(self, kind: str, device: str | None, data: Mapping[str, Any], at: float | None = None) -> None:
        self._exec("INSERT INTO events(at, kind, device, data) VALUES(?, ?, ?, ?)",
                   (at if at is not None else time.time(), kind, device, json.dumps(data, default=str)))
