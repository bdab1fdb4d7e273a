"""The device protocol, defined once: verbs, their command lines, JSON answers and exit codes.

Both sides import this module: the receiver (cli.py parses the verbs, errors.py takes its exit
codes from here, maintenance.py and receive.py build the answers) and the controller
(reup.io.ssh builds the command lines, validates every answer with the `from_json` readers and
maps exit codes to its error classes through `RETRY`). Normative text: docs/stream-format.md.

An answer read from a device is untrusted input: every reader checks shape and types and raises
`ProtocolError` (a ValueError) on anything else, so a device that lies or streams garbage is a
clear error with the device's name, never an internal one.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

# The forced command's verbs (`SSH_ORIGINAL_COMMAND`); nothing else is accepted.
VERBS = ("status", "receive", "rollback", "gc", "confirm")
# switch-to-configuration actions after an install.
ACTIONS = ("switch", "boot", "test", "none", "reboot")
# `reboot`: a generation that changes the kernel, initrd, kernel parameters or device tree gets a
# boot entry with a try counter and the device reboots into it (reup_receiver.boot); others switch.

# Bounds on the controller's side: what it reads from a device before giving up.
MAX_ANSWER_BYTES = 64 << 20  # a status lists every valid path: sized for large closures
MAX_STDERR_BYTES = 64 << 10


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    BAD_MAGIC = 10
    TRUNCATED = 11
    CORRUPT = 12
    HASH_MISMATCH = 13
    MISSING_BASE = 14
    UNSAFE_NAME = 15
    UNSAFE_WRITE = 16
    OVERSIZED = 17
    DISK_FULL = 18
    LOCKED = 19
    ACTIVATION_FAILED = 20
    MISSING_PATH = 21
    UNSUPPORTED = 22
    NO_GENERATION = 23
    NOT_PENDING = 24
    HEALTH_CHECK_FAILED = 25
    REBOOTING = 26  # confirm before the device rebooted into a generation on trial: ask again
    RESUME_MISMATCH = 27
    BAD_SIGNATURE = 28
    PENDING = 29  # a generation awaits confirmation: confirm it or wait for its deadline
    SSH_FAILURE = 255  # ssh's own code: the connection, not the receiver


class Retry(StrEnum):
    """What the controller does about a failed verb (its handling of each exit code)."""

    TRANSIENT = "transient"  # resend the same stream later (a damaged transfer, a busy device)
    UNREACHABLE = "unreachable"  # the connection failed: count toward unreachable_after
    REENCODE = "reencode"  # the stream assumed a base the device lacks: encode avoiding it
    ROLLED_BACK = "rolled_back"  # the device is back on its last confirmed generation
    PERMANENT = "permanent"  # the same stream would fail the same way: quarantine the revision


# Exit code -> (kind, as printed after "reup-receive: ", and the controller's handling).
EXITS: Mapping[ExitCode, tuple[str, Retry]] = {
    ExitCode.ERROR: ("error", Retry.PERMANENT),
    ExitCode.USAGE: ("usage", Retry.PERMANENT),
    ExitCode.BAD_MAGIC: ("bad-magic", Retry.TRANSIENT),
    ExitCode.TRUNCATED: ("truncated", Retry.TRANSIENT),
    ExitCode.CORRUPT: ("corrupt", Retry.TRANSIENT),
    ExitCode.HASH_MISMATCH: ("hash-mismatch", Retry.PERMANENT),
    ExitCode.MISSING_BASE: ("missing-base", Retry.REENCODE),
    ExitCode.UNSAFE_NAME: ("unsafe-name", Retry.PERMANENT),
    ExitCode.UNSAFE_WRITE: ("unsafe-write", Retry.PERMANENT),
    ExitCode.OVERSIZED: ("oversized", Retry.PERMANENT),
    ExitCode.DISK_FULL: ("disk-full", Retry.PERMANENT),
    ExitCode.LOCKED: ("locked", Retry.TRANSIENT),
    ExitCode.ACTIVATION_FAILED: ("activation-failed", Retry.PERMANENT),
    ExitCode.MISSING_PATH: ("missing-path", Retry.REENCODE),
    ExitCode.UNSUPPORTED: ("unsupported", Retry.PERMANENT),
    ExitCode.NO_GENERATION: ("no-generation", Retry.PERMANENT),
    ExitCode.NOT_PENDING: ("not-pending", Retry.ROLLED_BACK),
    ExitCode.HEALTH_CHECK_FAILED: ("health-check-failed", Retry.ROLLED_BACK),
    ExitCode.REBOOTING: ("rebooting", Retry.TRANSIENT),
    ExitCode.RESUME_MISMATCH: ("resume-mismatch", Retry.TRANSIENT),  # the device's partial is dropped
    ExitCode.BAD_SIGNATURE: ("bad-signature", Retry.PERMANENT),  # an offline bundle (--from-file)
    ExitCode.PENDING: ("pending", Retry.TRANSIENT),
    ExitCode.SSH_FAILURE: ("connection", Retry.UNREACHABLE),
}
# Exit codes that blame one store path the device holds (named on stderr): a corrupt or
# mismatching result may come from a damaged base, so the controller re-encodes without it.
BLAMES_BASE = frozenset({ExitCode.CORRUPT, ExitCode.HASH_MISMATCH})
# `last_rollback.reason` of a generation whose kernel did not come up within its boot tries.
BOOT_FAILED = "boot_failed"


def retry_class(exit_status: int | None) -> Retry:
    """The controller's handling of a verb that ended with `exit_status` (None: no exit status)."""
    if exit_status is None:
        return Retry.UNREACHABLE
    try:
        return EXITS[ExitCode(exit_status)][1]
    except (ValueError, KeyError):
        return Retry.PERMANENT


