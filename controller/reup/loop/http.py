"""The controller's HTTP endpoint: /metrics, /healthz, /api/status, POST /webhook.

Started by controller.py in a daemon thread (stdlib ThreadingHTTPServer) on
`[http] listen`. `/metrics` is prometheus-client's exposition of the
controller's registry; `/api/status` is `StateDB.status()`; `POST /webhook`
(any body, e.g. a GitHub/GitLab/Gitea push hook) asks the loop to fetch now.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


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
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "reup"

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
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(min(length, 1 << 20))
                if self.path.split("?", 1)[0] == "/webhook":
                    outer.webhook()
                    self._send(202, b'{"accepted": true}\n', "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

        self.registry = registry
        self.status = status
        self.webhook = webhook
        self.healthy = healthy
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
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
