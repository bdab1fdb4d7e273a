"""The controller's metrics and their label names, through prometheus_client's public API.

Used by test_chart.py (queries use only what exists) and test_readme.py (the metric reference).
A labelled metric shows its labels only once it has a series, so the registry is fed one event
of each labelled kind; a metric still without a series fails loudly instead of passing unlabelled.
"""

from __future__ import annotations

from reup.loop.events import DevicesSnapshot, ReconcileError, RevisionSeen
from reup.loop.metrics import Metrics
from reup.loop.transfers import register_gauges


def controller_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Family name -> (type, label names other than `le`), with every option on."""
    metrics = Metrics(device_info=True)
    metrics(RevisionSeen(1.0, "c0ffee"))
    metrics(ReconcileError(1.0, "push", "refused"))
    metrics(DevicesSnapshot(1.0, (("d1", "in_sync", "main", "1"),)))
    register_gauges(metrics.registry, {}, {})  # the controller adds these to the same registry
    out = {}
    for family in metrics.registry.collect():
        assert family.samples, f"{family.name} has no series: feed it an event in controller_metrics()"
        out[family.name] = (family.type, frozenset(k for s in family.samples for k in s.labels if k != "le"))
    return out