def exit_kind(exit_status: int | None) -> str:
    try:
        return EXITS[ExitCode(exit_status or 0)][0]
    except (ValueError, KeyError):
        return f"exit {exit_status}"


# --- command lines (built by the controller, parsed by the receiver's cli.py) --------------------


# `--confirm-timeout` range (docs/device-invariants.md, invariant 8); 0 means no confirmation.
CONFIRM_TIMEOUT_MIN = 1.0
CONFIRM_TIMEOUT_MAX = 86400.0


def check_confirm_timeout(value: float) -> float:
    """0 (no confirmation) or a finite number of seconds within the documented range."""
    if value != 0 and not (math.isfinite(value) and CONFIRM_TIMEOUT_MIN <= value <= CONFIRM_TIMEOUT_MAX):
        raise ValueError(f"--confirm-timeout {value!r}: must be 0 or between {CONFIRM_TIMEOUT_MIN:g} "
                         f"and {CONFIRM_TIMEOUT_MAX:g} seconds")
    return value


def receive_command(activation: str = "switch", confirm_timeout: float = 0.0) -> str:
    if activation not in ACTIONS:
        raise ValueError(f"unknown activation {activation!r}")
    check_confirm_timeout(confirm_timeout)
    extra = f" --confirm-timeout {confirm_timeout:g}" if confirm_timeout > 0 else ""
    return f"receive --activate {activation}{extra}"


def confirm_command(generation: int, check: str | None = None) -> str:
    return f"confirm {generation}" + (f" --check {shlex.quote(check)}" if check else "")


STATUS_COMMAND = "status"
# In status `codecs`: the receiver reads stream version 2 (compact manifest, short ids,
# format/manifest2.py). The controller sends version 1 to a receiver that does not list it.
STREAM_V2 = "stream_v2"


def stream_version(codecs: Sequence[str] | None) -> int:
    """The stream version for a device that listed `codecs` in its status (None: not known, the newest)."""
    return 2 if codecs is None or STREAM_V2 in codecs else 1


# In status `codecs`, beside `solid_pyc`: "pyc-<16 hex>", the identity of the interpreter the
# receiver compiles .pyc recipes with (format/pyc.py `identity`). The controller uses SOLID_PYC
# only when it equals its own.
PYC_TOKEN = re.compile(r"pyc-[0-9a-f]{16}")


def pyc_identity(codecs: Sequence[str] | None) -> str | None:
    """The compiler identity a device listed in its status codecs (None: none)."""
    return next((c for c in codecs or () if PYC_TOKEN.fullmatch(c)), None)


# A version-2 stream names known paths by a prefix of their store hash; a `missing-base` refusal
# for one that does not resolve says "short id <prefix>", and the controller maps it back to
# the held path with that prefix, to re-encode without it.
SHORT_ID = re.compile(r"short id ([0-9a-df-np-sv-z]{8,32})\b")


def short_id_text(prefix: str) -> str:
    return f"short id {prefix}"


def resume_args(stream_id: str, offset: int = 0, prefix_sha256: str | None = None) -> str:
    """What `receive` takes after its options for a resumable transfer (docs/stream-format.md, Resume):
    the stream's id, and to continue a partial the device holds, its offset and the prefix's sha256."""
    if not _HEX64.fullmatch(stream_id) or offset < 0:
        raise ValueError("stream id must be 64 hex digits and the offset >= 0")
    if offset == 0:
        return f" --stream-id {stream_id}"
    if prefix_sha256 is None or not _HEX64.fullmatch(prefix_sha256):
        raise ValueError("resuming needs the prefix's sha256 (64 hex digits)")
    return f" --stream-id {stream_id} --resume-from {offset} --resume-sha256 {prefix_sha256}"


_HEX64 = re.compile(r"[0-9a-f]{64}")


# --- answers -------------------------------------------------------------------------------------


class ProtocolError(ValueError):
    """A device's answer is not what the protocol says (wrong shape, type or value)."""


