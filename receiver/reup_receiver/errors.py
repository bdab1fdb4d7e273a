"""Receiver errors and their exit codes (documented in docs/stream-format.md).

Every failure the receiver can meet maps to one `ReceiveError` subclass with a
distinct exit code, so the controller can tell a corrupt transfer (retry) from a
missing base file (fall back to a fuller stream) from a failed activation.
Raised everywhere in reup_receiver; turned into `reup-receive: <message>` and
the exit code by cli.py.
"""

from __future__ import annotations


class ReceiveError(Exception):
    exit_code = 1
    kind = "error"


class UsageError(ReceiveError):
    exit_code = 2
    kind = "usage"


class BadMagic(ReceiveError):
    exit_code = 10
    kind = "bad-magic"


class Truncated(ReceiveError):
    exit_code = 11
    kind = "truncated"


class Corrupt(ReceiveError):
    """Malformed framing, bad lengths, digest mismatch."""

    exit_code = 12
    kind = "corrupt"


class HashMismatch(ReceiveError):
    exit_code = 13
    kind = "hash-mismatch"


class MissingBase(ReceiveError):
    """An operation needs a base file the device does not have."""

    exit_code = 14
    kind = "missing-base"

    def __init__(self, message: str, base: str) -> None:
        super().__init__(message)
        self.base = base


class UnsafeName(ReceiveError):
    exit_code = 15
    kind = "unsafe-name"


class UnsafeWrite(ReceiveError):
    """A write would go through a symlink or out of the staging tree."""

    exit_code = 16
    kind = "unsafe-write"


class Oversized(ReceiveError):
    """More data than the manifest or an operation declared."""

    exit_code = 17
    kind = "oversized"


class DiskFull(ReceiveError):
    exit_code = 18
    kind = "disk-full"


class Locked(ReceiveError):
    exit_code = 19
    kind = "locked"


class ActivationFailed(ReceiveError):
    exit_code = 20
    kind = "activation-failed"


class MissingPath(ReceiveError):
    """A manifest path is neither in the stream, staged, nor in the store."""

    exit_code = 21
    kind = "missing-path"


class Unsupported(ReceiveError):
    """Unknown record, operation or codec (a newer encoder)."""

    exit_code = 22
    kind = "unsupported"


class NoGeneration(ReceiveError):
    """--rollback with no earlier generation."""

    exit_code = 23
    kind = "no-generation"


class NotPending(ReceiveError):
    """confirm for a generation that is not awaiting confirmation (e.g. already rolled back)."""

    exit_code = 24
    kind = "not-pending"


class HealthCheckFailed(ReceiveError):
    """The health check failed at confirmation; the device rolled back."""

    exit_code = 25
    kind = "health-check-failed"
