"""Sending one stream to a resumable receiver: resume offsets, a window of unacknowledged bytes,
token-bucket rate limits and pauses at chunk boundaries.

Called by ssh.py (`SshPusher._send`) when the device's status says it takes `--stream-id`
(reup_receiver.protocol.resume_args). The receiver acknowledges each durable chunk with a progress
line on stdout (protocol.progress_line); this sender keeps at most `WINDOW` bytes beyond the last
acknowledgement in flight, so a connection cut wastes at most one window: what was acknowledged
is kept on the device and the next attempt resumes there. Rates are enforced here with token
buckets (`TokenBucket`, one per limit that applies: controller total, device, tag or wave);
whether a transfer may run at all (its windows) is the planner's decision (reup.core.windows),
passed in as `may_continue`, checked between chunks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reup_receiver.protocol import parse_progress
from reup_receiver.resume import CHUNK as RECEIVER_CHUNK
from reup_receiver.resume import prefix_sha256, stream_id

from reup.core.errors import ReupError

__all__ = ["TokenBucket", "TransferPaused", "TransferProgress", "prefix_sha256", "send", "stream_id"]

WINDOW = 4 * RECEIVER_CHUNK  # unacknowledged bytes in flight (the most a cut can waste)
PIECE = 64 << 10  # bytes per write: the granularity of rate limiting and pauses


class TransferPaused(ReupError):
    """The transfer stopped at a chunk boundary because its window closed; it resumes later.

    Not a TemporaryError: it is not retried at once, nor counted as a failure (executors.py hands
    the device back to the planner, which holds it until the window opens)."""


class TokenBucket:
    """`rate` bytes/s with bursts up to `burst` bytes; `take` waits until the bytes may go.

    The clock is injectable for tests; several senders may share one bucket (a total or a wave).
    """

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(PIECE, rate / 4))
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, n: int) -> float:
        """Seconds until `n` bytes may go (0: now), without taking them."""
        self._refill()
        deficit = min(n, self.burst) - self.tokens
        return deficit / self.rate if deficit > 1e-6 else 0.0  # float dust is not worth a sleep

    async def take(self, n: int) -> None:
        async with self._lock:  # first come, first served among senders sharing the bucket
            while (wait := self.delay(n)) > 0:
                await asyncio.sleep(wait)
            self.tokens -= n  # may go negative for n > burst: the debt delays the next take


@dataclass
class TransferProgress:
    """What status and metrics show about one device's transfer."""

    stream_id: str = ""
    total: int = 0
    offset: int = 0  # where this attempt started (resumed from)
    position: int = 0  # bytes of the stream written so far (absolute)
    acknowledged: int = 0  # durable on the device
    sent: int = 0  # bytes written over all attempts (what the link carried)
    attempts: int = 0
    resumed: int = 0  # attempts that continued a kept partial
    rate: float = 0.0  # bytes/s over the last second or so
    waiting_for_window: bool = False
    first_write: float = 0.0  # monotonic time of this attempt's first and last writes
    last_write: float = 0.0
    _samples: list[tuple[float, int]] = field(default_factory=list)

    def note(self, now: float, written: int) -> None:
        self.first_write = self.first_write or now
        self.last_write = now
        self.sent += written
        self._samples.append((now, self.sent))
        while len(self._samples) > 2 and now - self._samples[0][0] > 2.0:
            self._samples.pop(0)
        t0, s0 = self._samples[0]
        self.rate = (self.sent - s0) / (now - t0) if now > t0 else self.rate

    def current_rate(self, now: float) -> float:
        """The rate, or 0 when nothing was written for two seconds (a finished or cut transfer)."""
        return self.rate if self._samples and now - self._samples[-1][0] < 2.0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"stream_id": self.stream_id, "total": self.total, "position": self.position,
                "acknowledged": self.acknowledged, "sent": self.sent, "attempts": self.attempts,
                "resumed": self.resumed, "rate": round(self.current_rate(time.monotonic()), 1), "waiting_for_window": self.waiting_for_window}


async def send(proc: Any, path: str, offset: int, progress: TransferProgress, *,
               buckets: Sequence[TokenBucket] = (), may_continue: Callable[[], bool] = lambda: True,
               window: int = WINDOW, ack_timeout: float = 120.0) -> bytes:
    """Write `path` from `offset` to `proc.stdin` within the window and rates; return the answer line.

    Raises TransferPaused (after closing stdin at a chunk boundary) when `may_continue` turns false.
    Connection errors propagate to the caller (ssh.py), which classifies them.
    """
    acked, ready = asyncio.Event(), asyncio.Event()
    progress.first_write = progress.last_write = 0.0
    progress.acknowledged = max(progress.acknowledged, offset)
    progress.position = offset
    lines: list[bytes] = []

    async def read_answers() -> None:
        try:
            while line := await proc.stdout.readline():
                verified = parse_progress(line)
                if verified is None:
                    lines.append(line)
                else:
                    progress.acknowledged = max(progress.acknowledged, verified)
                    ready.set()
                    acked.set()
        finally:
            acked.set()  # the writer must not wait on a reader that is gone

    reader = asyncio.create_task(read_answers())
    paused = False
    try:
        # The receiver's first progress line says it holds the lock and accepted the offset: a busy
        # or mismatching device costs no bytes.
        await asyncio.wait_for(asyncio.wait([reader, asyncio.create_task(ready.wait())],
                                            return_when=asyncio.FIRST_COMPLETED), ack_timeout)
        with open(path, "rb") as f:
            f.seek(offset)
            while True:
                if not may_continue():
                    paused = True
                    break
                while progress.position - progress.acknowledged >= window and not reader.done():
                    acked.clear()
                    await asyncio.wait_for(acked.wait(), ack_timeout)
                if reader.done() or not ready.is_set():
                    break  # the receiver stopped reading: its exit status says why
                chunk = f.read(PIECE)
                if not chunk:
                    break
                for bucket in buckets:
                    await bucket.take(len(chunk))
                proc.stdin.write(chunk)
                await proc.stdin.drain()
                progress.position += len(chunk)
                progress.note(time.monotonic(), len(chunk))
        proc.stdin.write_eof()
        await reader
    finally:
        if not reader.done():
            reader.cancel()
    if paused:
        raise TransferPaused(f"transfer window closed at byte {progress.position} of {progress.total}; "
                             "the device keeps what it acknowledged")
    return b"".join(lines)
