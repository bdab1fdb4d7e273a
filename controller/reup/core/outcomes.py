"""What an executor reports back: the outcomes of the planner's actions (kopf style).

The executors (loop/executors.py) run a Build, a Push or a status probe and return
one of these values; they never write the state store or emit events. The
reconcile loop (loop/controller.py) turns each outcome into state (SQLite) and
events with loop/record.py. Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from reup.core.model import AttemptKind, BuildResult, Push


@dataclass(frozen=True)
class Updated:
    """The device runs the push's target: acknowledged, adopted, or confirmed after a timed-out confirmation."""

    push: Push
    generation: int | None
    stream_bytes: int = 0
    nar_bytes: int = 0
    adopted: bool = False  # the device already ran the target: nothing was sent
    reason: str = "acknowledged"


@dataclass(frozen=True)
class UpdateFailed:
    """The push did not bring the device to its target."""

    push: Push
    kind: AttemptKind
    error: str
    generation: int | None = None  # the generation the device gave the update, when it said
    internal: str | None = None  # an encoder or protocol bug ("Type: message"), reported as a push error too


class ProbeVerdict(StrEnum):
    """What a status probe made of a generation whose confirmation timed out."""

    ROLLED_BACK = "rolled_back"  # the device rolled it back
    COMMITTED = "committed"  # it runs and is no longer pending: confirmed after all
    PENDING = "pending"  # it still awaits confirmation: ask again later
    UNREACHABLE = "unreachable"  # no answer: ask again later
    UNKNOWN = "unknown"  # no trace of it on the device: it stays timed out, asked no more

    @property
    def ask_again(self) -> bool:
        return self in (ProbeVerdict.PENDING, ProbeVerdict.UNREACHABLE)


@dataclass(frozen=True)
class Undecided:
    """A status probe that could not settle the fate of a timed-out generation."""

    push: Push
    verdict: ProbeVerdict  # PENDING, UNREACHABLE or UNKNOWN
    detail: str


@dataclass(frozen=True)
class Built:
    """A build finished: its output, or a failure that this revision will not retry."""

    result: BuildResult
    seconds: float


@dataclass(frozen=True)
class BuildDeferred:
    """A build hit a temporary failure: nothing recorded, a later pass builds it again."""

    drv_path: str
    error: str


@dataclass(frozen=True)
class Paused:
    """The transfer stopped because the device's transfer window closed: no failure, it resumes from
    the device's kept partial when the planner's window opens again."""

    push: Push


UpdateOutcome = Updated | UpdateFailed | Undecided | Paused
BuildOutcome = Built | BuildDeferred
