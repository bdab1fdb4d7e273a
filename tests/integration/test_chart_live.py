"""The chart's alerts and dashboard against a real Prometheus scraping a real controller.

Debian's `prometheus` server scrapes `reup run` (two simulated devices behind real sshd) every
second and evaluates the chart's PrometheusRule (rendered with zero `for` durations). A good
commit shows full progress by wave on the dashboard's query; a commit whose activation fails on
every device halts the rollout, and the halted and failed alerts fire. Every dashboard query
runs without error against the live data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from typing import Any

import pytest
import yaml
from support.sshd import Lab, free_port, start_controller, wait_for
from test_chart import dashboard_exprs, one, render

pytestmark = pytest.mark.slow

LIVE_VALUES = {"prometheusRule": {"haltedFor": "0s", "failedWindow": "5m", "failedThreshold": 0,
                                  "controllerDownFor": "0s"}}


class Prometheus:
    def __init__(self, base: str, target: str, rules: dict[str, Any]) -> None:
        if shutil.which("prometheus") is None:
            pytest.fail("prometheus not found: install Debian's prometheus package (.ci/run does)")
        expr = rules["groups"][0]["rules"][0]["expr"]
        sel = re.search(r'job="([^"]+)", namespace="([^"]+)"', expr)
        assert sel, expr
        os.makedirs(base, exist_ok=True)
        with open(os.path.join(base, "rules.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(rules, f)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{"job_name": sel.group(1), "static_configs": [
                {"targets": [target], "labels": {"namespace": sel.group(2), "pod": "reup-0"}}]}],
        }
        with open(os.path.join(base, "prometheus.yml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
        self.port = free_port()
        log = open(os.path.join(base, "prometheus.log"), "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(["prometheus", "--config.file", "prometheus.yml", "--storage.tsdb.path", "data",
                                      "--web.listen-address", f"127.0.0.1:{self.port}"], cwd=base, stdout=log,
                                     stderr=log)
        log.close()
        wait_for(lambda: self._ready(), 30, "prometheus ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def dashboard_query(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$__range", "10m").replace("$job", ".*").replace("$namespace", ".*")


def test_alerts_and_dashboard_on_a_live_controller(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1", "d2"], poll_interval=10)
    lab.start()
    controller = prom = None
    try:
        c1 = lab.commit("first", {"d1": "1", "d2": "1"})
        controller = start_controller(lab)
        rules = one(render(LIVE_VALUES), "PrometheusRule")["spec"]
        prom = Prometheus(os.path.join(str(tmp_path), "prometheus"), f"127.0.0.1:{lab.http_port}", rules)

        progress = dashboard_query(next(e for e in dashboard_exprs() if e.startswith("sum by (wave)")))
        wait_for(lambda: [r["value"][1] for r in prom.query(progress)] == ["1"], 120, f"{c1[:8]} in sync")
        assert {r["metric"]["wave"] for r in prom.query(progress)} == {"default"}
        assert not prom.firing() & {"ReupRolloutHalted", "ReupDevicesFailed", "ReupControllerDown"}

        lab.commit("activation breaks", {"d1": "2!fail", "d2": "2!fail"})
        wait_for(lambda: {"ReupRolloutHalted", "ReupDevicesFailed"} <= prom.firing(), 120, "alerts firing")
        # The halt comes with the first failure (1 failed of 1 executed); the other device fails too.
        wait_for(lambda: [r["value"][1] for r in prom.query('sum(reup_devices{state="failed"})')] == ["2"], 60,
                 "both devices failed")
        for expr in dashboard_exprs():  # every panel's query evaluates on live data
            prom.query(dashboard_query(expr))
        saving = prom.query(dashboard_query(next(e for e in dashboard_exprs() if e.startswith("1 - sum("))))
        assert saving and 0.0 < float(saving[0]["value"][1]) < 1.0

        controller.terminate()
        controller.wait(timeout=30)
        controller = None
        wait_for(lambda: "ReupControllerDown" in prom.firing(), 60, "controller down alert")
    finally:
        if controller is not None:
            controller.terminate()
            controller.wait(timeout=30)
        if prom is not None:
            prom.stop()
        lab.stop()
