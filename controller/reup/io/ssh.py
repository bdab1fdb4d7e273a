"""Push executor: talk to a device's `reup-receive --ssh-command` over SSH (asyncssh).

Called by the reconcile loop (controller.py) for each Push action and by
`reup plan` (status only). A push is: connect (host key checked against
fleet.toml, no trust on first use) -> `status` -> if the device already runs the
target, adopt it (nothing sent) -> a stream from the delta encoder for what the
device holds (deltacache.py; a base the device reports broken is avoided) -> `receive --activate A` with the stream on stdin
-> the receiver's JSON result; with a confirm timeout the generation is then pending
on the device, and `confirm` (on a new connection, running the policy's health check
there) commits it: only then is the push a success (`RolledBackError` when the device
rolled back, `ConfirmTimeoutError` when the confirmation could not be delivered in time,
after which the device rolls back by itself). Failures are classified into `UnreachableError`,
`TemporaryError` (retried by tenacity with jittered exponential backoff) and
`PermanentError`; the command builders and parsers here are pure and unit-tested.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncssh
from reup_receiver.protocol import (
    BLAMES_BASE,
    STATUS_COMMAND,
    ExitCode,
    ProtocolError,
    ReceiveAnswer,
    Retry,
    StatusAnswer,
    confirm_command,
    exit_kind,
    receive_command,
    retry_class,
)

from reup.core.errors import PermanentError, TemporaryError, UnreachableError
from reup.core.model import Device, DeviceState
from reup.io.retry import retrying

log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class PushOutcome:
    toplevel: str
    generation: int | None
    stream_bytes: int = 0
    nar_bytes: int = 0
    adopted: bool = False  # the device already ran the target: nothing was sent
    seconds: float = 0.0
    installed: tuple[str, ...] = field(default=())
    confirm_deadline: float | None = None  # set while the generation awaits confirmation


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


def ordered_bases(status: StatusAnswer, have_path: Callable[[str], bool]) -> tuple[str, ...]:
    """The delta base: what the device holds and the controller still has, its current and newest
    generations first (the encoder pairs against those first)."""
    first = [status.current] if status.current else []
    first += [t for _, t in sorted(status.generations, reverse=True)]
    ordered = dict.fromkeys([*first, *sorted(status.paths)])
    return tuple(p for p in ordered if have_path(p))


# --- the executor --------------------------------------------------------------


# on_sent(stream bytes, NAR bytes of the missing paths, seconds): one whole stream went to a device.
SentHook = Callable[[int, int, float], None]


def _unreported(stream_bytes: int, nar_bytes: int, seconds: float) -> None:
    pass


class Stream(Protocol):
    """One encoded stream on disk (the delta cache's entries)."""

    @property
    def path(self) -> str: ...
    @property
    def stream_bytes(self) -> int: ...
    @property
    def nar_bytes(self) -> int: ...


class StreamSource(Protocol):
    """Where streams come from (the delta cache): the stream for a device holding `held` and `staged`."""

    def get(self, held: Sequence[str], target: str, staged: Sequence[str] = (), avoid: Sequence[str] = (),
            codecs: Sequence[str] | None = None) -> Stream: ...


class SshPusher:
    def __init__(
        self,
        deltas: StreamSource,
        *,
        key: str | None,
        connect_timeout: float = 10.0,
        attempts: int = 3,
        have_path: Callable[[str], bool] = os.path.exists,
        max_connections: int = 64,
    ) -> None:
        self.deltas = deltas
        self.key = key
        self.connect_timeout = connect_timeout
        self.attempts = attempts
        self.have_path = have_path
        # Transfers (status + receive) wait for one of `max_connections` slots; confirmations and status
        # probes have their own slots, so a confirmation never queues behind other devices' transfers.
        self.max_connections = max(1, max_connections)
        self._slot_loop: asyncio.AbstractEventLoop | None = None
        self._transfer_slots = self._confirm_slots = asyncio.Semaphore(1)
        self._client_keys: list[asyncssh.SSHKey] | None = None  # the key file, read once
        self._host_keys: dict[str, asyncssh.SSHKey] = {}  # fleet.toml's host keys, parsed once each
        self._encoders = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                                               thread_name_prefix="reup-encode")

    def _slots(self, confirm: bool = False) -> asyncio.Semaphore:
        # Made inside the running loop (and again for another loop: tests run several).
        if self._slot_loop is not asyncio.get_running_loop():
            self._slot_loop = asyncio.get_running_loop()
            self._transfer_slots = asyncio.Semaphore(self.max_connections)
            self._confirm_slots = asyncio.Semaphore(self.max_connections)
        return self._confirm_slots if confirm else self._transfer_slots

    def _keys(self) -> list[asyncssh.SSHKey] | None:
        if not self.key:
            return None
        if self._client_keys is None:
            self._client_keys = [asyncssh.read_private_key(self.key)]
        return self._client_keys

    def _host_key(self, text: str) -> asyncssh.SSHKey:
        key = self._host_keys.get(text)
        if key is None:
            key = self._host_keys[text] = asyncssh.import_public_key(text)
        return key

    async def _connect(self, dev: Device, timeout: float | None = None) -> asyncssh.SSHClientConnection:
        try:
            trusted = [self._host_key(dev.host_key)]
            return await asyncssh.connect(
                dev.host,
                dev.port,
                username=dev.user,
                client_keys=self._keys(),
                known_hosts=(trusted, [], []),
                agent_path=None,
                config=[],
                connect_timeout=timeout or self.connect_timeout,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise PermanentError(f"{dev.name}: host key does not match fleet.toml: {exc}") from exc
        except asyncssh.PermissionDenied as exc:
            raise PermanentError(f"{dev.name}: SSH authentication refused: {exc}") from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise UnreachableError(f"{dev.name} ({dev.host}:{dev.port}) unreachable: {exc or type(exc).__name__}") from exc

    async def _run(self, conn: asyncssh.SSHClientConnection, command: str) -> str:
        try:
            res = await conn.run(command, check=False, timeout=self.connect_timeout * 6)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise UnreachableError(f"{command}: {exc}") from exc
        if res.exit_status != 0:
            raise classify_exit(res.exit_status, str(res.stderr or ""))
        return str(res.stdout or "")

    async def status(self, dev: Device, attempts: int | None = None) -> StatusAnswer:
        async def once() -> StatusAnswer:
            async with self._slots(confirm=True):
                conn = await self._connect(dev)
                try:
                    return parse_status(await self._run(conn, STATUS_COMMAND))
                finally:
                    conn.close()

        return await retrying(once, attempts=attempts or self.attempts)

    async def push(
        self,
        dev: Device,
        toplevel: str,
        *,
        activation: str = "switch",
        on_phase: Callable[[DeviceState], None] = lambda s: None,
        confirm_timeout: float = 0.0,
        health_check: str | None = None,
        on_sent: SentHook = _unreported,
    ) -> PushOutcome:
        """Bring `dev` to `toplevel`; `on_sent(stream bytes, NAR bytes, seconds)` after each whole stream
        sent, whatever the device then makes of it (so failed updates count on the wire too)."""
        async def once() -> PushOutcome:
            async with self._slots():
                return await self._push_once(dev, toplevel, activation, on_phase, confirm_timeout, on_sent)

        outcome = await retrying(once, attempts=self.attempts)
        if outcome.generation is not None and outcome.confirm_deadline is not None:
            on_phase(DeviceState.CONFIRMING)
            await self.confirm(dev, toplevel, outcome.generation, outcome.confirm_deadline, health_check)
        return outcome

    async def confirm(self, dev: Device, toplevel: str, generation: int, deadline: float,
                      check: str | None) -> None:
        """Deliver `confirm GEN [--check CMD]` on new connections until it is answered or the deadline passes."""
        while True:
            left = deadline - time.time()
            if left <= 0.2:
                raise ConfirmTimeoutError(
                    f"confirmation of generation {generation} not delivered before the deadline; "
                    "the device rolls back by itself", generation)
            try:
                async with self._slots(confirm=True), \
                        await self._connect(dev, timeout=min(self.connect_timeout, left)) as conn:
                    res = await conn.run(confirm_command(generation, check), check=False,
                                         timeout=max(left + 5.0, self.connect_timeout))
                    if res.exit_status == 0:
                        return
                    stderr = str(res.stderr or "").strip()
                    message = stderr.splitlines()[-1] if stderr else f"exit status {res.exit_status}"
                    if retry_class(res.exit_status) == Retry.ROLLED_BACK:
                        status = parse_status(await self._run(conn, STATUS_COMMAND))
                        if (res.exit_status == ExitCode.NOT_PENDING and status.current == toplevel
                                and status.pending is None):
                            return  # confirmed by an earlier attempt whose answer was lost
                        raise RolledBackError(f"rolled back by the device: {message}")
                    if retry_class(res.exit_status) not in (Retry.UNREACHABLE, Retry.TRANSIENT):
                        raise classify_exit(res.exit_status, stderr)
            except (UnreachableError, OSError, asyncssh.Error, TimeoutError) as exc:
                log.warning("%s: confirm %d: %s", dev.name, generation, exc)
            await asyncio.sleep(min(1.0, max(0.05, deadline - time.time() - 0.3)))

    async def _push_once(
        self, dev: Device, toplevel: str, activation: str, on_phase: Callable[[DeviceState], None],
        confirm_timeout: float = 0.0, on_sent: SentHook = _unreported,
    ) -> PushOutcome:
        start = time.monotonic()
        async with await self._connect(dev) as conn:
            status = parse_status(await self._run(conn, STATUS_COMMAND))
            if status.current == toplevel:
                gen = status.generation_of(toplevel)
                if status.pending is not None and status.pending.generation == gen:  # activated, never confirmed
                    return PushOutcome(toplevel, gen, adopted=True, confirm_deadline=status.pending.deadline)
                return PushOutcome(toplevel, gen, adopted=True)
            held, staged = ordered_bases(status, self.have_path), status.staged
            avoid: tuple[str, ...] = ()
            on_phase(DeviceState.TRANSFERRING)
            for _ in range(4):
                try:
                    result, entry = await self._send(conn, held, toplevel, staged, avoid, activation, on_phase,
                                                     confirm_timeout, status.codecs, on_sent)
                    break
                except BrokenBaseError as exc:
                    if exc.path and exc.path not in avoid and len(avoid) < 2:
                        log.warning("%s: %s; re-encoding without %s", dev.name, exc, exc.path)
                        avoid = (*avoid, exc.path)
                    elif held:
                        log.warning("%s: %s; sending a full stream", dev.name, exc)
                        held, staged, avoid = (), (), ()
                    else:
                        raise
            else:  # pragma: no cover - the loop always breaks or raises
                raise PermanentError("no usable delta base")
        if result.toplevel != toplevel:
            raise PermanentError(f"receiver installed {result.toplevel}, expected {toplevel}")
        return PushOutcome(toplevel, result.generation, entry.stream_bytes, entry.nar_bytes,
                           seconds=time.monotonic() - start, installed=result.installed,
                           confirm_deadline=result.confirm_deadline)

    async def _send(self, conn: asyncssh.SSHClientConnection, held: tuple[str, ...], toplevel: str,
                    staged: tuple[str, ...], avoid: tuple[str, ...], activation: str,
                    on_phase: Callable[[DeviceState], None],
                    confirm_timeout: float = 0.0,
                    codecs: tuple[str, ...] | None = None,
                    on_sent: SentHook = _unreported,
                    ) -> tuple[ReceiveAnswer, Stream]:
        # Encodes get their own threads: long encodes must not take the default executor's threads,
        # which asyncssh needs (name resolution) to open the confirmations that beat the deadlines.
        entry = await asyncio.get_running_loop().run_in_executor(
            self._encoders, self.deltas.get, held, toplevel, staged, avoid, codecs)
        start = time.monotonic()
        try:
            proc = await conn.create_process(receive_command(activation, confirm_timeout), encoding=None)
            with open(entry.path, "rb") as f:
                while chunk := f.read(CHUNK):
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
            proc.stdin.write_eof()
            on_sent(entry.stream_bytes, entry.nar_bytes, time.monotonic() - start)
            on_phase(DeviceState.ACTIVATING)
            res = await proc.wait(check=False)
        except (OSError, asyncssh.Error, TimeoutError, BrokenPipeError) as exc:
            raise UnreachableError(f"transfer interrupted: {exc}") from exc
        stderr = (res.stderr or b"").decode("utf-8", "replace") if isinstance(res.stderr, bytes) else str(res.stderr or "")
        if res.exit_status != 0:
            err = classify_exit(res.exit_status, stderr)
            if res.exit_status in BLAMES_BASE:  # corrupt or mismatching, but blaming a base the device holds
                blamed = [p for p in _STORE_PATH.findall(stderr) if p in held]
                if blamed:
                    raise BrokenBaseError(str(err), blamed[0])
            raise err
        out = res.stdout if isinstance(res.stdout, bytes) else str(res.stdout or "").encode()
        return parse_receive(out), entry
