"""The live fleet page at `/` and its read-only access control, on the controller's HTTP listener.

Called by http.py (`handle_get` first, for every GET) and wired by controller.py
(`start_http`), which subscribes `FleetPage.on_event` to the event bus.

- `/`, `/static/...`: the page (plain HTML, CSS and vanilla JS in `static/`, package data).
- `/api/fleet`: `StateDB.status()` plus what the page adds (commit author and
  message, tags, bytes sent, the Grafana link). Built once per change and shared
  by every viewer: events bump a version, and the first request after a bump
  builds the document; the others get the same bytes. At most one build per
  MIN_INTERVAL, so a busy controller with many viewers is not slowed.
- `/api/events`: server-sent events, one `change` per new version, at most two a
  second per viewer however busy the controller is (viewers then fetch `/api/fleet`).
- `/api/device?name=N`: one device and its recent events.
- With `[http] token`, `/`, `/static`, `/api/*` need `Authorization: Bearer TOKEN`
  or basic auth with TOKEN as the password (browsers ask for it); with
  `[http] metrics_token` the same holds for `/metrics`. `/healthz` and `/webhook`
  are not this module's.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from reup.loop.events import DevicesSnapshot, Event, GitFetched, ReconcileDone

log = logging.getLogger(__name__)

_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".md": "text/plain; charset=utf-8"}
# Events that do not change what the page shows (ReconcileDone comes every pass).
_QUIET = (GitFetched, ReconcileDone, DevicesSnapshot)
MAX_STREAMS = 64  # server-sent event viewers at once; more fall back to polling
MIN_INTERVAL = 0.5  # seconds between two `change` events to one viewer


def authorized(header: str | None, token: str | None) -> bool:
    """`Authorization` carries `token` as a bearer token or as a basic-auth password (any user)."""
    if not token:
        return True
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


class FleetPage:
    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        *,
        device: Callable[[str], dict[str, Any] | None],
        extras: Callable[[dict[str, Any]], Mapping[str, Any]] = lambda s: {},
        token: str | None = None,
        metrics_token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.status = status
        self.device = device
        self.extras = extras
        self.token = token
        self.metrics_token = metrics_token
        self.version = 1
        self.builds = 0  # snapshots built (the tests check that viewers share them)
        self._changed = threading.Condition()
        self._build_lock = threading.Lock()
        self._cache: tuple[int, bytes] = (0, b"")
        self._streams = 0
        self.clock = clock
        self._built_at = -MIN_INTERVAL

    # --- the bus side (the loop's thread) ---------------------------------------

    def on_event(self, event: Event) -> None:
        if not isinstance(event, _QUIET):
            self.changed()

    def changed(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    # --- the shared snapshot -------------------------------------------------------

    def snapshot(self) -> tuple[int, bytes]:
        """(version, JSON bytes) of the fleet: built at most once per version and once per MIN_INTERVAL,
        however many viewers ask (a viewer handed an older version asks again; see app.js)."""
        with self._build_lock:
            version = self.version
            if self._cache[0] != version and self.clock() - self._built_at >= MIN_INTERVAL:
                doc = self.status()
                doc["page"] = {"version": version, "generated_at": time.time(), **self.extras(doc)}
                self._cache = (version, json.dumps(doc, separators=(",", ":")).encode())
                self._built_at = self.clock()
                self.builds += 1
            return self._cache

    # --- requests (the HTTP server's threads) ---------------------------------------

    def handle_get(self, h: BaseHTTPRequestHandler) -> bool:
        """Answer the request if it is the page's or refused by access control; False: not handled."""
        url = urlsplit(h.path)
        path = url.path
        if path == "/metrics":
            return not authorized(h.headers.get("Authorization"), self.metrics_token) and _deny(h)
        if not (path in ("/", "/index.html") or path.startswith(("/static/", "/api/"))):
            return False
        if not authorized(h.headers.get("Authorization"), self.token):
            return _deny(h)
        if path in ("/", "/index.html"):
            self._static(h, "index.html")
        elif path.startswith("/static/"):
            self._static(h, path.removeprefix("/static/"))
        elif path == "/api/fleet":
            _, body = self.snapshot()
            _send(h, 200, body, "application/json")
        elif path == "/api/device":
            name = (parse_qs(url.query).get("name") or [""])[0]
            doc = self.device(name) if name else None
            if doc is None:
                _send(h, 404, b'{"error": "no such device"}\n', "application/json")
            else:
                _send(h, 200, json.dumps(doc).encode(), "application/json")
        elif path == "/api/events":
            self._stream(h)
        else:
            return False  # /api/status and whatever http.py serves, now authorized
        return True

    def _static(self, h: BaseHTTPRequestHandler, name: str) -> None:
        if "/" in name or name.startswith(".") or not name:
            _send(h, 404, b"not found\n", "text/plain")
            return
        try:
            body = resources.files("reup.loop").joinpath("static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            _send(h, 404, b"not found\n", "text/plain")
            return
        ext = name[name.rfind("."):]
        _send(h, 200, body, _TYPES.get(ext, "application/octet-stream"),
              {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    def _stream(self, h: BaseHTTPRequestHandler) -> None:
        """Server-sent events: `change` with the version, a comment every 15 s to keep proxies open."""
        with self._changed:
            if self._streams >= MAX_STREAMS:
                _send(h, 503, b"too many viewers; poll /api/fleet\n", "text/plain", {"Retry-After": "5"})
                return
            self._streams += 1
        try:
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Cache-Control", "no-cache")
            h.send_header("X-Accel-Buffering", "no")
            h.end_headers()
            seen = -1
            while True:
                with self._changed:
                    if self.version == seen:
                        self._changed.wait(timeout=15.0)
                    version = self.version
                if version != seen:
                    h.wfile.write(f"event: change\ndata: {version}\n\n".encode())
                    seen = version
                else:
                    h.wfile.write(b": keep-alive\n\n")
                h.wfile.flush()
                time.sleep(MIN_INTERVAL)  # coalesce bursts: one change event per interval
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            with self._changed:
                self._streams -= 1
            h.close_connection = True


def _send(h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str,
          headers: Mapping[str, str] | None = None) -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def _deny(h: BaseHTTPRequestHandler) -> bool:
    _send(h, 401, b"authorization required\n", "text/plain", {"WWW-Authenticate": 'Basic realm="reup", charset="UTF-8"'})
    return True
