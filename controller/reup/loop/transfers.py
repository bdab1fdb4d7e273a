"""The controller's transfer limits: token buckets from the configuration, windows for the planner
and the transport, and what status and metrics show about transfers.

Created by controller.py. The buckets (reup.io.transfer.TokenBucket) are one for the controller's
total egress (`[transfer] max_rate` in reup.toml), one per device, tag and wave with a `max_rate`
in fleet.toml; a transfer takes its bytes from every bucket that applies, so a slow or limited
device only ever waits on its own buckets and the shared ones it belongs to. Windows are the pure
`reup.core.windows` schedules: the planner gets them (a push outside its window waits), the
transport asks `may_transfer` between chunks (a running transfer pauses at a chunk boundary and
resumes from the device's kept partial later). Gauges are read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from reup.core.model import Decision, Device, Fleet, Wait
from reup.core.windows import WAITING_FOR_WINDOW, Schedule, schedule_for, schedules
from reup.io.transfer import TokenBucket, TransferProgress


class TransferLimits:
    def __init__(self, total_rate: float | None, fleet: Callable[[], Fleet | None],
                 clock: Callable[[], float] = time.time) -> None:
        self.total = TokenBucket(total_rate) if total_rate else None
        self.fleet = fleet
        self.clock = clock
        self._buckets: dict[tuple[str, str, float], TokenBucket] = {}
        self._schedules: tuple[Fleet, dict[str, Schedule]] | None = None

    def _bucket(self, kind: str, name: str, rate: float) -> TokenBucket:
        key = (kind, name, rate)  # a changed rate in fleet.toml gets a fresh bucket
        if key not in self._buckets:
            self._buckets[key] = TokenBucket(rate)
        return self._buckets[key]

    def buckets_for(self, dev: Device) -> list[TokenBucket]:
        """Every bucket a transfer to `dev` draws from: its own, its tags', its wave's, the total."""
        fleet = self.fleet()
        known = fleet.devices.get(dev.name, dev) if fleet else dev
        out = []
        if known.max_rate:
            out.append(self._bucket("device", known.name, known.max_rate))
        if fleet is not None:
            for tag in known.tags:
                limits = fleet.transfer.tags.get(tag)
                if limits is not None and limits.max_rate:
                    out.append(self._bucket("tag", tag, limits.max_rate))
            wave = fleet.transfer.waves.get(known.wave)
            if wave is not None and wave.max_rate:
                out.append(self._bucket("wave", known.wave, wave.max_rate))
        if self.total is not None:
            out.append(self.total)
        return out

    def schedules(self) -> dict[str, Schedule]:
        """The planner's schedules, made once per fleet (every pass asks; a fleet.toml changes rarely)."""
        fleet = self.fleet()
        if fleet is None:
            return {}
        if self._schedules is None or self._schedules[0] is not fleet:
            self._schedules = (fleet, schedules(fleet))
        return self._schedules[1]

    def may_transfer(self, dev: Device) -> bool:
        fleet = self.fleet()
        known = fleet.devices.get(dev.name) if fleet else None
        return known is None or schedule_for(known, fleet or Fleet()).is_open(self.clock())


def waiting_for_window(decisions: Mapping[str, Decision]) -> dict[str, float | None]:
    """Devices the planner holds until a window opens, with the opening (None: none within a week)."""
    return {name: d.action.until if isinstance(d.action, Wait) else None
            for name, d in decisions.items() if d.reason.startswith(WAITING_FOR_WINDOW)}


def transfer_status(progress: Mapping[str, TransferProgress], waiting: Mapping[str, float | None]
                    ) -> dict[str, dict[str, Any]]:
    """`/api/status` "transfers": each device's transfer progress and rate, and who waits for a window."""
    out: dict[str, dict[str, Any]] = {name: p.to_json() for name, p in progress.items()}
    for name, opens in waiting.items():
        entry = out.setdefault(name, {})
        entry["waiting_for_window"] = True
        entry["window_opens_at"] = opens
    return out


def register_gauges(registry: CollectorRegistry, progress: Mapping[str, TransferProgress],
                    waiting: Mapping[str, float | None]) -> None:
    """reup_transfer_rate_bytes_per_second (all transfers now) and reup_devices_waiting_for_window."""
    Gauge("reup_transfer_rate_bytes_per_second", "Current egress to devices, all transfers",
          registry=registry).set_function(lambda: sum(p.current_rate(time.monotonic()) for p in progress.values()))
    Gauge("reup_devices_waiting_for_window", "Devices with an update held until their transfer window opens",
          registry=registry).set_function(lambda: len(waiting))
