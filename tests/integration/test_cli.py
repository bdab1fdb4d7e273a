"""The `reup` command line as an operator meets it, run as a real process: errors are one clear line and
an exit code (never a traceback unless --debug), logs come as text or JSON lines, tables fit and read
well, a device's whole story is one command, and the CLI describes itself."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import pytest
from reup.cli.main import build_parser
from reup.core.model import Decision, DeviceState, Target
from reup.loop.state import StateDB
from reup_lab import demofleet
from support.sshd import reup_bin

BIN = os.path.dirname(reup_bin())


def reup(*args: str, cwd: str | None = None, env: dict[str, str] | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([reup_bin(), *args], capture_output=True, text=True, timeout=120, check=False,
                          cwd=cwd, env={**os.environ, **(env or {})}, input=stdin)


def config(tmp: str, body: str = "") -> str:
    path = os.path.join(tmp, "reup.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'[source]\nurl = "fleet"\n[http]\nlisten = ""\n{body}')
    return path


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


def test_versions_and_help_describe_the_tool() -> None:
    assert reup("--version").stdout.strip().startswith("reup ")
    recv = subprocess.run([os.path.join(BIN, "reup-receive"), "--version"], capture_output=True, text=True,
                          check=False)
    assert recv.returncode == 0 and recv.stdout.startswith("reup-receive ") and "stream format" in recv.stdout
    top = reup("--help").stdout
    assert "GitOps delivery of NixOS systems to device fleets by binary delta" in top.split("\n\n")[1]


def test_every_command_and_option_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    missing = [name for name in sub.choices if not helps.get(name)]
    for name, sp in sub.choices.items():
        missing += [f"{name} {a.option_strings or a.dest}" for a in sp._actions
                    if not isinstance(a, argparse._HelpAction) and a.help in (None, "", argparse.SUPPRESS)]
    assert missing == []


@pytest.mark.parametrize(("args", "body", "expected"), [
    (("status",), '[state]\ndir = "/proc/reup-cannot-be-here"\n', "/proc/reup-cannot-be-here"),
    (("status",), "[source]\n", "reup.toml"),  # a table twice: broken TOML
    (("history", "nobody"), '[ssh]\nattempts = "3"\n', "ssh.attempts: expected an integer, got '3'"),
    (("run", "--once"), "", "not a git repository: "),
    (("status", "--config", "/nonexistent/reup.toml"), "", "/nonexistent/reup.toml: No such file or directory"),
])
def test_operator_errors_are_one_line_and_exit_2(tmp_path: str, args: tuple[str, ...], body: str,
                                                 expected: str) -> None:
    cfg = config(str(tmp_path), body)
    r = reup(*args, *([] if "--config" in args else ["--config", cfg]))
    no_traceback(r)
    assert expected in r.stderr, r.stderr
    assert r.returncode in (1, 2), r  # `run --once` ends with the fleet not in sync: 1


def test_a_missing_branch_is_named(tmp_path: str) -> None:
    repo = os.path.join(str(tmp_path), "fleet")
    demofleet.init_repo(repo)
    demofleet.commit(repo, "one", configs={"alpha": "1"}, fleet="")
    cfg = config(str(tmp_path))
    with open(cfg, encoding="utf-8") as f:
        text = f.read().replace('url = "fleet"\n', 'url = "fleet"\nbranch = "prod"\n')
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(text)
    r = reup("run", "--once", "--config", cfg)
    no_traceback(r)
    assert "no branch 'prod' in " in r.stderr, r.stderr


def test_init_into_an_unwritable_place_is_one_line(tmp_path: str) -> None:
    r = reup("init", "/proc/reup-fleet")
    no_traceback(r)
    assert r.returncode == 2 and r.stderr.startswith("reup: ") and len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path: str) -> None:
    cfg = config(str(tmp_path), '[state]\ndir = "/proc/reup-cannot-be-here"\n')
    r = reup("status", "--debug", "--config", cfg)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_a_closed_pipe_is_no_error(tmp_path: str) -> None:
    cfg = config(str(tmp_path))
    seed(os.path.join(str(tmp_path), "state"), 3000)
    shell = subprocess.run(f"'{reup_bin()}' status --json --config '{cfg}' | head -c 100 >/dev/null; "
                           "echo \"rc=${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash", capture_output=True,
                           text=True, timeout=60, check=False)
    no_traceback(shell)
    assert "rc=0" in shell.stdout and "Error" not in shell.stderr, shell.stderr


def seed(state_dir: str, n: int = 2) -> StateDB:
    """A state directory as a controller leaves it: one revision, device d0 failed with a Nix error."""
    db = StateDB(state_dir)
    targets = [Target(f"d{i}", "c" * 40, "canary" if i == 0 else "rest", f"/nix/store/{'a' * 32}-d{i}.drv",
                      f"/nix/store/{'b' * 32}-nixos-system-d{i}") for i in range(n)]
    now = time.time()
    db.record_revision("c" * 40, now, targets, None)
    nix_error = ("error: builder for '/nix/store/" + "a" * 32 + "-d0.drv' failed with exit code 1;\n"
                 "       last 10 log lines:\n       > gcc: fatal error: no input files\n"
                 "       For full logs, run 'nix log /nix/store/" + "a" * 32 + "-d0.drv'.\n"
                 "(use '--show-trace' to show detailed location information)")
    db.set_states([Decision("d0", DeviceState.FAILED, None, nix_error * 3)]
                  + [Decision(f"d{i}", DeviceState.PENDING, None, "update needed") for i in range(1, n)], now)
    db.log_event("DeviceStateChanged", "d0", {"old": "pending", "new": "building", "reason": "target not built"},
                 now - 5)
    db.log_event("TransferFinished", "d0", {"stream_bytes": 718, "nar_bytes": 19150, "seconds": 0.4}, now - 3)
    db.log_event("DeviceUpdated", "d0", {"result": "failed", "commit": "c" * 40, "toplevel": targets[0].toplevel,
                                         "error": nix_error}, now - 2)
    db.close()
    return db


def test_status_shows_the_meaningful_error_line_and_device_story(tmp_path: str) -> None:
    cfg = config(str(tmp_path))
    seed(os.path.join(str(tmp_path), "state"))
    table = reup("status", "--config", cfg)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("d0 "))
    assert "error: builder for" in row and "show-trace" not in row
    story = reup("status", "d0", "--config", cfg)
    assert story.returncode == 0, story.stderr
    assert story.stdout.startswith("device d0: failed (wave canary")
    assert story.stdout.count("gcc: fatal error: no input files") == 3  # the last error in full
    assert "update failed" in story.stdout and "pending -> building" in story.stdout  # recent events
    assert "718" in story.stdout and "0.4s" in story.stdout  # bytes and duration of the transfer
    as_json = json.loads(reup("status", "--json", "--config", cfg).stdout)
    assert as_json["devices"][0]["last_error"].count("no input files") == 3  # whole, within the 4 KiB bound
    assert reup("status", "nobody", "--config", cfg).returncode == 1


def test_history_is_a_table(tmp_path: str) -> None:
    cfg = config(str(tmp_path))
    seed(os.path.join(str(tmp_path), "state"))
    r = reup("history", "d0", "--config", cfg)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TIME", "EVENT", "BYTES", "DURATION", "DETAIL"]
    assert "pending -> building" in lines[1] and "{" not in r.stdout
    assert "sent" in lines[2] and "718" in lines[2]
    assert "update failed" in lines[3] and "error: builder for" in lines[3]
    assert len(json.loads(reup("history", "d0", "--json", "--config", cfg).stdout)) == 3


def test_pause_shows_at_once_without_a_controller(tmp_path: str) -> None:
    cfg = config(str(tmp_path))
    seed(os.path.join(str(tmp_path), "state"))
    assert reup("rollout", "pause", "--config", cfg).returncode == 0
    assert "rollout paused" in reup("status", "--config", cfg).stdout
    doc = json.loads(reup("rollout", "status", "--json", "--config", cfg).stdout)
    assert doc["paused"] is True
    assert json.loads(reup("status", "--json", "--config", cfg).stdout)["paused"] is True
    reup("rollout", "resume", "--config", cfg)
    assert json.loads(reup("rollout", "status", "--json", "--config", cfg).stdout)["paused"] is False


def test_json_logs_one_object_per_line_and_fleet_errors_at_error(tmp_path: str) -> None:
    repo = os.path.join(str(tmp_path), "fleet")
    demofleet.init_repo(repo)
    demofleet.commit(repo, "broken fleet", configs={"alpha": "1"}, fleet="[devices.a]\nhots = 1\n")
    cfg = config(str(tmp_path))
    r = reup("--log-format", "json", "run", "--once", "--config", cfg)
    no_traceback(r)
    records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert records and len(records) == len([ln for ln in r.stderr.splitlines() if ln.strip()]), r.stderr
    fleet = [rec for rec in records if rec.get("event") == "RevisionSeen"]
    assert fleet and fleet[0]["level"] == "error" and "did you mean `host`" in fleet[0]["fleet_error"]
    assert all({"time", "level", "logger", "message"} <= set(rec) for rec in records)
    quiet = reup("run", "--once", "--log-level", "error", "--config", cfg)
    assert [ln for ln in quiet.stderr.splitlines() if " INFO " in ln] == []


def test_init_commits_with_the_users_identity(tmp_path: str) -> None:
    home = os.path.join(str(tmp_path), "home")
    os.makedirs(home)
    with open(os.path.join(home, ".gitconfig"), "w", encoding="utf-8") as f:
        f.write("[user]\n\tname = Ada Operator\n\temail = ada@example.org\n")
    dest = os.path.join(str(tmp_path), "fleet")
    env = {"HOME": home, "GIT_CONFIG_NOSYSTEM": "1"}
    r = reup("init", dest, env=env)
    assert r.returncode == 0, r.stderr
    assert "inputs.reup.url" in r.stdout and "nix flake lock" in r.stdout and "ssh-keyscan" in r.stdout
    author = subprocess.run(["git", "-C", dest, "log", "-1", "--format=%an <%ae>"], capture_output=True, text=True,
                            env={**os.environ, **env}, check=True).stdout.strip()
    assert author == "Ada Operator <ada@example.org>"
    bare = os.path.join(str(tmp_path), "nohome")
    os.makedirs(bare)
    dest2 = os.path.join(str(tmp_path), "fleet2")
    assert reup("init", dest2, env={"HOME": bare, "GIT_CONFIG_NOSYSTEM": "1"}).returncode == 0
    fallback = subprocess.run(["git", "-C", dest2, "log", "-1", "--format=%an"], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert fallback == "reup"
