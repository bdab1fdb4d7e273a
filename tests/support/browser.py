"""The system Chromium driven by Playwright for Python, and a fleet seeded straight into SQLite.

Used by tests/e2e/test_fleet_page_browser.py. Playwright's own browser download is
not used: `executable_path` points at Debian's `chromium` (installed by .ci/run).
`seed_fleet` writes N devices, their history and a rollout into a state
directory, so that a page of thousands of devices can be served without
thousands of sshd processes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from reup.core.model import Target
from reup.loop.state import StateDB

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STATES = ("in_sync", "in_sync", "in_sync", "pending", "transferring", "failed", "halted", "unreachable")


def have_browser() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return os.access(CHROMIUM, os.X_OK)


@contextmanager
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def seed_fleet(state_dir: str, n: int, *, waves: tuple[str, ...] = ("canary", "early", "main"),
               now: float = 1.8e9) -> str:
    """N devices over `waves` in every state, one revision, a halted rollout; returns the commit id."""
    commit = "c0ffee" + "0" * 34
    store = StateDB(state_dir)
    try:
        targets = []
        for i in range(n):
            wave = waves[0] if i < max(1, n // 100) else waves[1] if i < n // 10 else waves[-1]
            targets.append(Target(f"dev-{i:05d}", commit, wave, f"/nix/store/{i:032d}-sys.drv",
                                  f"/nix/store/{'a' * 32}-nixos-system-{wave}-2"))
        store.record_revision(commit, now - 600, targets, None)
        rows = []
        for i, t in enumerate(targets):
            state = STATES[i % len(STATES)]
            acked = t.toplevel if state == "in_sync" else f"/nix/store/{'b' * 32}-nixos-system-{t.wave}-1"
            err = "activation failed: unit sensord.service failed" if state == "failed" else None
            rows.append((state, acked, err, now - (i % 900), t.device))
        with store._lock:
            store.db.execute("BEGIN")
            store.db.executemany("UPDATE devices SET state=?, acked_toplevel=?, last_error=?, updated_at=? WHERE name=?", rows)
            store.db.executemany(
                "INSERT INTO history(device, commit_id, toplevel, result, stream_bytes, nar_bytes, at) VALUES(?, ?, ?, 'committed', ?, ?, ?)",
                [(t.device, commit, t.toplevel, 2000 + i % 5000, 90000, now - 10) for i, t in enumerate(targets)
                 if STATES[i % len(STATES)] == "in_sync"])
            store.db.execute("COMMIT")
        counts = {w: {"devices": 0, "committed": 0, "failed": 0, "updating": 0} for w in waves}
        for i, t in enumerate(targets):
            c = counts[t.wave]
            c["devices"] += 1
            s = STATES[i % len(STATES)]
            c["committed"] += s == "in_sync"
            c["failed"] += s == "failed"
            c["updating"] += s == "transferring"
        failed = sum(c["failed"] for c in counts.values())
        store.set_meta("rollout", json.dumps({
            "revision": commit, "wave": waves[1], "wave_index": 1, "paused": False, "executed": n, "failed": failed,
            "halted": f"failure threshold reached: {failed} failed of {n} executed (failure_threshold 0.1, min_executed 1)",
            "progress": sum(c["committed"] for c in counts.values()) / n, "waves": counts, "baking_until": None}))
        store.log_event("DeviceStateChanged", "dev-00005", {"old": "activating", "new": "failed",
                                                           "reason": "activation failed: unit sensord.service failed"},
                        now - 30)
    finally:
        store.close()
    return commit
