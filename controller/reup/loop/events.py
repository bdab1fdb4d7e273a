"""Controller events and the bus that carries them to subscribers.

The reconcile loop (controller.py) emits one event per thing that happened
(a fetch, a build, a state change, a transfer, an update outcome); metrics
(metrics.py), the SQLite event log (state.py via `store_subscriber`), logs and
progress display (progress.py) subscribe. Business code never touches metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from reup.loop.state import StateDB

log = logging.getLogger("reup.loop.events")


@dataclass(frozen=True)
class Event:
    at: float


@dataclass(frozen=True)
class GitFetched(Event):
    result: str  # "success", "error" (temporary) or one of gitfetch.REFUSED_RESULTS
    revision: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class RevisionSeen(Event):
    revision: str
    devices: int = 0
    fleet_error: str | None = None


@dataclass(frozen=True)
class BuildFinished(Event):
    drv_path: str
    result: str  # "success" or "failure"
    seconds: float
    toplevel: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class DeviceStateChanged(Event):
    device: str
    old: str
    new: str
    reason: str = ""


@dataclass(frozen=True)
class DevicesSnapshot(Event):
    """Every device's (name, state, wave, acknowledged generation) after a reconcile pass."""

    devices: tuple[tuple[str, str, str, str], ...]


@dataclass(frozen=True)
class TransferFinished(Event):
    device: str
    stream_bytes: int
    nar_bytes: int  # NAR bytes of the paths the device lacked: what a full copy would move
    seconds: float


@dataclass(frozen=True)
class DeviceUpdated(Event):
    device: str
    result: str  # an UpdateResult (core.model)
    commit: str
    toplevel: str
    seconds_since_seen: float | None = None
    error: str | None = None
    adopted: bool = False


@dataclass(frozen=True)
class RolloutChanged(Event):
    """The rollout of the current revision changed (wave, halt, counts); `rollout` is its JSON form."""

    revision: str | None
    wave: str | None
    wave_index: int
    halted: str | None
    progress: float
    rollout: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class CommitRefused(Event):
    revision: str
    reason: str  # "unsigned" or "bad_signature"
    error: str = ""


@dataclass(frozen=True)
class ReconcileError(Event):
    stage: str  # "fetch", "fleet", "eval", "build", "push", "gcroots"
    error: str
    device: str | None = None


@dataclass(frozen=True)
class ReconcileDone(Event):
    revision: str | None
    settled: bool


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> None:
        self.subscribers.append(fn)

    def emit(self, event: Event) -> None:
        for fn in self.subscribers:
            try:
                fn(event)
            except Exception:  # a broken subscriber must not break the loop
                log.exception("event subscriber %r failed on %s", fn, type(event).__name__)


# Events kept in the SQLite history (the rest are too chatty or derived).
_STORED = (RevisionSeen, BuildFinished, DeviceStateChanged, TransferFinished, DeviceUpdated, ReconcileError,
           RolloutChanged, CommitRefused)


def store_subscriber(store: StateDB) -> Subscriber:
    def record(event: Event) -> None:
        if isinstance(event, _STORED):
            data = dataclasses.asdict(event)
            at = data.pop("at")
            store.log_event(type(event).__name__, data.pop("device", None), data, at)

    return record


def log_subscriber(logger: logging.Logger = log) -> Subscriber:
    """One log record per event, each failure once: a push failure by its DeviceUpdated (WARNING), not
    again by the state change or the push's ReconcileError; a fleet.toml error at ERROR. Every record
    carries the event's fields (`--log-format json` prints them)."""

    def emit(event: Event) -> None:
        if isinstance(event, DevicesSnapshot | ReconcileDone) or (
                isinstance(event, GitFetched) and event.result == "success"):
            return  # never logged: not even their fields are copied (a snapshot holds every device)
        extra = {"event": type(event).__name__, **dataclasses.asdict(event)}
        if isinstance(event, DeviceStateChanged):
            said_elsewhere = event.new in ("failed", "rolled_back", "unreachable")
            logger.info("device %s: %s -> %s%s", event.device, event.old or "new", event.new,
                        f" ({event.reason})" if event.reason and not said_elsewhere else "", extra=extra)
        elif isinstance(event, RolloutChanged):
            logger.info("rollout %s: wave %s (%d), %.0f%% done%s", (event.revision or "none")[:12], event.wave,
                        event.wave_index, 100 * event.progress, f"; halted: {event.halted}" if event.halted else "",
                        extra=extra)
        elif isinstance(event, CommitRefused):
            logger.warning("commit %s refused (%s): %s", event.revision[:12], event.reason, event.error, extra=extra)
        elif isinstance(event, DeviceUpdated):
            said = f": {event.error}" if event.error else (" (already running it)" if event.adopted else "")
            logger.log(logging.WARNING if event.error else logging.INFO, "device %s: update %s -> %s%s",
                       event.device, event.result, event.toplevel, said, extra=extra)
        elif isinstance(event, TransferFinished):
            logger.info("device %s: sent %d bytes (a full copy: %d NAR bytes) in %.1fs",
                        event.device, event.stream_bytes, event.nar_bytes, event.seconds, extra=extra)
        elif isinstance(event, BuildFinished):
            logger.log(logging.WARNING if event.error else logging.INFO, "build %s: %s in %.1fs%s", event.drv_path,
                       event.result, event.seconds, f": {event.error}" if event.error else "", extra=extra)
        elif isinstance(event, RevisionSeen):
            logger.log(logging.ERROR if event.fleet_error else logging.INFO, "revision %s: %d devices%s",
                       event.revision[:12], event.devices,
                       f"; fleet.toml error: {event.fleet_error}" if event.fleet_error else "", extra=extra)
        elif isinstance(event, ReconcileError):
            if event.stage in ("push", "source"):  # its DeviceUpdated or GitFetched said it
                return
            logger.log(logging.ERROR if event.stage == "fleet" else logging.WARNING, "%s error%s: %s", event.stage,
                       f" ({event.device})" if event.device else "", event.error, extra=extra)
        elif isinstance(event, GitFetched) and event.result not in ("success", "error"):
            logger.error("git fetch refused (%s): %s", event.result, event.error, extra=extra)
        elif isinstance(event, GitFetched) and event.result != "success":
            logger.warning("git fetch failed: %s", event.error, extra=extra)

    return emit
