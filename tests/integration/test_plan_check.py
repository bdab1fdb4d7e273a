"""`reup plan --rev/--base/--assume-base` and `reup check` on a real fleet repo with real Nix, no devices,
and the fleet template's CI examples (GitHub Actions, GitLab CI): their reup and git commands run here
as the CI would run them in a pull request's checkout."""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import pytest
import yaml
from reup.core.model import Target
from reup.core.preview import human
from reup.io.template import template_dir
from reup.loop.state import StateDB
from reup_lab import demofleet
from support.sshd import reup_bin

pytestmark = pytest.mark.slow

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH+C9okWi0dh2l9GKJl"
WAVES = {"d1": "canary", "d2": "rest", "d3": "rest"}
FLEET = '[rollout]\nwaves = ["canary", "rest"]\n' + "".join(
    f'[devices.{n}]\nhost = "127.0.0.1"\nport = 2222\nhost_key = "{KEY}"\nwave = "{w}"\n' for n, w in WAVES.items())


def reup(cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([reup_bin(), *args], cwd=cwd, capture_output=True, text=True, timeout=180, check=False)


def pr_checkout(base: str, name: str, configs: dict[str, str]) -> tuple[str, str]:
    """An upstream repo with main at version 1 everywhere, and a clone with a pull request's commit on top."""
    upstream = os.path.join(base, name + "-upstream")
    demofleet.init_repo(upstream)
    demofleet.commit(upstream, "all at 1", configs=dict.fromkeys(WAVES, "1"), fleet=FLEET)
    checkout = os.path.join(base, name)
    subprocess.run(["git", "clone", "-q", upstream, checkout], check=True)
    demofleet.git(checkout, "checkout", "-q", "-b", "change")
    return upstream, demofleet.commit(checkout, "the change", configs=configs)


def test_check_and_plan(tmp_path: os.PathLike[str]) -> None:
    base = str(tmp_path)
    upstream, head = pr_checkout(base, "fleet", {"d1": "2", "d2": "1", "d3": "!eval"})
    checkout = os.path.join(base, "fleet")

    ok = reup(upstream, "check", "--repo", ".")
    assert ok.returncode == 0 and ok.stdout == "ok: 3 devices evaluate\n", ok.stdout + ok.stderr
    bad = reup(checkout, "check", "--repo", ".")
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == ["device d3: evaluation failed: error: configuration d3 is broken"]

    r = reup(checkout, "plan", "--repo", ".", "--rev", "HEAD", "--base", "origin/main", "--build", "--format", "json")
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    assert doc["revision"]["commit"] == head and doc["revision"]["message"] == "the change"
    assert doc["summary"] == {"devices": 3, "changed": 1, "unchanged": 1, "errors": 1, "removed": 0}
    rows = {row["device"]: row for w in doc["waves"] for row in w["devices"]}
    d1 = rows["d1"]
    assert d1["change"] == "update" and d1["base_from"] == "base" and d1["needs_build"] is None
    assert 0 < d1["stream_bytes"] < d1["full_bytes"]  # the delta is smaller than a full copy
    assert rows["d2"]["change"] == "unchanged"
    assert [e["device"] for e in doc["errors"]] == ["d3"]

    md = reup(checkout, "plan", "--repo", ".", "--rev", "HEAD", "--base", "origin/main", "--format", "markdown")
    assert md.returncode == 0, md.stderr
    text = md.stdout
    assert text.startswith(f"### reup plan: `{head[:12]}` against `{doc['base']['commit'][:12]}`")
    assert "**1 of 3 devices change**, 1 unchanged, **1 evaluation error**." in text
    assert "#### Wave 1: `canary` (1 of 1 change)" in text and "Unchanged: `d2`." in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| `d1` |"))
    assert human(d1["stream_bytes"]) in row and human(d1["full_bytes"]) in row  # same figures as the JSON
    assert "| `d3` | `evaluation failed: error: configuration d3 is broken` |" in text

    # --assume-base: every device is taken to run d1's old system
    r = reup(checkout, "plan", "--repo", ".", "--rev", "HEAD", "--assume-base", d1["base"], "--format", "json")
    assume = {row["device"]: row for w in json.loads(r.stdout)["waves"] for row in w["devices"]}
    assert assume["d1"]["stream_bytes"] == d1["stream_bytes"]
    assert assume["d2"]["change"] == "update" and assume["d2"]["base_from"] == "assume"

    # what the controller last knew: its state directory (read-only; here d1 acknowledged its old system)
    state = os.path.join(base, "state")
    store = StateDB(state)
    store.record_revision("a" * 40, 0.0, [Target("d1", "a" * 40, "canary", "x.drv", d1["base"])], None)
    store.record_ack("d1", "a" * 40, d1["base"], 1, 0.0)
    store.close()
    r = reup(checkout, "plan", "--repo", ".", "--state", state, "--format", "json")
    known = {row["device"]: row for w in json.loads(r.stdout)["waves"] for row in w["devices"]}
    assert known["d1"]["base_from"] == "state" and known["d1"]["stream_bytes"] == d1["stream_bytes"]
    assert known["d2"]["change"] == "install" and known["d2"]["base"] is None  # never acknowledged anything


def ci_commands(path: str) -> list[tuple[str, dict[str, str]]]:
    """(shell line, step env) of every `reup` and `git` command in a GitHub workflow or GitLab CI file."""
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    out: list[tuple[str, dict[str, str]]] = []
    if "jobs" in doc:  # GitHub Actions
        for job in doc["jobs"].values():
            for step in job["steps"]:
                for line in str(step.get("run", "")).splitlines():
                    out.append((line, {k: str(v) for k, v in (step.get("env") or {}).items()}))
    else:  # GitLab CI
        for job in doc.values():
            if isinstance(job, dict) and "script" in job:
                out += [(str(line), {}) for line in job["script"]]
    return [(line, env) for line, env in out if line.startswith(("reup ", "git "))]


def expand(value: str, ci_env: dict[str, str]) -> str:
    return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: ci_env.get(m.group(1), ""), value)


