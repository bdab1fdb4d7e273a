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
