"""The fleet page's pure parts: the access check, the `[http]` keys, and the one-snapshot-per-change rule."""

from __future__ import annotations

import base64

import pytest
from reup.config.reup_toml import parse_config
from reup.core.errors import ConfigError
from reup.loop.events import DeviceStateChanged, GitFetched, ReconcileDone
from reup.loop.web import MIN_INTERVAL, FleetPage, authorized


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_authorized() -> None:
    assert authorized(None, None) and authorized("anything", "")
    assert authorized("Bearer t0k", "t0k") and authorized("bearer t0k", "t0k")
    assert authorized(basic("ops", "t0k"), "t0k") and authorized(basic("", "t0k"), "t0k")
    for header in (None, "", "Bearer", "Bearer t0", "Bearer t0kk", basic("t0k", ""), "Basic !!!", "Digest t0k",
                   basic("ops", "t0k:x")):
        assert not authorized(header, "t0k"), header


def test_http_keys() -> None:
    cfg = parse_config('[source]\nurl = "/r"\n[http]\ntoken = "a"\nmetrics_token = "b"\n'
                       'grafana_url = "https://g.example.org/d/reup"\n')
    assert (cfg.http.token, cfg.http.metrics_token, cfg.http.grafana_url) == ("a", "b", "https://g.example.org/d/reup")
    plain = parse_config('[source]\nurl = "/r"\n')
    assert (plain.http.token, plain.http.metrics_token, plain.http.grafana_url) == (None, None, None)
    with pytest.raises(ConfigError, match="http.token"):
        parse_config('[source]\nurl = "/r"\n[http]\ntoken = 5\n')


def test_one_snapshot_per_change() -> None:
    calls = []

    def status() -> dict[str, object]:
        calls.append(1)
        return {"devices": []}

    now = [100.0]
    page = FleetPage(status, device=lambda n: None, extras=lambda s: {"message": "m"}, clock=lambda: now[0])
    v1, body1 = page.snapshot()
    assert page.snapshot() == (v1, body1) and len(calls) == 1  # viewers share it
    for quiet in (GitFetched(0.0, "success"), ReconcileDone(0.0, None, True)):
        page.on_event(quiet)  # every pass ends with these: no new snapshot
    assert page.snapshot()[0] == v1 and len(calls) == 1
    page.on_event(DeviceStateChanged(0.0, "d1", "pending", "transferring"))
    assert page.snapshot()[0] == v1 and len(calls) == 1  # at most one build per MIN_INTERVAL ...
    now[0] += MIN_INTERVAL
    v2, body2 = page.snapshot()  # ... then the change is there
    assert v2 > v1 and len(calls) == 2 and b'"message":"m"' in body2
    for _ in range(50):  # a burst of changes and many viewers: still one build per interval
        page.changed()
        page.snapshot()
    assert len(calls) == 2