def test_template_ci_examples(tmp_path: os.PathLike[str]) -> None:
    tpl = template_dir()
    gh = ci_commands(os.path.join(tpl, ".github", "workflows", "reup.yml"))
    gl = ci_commands(os.path.join(tpl, ".gitlab-ci.yml"))
    assert [c.split()[:2] for c, _ in gh] == [["reup", "check"], ["reup", "plan"]]
    assert [c.split()[:2] for c, _ in gl] == [["reup", "check"], ["git", "fetch"], ["reup", "plan"]]
    github = {"github.base_ref": "main"}
    gitlab = {"CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "main"}
    for name, commands, ci_env in (("github", gh, github), ("gitlab", gl, gitlab)):
        _, head = pr_checkout(str(tmp_path), name, {"d1": "2", "d2": "2", "d3": "1"})
        checkout = os.path.join(str(tmp_path), name)
        for line, step_env in commands:
            env = {**os.environ, **ci_env}
            for k, v in step_env.items():  # ${{ github.x }} expressions of the step's env
                env[k] = expand(v, ci_env)
            line = line.replace("reup ", reup_bin() + " ", 1) if line.startswith("reup ") else line
            r = subprocess.run(["bash", "-ec", line], cwd=checkout, env=env, capture_output=True, text=True,
                               timeout=180, check=False)
            assert r.returncode == 0, f"{name}: {line}\n{r.stdout}\n{r.stderr}"
        with open(os.path.join(checkout, "reup-plan.md"), encoding="utf-8") as f:
            text = f.read()
        assert text.startswith(f"### reup plan: `{head[:12]}` against `")
        assert "**2 of 3 devices change**, 1 unchanged." in text
        assert re.search(r"^\| `d2` \| nixos-system-d2-1 \(\w+\) → nixos-system-d2-2 \(\w+\) \| \d", text, re.M), text
