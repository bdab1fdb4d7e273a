"""The Helm chart charts/reup, through real Helm (Helm's Go library via helm-python-sdk, no binary).

Templates are rendered by Helm with the default values and other value sets; every object must
pass `kubernetes-validate --strict` for the oldest and newest Kubernetes the chart supports, and
`helm lint --strict` must be clean for both; values.yaml and the other sets must match
values.schema.json as Helm applies it (bad ones must not); the PrometheusRule must pass `promtool
check rules` and the alert unit tests in charts/reup/tests/alerts_test.yaml (promtool is required:
CI installs Debian's prometheus package); the dashboard's and the rules' queries must parse
(promql-parser) and may use only metrics and labels the controller's registry exports.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import shutil
import subprocess
from typing import Any

import helm_python as helm
import pytest
import yaml
from reup.config.reup_toml import parse_config
from support.helmchart import (
    CRD_KINDS,
    OLDEST_KUBERNETES,
    Chart,
    kubernetes_errors,
    manifests,
    newest_kubernetes,
)
from support.metricnames import controller_metrics
from support.promql import PromQLError, Selector, parse, selectors

CHART = os.path.join(os.path.dirname(__file__), "..", "..", "charts", "reup")
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
KNOWN_HOSTS = "git.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEx8O0jJ9Zw4mXl3kVrYzq1N0vJ5mO7cH2rT8pQ4sU6d\n"
SHARDED: dict[str, Any] = {
    "replicas": 3,
    "ssh": {"privateKey": KEY},
    "gitCredentials": {"sshKey": KEY, "knownHosts": KNOWN_HOSTS},
    "nameOverride": "fleet-ctl",
    "ingress": {"enabled": True, "className": "nginx", "host": "reup.example.org",
                "tls": [{"secretName": "reup-tls", "hosts": ["reup.example.org"]}]},
    "config": {"http": {"device_info": True},
               "build": {"nix_options": {"builders": "ssh://nixbuild@b1 aarch64-linux - 8", "max-jobs": "0"}},
               "source": {"url": "ssh://git@git.example.org/fleet.git", "poll_interval": 30}},
    "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}},
    "podAnnotations": {"example.org/team": "fleet"},
}
EXISTING: dict[str, Any] = {
    "replicas": 2,
    "gitCredentials": {"existingSecret": "fleet-git"},
    "fullnameOverride": "ctl",
    "serviceAccount": {"create": False, "name": "fleet-sa"},
    "ssh": {"existingSecret": "fleet-key", "key": "ed25519"},
    "persistence": {"nix": {"enabled": False}, "state": {"storageClass": "fast-ssd", "size": "20Gi"}},
    "serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}, "grafanaDashboard": {"enabled": False},
}
VALUE_SETS = {"defaults": {}, "sharded": SHARDED, "existing-secret": EXISTING}
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}  # added by Prometheus


@functools.cache
def chart() -> Chart:
    return Chart(CHART)


def render(values: dict[str, Any], namespace: str = "fleet") -> dict[str, list[dict[str, Any]]]:
    """The rendered documents by kind."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in manifests(chart().render(values, namespace=namespace)):
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def one(docs: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    assert len(docs.get(kind, [])) == 1, (kind, docs.get(kind))
    return docs[kind][0]


def named(docs: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs.get(kind, []) if d["metadata"]["name"] == name]
    return doc


def container(docs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["reup"]
    return dict(pod["containers"][0])


# ---- rendering ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_template_renders_to_kubernetes_objects(name: str) -> None:
    rendered = chart().render(VALUE_SETS[name])
    assert "reup/templates/NOTES.txt" in rendered and "reup run" not in rendered["reup/templates/NOTES.txt"]
    docs = manifests(rendered)
    seen = set()
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"]["name"] and (doc["kind"], doc["metadata"]["name"]) not in seen
        seen.add((doc["kind"], doc["metadata"]["name"]))
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "reup"
    kinds = {k for k, _ in seen}
    assert {"StatefulSet", "ConfigMap", "Service"} <= kinds and "Deployment" not in kinds
    assert "PersistentVolumeClaim" not in kinds  # claims come from volumeClaimTemplates, one set per shard


def test_defaults_one_replica_without_shard_flag() -> None:
    docs = render({})
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "reup-headless"
    c = container(docs)
    assert c["args"] == ["run", "--config", "/etc/reup/reup.toml"]
    claims = {t["metadata"]["name"]: t["spec"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert claims["state"]["resources"]["requests"]["storage"] == "5Gi"
    assert claims["nix"]["resources"]["requests"]["storage"] == "50Gi" and "storageClassName" not in claims["nix"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"config": "/etc/reup/reup.toml", "ssh": "/etc/reup/ssh", "state": "/var/lib/reup", "nix": "/nix"}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["ssh"]["secret"]["secretName"] == "reup-ssh" and "Secret" not in docs
    assert volumes["config"]["configMap"]["name"] == "reup-config"
    # the reup.toml the controller reads: chart-owned keys set, the rest from values
    cfg = parse_config(named(docs, "ConfigMap", "reup-config")["data"]["reup.toml"], base_dir="/etc/reup")
    assert (cfg.state.dir, cfg.ssh.key, cfg.http.listen) == ("/var/lib/reup", "/etc/reup/ssh/id_ed25519", "0.0.0.0:9120")
    assert (cfg.source.url, cfg.source.poll_interval, cfg.build.max_parallel) == ("https://git.example.org/fleet.git", 60, 2)
    # a config change rolls the pods
    configmap = chart().render({})["reup/templates/configmap.yaml"]
    annotation = sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert annotation == hashlib.sha256(configmap.encode()).hexdigest()
    ports = {s["metadata"]["name"]: s["spec"] for s in docs["Service"]}
    assert ports["reup"]["ports"][0]["port"] == 9120 and ports["reup-headless"]["clusterIP"] == "None"
    assert c["ports"] == [{"name": "http", "containerPort": 9120}]
    monitor = one(docs, "ServiceMonitor")["spec"]
    assert monitor["endpoints"][0]["path"] == "/metrics" and monitor["endpoints"][0]["port"] == "http"
    assert monitor["selector"]["matchLabels"]["app.kubernetes.io/component"] == "http"  # not the headless twin
    assert one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert "Ingress" not in docs


def test_sharded_statefulset_secret_and_ingress() -> None:
    docs = render(SHARDED)
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    c = container(docs)
    assert c["args"] == ["run", "--config", "/etc/reup/reup.toml", "--shard", "$(REUP_SHARD_INDEX)/3"]
    assert c["env"][0] == {"name": "REUP_SHARD_INDEX", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}}
    assert "command" not in c  # no shell: Kubernetes expands $(REUP_SHARD_INDEX) in args
    assert {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]} == {"state", "nix"}
    secret = named(docs, "Secret", "reup-fleet-ctl-ssh")
    assert base64.b64decode(secret["data"]["id_ed25519"]).decode() == KEY
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["ssh"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert volumes["git"]["secret"]["secretName"] == "reup-fleet-ctl-git"
    # nameOverride: names and labels follow it
    assert sts["metadata"]["name"] == "reup-fleet-ctl" and sts["metadata"]["labels"]["app.kubernetes.io/name"] == "fleet-ctl"
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert sts["spec"]["template"]["metadata"]["annotations"]["example.org/team"] == "fleet"
    ingress = one(docs, "Ingress")["spec"]
    assert ingress["ingressClassName"] == "nginx" and ingress["tls"][0]["secretName"] == "reup-tls"
    (rule,) = ingress["rules"]
    assert rule["host"] == "reup.example.org"
    assert rule["http"]["paths"] == [{"path": "/webhook", "pathType": "Exact",
                                      "backend": {"service": {"name": "reup-fleet-ctl", "port": {"name": "http"}}}}]
    cfg = parse_config(named(docs, "ConfigMap", "reup-fleet-ctl-config")["data"]["reup.toml"], base_dir="/etc/reup")
    assert cfg.build.nix_options == {"builders": "ssh://nixbuild@b1 aarch64-linux - 8", "max-jobs": "0"}
    assert cfg.http.device_info and cfg.source.poll_interval == 30
    assert one(docs, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for r in one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert alerts["ReupShardsMissing"]["expr"].endswith("< 3")
    assert "ReupDeviceUnreachable" in alerts and "ReupDevicesUnreachable" not in alerts  # per device when exported


def test_existing_secret_without_nix_volume_and_monitoring() -> None:
    docs = render(EXISTING)
    sts = one(docs, "StatefulSet")
    c = container(docs)
    assert c["args"][-2:] == ["--shard", "$(REUP_SHARD_INDEX)/2"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state" and claim["spec"]["storageClassName"] == "fast-ssd"
    assert "nix" not in {m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["ssh"]["secret"]["secretName"] == "fleet-key" and "Secret" not in docs
    assert volumes["git"]["secret"]["secretName"] == "fleet-git"
    assert sts["metadata"]["name"] == "ctl" and "ServiceAccount" not in docs  # fullnameOverride, serviceAccount.create
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == "fleet-sa"
    cfg = parse_config(named(docs, "ConfigMap", "ctl-config")["data"]["reup.toml"], base_dir="/etc/reup")
    assert cfg.source.url.startswith("https://")
    assert cfg.ssh.key == "/etc/reup/ssh/ed25519"
    assert not {"ServiceMonitor", "PrometheusRule"} & docs.keys() and len(docs["ConfigMap"]) == 1


def test_git_credentials_mounted_where_the_config_reads_them(tmp_path: Any) -> None:
    """The Secret's keys, mounted at the container's path, are what [source] credentials_dir reads."""
    docs = render(SHARDED)
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    toml = named(docs, "ConfigMap", "reup-fleet-ctl-config")["data"]["reup.toml"]
    assert 'credentials_dir = "/etc/reup/git"' in toml and mounts["git"]["mountPath"] == "/etc/reup/git"
    secret = named(docs, "Secret", "reup-fleet-ctl-git")["data"]
    assert set(secret) == {"ssh_key", "known_hosts"}
    # Materialise the volume as Kubernetes would (a file per key) and read the config against it.
    volume = tmp_path / "git"
    volume.mkdir()
    for key, value in secret.items():
        (volume / key).write_bytes(base64.b64decode(value))
    cfg = parse_config(toml.replace("/etc/reup/git", str(volume)), base_dir="/etc/reup", env={})
    assert cfg.source.ssh_key == str(volume / "ssh_key") and cfg.source.known_hosts == str(volume / "known_hosts")
    with open(str(cfg.source.known_hosts), encoding="utf-8") as f:
        assert f.read() == KNOWN_HOSTS
    # https: token and CA file under the names the config reads
    docs = render({"config": {"source": {"url": "https://gitlab.example.org/fleet.git"}},
                   "gitCredentials": {"username": "deploy", "token": "glpat-x", "caFile": "PEM"}})
    assert set(named(docs, "Secret", "reup-git")["data"]) == {"username", "token", "ca_file"}


def test_notes_ask_for_a_pinned_host_key_for_ssh() -> None:
    for url in ("ssh://git@github.com/o/fleet.git", "git@github.com:o/fleet.git"):
        notes = chart().render({"config": {"source": {"url": url}}})["reup/templates/NOTES.txt"]
        assert "gitCredentials.knownHosts" in notes
    assert "knownHosts" not in chart().render(SHARDED)["reup/templates/NOTES.txt"]  # credentials given
    assert "knownHosts" not in chart().render({})["reup/templates/NOTES.txt"]  # https://


def test_secret_changes_roll_the_pods() -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        return dict(one(render(values), "StatefulSet")["spec"]["template"]["metadata"]["annotations"])
    base = annotations(SHARDED)
    other_key = annotations({**SHARDED, "ssh": {"privateKey": KEY.replace("AAAA", "BBBB")}})
    other_git = annotations({**SHARDED, "gitCredentials": {"sshKey": KEY, "knownHosts": "x ssh-ed25519 B\n"}})
    assert other_key["checksum/ssh"] != base["checksum/ssh"] and other_key["checksum/git"] == base["checksum/git"]
    assert other_git["checksum/git"] != base["checksum/git"] and other_git["checksum/ssh"] == base["checksum/ssh"]


def test_git_credentials_from_one_source_only() -> None:
    with pytest.raises(helm.HelmRenderError, match="not both"):
        chart().render({"gitCredentials": {"existingSecret": "x", "token": "t"}})
    with pytest.raises(helm.HelmRenderError, match="password or gitCredentials.token"):
        chart().render({"gitCredentials": {"password": "p", "token": "t"}})


def test_ssh_key_from_one_source_only() -> None:
    with pytest.raises(helm.HelmRenderError, match="not both"):
        chart().render({"ssh": {"privateKey": KEY, "existingSecret": "fleet-key"}})


def test_dashboard_configmap_carries_the_dashboard_file() -> None:
    cm = named(render({}), "ConfigMap", "reup-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    with open(os.path.join(CHART, "dashboards", "reup.json"), encoding="utf-8") as f:
        assert json.loads(cm["data"]["reup.json"]) == json.load(f)


# ---- Kubernetes and Helm's own checks ---------------------------------------------------------

KUBERNETES = [OLDEST_KUBERNETES, newest_kubernetes()]


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_objects_pass_kubernetes_validate_strict(name: str, version: str) -> None:
    docs = manifests(chart().render(VALUE_SETS[name]))
    errors = [e for d in docs if d["kind"] not in CRD_KINDS for e in kubernetes_errors(d, version)]
    assert errors == []
    assert {d["kind"] for d in docs} - CRD_KINDS >= {"StatefulSet", "Service", "ConfigMap"}


def test_kubernetes_validate_catches_a_bad_field() -> None:
    sts = one(render({}), "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["mountPath"] = "/x"  # belongs in volumeMounts
    assert kubernetes_errors(sts, OLDEST_KUBERNETES)


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict_is_clean(name: str, version: str) -> None:
    assert chart().lint(VALUE_SETS[name], kube_version=version) == []


def test_helm_package(tmp_path: Any) -> None:
    archive = helm.package(CHART, destination=str(tmp_path))
    assert os.path.basename(archive) == f"reup-{chart().chart.version}.tgz"
    packaged = helm.Chart.load_archive(open(archive, "rb").read())  # noqa: SIM115 - read once
    assert packaged.metadata["icon"].startswith("data:image/svg+xml;base64,")
    assert {t["name"] for t in packaged.templates} == {t["name"] for t in chart().chart.templates}


def test_icon_is_the_svg_file() -> None:
    with open(os.path.join(CHART, "icon.svg"), "rb") as f:
        svg = f.read().strip()
    assert chart().chart.metadata["icon"] == "data:image/svg+xml;base64," + base64.b64encode(svg).decode()


# ---- values schema ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_values_match_the_schema(name: str) -> None:
    chart().validate(VALUE_SETS[name])


@pytest.mark.parametrize("change", [
    {"replicas": 0}, {"replicas": "3"}, {"replicas": 1.5}, {"replicaCount": 2},
    {"config": {"state": {"dir": "/data"}}}, {"config": {"http": {"listen": ":1"}}}, {"config": {"source": {"url": ""}}},
    {"config": {"source": {"pol_interval": 5}}}, {"prometheusRule": {"haltedFor": "15 minutes"}},
    {"prometheusRule": {"fetchStaleIntervals": 0}}, {"persistence": {"nix": {"size": 50}}},
    {"service": {"port": 70000}}, {"ssh": {"key": "../key"}},
])
def test_bad_values_fail_the_schema(change: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart().validate(change)
    with pytest.raises(helm.HelmValuesError):  # and Helm refuses to render them
        chart().render(change)


# ---- alerts: promtool ---------------------------------------------------------------------------

def promtool(*args: str, cwd: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: install Debian's prometheus package (.ci/run does)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rules_file(values: dict[str, Any], directory: str) -> str:
    spec = one(render(values), "PrometheusRule")["spec"]
    path = os.path.join(directory, "rules.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f)
    return path


@pytest.mark.parametrize("name", ["defaults", "sharded"])
def test_rules_pass_promtool_check(name: str, tmp_path: Any) -> None:
    result = promtool("check", "rules", rules_file(VALUE_SETS[name], str(tmp_path)), cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests(tmp_path: Any) -> None:
    rules_file({}, str(tmp_path))
    shutil.copy(os.path.join(CHART, "tests", "alerts_test.yaml"), tmp_path)
    result = promtool("test", "rules", "alerts_test.yaml", cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    # the tests see the thresholds: with another one they fail
    rules_file({"prometheusRule": {"fetchStaleIntervals": 6}}, str(tmp_path))
    result = promtool("test", "rules", "alerts_test.yaml", cwd=str(tmp_path))
    assert result.returncode == 1 and "ReupFetchStale" in result.stdout + result.stderr


def dashboard() -> dict[str, Any]:
    with open(os.path.join(CHART, "dashboards", "reup.json"), encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def dashboard_exprs() -> list[str]:
    """The queries of every panel and of the Prometheus annotations."""
    dash = dashboard()
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])] + [
        a["expr"] for a in dash["annotations"]["list"] if a.get("datasource", {}).get("type") == "prometheus"]


def test_dashboard_queries_parse() -> None:
    """Every panel and variable query parses as PromQL (Grafana's interval variables as durations)."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        parse(expr)


def test_dashboard_panels() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    # Import through Grafana's UI: it asks for the data source declared in __inputs.
    (ds_input,) = dash["__inputs"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${" + ds_input["name"] + "}"
    # Namespace then controller: every query is scoped by both.
    assert list(variables) == ["datasource", "namespace", "job"]
    assert 'namespace=~"$namespace"' in variables["job"]["query"]["query"]
    for expr in dashboard_exprs():
        for sel in selectors(expr):
            assert {"namespace", "job"} <= sel.labels, expr
    annotations = {a["name"]: a for a in dash["annotations"]["list"]}
    assert "reup_source_revision_info" in annotations["New revision"]["expr"]
    assert "reup_rollout_halted" in annotations["Rollout halted"]["expr"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ("progress by wave", "devices by state", "bytes sent vs. full closure", "saving",
                   "update duration", "build duration", "errors by stage", "fetch"):
        assert needed in titles, needed
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    exprs = dashboard_exprs()
    assert any("histogram_quantile(0.99, sum by (le) (rate(reup_update_duration_seconds_bucket" in e for e in exprs)
    for e in exprs:  # one pod per shard: every series is summed (or min/max-ed) across replicas
        assert all(s.aggregated for s in selectors(e)), e


# ---- queries use what the controller exports ----------------------------------------------------

def exported() -> dict[str, frozenset[str]]:
    """Series name -> label names, for every metric of the controller's registry (all options on)."""
    suffixes: dict[str, dict[str, tuple[str, ...]]] = {
        "counter": {"_total": ()}, "gauge": {"": ()}, "histogram": {"_bucket": ("le",), "_sum": (), "_count": ()}}
    names: dict[str, frozenset[str]] = {"up": frozenset(SCRAPE_LABELS)}
    for name, (kind, labels) in controller_metrics().items():
        for sfx, extra in suffixes[kind].items():
            names[name + sfx] = labels | SCRAPE_LABELS | set(extra)
    return names


def rule_exprs() -> list[str]:
    exprs = []
    for values in (VALUE_SETS["defaults"], VALUE_SETS["sharded"]):
        exprs += [r["expr"] for r in one(render(values), "PrometheusRule")["spec"]["groups"][0]["rules"]]
    return exprs


def test_queries_use_exported_metrics_and_labels() -> None:
    names = exported()
    variable_queries = [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    uses: list[Selector] = []
    for expr in dashboard_exprs() + rule_exprs():
        uses += selectors(expr)
    for q in variable_queries:  # label_values(selector, label)
        selector, label = q.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        uses += [Selector(u.metric, u.labels | {label}, True) for u in selectors(selector)]
    assert len({u.metric for u in uses}) >= 15
    for use in uses:
        assert use.metric in names, f"{use.metric} is not exported by reup.loop.metrics"
        assert use.labels <= names[use.metric], f"{use.metric} has no label(s) {set(use.labels - names[use.metric])}"
    for needed in ("reup_git_last_success_timestamp_seconds", "reup_source_poll_interval_seconds", "reup_shard_info"):
        assert needed in {u.metric for u in uses}


def test_promql_selectors_golden() -> None:
    e = 'histogram_quantile(0.9, sum by (le) (rate(x_bucket{job=~"$job"}[$__rate_interval]))) > 3'
    assert selectors(e) == [Selector("x_bucket", frozenset({"le", "job"}), True)]
    assert selectors('time() - a{p="1"} > 5 * b and a > 0') == [
        Selector("a", frozenset({"p"}), False), Selector("b", frozenset(), False), Selector("a", frozenset(), False)]
    assert selectors('sum(x) by (w) / count without (z) (max by (w) (y{q!~"a|b"})) or vector(0)') == [
        Selector("x", frozenset({"w"}), True), Selector("y", frozenset({"q", "z", "w"}), True)]
    assert selectors("a unless a offset 5m") == [Selector("a", frozenset(), False)] * 2
    for bad in ('a * on(pod) b', "rate(a[5m] @ 100)", 'label_replace(a, "x", "$1", "y", "(.*)")', '{__name__="a"}',
                "sum(rate(a[5m])", "a >", "max_over_time(a[5m:1m])"):
        with pytest.raises(PromQLError):
            selectors(bad)


def test_exported_rejects_unknown_label() -> None:
    names = exported()
    (use,) = selectors('sum by (device) (reup_devices{state="failed"})')
    assert not use.labels <= names[use.metric]
    assert names["reup_update_duration_seconds_bucket"] >= {"le"} and "le" not in names["reup_update_duration_seconds_sum"]
