"""Byte-level resume: the receiver keeps the raw bytes of an interrupted stream.

With `receive --stream-id ID` every byte read from stdin is appended to `nix/var/reup/partial/
stream` before the parser sees it. Each `CHUNK` bytes, and when the input ends, the spool is
fsynced and `stream.json` records (stream id, offset, sha256 of those first `offset` bytes); only
then does the receiver print a progress line `{"verified": offset}` (protocol.progress_line), which
the controller uses to keep at most one window of unacknowledged bytes in flight. A later
`receive --stream-id ID --resume-from N --resume-sha256 H` replays the spool through the usual
parser (every path is rebuilt and verified as if the bytes had just arrived), checks the replayed
prefix against both the record and the controller's `H`, and then reads the rest from stdin.
Anything that does not match drops the partial (`ResumeMismatch`) and the controller starts over.

Called by cli.py (`SpoolInput`, `finish`), maintenance.py (`point` for status, `discard` for gc).
Normative text: docs/stream-format.md, "Resume".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import BinaryIO

from reup_receiver.device import Device, write_atomic
from reup_receiver.errors import Locked, ReceiveError, ResumeMismatch, Truncated, UsageError
from reup_receiver.format.wire import DIGEST_SIZE
from reup_receiver.protocol import ResumePoint, progress_line

CHUNK = 256 << 10  # checkpoint (fsync + record + progress line) granularity
_HEX64 = re.compile(r"[0-9a-f]{64}")


def stream_id(path: str) -> str:
    """A stream file's id: its trailer digest (sha256 of all before it), i.e. its last 32 bytes.

    Used by the controller (reup.io.transfer, reup.delta.cache) and offline.py.
    """
    with open(path, "rb") as f:
        f.seek(-DIGEST_SIZE, os.SEEK_END)
        return f.read(DIGEST_SIZE).hex()


def prefix_sha256(path: str, n: int) -> str:
    """sha256 of a file's first `n` bytes (what a resume names as the kept prefix)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise ValueError(f"{path} is shorter than {n} bytes")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _dir(device: Device) -> str:
    return os.path.join(device.state, "partial")


def _paths(device: Device) -> tuple[str, str]:
    return os.path.join(_dir(device), "stream"), os.path.join(_dir(device), "stream.json")


def _record(device: Device) -> dict[str, object] | None:
    _, meta = _paths(device)
    try:
        with open(meta, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(d, dict) or not isinstance(d.get("stream_id"), str) or not isinstance(d.get("offset"), int)
            or not isinstance(d.get("sha256"), str)):
        return None
    return d


def point(device: Device) -> ResumePoint | None:
    """The partial stream the device keeps, for `status`."""
    d = _record(device)
    if d is None or not _HEX64.fullmatch(str(d["stream_id"])) or int(str(d["offset"])) <= 0:
        return None
    return ResumePoint(str(d["stream_id"]), int(str(d["offset"])))


def status_field(device: Device) -> dict[str, object] | None:
    p = point(device)
    return p.to_json() if p else None


