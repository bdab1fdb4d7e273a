"""Private fleet repos against real git servers: OpenSSH + git-shell and git http-backend over TLS.

No mocks: each test starts a real server on 127.0.0.1 (tests/support/gitservers.py) and fetches
with the controller's GitSource, `reup source test` or the Controller itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from reup.config.reup_toml import parse_config
from reup.core.errors import ConfigError, TemporaryError
from reup.io.gitfetch import GitCredentials, SourceRefused, credentials_from
from reup.io.source import GitSource
from reup.loop.controller import Controller
from reup_lab.simdevice import free_port, generate_key
from support.gitservers import HttpsGitServer, SshGitServer, commit_to, make_ca
from support.sshd import metric, parse_metrics, reup_bin

TOKEN = "glpat-test-0123456789"


@pytest.fixture
def ssh_server(tmp_path: os.PathLike[str]) -> Iterator[tuple[SshGitServer, str, str]]:
    """(server, deploy key path, head commit) with one commit on main."""
    server = SshGitServer()
    key = os.path.join(str(tmp_path), "deploy_key")
    server.authorize(generate_key(key))
    head = commit_to(server.repo(), os.path.join(str(tmp_path), "work"), "first", {"fleet.toml": "# empty\n"})
    server.start()
    try:
        yield server, key, head
    finally:
        server.stop()


@pytest.fixture
def https_server(tmp_path: os.PathLike[str]) -> Iterator[tuple[HttpsGitServer, str]]:
    server = HttpsGitServer(os.path.join(str(tmp_path), "https"), user="deploy", token=TOKEN)
    head = commit_to(server.repo(), os.path.join(str(tmp_path), "work"), "first", {"fleet.toml": "# empty\n"})
    server.start()
    try:
        yield server, head
    finally:
        server.stop()


def write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def nothing_fetched(mirror: str) -> bool:
    out = subprocess.run(["git", "--git-dir", mirror, "count-objects", "-v"], capture_output=True, text=True,
                         check=True).stdout
    counts = dict(line.split(": ") for line in out.splitlines())
    refs = subprocess.run(["git", "--git-dir", mirror, "for-each-ref"], capture_output=True, text=True).stdout
    return counts["count"] == "0" and counts["in-pack"] == "0" and refs.strip() == ""


# --- ssh:// ---------------------------------------------------------------------------------------


def test_ssh_deploy_key_pinned_host_key_and_a_user_other_than_git(ssh_server: tuple[SshGitServer, str, str],
                                                                   tmp_path: os.PathLike[str]) -> None:
    server, key, head = ssh_server
    assert server.user != "git"
    src = GitSource(server.url(), "main", os.path.join(str(tmp_path), "mirror"),
                    GitCredentials(ssh_key=key, known_hosts=server.known_hosts()))
    assert src.fetch() == head, server.log()
    report = src.last_report
    assert report is not None and report.transport == "ssh"
    assert report.host_key == f"ssh-ed25519 {server.fingerprint()}"
    assert report.auth.startswith("publickey (deploy key")
    assert src.read_file(head, "fleet.toml") == "# empty\n"


def test_ssh_host_key_mismatch_is_refused_and_nothing_is_fetched(ssh_server: tuple[SshGitServer, str, str],
                                                                  tmp_path: os.PathLike[str]) -> None:
    server, key, _ = ssh_server
    other = generate_key(os.path.join(str(tmp_path), "impostor_host_key"))
    mirror = os.path.join(str(tmp_path), "mirror")
    src = GitSource(server.url(), "main", mirror,
                    GitCredentials(ssh_key=key, known_hosts=f"[127.0.0.1]:{server.port} {other}\n"))
    with pytest.raises(SourceRefused) as info:
        src.fetch()
    assert info.value.result == "host_key_mismatch"
    assert "does not match the pinned known_hosts" in str(info.value)
    assert not isinstance(info.value, TemporaryError)
    assert nothing_fetched(mirror)


def test_ssh_unknown_host_or_no_known_hosts_is_refused(ssh_server: tuple[SshGitServer, str, str],
                                                       tmp_path: os.PathLike[str]) -> None:
    server, key, _ = ssh_server
    # known_hosts that pins another host only: the server is unknown.
    mirror = os.path.join(str(tmp_path), "mirror")
    elsewhere = f"[127.0.0.1]:{server.port + 1} {server.host_public_key()}\n"
    with pytest.raises(SourceRefused) as info:
        GitSource(server.url(), "main", mirror, GitCredentials(ssh_key=key, known_hosts=elsewhere)).fetch()
    assert info.value.result == "host_key_unknown" and "not in the pinned known_hosts" in str(info.value)
    assert nothing_fetched(mirror)
    # No known_hosts at all: refused by GitSource, and by reup.toml before anything runs.
    with pytest.raises(SourceRefused) as info:
        GitSource(server.url(), "main", mirror, GitCredentials(ssh_key=key)).fetch()
    assert info.value.result == "host_key_unknown"
    assert nothing_fetched(mirror)
    with pytest.raises(ConfigError, match="known_hosts is required"):
        parse_config(f'[source]\nurl = "{server.url()}"\nssh_key = "{key}"\n', env={})
    # A known_hosts path that does not exist is a config error, not a silent fallback.
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(f'[source]\nurl = "{server.url()}"\nknown_hosts = "/nonexistent/known_hosts"\n', env={})


def test_ssh_wrong_key_is_an_auth_error_and_a_closed_port_is_temporary(
        ssh_server: tuple[SshGitServer, str, str], tmp_path: os.PathLike[str]) -> None:
    server, _, _ = ssh_server
    wrong = os.path.join(str(tmp_path), "wrong_key")
    generate_key(wrong)
    mirror = os.path.join(str(tmp_path), "mirror")
    with pytest.raises(SourceRefused) as info:
        GitSource(server.url(), "main", mirror, GitCredentials(ssh_key=wrong, known_hosts=server.known_hosts())).fetch()
    assert info.value.result == "auth_failed" and "refused our credentials" in str(info.value)
    assert nothing_fetched(mirror)
    port = free_port()  # nobody listens: network trouble, retried
    url = f"ssh://{server.user}@127.0.0.1:{port}/x.git"
    with pytest.raises(TemporaryError):
        GitSource(url, "main", mirror, GitCredentials(known_hosts=server.known_hosts())).fetch()


def test_ssh_agent_is_used_when_no_key_is_configured(ssh_server: tuple[SshGitServer, str, str],
                                                     tmp_path: os.PathLike[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server, key, head = ssh_server
    sock = os.path.join(str(tmp_path), "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        subprocess.run(["ssh-add", "-q", key], env={**os.environ, "SSH_AUTH_SOCK": sock}, check=True,
                       capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        src = GitSource(server.url(), "main", os.path.join(str(tmp_path), "mirror"),
                        GitCredentials(known_hosts=server.known_hosts()))
        assert src.fetch() == head
        assert src.last_report is not None and src.last_report.auth.startswith("publickey (agent")
    finally:
        agent.terminate()
        agent.wait(timeout=5)


def test_reup_source_test_reports_fingerprint_auth_and_head(ssh_server: tuple[SshGitServer, str, str],
                                                            tmp_path: os.PathLike[str]) -> None:
    server, key, head = ssh_server
    base = str(tmp_path)
    # The chart's layout: a credentials directory with a file per key (a mounted Secret).
    creds = os.path.join(base, "git-credentials")
    os.makedirs(creds)
    write(os.path.join(creds, "known_hosts"), server.known_hosts())
    with open(key, "rb") as f, open(os.open(os.path.join(creds, "ssh_key"), os.O_WRONLY | os.O_CREAT, 0o440), "wb") as out:
        out.write(f.read())
    config = write(os.path.join(base, "reup.toml"),
                   f'[source]\nurl = "{server.url()}"\ncredentials_dir = "{creds}"\n\n[state]\ndir = "{base}/state"\n')
    r = subprocess.run([reup_bin(), "source", "test", "--config", config], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ssh-ed25519 {server.fingerprint()} (pinned known_hosts)" in r.stdout
    assert "publickey (deploy key" in r.stdout and head in r.stdout
    # A changed host key: exit 1 and the refusal in words, as JSON too.
    write(os.path.join(creds, "known_hosts"),
          f"[127.0.0.1]:{server.port} {generate_key(os.path.join(base, 'other_host'))}\n")
    r = subprocess.run([reup_bin(), "source", "test", "--json", "--config", config], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["result"] == "host_key_mismatch" and "does not match" in out["error"]


def test_controller_counts_a_refused_fetch_and_stays_on_its_commit(ssh_server: tuple[SshGitServer, str, str],
                                                                    tmp_path: os.PathLike[str]) -> None:
    server, key, head = ssh_server
    base = str(tmp_path)
    kh = write(os.path.join(base, "known_hosts"), server.known_hosts())
    cfg = parse_config(f'[source]\nurl = "{server.url()}"\nssh_key = "{key}"\nknown_hosts = "{kh}"\n'
                       f'[state]\ndir = "{base}/state"\n[http]\nlisten = ""\n', env={})
    ctrl = Controller(cfg)
    try:
        asyncio.run(ctrl.fetch())
        assert ctrl.store.revision() is not None and ctrl.store.revision()[0] == head  # type: ignore[index]
        commit_to(server.repo(), os.path.join(base, "work"), "second", {"fleet.toml": "# still empty\n"})
        server.publish()
        write(kh, f"[127.0.0.1]:{server.port} {generate_key(os.path.join(base, 'other_host'))}\n")
        asyncio.run(ctrl.fetch())
        samples = parse_metrics(generate_latest(ctrl.metrics.registry).decode())
        assert metric(samples, "reup_git_fetches_total", result="host_key_mismatch") == 1
        assert metric(samples, "reup_git_fetches_total", result="success") == 1
        assert ctrl.store.revision()[0] == head  # type: ignore[index]
        events = ctrl.store.events("ReconcileError")
        assert events and "host key does not match" in json.dumps(events[-1])
    finally:
        ctrl.close()


# --- https:// -------------------------------------------------------------------------------------


def test_https_token_with_ca_file(https_server: tuple[HttpsGitServer, str], tmp_path: os.PathLike[str]) -> None:
    server, head = https_server
    token = write(os.path.join(str(tmp_path), "token"), TOKEN + "\n")
    src = GitSource(server.url(), "main", os.path.join(str(tmp_path), "mirror"),
                    GitCredentials(username="deploy", token_file=token, ca_file=server.ca_file))
    assert src.fetch() == head
    assert src.last_report is not None and src.last_report.auth == "basic (token_file, user deploy)"
    statuses = [status for _, status in server.requests]
    assert statuses[0] == 401 and 200 in statuses  # asked for credentials, then let us in


def test_https_wrong_token_is_an_auth_error(https_server: tuple[HttpsGitServer, str],
                                            tmp_path: os.PathLike[str]) -> None:
    server, _ = https_server
    token = write(os.path.join(str(tmp_path), "token"), "wrong\n")
    mirror = os.path.join(str(tmp_path), "mirror")
    with pytest.raises(SourceRefused) as info:
        GitSource(server.url(), "main", mirror,
                  GitCredentials(username="deploy", token_file=token, ca_file=server.ca_file)).fetch()
    assert info.value.result == "auth_failed"
    assert nothing_fetched(mirror)


def test_https_untrusted_certificate_is_refused(https_server: tuple[HttpsGitServer, str],
                                                tmp_path: os.PathLike[str]) -> None:
    server, _ = https_server
    token = write(os.path.join(str(tmp_path), "token"), TOKEN)
    mirror = os.path.join(str(tmp_path), "mirror")
    other_ca, _ = make_ca(str(tmp_path), "other")
    for ca_file in (None, other_ca):  # the system's CAs, then another CA
        with pytest.raises(SourceRefused) as info:
            GitSource(server.url(), "main", mirror,
                      GitCredentials(username="deploy", token_file=token, ca_file=ca_file)).fetch()
        assert info.value.result == "tls_untrusted", str(info.value)
        assert "ca_file" in str(info.value)
    assert nothing_fetched(mirror)
    assert not any(status == 200 for _, status in server.requests)


def test_https_credentials_from_environment_and_url_user(https_server: tuple[HttpsGitServer, str],
                                                         tmp_path: os.PathLike[str]) -> None:
    server, head = https_server
    base = str(tmp_path)
    token = write(os.path.join(base, "token"), TOKEN)
    url = server.url().replace("https://", "https://deploy@")
    cfg = parse_config(f'[source]\nurl = "{url}"\n', base_dir=base,
                       env={"REUP_SOURCE_TOKEN_FILE": token, "REUP_SOURCE_CA_FILE": server.ca_file})
    assert cfg.source.token_file == token and cfg.source.ca_file == server.ca_file
    src = GitSource(cfg.source.url, "main", os.path.join(base, "mirror"), credentials_from(cfg.source))
    assert src.fetch() == head
    assert src.last_report is not None and "user deploy" in src.last_report.auth
