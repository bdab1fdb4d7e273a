"""Controller error types, kopf style, shared by every executor.

Effects (git, nix, ssh) raise `TemporaryError` for failures worth retrying
(network, timeouts, a locked device) and `PermanentError` for failures that
retrying the same revision cannot fix (stream rejected, activation failed, build
error). The loop's executors (loop/executors.py) turn them into outcomes
(core/outcomes.py, with an `AttemptKind`); tenacity retries only `TemporaryError`.
`ConfigError` is raised by config/reup_toml.py and config/fleet_toml.py.
"""

from __future__ import annotations


class ReupError(Exception):
    """Base of every controller error."""


class TemporaryError(ReupError):
    """Retry later: the same action may succeed."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class UnreachableError(TemporaryError):
    """The device could not be reached over SSH (refused, timeout, host down)."""


class PermanentError(ReupError):
    """Do not retry this revision on this device until a new commit."""


class ConfigError(ReupError, ValueError):
    """A malformed reup.toml or fleet.toml: the message names the file and key."""


MAX_ERROR_CHARS = 4096  # what state, /api/status and `reup status DEVICE` keep of one error


def bounded(message: str | None) -> str | None:
    """A whole error message, cut (with a mark) only past MAX_ERROR_CHARS."""
    if message is None or len(message) <= MAX_ERROR_CHARS:
        return message
    return message[:MAX_ERROR_CHARS - 20] + " ... [truncated]"


def headline(message: str | None) -> str:
    """The one line of an error worth a table cell: Nix's first `error:` line (what went wrong, not
    the consequences after it, nor its `--show-trace` hint), else the last line that says something."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    lines = [ln for ln in lines if "--show-trace" not in ln] or lines
    errors = [ln for ln in lines if ln.startswith("error:") or " error:" in ln]
    return (errors[:1] or lines[-1:] or [""])[0]