def discard(device: Device, stream_id: str | None = None) -> None:
    """Drop the partial stream (only if it is `stream_id`'s, when given)."""
    spool, meta = _paths(device)
    if stream_id is not None:
        d = _record(device)
        if d is not None and d["stream_id"] != stream_id:
            return
    for p in (meta, spool):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class SpoolInput:
    """stdin as the parser sees it: the kept prefix first (on resume), then new bytes, all spooled.

    Opened lazily on the first read, i.e. under the device lock receive() takes.
    """

    def __init__(self, device: Device, inp: BinaryIO, stream_id: str, resume_from: int = 0,
                 resume_sha256: str | None = None, progress: BinaryIO | None = None) -> None:
        if not _HEX64.fullmatch(stream_id) or resume_from < 0:
            raise UsageError("--stream-id must be 64 hex digits and --resume-from >= 0")
        if resume_from and (resume_sha256 is None or not _HEX64.fullmatch(resume_sha256)):
            raise UsageError("--resume-from needs --resume-sha256 (64 hex digits)")
        self.device = device
        self.inp = inp
        self.stream_id = stream_id
        self.resume_from = resume_from
        self.resume_sha256 = resume_sha256
        self.progress = progress
        self.digest = hashlib.sha256()
        self.offset = 0  # bytes handed to the parser
        self.durable = 0  # bytes fsynced and recorded
        self.replay: BinaryIO | None = None
        self.spool: BinaryIO | None = None
        self.ended = False

    def _open(self) -> None:
        os.makedirs(_dir(self.device), exist_ok=True)
        spool, _ = _paths(self.device)
        if self.resume_from:
            d = _record(self.device)
            if (d is None or d["stream_id"] != self.stream_id or d["offset"] != self.resume_from
                    or d["sha256"] != self.resume_sha256):
                discard(self.device)
                raise ResumeMismatch(f"no partial stream {self.stream_id[:16]} at {self.resume_from} on this device; "
                                     "send it from the start")
            with open(spool, "r+b") as f:  # bytes past the record were never acknowledged
                f.truncate(self.resume_from)
            self.replay = open(spool, "rb")  # noqa: SIM115 - closed at the end of the replay
        else:
            discard(self.device)
        self.spool = open(spool, "ab")  # noqa: SIM115 - lives as long as the receive
        self.durable = self.resume_from
        self._say(self.resume_from)  # ready: the controller sends nothing before this line

    def read(self, n: int = -1) -> bytes:
        if self.spool is None:
            self._open()
        if self.replay is not None:
            data = self.replay.read(min(n, self.resume_from - self.offset) if n >= 0 else self.resume_from - self.offset)
            if data:
                return self._seen(data)
            self.replay.close()
            self.replay = None
            if self.offset != self.resume_from or self.digest.hexdigest() != self.resume_sha256:
                discard(self.device)
                raise ResumeMismatch("the kept partial stream does not match its record; send it from the start")
        # At most one underlying read, so a large record never holds back a checkpoint (and so the
        # controller's window of unacknowledged bytes can be smaller than a record).
        want = CHUNK if n < 0 else min(n, CHUNK)
        read1 = getattr(self.inp, "read1", None)
        data = read1(want) if read1 is not None else self.inp.read(want)
        if not data:
            self.checkpoint()
            return data
        assert self.spool is not None
        self.spool.write(data)
        data = self._seen(data)
        if self.offset - self.durable >= CHUNK:
            self.checkpoint()
        return data

    def _seen(self, data: bytes) -> bytes:
        self.digest.update(data)
        self.offset += len(data)
        return data

    def checkpoint(self) -> None:
        """Make every byte read so far durable and say so (a progress line on stdout)."""
        if self.spool is None or self.replay is not None or self.offset == self.durable:
            return
        self.spool.flush()
        os.fsync(self.spool.fileno())
        _, meta = _paths(self.device)
        write_atomic(meta, json.dumps({"stream_id": self.stream_id, "offset": self.offset,
                                       "sha256": self.digest.hexdigest()}).encode())
        self.durable = self.offset
        self._say(self.offset)

    def _say(self, offset: int) -> None:
        if self.progress is not None:
            with contextlib.suppress(OSError):  # the controller may be gone: the record still stands
                self.progress.write(progress_line(offset))
                self.progress.flush()

    def close(self) -> None:
        for f in (self.replay, self.spool):
            if f is not None:
                f.close()
        self.replay = self.spool = None


def finish(device: Device, spool: SpoolInput, error: BaseException | None) -> None:
    """After a receive: keep the partial if the input was cut short, else drop it."""
    spool.close()
    if isinstance(error, Locked | ResumeMismatch):
        return  # not ours to touch / already dropped
    if isinstance(error, Truncated) or (error is not None and not isinstance(error, ReceiveError)):
        return  # an interruption (or a kill): the recorded prefix stays for the next attempt
    with device.lock(wait=True):
        discard(device, spool.stream_id)
