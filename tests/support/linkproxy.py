"""A userspace TCP proxy standing in for a bad link between the controller and a device's sshd.

The tests control it: cut each connection after a given number of client-to-device bytes (a
link that drops), throttle it to a rate (a slow link; tc netem is not available here), and count
what crossed it. It runs its own asyncio loop in a thread, so the code under test (asyncssh in
the test's loop, or a `reup` process) sees a plain TCP endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator


class LinkProxy:
    def __init__(self, target_port: int, *, cuts: list[int] | None = None, rate: float | None = None,
                 listen: str = "127.0.0.1", target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen = listen
        self.cuts = list(cuts or [])  # one budget per new connection, then unlimited
        self.rate = rate  # bytes/s each way, None: as fast as the kernel goes
        self.upstream_bytes = 0  # client -> device, over all connections
        self.connections = 0
        self.cut_count = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> LinkProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, self.listen, 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        budget = self.cuts.pop(0) if self.cuts else None
        try:
            dreader, dwriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            return
        done = asyncio.Event()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            nonlocal budget
            start, moved = time.monotonic(), 0
            try:
                while data := await src.read(16 << 10):
                    if upstream and budget is not None:
                        if len(data) >= budget:
                            data = data[:budget]
                            dst.write(data)
                            await dst.drain()
                            self.upstream_bytes += len(data)
                            self.cut_count += 1
                            return  # the link drops here
                        budget -= len(data)
                    if upstream:
                        self.upstream_bytes += len(data)
                    dst.write(data)
                    await dst.drain()
                    moved += len(data)
                    if self.rate:
                        ahead = moved / self.rate - (time.monotonic() - start)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            except (OSError, ConnectionError):
                pass
            finally:
                done.set()

        tasks = [asyncio.create_task(pump(creader, dwriter, True)), asyncio.create_task(pump(dreader, cwriter, False))]
        await done.wait()
        for t in tasks:
            t.cancel()
        for w in (cwriter, dwriter):
            with contextlib.suppress(Exception):
                w.transport.abort()


@contextlib.contextmanager
def link(target_port: int, **kw: object) -> Iterator[LinkProxy]:
    with LinkProxy(target_port, **kw) as proxy:  # type: ignore[arg-type]
        yield proxy