def _obj(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _str(d: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise ProtocolError(f"{key}: expected a string, got {v!r:.80}")
    return v


def _int(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{key}: expected an integer, got {v!r:.80}")
    return v


def _num(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ProtocolError(f"{key}: expected a finite number, got {v!r:.80}")
    return float(v)


def _strs(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = d.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ProtocolError(f"{key}: expected a list of strings")
    return tuple(v)


@dataclass(frozen=True)
class Pending:
    """A generation awaiting confirmation."""

    generation: int
    deadline: float  # the device's clock (epoch seconds)
    remaining: float | None = None  # seconds left, by the device's monotonic view (None: older receiver)

    @classmethod
    def from_json(cls, data: Any) -> Pending:
        d = _obj(data, "pending")
        rem = d.get("remaining")
        return cls(_int(d.get("generation"), "pending.generation"), _num(d.get("deadline"), "pending.deadline"),
                   None if rem is None else _num(rem, "pending.remaining"))


@dataclass(frozen=True)
class StatusAnswer:
    """`status`: what the device holds, runs and can apply."""

    current: str | None
    generations: tuple[tuple[int, str], ...] = ()
    paths: tuple[str, ...] = ()
    staged: tuple[str, ...] = ()
    pending: Pending | None = None
    last_rollback: Mapping[str, object] | None = None
    codecs: tuple[str, ...] | None = None  # patch codecs it can apply (None: an older receiver)
    format: int | None = None
    resume: ResumePoint | None = None  # a partial stream the device keeps (resume.py)
    resumable: bool = False  # the receiver takes --stream-id (False: an older receiver)

    def generation_of(self, toplevel: str) -> int | None:
        numbers = [n for n, t in self.generations if t == toplevel]
        return max(numbers) if numbers else None

    @classmethod
    def from_json(cls, data: Any) -> StatusAnswer:
        d = _obj(data, "status")
        gens_raw = d.get("generations")
        gens_raw = [] if gens_raw is None else gens_raw
        if not isinstance(gens_raw, list):
            raise ProtocolError("generations: expected a list")
        gens = tuple((_int(_obj(g, "generation").get("number"), "generations[].number"),
                      str(_str(_obj(g, "generation"), "toplevel"))) for g in gens_raw)
        rb = d.get("last_rollback")
        if rb is not None:
            _obj(rb, "last_rollback")
        codecs = d.get("codecs")
        fmt = d.get("format")
        return cls(
            current=_str(d, "current", optional=True),
            generations=gens,
            paths=_strs(d, "paths"),
            staged=_strs(d, "staged"),
            pending=Pending.from_json(d["pending"]) if d.get("pending") else None,
            last_rollback=rb or None,
            codecs=_strs(d, "codecs") if codecs is not None else None,
            format=_int(fmt, "format") if fmt is not None else None,
            resume=ResumePoint.from_json(d["resume"]) if d.get("resume") else None,
            resumable="resume" in d,
        )


@dataclass(frozen=True)
class ResumePoint:
    """`status.resume`: the device holds the first `offset` bytes of stream `stream_id`, verified."""

    stream_id: str
    offset: int

    def to_json(self) -> dict[str, object]:
        return {"stream_id": self.stream_id, "offset": self.offset}

    @classmethod
    def from_json(cls, data: Any) -> ResumePoint:
        d = _obj(data, "resume")
        sid = str(_str(d, "stream_id"))
        off = _int(d.get("offset"), "resume.offset")
        if not _HEX64.fullmatch(sid) or off < 0:
            raise ProtocolError(f"resume: bad stream id or offset {sid!r:.80} {off}")
        return cls(sid, off)


def progress_line(offset: int) -> bytes:
    """What a resumable `receive` writes on stdout each time it has made `offset` bytes durable;
    the answer is the last line."""
    return b'{"verified": %d}\n' % offset


def parse_progress(line: bytes) -> int | None:
    """The offset in a progress line, None for any other line (the answer)."""
    if not line.startswith(b'{"verified": '):
        return None
    try:
        value = json.loads(line)["verified"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class ReceiveAnswer:
    """`receive`: the generation installed (and, with a confirm timeout, pending)."""

    generation: int | None
    toplevel: str
    installed: tuple[str, ...] = ()
    bytes_read: int = 0
    seconds: float = 0.0
    unchanged: bool = False
    confirm_deadline: float | None = None  # the device's clock
    confirm_remaining: float | None = None  # seconds left when the answer was written

    def to_json(self) -> dict[str, object]:
        return {"generation": self.generation, "toplevel": self.toplevel, "installed": list(self.installed),
                "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3), "unchanged": self.unchanged,
                "confirm_deadline": self.confirm_deadline, "confirm_remaining": self.confirm_remaining}

    @classmethod
    def from_json(cls, data: Any) -> ReceiveAnswer:
        d = _obj(data, "receive")
        gen = d.get("generation")
        dl = d.get("confirm_deadline")
        rem = d.get("confirm_remaining")
        return cls(
            generation=_int(gen, "generation") if gen is not None else None,
            toplevel=str(_str(d, "toplevel")),
            installed=_strs(d, "installed"),
            bytes_read=_int(d.get("bytes_read") or 0, "bytes_read"),
            seconds=_num(d.get("seconds") or 0.0, "seconds"),
            unchanged=bool(d.get("unchanged")),
            confirm_deadline=_num(dl, "confirm_deadline") if dl else None,
            confirm_remaining=_num(rem, "confirm_remaining") if rem is not None else None,
        )
