"""The device's Nix database, when it has one (`nix/var/nix/db/db.sqlite`).

Registration prefers Nix's own tool (`nix-store --load-db`, with `--store ROOT`
when the root is not `/`) and falls back to writing Nix's SQLite schema
directly, so a device without Nix binaries still ends up with a database that
`nix store verify` accepts. Used by device.py (validity) and receive.py /
maintenance.py (register, unregister).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from reup_receiver.errors import ReceiveError


class NixDb:
    def __init__(self, root: str, db_dir: str) -> None:
        self.root = root
        self.db_dir = db_dir
        self.file = os.path.join(db_dir, "db.sqlite")

    def exists(self) -> bool:
        return os.path.exists(self.file)

    def _connect(self, readonly: bool = True) -> sqlite3.Connection:
        if readonly:
            return sqlite3.connect(f"file:{self.file}?mode=ro", uri=True, timeout=30)
        return sqlite3.connect(self.file, timeout=30)

    def valid_paths(self) -> set[str]:
        with self._connect() as conn:
            return {row[0] for row in conn.execute("SELECT path FROM ValidPaths")}

    def references(self) -> dict[str, set[str]]:
        with self._connect() as conn:
            ids = dict(conn.execute("SELECT id, path FROM ValidPaths"))
            out: dict[str, set[str]] = {p: set() for p in ids.values()}
            for referrer, reference in conn.execute("SELECT referrer, reference FROM Refs"):
                out[ids[referrer]].add(ids[reference])
        return out

    def register(self, records: Sequence[PathRecord]) -> None:
        missing = [r for r in records if r.path not in self.valid_paths()]
        if not missing:
            return
        tool = shutil.which("nix-store")
        if tool:
            self._load_db(tool, missing)
        else:
            self._insert(missing)

    def _load_db(self, tool: str, records: Sequence[PathRecord]) -> None:
        lines = []
        for r in records:
            lines += [r.path, "sha256:" + r.nar_hash.hex(), str(r.nar_size), r.deriver or "",
                      str(len(r.references)), *r.references]
        argv = [tool, "--load-db"]
        if self.root != "/":
            argv += ["--store", self.root]
        proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise ReceiveError(f"nix-store --load-db failed: {proc.stderr.strip()}")

    def _insert(self, records: Sequence[PathRecord]) -> None:
        now = int(time.time())
        with self._connect(readonly=False) as conn:
            for r in records:
                conn.execute(
                    "INSERT OR IGNORE INTO ValidPaths (path, hash, registrationTime, deriver, narSize)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (r.path, "sha256:" + r.nar_hash.hex(), now, r.deriver, r.nar_size),
                )
            ids = dict(conn.execute("SELECT path, id FROM ValidPaths"))
            for r in records:
                for ref in r.references:
                    conn.execute("INSERT OR IGNORE INTO Refs (referrer, reference) VALUES (?, ?)",
                                 (ids[r.path], ids[ref]))

    def reregister(self, r: PathRecord) -> None:
        """A replaced path: its registered NAR hash and size are the new copy's."""
        with self._connect(readonly=False) as conn:
            conn.execute("UPDATE ValidPaths SET hash = ?, narSize = ? WHERE path = ?",
                         ("sha256:" + r.nar_hash.hex(), r.nar_size, r.path))

    def unregister(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        if not paths or not self.exists():
            return
        with self._connect(readonly=False) as conn:
            ids = dict(conn.execute("SELECT path, id FROM ValidPaths"))
            doomed = [ids[p] for p in paths if p in ids]
            conn.executemany("DELETE FROM Refs WHERE referrer = ?", [(i,) for i in doomed])
            conn.executemany("DELETE FROM ValidPaths WHERE id = ?", [(i,) for i in doomed])


@dataclass(frozen=True)
class PathRecord:
    """What registering a path needs; kept by the receiver for devices without a Nix DB."""

    path: str
    nar_hash: bytes
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "narHash": self.nar_hash.hex(),
            "narSize": self.nar_size,
            "references": list(self.references),
            "deriver": self.deriver,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PathRecord:
        return cls(
            d["path"], bytes.fromhex(d["narHash"]), int(d["narSize"]),
            tuple(d["references"]), d.get("deriver"),
        )
