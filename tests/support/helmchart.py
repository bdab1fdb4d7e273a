"""The Helm chart through Helm itself: `helm-python-sdk` binds Helm's Go library (no helm binary).

Used by tests/integration/test_chart*.py: render a release offline, merge and schema-check values,
lint, package; and `kubernetes-validate --strict` for every rendered object against the oldest and
newest Kubernetes the chart supports (objects of CRDs, which it has no schema for, are named in
`CRD_KINDS` and checked by the tests themselves).
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # prometheus-operator's; promtool checks the rules
OLDEST_KUBERNETES = "1.28.0"  # Chart.yaml kubeVersion: the pod-index label


def newest_kubernetes() -> str:
    return str(kubernetes_validate.latest_version())


class Chart:
    def __init__(self, path: str) -> None:
        self.path = path
        self.chart = helm.Chart.load(path)

    def render(self, values: dict[str, Any] | None = None, *, release: str = "reup",
               namespace: str = "fleet") -> dict[str, str]:
        """{template path: rendered text}; raises helm.HelmError (a `fail`, a schema violation)."""
        return self.chart.render(values or {}, name=release, namespace=namespace, is_install=True)

    def values(self, values: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.chart.merge_values(values or {})

    def validate(self, values: dict[str, Any]) -> None:
        """values.schema.json as Helm applies it; raises helm.HelmValuesError."""
        self.chart.validate_schema(self.values(values))

    def lint(self, values: dict[str, Any] | None = None, *, kube_version: str) -> list[str]:
        """Helm's lint findings (strict: warnings count), as 'path: message' lines."""
        report = helm.lint(self.path, values or {}, strict=True, namespace="fleet", kube_version="v" + kube_version)
        return [f"{m['path']}: {m['error']}" for m in report["messages"]] + list(report["errors"])


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a render (NOTES.txt and empty documents left out)."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def kubernetes_errors(doc: dict[str, Any], version: str) -> list[str]:
    """`kubernetes-validate --strict` of one object: unknown fields count."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}"]
    return []
