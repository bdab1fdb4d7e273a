"""The live fleet page in a real browser: Debian's Chromium driven by Playwright for Python.

1. A running `reup run` with simulated devices behind real sshd: the page, loaded once, shows a
   commit rolling out wave by wave (baking between them), then a halt with its reason; filters
   and a device's detail with its history.
2. The controller's HTTP listener over 5,000 devices seeded into SQLite, with `[http] token`:
   401 without it (curl-like and in the browser), the page renders in under 2 s, viewers share
   one snapshot per change, and it fits a phone's width.

Screenshots go to $REUP_SCREENSHOTS when set (docs/screenshots/ was made that way).
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from reup.config.reup_toml import load_config
from reup.loop.controller import Controller
from reup_lab import demofleet
from support.browser import browser, have_browser, seed_fleet
from support.sshd import (
    Lab,
    controller_session,
    free_port,
    run_once,
    states,
    store_status,
    wait_for,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_browser() and not os.environ.get("CI"), reason="needs playwright and /usr/bin/chromium (.ci/run)")]

SHOTS = os.environ.get("REUP_SCREENSHOTS") or tempfile.mkdtemp(prefix="reup-shots-")
WAVES = {"d1": "canary", "d2": "canary", "d3": "rest", "d4": "rest"}
TAGS = {"d1": "site=berlin", "d2": "site=paris", "d3": "site=berlin", "d4": "site=paris"}


def shot(page: Any, name: str, full: bool = True) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, name + ".png"), full_page=full)


def fleet(lab: Lab, policy: str) -> str:
    parts = [f"[rollout]\n{policy}\n"]
    for n, dev in lab.devices.items():
        parts.append(dev.fleet_entry(lab.device_configs.get(n), WAVES[n]) + f'tags = ["{TAGS[n]}"]\n')
    return "\n".join(parts)


def phase(page: Any, wave: str) -> str:
    return str(page.get_attribute(f'li[data-wave="{wave}"]', "data-phase"))


def row_states(page: Any) -> dict[str, str]:
    rows = page.eval_on_selector_all("#devices tbody tr", "rs => rs.map(r => [r.dataset.device, r.dataset.state])")
    return {str(n): str(s) for n, s in rows}


def test_rollout_live_in_the_browser(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), list(WAVES), poll_interval=30)
    lab.start()
    with controller_session(lab) as ctl:
        policy = 'waves = ["canary", "rest"]\nbake_time = 3\nconfirm_timeout = 20\nfailure_threshold = 0.5'
        text = fleet(lab, policy)
        lab.commit("all at 1", dict.fromkeys(WAVES, "1"), fleet=text)
        r = run_once(lab)
        assert r.returncode == 0, r.stderr[-3000:]
        ctl.start()
        url = f"http://127.0.0.1:{lab.http_port}/"
        with browser() as b:
            page = b.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#devices tbody tr').length === 4")
            page.evaluate("window.__loadedOnce = true")  # gone if the page reloads
            wait_for(lambda: page.inner_text("#live") == "live", 10, "the event stream")

            # 1. a commit rolls out wave by wave, watched without reloading
            c2 = lab.commit("sensord 2: faster polling", dict.fromkeys(WAVES, "2"), fleet=text)
            page.wait_for_function(f"document.getElementById('rev-commit').title === '{c2}'", timeout=30_000)
            assert page.inner_text("#rev-message") == "sensord 2: faster polling"
            assert "reup demo" in page.inner_text("#rev-author")
            seen: list[tuple[str, str]] = []

            def watch() -> bool:
                if page.get_attribute("#waves", "data-revision") != c2:
                    return False  # the new head is seen; its rollout not yet planned
                now = (phase(page, "canary"), phase(page, "rest"))
                if not seen or seen[-1] != now:
                    seen.append(now)
                    if now[0] == "baking" and not os.path.exists(os.path.join(SHOTS, "fleet-page-baking.png")):
                        shot(page, "fleet-page-baking")
                return set(row_states(page).values()) == {"in_sync"} and now == ("done", "done")

            wait_for(watch, 90, "the rollout of c2 on the page", interval=0.05)
            assert page.evaluate("window.__loadedOnce") is True
            phases = [p for p, _ in seen]
            assert "rolling" in phases and "baking" in phases, seen
            baking = next(i for i, (c, _) in enumerate(seen) if c == "baking")
            assert all(r == "waiting" for _, r in seen[:baking]), seen  # the rest waited for the canaries
            assert any(r == "rolling" for _, r in seen[baking:]), seen  # ... then rolled out
            assert states(store_status(lab)) == dict.fromkeys(WAVES, "in_sync")
            assert page.inner_text("tr[data-device=d3] td.num") != "-"  # bytes sent
            shot(page, "fleet-page-done")

            # 2. a bad commit halts the rollout; the page says why
            lab.commit("sensord 3: broken unit", {"d1": "3!fail", "d2": "3!fail", "d3": "3", "d4": "3"}, fleet=text)
            page.wait_for_selector("#halted:not([hidden])", timeout=60_000)
            assert page.inner_text("#halted").startswith("Rollout halted: failure threshold reached")
            page.wait_for_function("document.querySelector('li[data-wave=rest]').dataset.phase === 'halted'")
            wait_for(lambda: row_states(page).get("d3") == "halted", 30, "d3 halted on the page")
            shot(page, "fleet-page-halted")

            # 3. filters and a device's detail
            page.select_option("#f-wave", "rest")
            assert sorted(row_states(page)) == ["d3", "d4"]
            page.select_option("#f-wave", "")
            page.select_option("#f-tag", "site=berlin")
            assert sorted(row_states(page)) == ["d1", "d3"]
            page.select_option("#f-tag", "")
            page.fill("#f-search", "d2")
            assert list(row_states(page)) == ["d2"]
            page.fill("#f-search", "")
            page.click("[data-open=d1]")
            page.wait_for_selector("#detail[open] #detail-events li")
            history = page.inner_text("#detail-events")
            assert "rolled_back" in history or "rolled back" in history, history
            assert "committed" in history  # the earlier updates are in its history too
            assert "site=berlin" in page.inner_text("#detail-facts")
            shot(page, "fleet-page-detail")
            page.keyboard.press("Escape")
            assert not page.is_visible("#detail")
            assert page.evaluate("window.__loadedOnce") is True


def get(url: str, auth: str | None = None) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def test_thousands_of_devices_and_the_token(tmp_path: os.PathLike[str]) -> None:
    base = str(tmp_path)
    state = os.path.join(base, "state")
    n = 5000
    seed_fleet(state, n, now=time.time())
    repo = os.path.join(base, "fleet")
    demofleet.init_repo(repo)
    port = free_port()
    cfg_path = os.path.join(base, "reup.toml")
    with open(cfg_path, "w", encoding="utf-8") as f:
        f.write(f'[source]\nurl = "{repo}"\n[state]\ndir = "{state}"\n[http]\nlisten = "127.0.0.1:{port}"\n'
                'token = "s3cret"\nmetrics_token = "m3trics"\ngrafana_url = "https://grafana.example.org/d/reup"\n')
    ctrl = Controller(load_config(cfg_path))
    server = ctrl.start_http()
    assert server is not None
    url = f"http://127.0.0.1:{port}"
    try:
        # read-only access control, as a client sees it
        for path in ("/", "/api/status", "/api/fleet", "/api/events", "/static/app.js"):
            code, _, headers = get(url + path)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
        assert get(url + "/api/status", "Bearer wrong")[0] == 401
        assert get(url + "/api/status", "Bearer s3cret")[0] == 200
        assert get(url + "/metrics")[0] == 401 and get(url + "/metrics", "Bearer s3cret")[0] == 401
        assert get(url + "/metrics", "Bearer m3trics")[0] == 200
        assert get(url + "/healthz")[0] == 200

        page_obj = ctrl.fleet_page()
        with browser() as b:
            anon = b.new_page()
            statuses: list[int] = []
            anon.on("response", lambda r: statuses.append(r.status))
            try:  # headless Chromium, asked for credentials it does not have, gives up on the page
                code = anon.goto(url + "/").status
            except Exception as exc:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
                code = statuses[0]
            assert code == 401
            ctx = b.new_context(http_credentials={"username": "ops", "password": "s3cret"},
                                viewport={"width": 1280, "height": 900})
            pages = [ctx.new_page() for _ in range(3)]
            rendered = f"document.getElementById('count').textContent === '{n} of {n}'"
            timings = []
            for p in (pages[1], pages[0]):  # the first viewer makes the shared snapshot, the next one reuses it
                p.goto(url + "/")
                p.wait_for_function(rendered)
                # from the start of the navigation to the first complete render, as the browser measured it
                timings.append(p.evaluate("performance.getEntriesByName('reup-rendered')[0].startTime") / 1000)
            assert len(pages[0].query_selector_all("#devices tbody tr")) == 100  # one page of rows
            print(f"5000 devices rendered: first viewer {timings[0]:.2f} s (builds the snapshot), next {timings[1]:.2f} s")
            assert max(timings) < 2.0
            assert pages[0].is_visible("#grafana") and pages[0].get_attribute("#grafana", "href").endswith("/d/reup")
            shot(pages[0], "fleet-page-5000", full=False)
            pages[2].goto(url + "/")
            pages[2].wait_for_function(rendered)
            assert page_obj.builds == 1  # three viewers, one snapshot
            for p in pages:
                p.wait_for_function("document.getElementById('live').textContent === 'live'", timeout=10_000)
            page_obj.changed()  # what an event on the bus does
            version = page_obj.version
            for p in pages:
                p.wait_for_function(f"document.body.dataset.version === '{version}'", timeout=10_000)
            assert page_obj.builds == 2  # one more snapshot for the change, shared again

            p = pages[0]
            p.focus("[data-open=dev-00005]")  # the keyboard alone opens a device's detail
            p.keyboard.press("Enter")
            p.wait_for_selector("#detail[open] #detail-events li")
            assert "activating → failed" in p.inner_text("#detail-events")
            p.keyboard.press("Escape")
            assert not p.is_visible("#detail")
            unlabelled = p.evaluate("[...document.querySelectorAll('select, input')].filter(e => !e.labels.length).length")
            assert unlabelled == 0
            p.select_option("#f-state", "failed")
            assert p.inner_text("#count") == f"{n // 8} of {n}"
            p.select_option("#f-state", "")
            p.fill("#f-search", "dev-0499")
            assert p.inner_text("#count") == f"10 of {n}"
            p.fill("#f-search", "")
            p.click("#next")
            assert p.inner_text("#page") == f"page 2 of {n // 100}"

            phone = ctx.new_page()
            phone.set_viewport_size({"width": 390, "height": 844})
            phone.goto(url + "/")
            phone.wait_for_selector("#devices tbody tr")
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the page scrolls sideways at phone width ({width} px)"
            shot(phone, "fleet-page-phone", full=False)
    finally:
        server.stop()
        ctrl.close()
