"""What the fleet page (web.py) shows beyond the status rows: the revision's author and message, the
devices' tags, the bytes sent, and one device's own page (its row, tags, host and recent events).

Created by the Controller's `fleet_page()` (controller.py), which hands `extras` and `device` to the
`FleetPage` it serves at `/`. The source and the current fleet are read through callables at each
use, as the controller (and its tests) may replace them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from reup.config.reup_toml import HttpConfig
from reup.core.model import Fleet
from reup.io.source import GitSource
from reup.loop.state import StateDB


class PageFeed:
    def __init__(self, cfg: HttpConfig, store: StateDB, *, source: Callable[[], GitSource],
                 fleet: Callable[[], Fleet | None]) -> None:
        self.cfg = cfg
        self.store = store
        self.source = source
        self.fleet = fleet
        self._summaries: dict[str, tuple[str, str]] = {}  # commit -> (author, message)

    def extras(self, status: dict[str, Any]) -> dict[str, Any]:
        commit = status.get("revision")
        if commit and commit not in self._summaries:
            with contextlib.suppress(Exception):  # a mirror not yet there: the page shows the id alone
                self._summaries[commit] = self.source().commit_summary(commit)
        author, message = self._summaries.get(commit or "", ("", ""))
        fleet = self.fleet()
        return {"author": author, "message": message, "grafana_url": self.cfg.grafana_url,
                "tags": {n: list(d.tags) for n, d in fleet.devices.items() if d.tags} if fleet else {},
                "bytes_sent": self.store.bytes_sent()}

    def device(self, name: str) -> dict[str, Any] | None:
        rows = [d for d in self.store.status()["devices"] if d["name"] == name]
        if not rows:
            return None
        fleet = self.fleet()
        dev = fleet.devices.get(name) if fleet else None
        return {"device": rows[0], "tags": list(dev.tags) if dev else [], "host": dev.host if dev else None,
                "events": self.store.recent_device_events(name, 50)}
