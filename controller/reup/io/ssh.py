"""The SSH transport to a device's `reup-receive` (sshd's forced command), with asyncssh.

`SshPusher` is the device executor the reconcile loop uses (loop/executors.py runs
the Push actions through it) and `reup plan` asks for a device's status. A push is:
connect (host key checked against fleet.toml, no trust on first use) -> `status` ->
if the device already runs the target, adopt it (nothing sent) -> a stream from the
delta cache (delta/cache.py) for what the device holds -> `receive --activate A` with
the stream on stdin -> the receiver's JSON answer. A base the device reports broken is
re-encoded around as `core.delta_base.after_broken_base` decides. With a confirm
timeout the generation is then pending on the device, and `confirm` (on a new
connection, running the policy's health check there) commits it (`RolledBackError`
when the device rolled back, `ConfirmTimeoutError` when the confirmation could not be
delivered in time, after which the device rolls back by itself). Failures are
classified, by `reup_receiver.protocol`'s handling of each exit code, into
`UnreachableError`, `TemporaryError` (retried by tenacity with jittered exponential
backoff) and `PermanentError`; the parsers here are pure and unit-tested.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import asyncssh
from reup_receiver.protocol import (
    MAX_ANSWER_BYTES,
    STATUS_COMMAND,
    ExitCode,
    ReceiveAnswer,
    ResumePoint,
    Retry,
    StatusAnswer,
    confirm_command,
    receive_command,
    resume_args,
    retry_class,
)

from reup.core.delta_base import DeltaBase, after_broken_base
from reup.core.errors import PermanentError, TemporaryError, UnreachableError
from reup.core.model import Device, DeviceState
from reup.io import transfer
from reup.io.answers import (
    CHUNK,
    BrokenBaseError,
    ConfirmTimeoutError,
    RolledBackError,
    bounded,
    classify_exit,
    local_deadline,
    ordered_bases,
    parse_receive,
    parse_status,
    read_answer,
    read_bounded,
    receive_refused,
    talk,
)
from reup.io.retry import retrying
from reup.io.transfer import TokenBucket, TransferProgress

log = logging.getLogger(__name__)
_T = TypeVar("_T")



@dataclass(frozen=True)
class PushOutcome:
    toplevel: str
    generation: int | None
    stream_bytes: int = 0
    nar_bytes: int = 0
    adopted: bool = False  # the device already ran the target: nothing was sent
    seconds: float = 0.0
    installed: tuple[str, ...] = field(default=())
    confirm_deadline: float | None = None  # while pending: the deadline on the controller's monotonic clock


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
        transfers: dict[str, TransferProgress] | None = None,
        rate_limits: Callable[[Device], Sequence[TokenBucket]] = lambda dev: (),
        may_transfer: Callable[[Device], bool] = lambda dev: True,
        max_connections: int = 64,
    ) -> None:
        self.deltas = deltas
        self.key = key
        self.connect_timeout = connect_timeout
        self.attempts = attempts
        self.have_path = have_path
        # Byte-level resume, rates and windows (transfer.py), as the reconcile loop configures them:
        # the progress of each device's transfer (read by status and gauges), its buckets, its window.
        self.transfers = {} if transfers is None else transfers
        self.rate_limits = rate_limits
        self.may_transfer = may_transfer
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

    async def _run(self, conn: asyncssh.SSHClientConnection, command: str, who: str) -> str:
        try:
            proc = await conn.create_process(command, encoding=None)
            proc.stdin.write_eof()
            exit_status, out, err = await asyncio.wait_for(bounded(proc, who), self.connect_timeout * 6)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise UnreachableError(f"{command}: {exc}") from exc
        if exit_status != 0:
            raise classify_exit(exit_status, err.decode("utf-8", "replace"))
        return out.decode("utf-8", "replace")

    async def _status_on(self, dev: Device, conn: asyncssh.SSHClientConnection) -> StatusAnswer:
        return read_answer(dev, parse_status, await self._run(conn, STATUS_COMMAND, dev.name))

    async def status(self, dev: Device, attempts: int | None = None) -> StatusAnswer:
        async def once() -> StatusAnswer:
            async with self._slots(confirm=True):
                conn = await self._connect(dev)
                try:
                    return await self._status_on(dev, conn)
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
        on_sent: SentHook = _unreported,
    ) -> PushOutcome:
        """Install and activate `toplevel` on `dev` (or adopt it if it runs it); `on_sent(stream bytes,
        NAR bytes, seconds)` after each whole stream sent, whatever the device then makes of it (so failed
        updates count on the wire too). With `confirm_timeout` the generation is left pending
        (`PushOutcome.confirm_deadline`): `confirm` commits it."""
        async def once() -> PushOutcome:
            async with self._slots():
                return await self._push_once(dev, toplevel, activation, on_phase, confirm_timeout, on_sent)

        return await retrying(once, attempts=self.attempts)

    async def confirm(self, dev: Device, toplevel: str, generation: int, deadline: float,
                      check: str | None) -> None:
        """Deliver `confirm GEN [--check CMD]` on new connections until it is answered or the deadline
        passes. `deadline` is on the controller's monotonic clock (the device's remaining seconds
        when it answered, added to ours): the device's own clock never enters."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0.2:
                raise ConfirmTimeoutError(
                    f"confirmation of generation {generation} not delivered before the deadline; "
                    "the device rolls back by itself", generation)
            try:
                async with self._slots(confirm=True), \
                        await self._connect(dev, timeout=min(self.connect_timeout, left)) as conn:
                    proc = await conn.create_process(confirm_command(generation, check), encoding=None)
                    proc.stdin.write_eof()
                    exit_status, _out, err = await asyncio.wait_for(
                        bounded(proc, dev.name), max(left + 5.0, self.connect_timeout))
                    if exit_status == 0:
                        return
                    stderr = err.decode("utf-8", "replace").strip()
                    message = stderr.splitlines()[-1] if stderr else f"exit status {exit_status}"
                    if retry_class(exit_status) == Retry.ROLLED_BACK:
                        status = await self._status_on(dev, conn)
                        if (exit_status == ExitCode.NOT_PENDING and status.current == toplevel
                                and status.pending is None):
                            return  # confirmed by an earlier attempt whose answer was lost
                        raise RolledBackError(f"rolled back by the device: {message}")
                    if retry_class(exit_status) not in (Retry.UNREACHABLE, Retry.TRANSIENT):
                        raise classify_exit(exit_status, stderr)
            except (UnreachableError, TemporaryError, OSError, asyncssh.Error, TimeoutError) as exc:
                log.warning("%s: confirm %d: %s", dev.name, generation, exc)
            await asyncio.sleep(min(1.0, max(0.05, deadline - time.monotonic() - 0.3)))

    async def _push_once(
        self, dev: Device, toplevel: str, activation: str, on_phase: Callable[[DeviceState], None],
        confirm_timeout: float = 0.0, on_sent: SentHook = _unreported,
    ) -> PushOutcome:
        start = time.monotonic()
        async with await self._connect(dev) as conn:
            status = await self._status_on(dev, conn)
            if status.current == toplevel:
                gen = status.generation_of(toplevel)
                if status.pending is not None and status.pending.generation == gen:  # activated, never confirmed
                    return PushOutcome(toplevel, gen, adopted=True, confirm_deadline=local_deadline(
                        status.pending.remaining, status.pending.deadline))
                return PushOutcome(toplevel, gen, adopted=True)
            base = DeltaBase(ordered_bases(status, self.have_path), status.staged)
            on_phase(DeviceState.TRANSFERRING)
            while True:
                try:
                    result, entry = await self._send(conn, base.held, toplevel, base.staged, base.avoid, activation,
                                                     on_phase, confirm_timeout, status.codecs, on_sent,
                                                     status=status, dev=dev)
                    break
                except BrokenBaseError as exc:
                    status = replace(status, resume=None)  # the device dropped its partial
                    following = after_broken_base(base, exc.path)
                    if following is None:
                        raise
                    log.warning("%s: %s; %s", dev.name, exc, "sending a full stream" if following.full
                                else f"re-encoding without {following.avoid[-1]}")
                    base = following
        if result.toplevel != toplevel:
            raise PermanentError(f"receiver installed {result.toplevel}, expected {toplevel}")
        deadline = (local_deadline(result.confirm_remaining, result.confirm_deadline)
                    if result.confirm_deadline is not None or result.confirm_remaining is not None else None)
        return PushOutcome(toplevel, result.generation, entry.stream_bytes, entry.nar_bytes,
                           seconds=time.monotonic() - start, installed=result.installed,
                           confirm_deadline=deadline)

    async def _send(self, conn: asyncssh.SSHClientConnection, held: tuple[str, ...], toplevel: str,
                    staged: tuple[str, ...], avoid: tuple[str, ...], activation: str,
                    on_phase: Callable[[DeviceState], None],
                    confirm_timeout: float = 0.0,
                    codecs: tuple[str, ...] | None = None,
                    on_sent: SentHook = _unreported,
                    *, status: StatusAnswer | None = None, dev: Device | None = None,
                    ) -> tuple[ReceiveAnswer, Stream]:
        kept = self._kept_stream(status, toplevel)
        # Encodes get their own threads: long encodes must not take the default executor's threads,
        # which asyncssh needs (name resolution) to open the confirmations that beat the deadlines.
        entry: Stream = kept if kept is not None else await asyncio.get_running_loop().run_in_executor(
            self._encoders, self.deltas.get, held, toplevel, staged, avoid, codecs)
        start = time.monotonic()
        if status is not None and status.resumable and dev is not None:
            return await self._send_resumable(conn, dev, entry, status.resume if kept else None, held, activation,
                                              on_phase, confirm_timeout, on_sent, start)
        who = dev.name if dev else "device"

        async def exchange(proc: asyncssh.SSHClientProcess[bytes]) -> bytes:
            with open(entry.path, "rb") as f:
                while chunk := f.read(CHUNK):
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
            proc.stdin.write_eof()
            on_sent(entry.stream_bytes, entry.nar_bytes, time.monotonic() - start)
            on_phase(DeviceState.ACTIVATING)
            return await read_bounded(proc.stdout, MAX_ANSWER_BYTES, "answer", who)

        try:
            proc = await conn.create_process(receive_command(activation, confirm_timeout), encoding=None)
            exit_status, out, err_bytes = await talk(proc, who, exchange(proc))
        except (OSError, asyncssh.Error, TimeoutError, BrokenPipeError) as exc:
            raise UnreachableError(f"transfer interrupted: {exc}") from exc
        stderr = err_bytes.decode("utf-8", "replace")
        if exit_status != 0:
            raise receive_refused(exit_status, stderr, held)
        return read_answer(who, parse_receive, out.decode("utf-8", "replace")), entry

    # --- byte-level resume, rates and windows (transfer.py) ---

    def _kept_stream(self, status: StatusAnswer | None, toplevel: str) -> Stream | None:
        """The cached stream whose partial the device keeps, if it is still for `toplevel`."""
        find = getattr(self.deltas, "find", None)
        if status is None or status.resume is None or find is None:
            return None
        entry: Stream | None = find(status.resume.stream_id, toplevel)
        return entry

    async def _send_resumable(self, conn: asyncssh.SSHClientConnection, dev: Device, entry: Stream,
                              point: ResumePoint | None, held: tuple[str, ...], activation: str,
                              on_phase: Callable[[DeviceState], None], confirm_timeout: float,
                              on_sent: SentHook, start: float) -> tuple[ReceiveAnswer, Stream]:
        sid = await asyncio.to_thread(transfer.stream_id, entry.path)
        offset = point.offset if point is not None and point.stream_id == sid and point.offset < entry.stream_bytes else 0
        prefix = await asyncio.to_thread(transfer.prefix_sha256, entry.path, offset) if offset else None
        progress = self.transfers.setdefault(dev.name, transfer.TransferProgress())
        if progress.stream_id != sid:
            self.transfers[dev.name] = progress = transfer.TransferProgress(stream_id=sid)
        progress.total, progress.offset, progress.attempts = entry.stream_bytes, offset, progress.attempts + 1
        progress.resumed += bool(offset)
        command = receive_command(activation, confirm_timeout) + resume_args(sid, offset, prefix)

        async def exchange(proc: asyncssh.SSHClientProcess[bytes]) -> bytes:
            answer = b""
            try:
                answer = await transfer.send(proc, entry.path, offset, progress, buckets=self.rate_limits(dev),
                                             may_continue=lambda: self.may_transfer(dev))
            except transfer.TransferPaused:
                progress.waiting_for_window = True
                raise  # _talk lets the receiver keep its partial and exit first
            except (OSError, asyncssh.Error, BrokenPipeError):
                pass  # the receiver may have stopped reading on purpose: its exit status says
            progress.waiting_for_window = False
            on_sent(entry.stream_bytes - offset, entry.nar_bytes, time.monotonic() - start)
            on_phase(DeviceState.ACTIVATING)
            rest = await read_bounded(proc.stdout, MAX_ANSWER_BYTES, "answer", dev.name)
            return answer or (rest.splitlines()[-1] if rest.strip() else b"")

        try:
            proc = await conn.create_process(command, encoding=None)
            exit_status, answer, err = await talk(proc, dev.name, exchange(proc))
        except (OSError, asyncssh.Error, TimeoutError, BrokenPipeError) as exc:
            raise UnreachableError(f"transfer interrupted at byte {progress.position}: {exc}") from exc
        if exit_status != 0:
            raise receive_refused(exit_status, err.decode("utf-8", "replace"), held)
        return read_answer(dev, parse_receive, answer.decode("utf-8", "replace")), entry
