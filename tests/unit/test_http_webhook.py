"""POST /webhook authentication and the HTTP server's bounds (issue 11, section 3), over real HTTP.

GitHub's X-Hub-Signature-256, Gitea's X-Gitea-Signature and GitLab's X-Gitlab-Token with the
shared secret are accepted; a missing or wrong one gets 401 and triggers nothing. Idle
connections time out and their number is bounded, so the server keeps answering.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from reup.config.reup_toml import parse_config
from reup.loop.http import HttpServer

SECRET = "s3cret-for-tests"
BODY = b'{"ref": "refs/heads/main"}'


@pytest.fixture
def server() -> Iterator[tuple[HttpServer, list[int]]]:
    hooks: list[int] = []
    srv = HttpServer("127.0.0.1", 0, registry=CollectorRegistry(), status=lambda: {}, webhook=lambda: hooks.append(1),
                     webhook_secret=SECRET, max_connections=4, socket_timeout=0.5)
    srv.start()
    yield srv, hooks
    srv.stop()


def post(srv: HttpServer, headers: dict[str, str], body: bytes = BODY) -> int:
    host, port = srv.address
    req = urllib.request.Request(f"http://{host}:{port}/webhook", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_signed_webhooks_are_accepted(server: tuple[HttpServer, list[int]]) -> None:
    srv, hooks = server
    assert post(srv, {"X-Hub-Signature-256": "sha256=" + sign(BODY)}) == 202  # GitHub
    assert post(srv, {"X-Gitea-Signature": sign(BODY)}) == 202  # Gitea
    assert post(srv, {"X-Gitlab-Token": SECRET}) == 202  # GitLab
    assert hooks == [1, 1, 1]


@pytest.mark.parametrize("headers", [
    {},
    {"X-Hub-Signature-256": "sha256=" + sign(BODY, "wrong")},
    {"X-Hub-Signature-256": sign(BODY)},  # no "sha256=" prefix
    {"X-Hub-Signature-256": "sha256=" + sign(BODY + b" ")},  # signature of another body
    {"X-Gitea-Signature": "0" * 64},
    {"X-Gitlab-Token": SECRET + "x"},
    {"X-Gitlab-Token": ""},
])
def test_unauthenticated_webhooks_get_401(server: tuple[HttpServer, list[int]], headers: dict[str, str]) -> None:
    srv, hooks = server
    assert post(srv, headers) == 401
    assert hooks == []


def test_idle_connections_do_not_pin_the_server(server: tuple[HttpServer, list[int]]) -> None:
    """More idle connections than the bound: they are closed or time out, the server still answers."""
    srv, hooks = server
    idle = [socket.create_connection(srv.address) for _ in range(12)]
    try:
        time.sleep(1.0)  # past the socket timeout
        assert post(srv, {"X-Gitlab-Token": SECRET}) == 202
        assert hooks == [1]
    finally:
        for s in idle:
            s.close()


def test_webhook_secret_config(tmp_path: object) -> None:
    import os

    base = str(tmp_path)
    with open(os.path.join(base, "hook.secret"), "w") as fh:
        fh.write(SECRET + "\n")
    cfg = parse_config('[source]\nurl = "repo"\n[http]\nwebhook_secret_file = "hook.secret"\n', base_dir=base)
    assert cfg.http.webhook_secret == SECRET
    assert parse_config('[source]\nurl = "repo"\n[http]\nwebhook_secret = "x"\n').http.webhook_secret == "x"
    assert parse_config('[source]\nurl = "repo"\n').http.webhook_secret is None
