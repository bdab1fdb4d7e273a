"""`[source]` credential keys (reup_toml.py) and the pure parts of gitfetch.py: golden cases."""

from __future__ import annotations

import os
from typing import Any

import pytest
from reup.config.reup_toml import parse_config
from reup.core.errors import ConfigError
from reup.io.gitfetch import classify, credentials_from, is_ssh_url, url_user

KH = "[git.example.org]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEx8O0jJ9Zw4mXl3kVrYzq1N0vJ5mO7cH2rT8pQ4sU6d"


def cfg(body: str, env: dict[str, str] | None = None, base: str = "/") -> Any:
    return parse_config(f"[source]\n{body}\n[state]\ndir = \"/tmp/s\"\n", base_dir=base, env=env or {}).source


def test_ssh_needs_known_hosts_unless_insecure_or_credentials_dir(tmp_path: Any) -> None:
    for url in ("ssh://fleet@git.example.org/fleet.git", "alice@git.example.org:fleet.git"):
        with pytest.raises(ConfigError, match="known_hosts is required"):
            cfg(f'url = "{url}"')
        assert cfg(f'url = "{url}"\nknown_hosts = "{KH}"').known_hosts == KH
        assert cfg(f'url = "{url}"\ninsecure_skip_host_key_check = true').insecure_skip_host_key_check
        assert cfg(f'url = "{url}"\ncredentials_dir = "{tmp_path}"').known_hosts is None  # checked at fetch
    assert cfg('url = "https://git.example.org/fleet.git"').known_hosts is None


def test_precedence_toml_then_environment_then_credentials_dir(tmp_path: Any) -> None:
    d = tmp_path / "creds"
    d.mkdir()
    for name, text in {"ssh_key": "K", "known_hosts": KH, "username": "deploy\n", "token": "t", "ca_file": "C"}.items():
        (d / name).write_text(text)
    (tmp_path / "other_key").write_text("K2")
    url = 'url = "ssh://git@git.example.org/fleet.git"'
    src = cfg(f'{url}\ncredentials_dir = "{d}"')
    assert (src.ssh_key, src.known_hosts, src.username, src.token_file, src.ca_file) == (
        str(d / "ssh_key"), str(d / "known_hosts"), "deploy", str(d / "token"), str(d / "ca_file"))
    env = {"REUP_SOURCE_SSH_KEY": str(tmp_path / "other_key"), "REUP_SOURCE_USERNAME": "bot",
           "REUP_SOURCE_CREDENTIALS_DIR": str(d)}
    src = cfg(url, env)
    assert (src.ssh_key, src.username, src.known_hosts) == (str(tmp_path / "other_key"), "bot", str(d / "known_hosts"))
    src = cfg(f'{url}\nusername = "alice"\nssh_key = "creds/ssh_key"', env, base=str(tmp_path))
    assert (src.ssh_key, src.username) == (str(d / "ssh_key"), "alice")  # relative to reup.toml's directory


def test_variables_are_expanded_and_an_undefined_one_is_an_error(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("t")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    src = cfg('url = "https://h/f.git"\ntoken_file = "${CREDENTIALS_DIRECTORY}/token"')
    assert src.token_file == str(tmp_path / "token")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="undefined environment variable"):
        cfg('url = "https://h/f.git"\ntoken_file = "${CREDENTIALS_DIRECTORY}/token"')


def test_bad_credential_keys(tmp_path: Any) -> None:
    (tmp_path / "p").write_text("p")
    with pytest.raises(ConfigError, match="not both"):
        cfg(f'url = "https://h/f.git"\npassword_file = "{tmp_path}/p"\ntoken_file = "{tmp_path}/p"')
    with pytest.raises(ConfigError, match="no such file"):
        cfg('url = "https://h/f.git"\nca_file = "/nonexistent/ca.pem"')
    with pytest.raises(ConfigError, match="unknown key"):
        cfg('url = "https://h/f.git"\ntoken = "inline secrets are not accepted"')


def test_credentials_from_config(tmp_path: Any) -> None:
    (tmp_path / "t").write_text("t")
    src = cfg(f'url = "https://deploy@h/f.git"\ntoken_file = "{tmp_path}/t"\nusername = "x"')
    creds = credentials_from(src)
    assert (creds.token_file, creds.username, creds.ssh_key) == (os.path.join(str(tmp_path), "t"), "x", None)


@pytest.mark.parametrize("url, ssh, user", [
    ("ssh://fleet@git.example.org:2222/srv/fleet.git", True, "fleet"),
    ("git@github.com:org/fleet.git", True, "git"),
    ("ssh://git.example.org/fleet.git", True, None),
    ("https://deploy:secret@git.example.org/fleet.git", False, "deploy"),
    ("https://git.example.org/fleet.git", False, None),
    ("/srv/fleet", False, None),
])
def test_url_shapes(url: str, ssh: bool, user: str | None) -> None:
    assert (is_ssh_url(url), url_user(url)) == (ssh, user)


@pytest.mark.parametrize("stderr, result", [
    ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.", "host_key_mismatch"),
    ("No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\n"
     "Host key verification failed.", "host_key_unknown"),
    ("git@h: Permission denied (publickey).\nfatal: Could not read from remote repository.", "auth_failed"),
    ("fatal: Authentication failed for 'https://h/f.git/'", "auth_failed"),
    ("fatal: unable to access 'https://h/f.git/': SSL certificate problem: unable to get local issuer certificate",
     "tls_untrusted"),
    ("ssh: connect to host 127.0.0.1 port 1: Connection refused", "error"),
    ("fatal: unable to access 'https://h/': Could not resolve host: h", "error"),
])
def test_classify(stderr: str, result: str) -> None:
    assert classify(stderr) == result


def test_no_secret_over_plain_http(tmp_path: Any) -> None:
    (tmp_path / "t").write_text("t")
    with pytest.raises(ConfigError, match="in clear"):
        cfg(f'url = "http://git.example.org/fleet.git"\ntoken_file = "{tmp_path}/t"')
