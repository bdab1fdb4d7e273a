"""The delta base a stream is encoded from, and what to send after a device reports a base broken.

A stream assumes the device holds what its `status` listed. When the receiver
refuses a stream because a path it should have held is missing or corrupt
(`Retry.REENCODE`, or a corrupt/mismatching file blamed on a held path), the SSH
transport (io/ssh.py) asks `after_broken_base` what to encode next: the same base
without the blamed path (up to MAX_AVOIDED paths), then a full stream that
assumes nothing, then give up. Pure; golden cases in tests/unit/test_planner_probes.py.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_AVOIDED = 2  # broken base paths to re-encode around before sending a full stream


@dataclass(frozen=True)
class DeltaBase:
    """What a stream may take from the device: `held` (current generation first), verified `staged`
    paths, and paths it must not use (`avoid`, reported broken)."""

    held: tuple[str, ...]
    staged: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()

    @property
    def full(self) -> bool:
        """The stream assumes nothing on the device."""
        return not self.held and not self.staged


def after_broken_base(base: DeltaBase, blamed: str | None) -> DeltaBase | None:
    """The base for the next stream after the device refused one encoded from `base`, blaming the
    store path `blamed` (None: it did not say which); None when there is nothing left to try."""
    if blamed is not None and blamed not in base.avoid and len(base.avoid) < MAX_AVOIDED and not base.full:
        return DeltaBase(base.held, base.staged, (*base.avoid, blamed))
    if base.held:
        return DeltaBase(())
    return None
