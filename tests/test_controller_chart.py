"""The Helm chart's dashboard and alerts use only metrics the controller exports; its files are well formed."""

from __future__ import annotations

import json
import os
import re

from reup.metrics import Metrics

CHART = os.path.join(os.path.dirname(__file__), "..", "charts", "reup")


def exported_names() -> set[str]:
    """Every sample name the controller's registry can expose (from the metric families' types)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = set()
    for family in Metrics(device_info=True).registry.collect():
        names.update(family.name + sfx for sfx in suffixes[family.type])
    return names


def used_names(text: str) -> set[str]:
    return set(re.findall(r"\breup_[a-z_]+\b", text)) - {"reup_controller"}


def test_dashboard_and_alerts_use_exported_metrics() -> None:
    names = exported_names()
    with open(os.path.join(CHART, "dashboards", "reup.json"), encoding="utf-8") as f:
        dashboard = json.load(f)
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert used_names(exprs) and used_names(exprs) <= names, used_names(exprs) - names
    with open(os.path.join(CHART, "templates", "prometheusrule.yaml"), encoding="utf-8") as f:
        rules = f.read()
    assert used_names(rules) and used_names(rules) <= names, used_names(rules) - names
    assert len(re.findall(r"- alert: ", rules)) >= 6
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_chart_files() -> None:
    with open(os.path.join(CHART, "Chart.yaml"), encoding="utf-8") as f:
        chart = dict(ln.split(": ", 1) for ln in f.read().splitlines() if ": " in ln and not ln.startswith(" "))
    assert chart["apiVersion"] == "v2" and chart["name"] == "reup"
    templates = set(os.listdir(os.path.join(CHART, "templates")))
    assert {"deployment.yaml", "configmap.yaml", "pvc.yaml", "service.yaml", "servicemonitor.yaml",
            "prometheusrule.yaml", "dashboard-configmap.yaml"} <= templates
    for name in templates:
        with open(os.path.join(CHART, "templates", name), encoding="utf-8") as f:
            text = f.read()
        assert text.count("{{") == text.count("}}"), name
        opened = sum(text.count(f"{{{{{dash} {word}") for dash in ("-", "") for word in ("if", "range", "with", "define"))
        closed = sum(text.count(f"{{{{{dash} end") for dash in ("-", ""))
        assert opened == closed, name
