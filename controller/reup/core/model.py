"""The controller's data model: desired state, observed state, actions, device states,
failure kinds (`AttemptKind`) and update results (`UpdateResult`).

Plain frozen dataclasses and enums shared by the pure planner (planner.py), the
state store (loop/state.py, which builds `Desired` and `Observed` from SQLite) and
the reconcile loop (loop/controller.py, whose executors carry out the actions and
return outcomes, core/outcomes.py). No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class DeviceState(StrEnum):
    IN_SYNC = "in_sync"
    PENDING = "pending"
    BUILDING = "building"
    TRANSFERRING = "transferring"
    ACTIVATING = "activating"
    CONFIRMING = "confirming"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    UNREACHABLE = "unreachable"
    HALTED = "halted"


ALL_STATES = tuple(DeviceState)
# States in which `reup run --once` considers a device settled.
SETTLED = frozenset({DeviceState.IN_SYNC, DeviceState.FAILED, DeviceState.UNREACHABLE, DeviceState.ROLLED_BACK,
                     DeviceState.HALTED})


class UpdateResult(StrEnum):
    """How one update of a device ended: the `result` of `DeviceUpdated` events and the label of the
    `reup_device_updates_total` counter (every value but RETRY, which is not an end)."""

    COMMITTED = "committed"
    SUPERSEDED = "superseded"  # committed, but the device's target changed meanwhile
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    TIMED_OUT = "timed_out"
    UNREACHABLE = "unreachable"
    RETRY = "retry"  # a transient failure: tried again soon

    @property
    def counted(self) -> bool:
        return self is not UpdateResult.RETRY


class AttemptKind(StrEnum):
    """What kind of failure an unsuccessful push was: the one place that says what each kind means.

    Stored as its value in SQLite (`devices.attempt_kind`, `history.result`)."""

    TRANSIENT = "transient"  # the same stream may succeed later (device locked, stream corrupted on the way)
    UNREACHABLE = "unreachable"  # no SSH connection
    PERMANENT = "permanent"  # retrying this revision cannot help (activation failed, stream refused)
    ROLLED_BACK = "rolled_back"  # the device rolled the new generation back (health check, deadline)
    TIMED_OUT = "timed_out"  # the confirmation was not delivered in time: the device decides, we ask it

    @property
    def quarantine(self) -> DeviceState | None:
        """The state a device stays in, with this revision not retried until a new commit (None: retried)."""
        return _QUARANTINE.get(self)

    @property
    def quarantines(self) -> bool:
        return self in _QUARANTINE

    @property
    def retryable(self) -> bool:
        """Pushed again after a backoff (a transient kind gives up after MAX_TRANSIENT failures)."""
        return self in (AttemptKind.TRANSIENT, AttemptKind.UNREACHABLE)

    @property
    def result(self) -> UpdateResult:
        """The update result (event, metric label) this failure is reported as."""
        return _RESULT[self]


_QUARANTINE = {AttemptKind.PERMANENT: DeviceState.FAILED, AttemptKind.ROLLED_BACK: DeviceState.ROLLED_BACK,
               AttemptKind.TIMED_OUT: DeviceState.ROLLED_BACK}
_RESULT = {AttemptKind.TRANSIENT: UpdateResult.RETRY, AttemptKind.UNREACHABLE: UpdateResult.UNREACHABLE,
           AttemptKind.PERMANENT: UpdateResult.FAILED, AttemptKind.ROLLED_BACK: UpdateResult.ROLLED_BACK,
           AttemptKind.TIMED_OUT: UpdateResult.TIMED_OUT}


@dataclass(frozen=True)
class Target:
    """What one device should run at one revision (result of fleet.toml + nix eval)."""

    device: str
    commit: str
    wave: str = "default"
    drv_path: str | None = None
    toplevel: str | None = None
    error: str | None = None  # fleet.toml or evaluation error: the device stays where it is


@dataclass(frozen=True)
class Desired:
    commit: str | None
    seen_at: float = 0.0
    targets: Mapping[str, Target] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildResult:
    drv_path: str
    commit: str  # the revision whose build produced this result
    ok: bool
    toplevel: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Attempt:
    """The last unsuccessful push of a device (cleared on success)."""

    commit: str
    toplevel: str
    kind: AttemptKind
    error: str
    failures: int = 1
    retry_at: float = 0.0
    since: float = 0.0  # first failure of this streak (unreachable_after counts from here)
    at: float = 0.0  # the last failure


@dataclass(frozen=True)
class DeviceObservation:
    name: str
    acked_toplevel: str | None = None
    acked_commit: str | None = None
    busy: DeviceState | None = None  # an action in flight: transferring, activating or confirming
    attempt: Attempt | None = None
    acked_at: float | None = None  # when the acknowledged generation was committed


@dataclass(frozen=True)
class RolloutControl:
    """Operator input (`reup rollout pause|resume`): a pause, and a resume of a halted revision."""

    paused: bool = False
    resumed_commit: str | None = None
    resumed_at: float = 0.0  # failures before this no longer count towards the threshold


@dataclass(frozen=True)
class Observed:
    devices: Mapping[str, DeviceObservation] = field(default_factory=dict)
    builds: Mapping[str, BuildResult] = field(default_factory=dict)  # by drv path
    building: frozenset[str] = frozenset()  # drv paths being built now
    control: RolloutControl = field(default_factory=RolloutControl)


@dataclass(frozen=True)
class Build:
    drv_path: str


@dataclass(frozen=True)
class Push:
    device: str
    commit: str
    toplevel: str


@dataclass(frozen=True)
class Wait:
    until: float


Action = Build | Push | Wait


@dataclass(frozen=True)
class Decision:
    device: str
    state: DeviceState
    action: Action | None = None
    reason: str = ""
    # Waiting for an earlier wave that can only move on through unreachable devices (their retries,
    # or rollout.unreachable_after): `reup run --once` need not wait for it.
    blocked_by: str | None = None


@dataclass(frozen=True)
class WaveCounts:
    name: str
    devices: int = 0
    committed: int = 0  # running the target
    failed: int = 0  # failed, rolled back (or unreachable too long, when that counts as failure)
    updating: int = 0


@dataclass(frozen=True)
class Rollout:
    """The rollout of the current revision as the planner sees it (status, metrics)."""

    revision: str | None = None
    wave: str | None = None  # the wave being rolled out (None: all waves reached)
    wave_index: int = 0
    halted: str | None = None  # why no new device starts (threshold, pause, a wave short of success)
    paused: bool = False
    executed: int = 0
    failed: int = 0
    progress: float = 0.0  # share of devices running the target
    waves: tuple[WaveCounts, ...] = ()
    baking_until: float | None = None  # the open wave committed enough; the next opens then


@dataclass(frozen=True)
class Plan:
    decisions: Mapping[str, Decision]
    builds: tuple[str, ...] = ()  # drv paths to build now, each once
    rollout: Rollout = field(default_factory=Rollout)

    def pushes(self) -> list[Push]:
        return [d.action for d in self.decisions.values() if isinstance(d.action, Push)]

    def next_wakeup(self) -> float | None:
        waits = [d.action.until for d in self.decisions.values() if isinstance(d.action, Wait)]
        return min(waits) if waits else None

    def settled(self) -> bool:
        """Nothing left to do now: every device settled and no build or push to start."""
        return not self.builds and all(
            d.state in SETTLED and not isinstance(d.action, Build | Push) for d in self.decisions.values()
        )

    def quiescent(self) -> bool:
        """Settled, or every unsettled device blocked behind a wave of unreachable devices (`--once`)."""
        return not self.builds and all(
            (d.state in SETTLED or d.blocked_by is not None) and not isinstance(d.action, Build | Push)
            for d in self.decisions.values()
        )

    def blocked(self) -> dict[str, str]:
        """Devices blocked behind unreachable ones, and why."""
        return {n: d.blocked_by for n, d in self.decisions.items() if d.blocked_by is not None}


# --- the fleet as fleet.toml describes it (parsed by config/fleet_toml.py) ---


@dataclass(frozen=True)
class RolloutPolicy:
    waves: tuple[str, ...] = ("default",)
    max_parallel: int = 0  # devices updating at once; 0 = no limit
    success_ratio: float = 1.0
    bake_time: float = 0.0
    failure_threshold: float = 1.0
    min_executed: int = 1
    unreachable_counts_as_failure: bool = False
    unreachable_after: float = 600.0
    confirm_timeout: float = 60.0
    activation: str = "switch"
    health_check: str | None = None


@dataclass(frozen=True)
class Device:
    name: str
    host: str
    host_key: str
    port: int = 22
    user: str = "root"
    config: str = ""
    wave: str = "default"
    tags: tuple[str, ...] = ()
    max_rate: float | None = None  # bytes/s to this device (None: no limit)
    windows: tuple[str, ...] = ()  # daily "HH:MM-HH:MM" ranges in `tz` (empty: any time)
    tz: str = "UTC"


@dataclass(frozen=True)
class LinkLimits:
    """`[transfer.tags.<tag>]` / `[transfer.waves.<wave>]` in fleet.toml: shared by their devices."""

    max_rate: float | None = None  # bytes/s, all of the group's transfers together
    windows: tuple[str, ...] = ()  # tags only: daily ranges in each device's tz


@dataclass(frozen=True)
class TransferPolicy:
    tags: Mapping[str, LinkLimits] = field(default_factory=dict)
    waves: Mapping[str, LinkLimits] = field(default_factory=dict)


@dataclass(frozen=True)
class Fleet:
    devices: dict[str, Device] = field(default_factory=dict)
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)
    transfer: TransferPolicy = field(default_factory=TransferPolicy)
