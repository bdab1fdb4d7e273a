"""Transfer windows: daily time ranges in a device's time zone, inside which transfers may run.

Pure: a `Schedule` (the windows that apply to one device, from fleet.toml: its own and its tags',
all of which must be open) and an epoch time in, a decision out. Called by the planner (a push
outside its window waits until the next opening) and by the transport (reup.io.transfer pauses
a running transfer at a chunk boundary when its window closes). Time zones come from the
standard library's zoneinfo (the IANA database); the clock is always an argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reup.core.errors import ConfigError
from reup.core.model import Device, Fleet

_RANGE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


@dataclass(frozen=True)
class Window:
    """[start, end) in minutes after local midnight; end <= start wraps past midnight."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


def parse_window(text: str, where: str = "windows") -> Window:
    m = _RANGE.match(text.strip())
    if not m:
        raise ConfigError(f"{where}: expected a daily range 'HH:MM-HH:MM', got {text!r}")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if end > 24 * 60 or start == end:
        raise ConfigError(f"{where}: empty or out-of-range window {text!r}")
    return Window(start, end)


def check_tz(tz: str, where: str = "tz") -> str:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"{where}: unknown time zone {tz!r}") from exc
    return tz


@dataclass(frozen=True)
class Schedule:
    """The windows that apply to one device: each group (the device's own, each tag's) must have
    one open window. No groups: always open."""

    groups: tuple[tuple[Window, ...], ...] = ()
    tz: str = "UTC"

    @property
    def always(self) -> bool:
        return not any(self.groups)

    def is_open(self, now: float) -> bool:
        if self.always:
            return True
        local = datetime.fromtimestamp(now, ZoneInfo(self.tz))
        minute = local.hour * 60 + local.minute
        return all(any(w.contains(minute) for w in g) for g in self.groups if g)

    def next_open(self, now: float) -> float | None:
        """The first moment at or after `now` when transfers may run (None: never, within a week)."""
        if self.is_open(now):
            return now
        zone = ZoneInfo(self.tz)
        today = datetime.fromtimestamp(now, zone).replace(hour=0, minute=0, second=0, microsecond=0)
        # Candidates: each window's start on each day, and each whole hour (where a DST jump skips
        # a window's start, the window opens at the first local time that exists inside it).
        naive = today.replace(tzinfo=None)
        starts = {naive + timedelta(days=d, minutes=w.start) for d in range(-1, 9) for g in self.groups for w in g}
        times = {s.replace(tzinfo=zone).timestamp() for s in starts}
        times |= {float(h) for h in range(int(now // 3600 + 1) * 3600, int(now) + 9 * 86400, 3600)}
        return next((t for t in sorted(times) if t >= now and self.is_open(t)), None)

    def describe(self) -> str:
        return " and ".join("/".join(str(w) for w in g) for g in self.groups if g) + f" ({self.tz})"


def schedule_for(device: Device, fleet: Fleet) -> Schedule:
    """The device's own windows and those of each of its tags, in the device's time zone."""
    where = f"devices.{device.name}"
    groups = [tuple(parse_window(w, f"{where}.windows") for w in device.windows)]
    for tag in device.tags:
        limits = fleet.transfer.tags.get(tag)
        if limits is not None and limits.windows:
            groups.append(tuple(parse_window(w, f"transfer.tags.{tag}.windows") for w in limits.windows))
    return Schedule(tuple(g for g in groups if g), device.tz)


def schedules(fleet: Fleet) -> dict[str, Schedule]:
    """Every device's schedule, for the planner; devices without windows are left out (always open)."""
    out = {name: schedule_for(dev, fleet) for name, dev in fleet.devices.items()}
    return {name: s for name, s in out.items() if not s.always}


WAITING_FOR_WINDOW = "waiting_for_window"
