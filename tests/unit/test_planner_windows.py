"""Golden cases for transfer windows with a fake clock: the schedule (device and tag windows in the
device's time zone) and the planner's rule 11 (a push outside its window waits for the opening)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from reup.config.fleet_toml import parse_fleet
from reup.core.errors import ConfigError
from reup.core.model import (
    BuildResult,
    Desired,
    DeviceObservation,
    DeviceState,
    Observed,
    Push,
    RolloutPolicy,
    Target,
    Wait,
)
from reup.core.planner import plan
from reup.core.windows import Schedule, parse_window, schedule_for, schedules

C2 = "c2" * 20
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0d6u0xjBWm0m1u2q5Sg8jzxf9C2ri8Hc3tnrsY+q0a"


def at(text: str, tz: str) -> float:
    """A fake clock reading: local wall time `text` in `tz` as epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


FLEET = f"""
[devices.berlin]
host = "10.0.0.1"
host_key = "{KEY}"
tags = ["cellular"]
windows = ["22:00-06:00"]
tz = "Europe/Berlin"
max_rate = 20000

[devices.tokyo]
host = "10.0.0.2"
host_key = "{KEY}"
tz = "Asia/Tokyo"
tags = ["cellular"]

[devices.lan]
host = "10.0.0.3"
host_key = "{KEY}"
wave = "default"

[transfer.tags.cellular]
max_rate = 50000
windows = ["01:00-05:00", "13:00-14:00"]

[transfer.waves.default]
max_rate = 1000000
"""


def test_fleet_toml_transfer_keys() -> None:
    fleet = parse_fleet(FLEET)
    assert fleet.devices["berlin"].max_rate == 20000.0 and fleet.devices["berlin"].tz == "Europe/Berlin"
    assert fleet.devices["lan"].windows == () and fleet.devices["lan"].tz == "UTC"
    assert fleet.transfer.tags["cellular"].max_rate == 50000.0
    assert fleet.transfer.waves["default"].max_rate == 1e6
    assert set(schedules(fleet)) == {"berlin", "tokyo"}


@pytest.mark.parametrize(("snippet", "needle"), [
    ('windows = ["25:00-01:00"]', "HH:MM-HH:MM"),
    ('windows = ["10:00-10:00"]', "empty"),
    ('tz = "Mars/Olympus"', "unknown time zone"),
    ("max_rate = 0", ">= 1.0"),
    ("burst = 3", "unknown key"),
])
def test_bad_transfer_keys_are_config_errors(snippet: str, needle: str) -> None:
    text = f'[devices.a]\nhost = "h"\nhost_key = "{KEY}"\n{snippet}\n'
    with pytest.raises(ConfigError, match=needle):
        parse_fleet(text)


def test_bad_group_keys_are_config_errors() -> None:
    base = f'[devices.a]\nhost = "h"\nhost_key = "{KEY}"\n'
    with pytest.raises(ConfigError, match="unknown key"):
        parse_fleet(base + '[transfer.waves.default]\nwindows = ["01:00-02:00"]\n')
    with pytest.raises(ConfigError, match="unknown key"):
        parse_fleet(base + "[transfer]\nmax_rate = 5\n")


@pytest.mark.parametrize(("local", "open_"), [
    ("2026-03-02T21:59:00", False), ("2026-03-02T22:00:00", False),  # device window open, tag closed
    ("2026-03-03T01:00:00", True), ("2026-03-03T04:59:00", True), ("2026-03-03T05:00:00", False),
    ("2026-03-03T13:30:00", False),  # tag window open, device's closed
])
def test_device_and_tag_windows_must_both_be_open(local: str, open_: bool) -> None:
    s = schedule_for(parse_fleet(FLEET).devices["berlin"], parse_fleet(FLEET))
    assert s.is_open(at(local, "Europe/Berlin")) is open_


def test_next_opening_in_the_device_time_zone_across_dst() -> None:
    s = Schedule(((parse_window("02:30-03:30"),),), "Europe/Berlin")
    # 2026-03-29: clocks jump 02:00 -> 03:00 in Berlin, so 02:30 does not exist that day; the
    # window is open from 03:00 (the first minute inside it that does exist).
    before = at("2026-03-28T12:00:00", "Europe/Berlin")
    assert s.next_open(before) == at("2026-03-29T03:00:00", "Europe/Berlin")
    assert s.next_open(at("2026-03-30T02:45:00", "Europe/Berlin")) == at("2026-03-30T02:45:00", "Europe/Berlin")
    assert Schedule().next_open(5.0) == 5.0 and Schedule().is_open(5.0)


def test_wrapping_window_opens_tonight() -> None:
    s = Schedule(((parse_window("22:00-06:00"),),), "Asia/Tokyo")
    assert s.next_open(at("2026-06-01T12:00:00", "Asia/Tokyo")) == at("2026-06-01T22:00:00", "Asia/Tokyo")
    assert s.is_open(at("2026-06-02T05:59:00", "Asia/Tokyo"))


def test_planner_holds_pushes_outside_windows_and_frees_their_slot() -> None:
    fleet = parse_fleet(FLEET)
    desired = Desired(C2, 1.0, {n: Target(n, C2, "default", f"/nix/store/{i}-s.drv", f"/nix/store/{i}-s")
                                for i, n in enumerate(["berlin", "lan", "tokyo"])})
    observed = Observed(builds={f"/nix/store/{i}-s.drv": BuildResult(f"/nix/store/{i}-s.drv", C2, True,
                                                                     f"/nix/store/{i}-s") for i in range(3)},
                        devices={n: DeviceObservation(n) for n in desired.targets})
    policy = RolloutPolicy(max_parallel=1)
    noon = at("2026-06-01T12:00:00", "Europe/Berlin")  # 19:00 in Tokyo: both closed
    p = plan(desired, observed, policy, noon, schedules(fleet))
    assert p.decisions["berlin"].state == DeviceState.PENDING
    assert p.decisions["berlin"].action == Wait(at("2026-06-02T01:00:00", "Europe/Berlin"))
    assert p.decisions["berlin"].reason.startswith("waiting_for_window")
    assert p.decisions["lan"].action == Push("lan", C2, "/nix/store/1-s")  # the slot goes to the open one
    assert p.decisions["tokyo"].action == Wait(at("2026-06-02T01:00:00", "Asia/Tokyo"))
    night = at("2026-06-02T01:30:00", "Europe/Berlin")
    p = plan(desired, observed, policy, night, schedules(fleet))
    assert p.decisions["berlin"].action == Push("berlin", C2, "/nix/store/0-s")
    assert p.decisions["lan"].reason.startswith("waiting for a free slot")
    # Without schedules the planner is as before.
    assert plan(desired, observed, policy, noon).decisions["berlin"].action == Push("berlin", C2, "/nix/store/0-s")
