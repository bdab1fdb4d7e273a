"""What a device answers, read safely: the protocol's validating parsers, the error class of every
exit code, and the bounded reading of a verb's stdout and stderr.

Pure apart from the asyncssh reading at the end; called by io/ssh.py (`SshPusher`), and the parsers
and classifications are unit-tested with golden cases (tests/unit/test_protocol.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncssh
from reup_receiver.protocol import (
    BLAMES_BASE,
    MAX_ANSWER_BYTES,
    MAX_STDERR_BYTES,
    SHORT_ID,
    ProtocolError,
    ReceiveAnswer,
    Retry,
    StatusAnswer,
    exit_kind,
    retry_class,
)

from reup.core.errors import PermanentError, TemporaryError, UnreachableError
from reup.core.model import Device

_T = TypeVar("_T")
CHUNK = 256 * 1024
_STORE_PATH = re.compile(r"(/nix/store/[0-9a-df-np-sv-z]{32}-[^/\s:'\"]+)")


class RolledBackError(PermanentError):
    """The device rolled the new generation back (health check failed, deadline passed)."""


class ConfirmTimeoutError(PermanentError):
    """The confirmation could not be delivered before the deadline: the device rolls back by itself."""

    def __init__(self, message: str, generation: int | None = None) -> None:
        super().__init__(message)
        self.generation = generation


class BrokenBaseError(PermanentError):
    """The device lacks something the stream assumed it held; `path` names the store path if known."""

    def __init__(self, message: str, path: str | None) -> None:
        super().__init__(message)
        self.path = path


# --- pure builders and parsers -------------------------------------------------


def parse_status(stdout: str | bytes) -> StatusAnswer:
    return StatusAnswer.from_json(_json(stdout))


def parse_receive(stdout: str | bytes) -> ReceiveAnswer:
    return ReceiveAnswer.from_json(_json(stdout))


def _json(stdout: str | bytes) -> object:
    try:
        return json.loads(stdout)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc


def classify_exit(exit_status: int | None, stderr: str) -> Exception:
    """Map a failed verb to an error class, by the protocol's handling of its exit code."""
    message = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {exit_status}"
    handling = retry_class(exit_status)
    if handling == Retry.UNREACHABLE:
        return UnreachableError(f"connection lost: {message}")
    if handling == Retry.TRANSIENT:
        return TemporaryError(f"{exit_kind(exit_status)}: {message}")
    if handling == Retry.REENCODE:
        found = _STORE_PATH.search(message)
        return BrokenBaseError(message, found.group(1) if found else None)
    if handling == Retry.ROLLED_BACK:
        return RolledBackError(f"rolled back by the device: {message}")
    return PermanentError(message)


def receive_refused(exit_status: int | None, stderr: str, held: Sequence[str]) -> Exception:
    """A failed `receive`: its exit code's error, or a BrokenBaseError when a corrupt or mismatching
    result names a base the device holds (the encoder then avoids it)."""
    err = classify_exit(exit_status, stderr)
    if exit_status in BLAMES_BASE:
        blamed = [p for p in _STORE_PATH.findall(stderr) if p in held]
        if blamed:
            return BrokenBaseError(str(err), blamed[0])
    if isinstance(err, BrokenBaseError) and err.path is None and (short := SHORT_ID.search(stderr)):
        named = [p for p in held if os.path.basename(p).startswith(short.group(1))]
        if len(named) == 1:  # a version-2 stream's known path, by its short id
            return BrokenBaseError(str(err), named[0])
    return err


def ordered_bases(status: StatusAnswer, have_path: Callable[[str], bool]) -> tuple[str, ...]:
    """The delta base: what the device holds and the controller still has, its current and newest
    generations first (the encoder pairs against those first)."""
    first = [status.current] if status.current else []
    first += [t for _, t in sorted(status.generations, reverse=True)]
    ordered = dict.fromkeys([*first, *sorted(status.paths)])
    return tuple(p for p in ordered if have_path(p))


# --- bounded reading of a device's output -----------------------------------------------------------


class AnswerTooLarge(TemporaryError):
    """A device sent more than the protocol's bound on one answer (or on its stderr)."""


async def read_bounded(stream: asyncssh.SSHReader[bytes], limit: int, what: str, who: str) -> bytes:
    buf = bytearray()
    while chunk := await stream.read(CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise AnswerTooLarge(f"{who}: the device sent more than {limit} bytes of {what}: cut off")
    return bytes(buf)


async def talk(proc: asyncssh.SSHClientProcess[bytes], who: str,
                exchange: Awaitable[_T]) -> tuple[int | None, _T, bytes]:
    """(exit status, what `exchange` returned, stderr) of a verb: `exchange` writes the verb's stdin
    and reads its stdout (each bounded), while the device's stderr is read beside it up to the
    protocol's bound. Every verb goes through here (status, confirm, both receive paths), so a device
    that streams endlessly on either stream is cut off (the channel closed) and our memory stays
    bounded; an exchange that fails otherwise (a paused transfer) lets the verb finish first."""
    err_task = asyncio.ensure_future(read_bounded(proc.stderr, MAX_STDERR_BYTES, "stderr", who))
    main = asyncio.ensure_future(exchange)
    try:
        done, _ = await asyncio.wait({err_task, main}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if isinstance(task.exception(), AnswerTooLarge):
                await task  # raises it: cut off now, whatever the other stream is doing
        await asyncio.wait({main})
        err = await err_task  # to the end of the verb's stderr (bounded), even after a failed exchange
    except BaseException:
        proc.close()
        for task in (err_task, main):
            task.cancel()
        raise
    await proc.wait_closed()
    return proc.exit_status, main.result(), err


async def bounded(proc: asyncssh.SSHClientProcess[bytes], who: str) -> tuple[int | None, bytes, bytes]:
    """(exit status, stdout, stderr) of a verb whose stdin is already closed."""
    return await talk(proc, who, read_bounded(proc.stdout, MAX_ANSWER_BYTES, "answer", who))


def read_answer(dev: Device | str, parse: Callable[[str], _T], text: str) -> _T:
    """A device's answer read with the protocol's validating reader; garbage is a temporary error
    that names the device (it may be a receiver mid-upgrade or a damaged one), never an internal one."""
    try:
        return parse(text)
    except ProtocolError as exc:
        name = dev if isinstance(dev, str) else dev.name
        raise TemporaryError(f"{name}: malformed answer from the device: {exc}") from exc


def local_deadline(remaining: float | None, device_deadline: float | None) -> float:
    """The confirmation deadline on the controller's monotonic clock: the device's remaining seconds
    (what a receiver reports) or, from an older receiver, its deadline on its own clock."""
    if remaining is not None:
        return time.monotonic() + remaining
    return time.monotonic() + ((device_deadline or 0.0) - time.time())
