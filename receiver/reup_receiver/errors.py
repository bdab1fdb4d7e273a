"""Receiver errors, one class per exit code of the protocol (protocol.py, docs/stream-format.md).

Every failure the receiver can meet maps to one `ReceiveError` subclass with a
distinct exit code, so the controller can tell a corrupt transfer (retry) from a
missing base file (fall back to a fuller stream) from a failed activation.
Raised everywhere in reup_receiver; turned into `reup-receive: <message>` and
the exit code by cli.py.
"""

from __future__ import annotations

from reup_receiver.protocol import EXITS, ExitCode


class ReceiveError(Exception):
    exit_code = ExitCode.ERROR

    @property
    def kind(self) -> str:
        return EXITS[self.exit_code][0]


class UsageError(ReceiveError):
    exit_code = ExitCode.USAGE


class BadMagic(ReceiveError):
    exit_code = ExitCode.BAD_MAGIC


class Truncated(ReceiveError):
    exit_code = ExitCode.TRUNCATED


class Corrupt(ReceiveError):
    """Malformed framing, bad lengths, digest mismatch."""

    exit_code = ExitCode.CORRUPT


class HashMismatch(ReceiveError):
    exit_code = ExitCode.HASH_MISMATCH


class MissingBase(ReceiveError):
    """An operation needs a base file the device does not have."""

    exit_code = ExitCode.MISSING_BASE

    def __init__(self, message: str, base: str) -> None:
        super().__init__(message)
        self.base = base


class UnsafeName(ReceiveError):
    exit_code = ExitCode.UNSAFE_NAME


class UnsafeWrite(ReceiveError):
    """A write would go through a symlink or out of the staging tree."""

    exit_code = ExitCode.UNSAFE_WRITE


class Oversized(ReceiveError):
    """More data than the manifest or an operation declared."""

    exit_code = ExitCode.OVERSIZED


class DiskFull(ReceiveError):
    exit_code = ExitCode.DISK_FULL


class Locked(ReceiveError):
    exit_code = ExitCode.LOCKED


class ActivationFailed(ReceiveError):
    exit_code = ExitCode.ACTIVATION_FAILED


class MissingPath(ReceiveError):
    """A manifest path is neither in the stream, staged, nor in the store."""

    exit_code = ExitCode.MISSING_PATH


class Unsupported(ReceiveError):
    """Unknown record, operation or codec (a newer encoder)."""

    exit_code = ExitCode.UNSUPPORTED


class NoGeneration(ReceiveError):
    """--rollback with no earlier generation."""

    exit_code = ExitCode.NO_GENERATION


class NotPending(ReceiveError):
    """confirm for a generation that is not awaiting confirmation (e.g. already rolled back)."""

    exit_code = ExitCode.NOT_PENDING


class HealthCheckFailed(ReceiveError):
    """The health check failed at confirmation; the device rolled back."""

    exit_code = ExitCode.HEALTH_CHECK_FAILED


class Rebooting(ReceiveError):
    """confirm while the device has not yet rebooted into the generation on trial (activation reboot)."""

    exit_code = ExitCode.REBOOTING


class ResumeMismatch(ReceiveError):
    """A resume that does not match the partial stream the device keeps; the partial is dropped."""

    exit_code = ExitCode.RESUME_MISMATCH


class BadSignature(ReceiveError):
    """An offline bundle whose signature, device or generation does not check out (offline.py)."""

    exit_code = ExitCode.BAD_SIGNATURE


class PendingConfirmation(ReceiveError):
    """A receive or switch while a generation awaits confirmation (invariant 2)."""

    exit_code = ExitCode.PENDING
