"""The README stays true: its metric reference lists exactly what the controller exports (with
their labels), its two commands are Makefile targets, and the files it links to exist."""

from __future__ import annotations

import os
import re

from support.metricnames import controller_metrics

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_metric_reference_matches_registry() -> None:
    section = readme().split("## Metric reference", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for m in re.finditer(r"^\| `(reup_[a-z_]+)` \| (\w+) \| ([^|]*)\|", section, re.MULTILINE):
        documented[m.group(1)] = (m.group(2), set(re.findall(r"`([a-z_]+)`", m.group(3))))
    exported = {name + ("_total" if kind == "counter" else ""): (kind, set(labels))
                for name, (kind, labels) in controller_metrics().items()}
    assert documented == exported


def test_two_commands_are_make_targets_and_links_exist() -> None:
    text = readme()
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        targets = set(re.findall(r"^([a-z-]+):", f.read(), re.MULTILINE))
    commands = re.findall(r"^make (\w+)", text.split("## The two commands", 1)[1], re.MULTILINE)
    assert commands[:2] == ["demo", "test"] and {"demo", "test"} <= targets
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in link:
            assert os.path.exists(os.path.join(ROOT, link)), link
