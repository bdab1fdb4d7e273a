"""The controller's HTTP endpoint: /metrics, /healthz, /api/status, POST /webhook.

Started by controller.py in a daemon thread (stdlib ThreadingHTTPServer) on
`[http] listen`. `/metrics` is prometheus-client's exposition of the
controller's registry; `/api/status` is `StateDB.status()`; `POST /webhook`
(e.g. a GitHub/GitLab/Gitea push hook) asks the loop to fetch now; the loop coalesces a burst
into one fetch. `/`, `/static/`, `/api/fleet`, `/api/events`, `/api/device` and the read-only
access control are web.py's (`FleetPage.handle_get`, asked first).

The webhook authenticates with the shared secret (`[http] webhook_secret` or
`webhook_secret_file`, or REUP_WEBHOOK_SECRET): GitHub's `X-Hub-Signature-256` and Gitea's
`X-Gitea-Signature` (HMAC-SHA256 of the body), or GitLab's `X-Gitlab-Token` (the secret),
compared in constant time; anything else gets 401 and triggers nothing. Without a secret only
loopback clients may trigger it. Connections have a socket timeout and their number is bounded,
so idle or slow clients cannot pin the server's threads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from reup.loop.web import FleetPage

log = logging.getLogger(__name__)

SOCKET_TIMEOUT = 10.0  # seconds a client may stay silent mid-request
MAX_CONNECTIONS = 96  # concurrent connections (64 of them the fleet page's event streams); more are closed at once
MAX_WEBHOOK_BODY = 1 << 20


def webhook_authorized(secret: str | None, headers: Any, body: bytes, client: str) -> bool:
    """GitHub / Gitea HMAC-SHA256 of the body, or GitLab's token, against `secret` in constant time;
    without a secret, only a loopback client."""
    if not secret:
        return client in ("127.0.0.1", "::1") or client.startswith("127.")
    key = secret.encode()
    digest = hmac.new(key, body, hashlib.sha256).hexdigest()
    github = headers.get("X-Hub-Signature-256") or ""
    gitea = headers.get("X-Gitea-Signature") or ""
    gitlab = headers.get("X-Gitlab-Token") or ""
    ok = False
    if github:
        ok |= hmac.compare_digest(github.strip().encode(), ("sha256=" + digest).encode())
    if gitea:
        ok |= hmac.compare_digest(gitea.strip().encode(), digest.encode())
    if gitlab:
        ok |= hmac.compare_digest(gitlab.encode(), key)
    return ok


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `limit` of them: more are closed at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, limit: int) -> None:
        self.slots = threading.BoundedSemaphore(limit)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.warning("HTTP: %d connections open; closing one from %s", MAX_CONNECTIONS, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class HttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        status: Callable[..., dict[str, Any]],
        webhook: Callable[[], None],
        healthy: Callable[[], bool] = lambda: True,
        web: FleetPage | None = None,
        webhook_secret: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        socket_timeout: float = SOCKET_TIMEOUT,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "reup"
            timeout = socket_timeout  # StreamRequestHandler: the connection's socket timeout

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if outer.web is not None and outer.web.handle_get(self):  # the fleet page, access control
                    return
                if path == "/metrics":
                    self._send(200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = outer.healthy()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
                elif path == "/api/status":
                    try:
                        page = status_page(self.path)
                    except ValueError as exc:
                        self._send(400, f"{exc}\n".encode(), "text/plain")
                        return
                    body = json.dumps(outer.status(**page), indent=1).encode()
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_WEBHOOK_BODY:
                    self._send(413, b"body too large\n", "text/plain")
                    return
                try:
                    body = self.rfile.read(length) if length else b""
                except TimeoutError:
                    return
                if self.path.split("?", 1)[0] != "/webhook":
                    self._send(404, b"not found\n", "text/plain")
                elif not webhook_authorized(outer.webhook_secret, self.headers, body, self.client_address[0]):
                    log.warning("webhook from %s refused: no valid signature or token", self.client_address[0])
                    self._send(401, b'{"accepted": false}\n', "application/json")
                else:
                    outer.webhook()
                    self._send(202, b'{"accepted": true}\n', "application/json")

        self.registry = registry
        self.status = status
        self.webhook = webhook
        self.healthy = healthy
        self.web = web
        self.webhook_secret = webhook_secret
        self.server = _BoundedServer((host, port), Handler, max_connections)
        self.thread = threading.Thread(target=self.server.serve_forever, name="reup-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()
        log.info("HTTP on http://%s:%d (/metrics, /healthz, /api/status, POST /webhook)", *self.address)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def status_page(url: str) -> dict[str, Any]:
    """`/api/status?offset=&limit=&state=&wave=` -> keyword arguments of `StateDB.status`."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    out: dict[str, Any] = {}
    for key in ("offset", "limit"):
        if key in query:
            value = int(query[key][-1])
            if value < 0:
                raise ValueError(f"{key}: must be >= 0")
            out[key] = value
    for key in ("state", "wave"):
        if key in query:
            out[key] = query[key][-1]
    return out
