"""The planner's inputs kept in memory between reconcile passes, updated from what changed.

Called by the reconcile loop (controller.py) once per pass, for the incremental planner
(core/planner_incremental.py): instead of reading every device and build from SQLite
each pass, it re-reads only the rows the store says it wrote since the last pass
(`StateDB.take_changes`: acknowledgements, failures, retry times, builds) and the devices
whose push or probe started, changed phase or ended (`touched`, from the loop). Everything
is read again on a new revision, after another process wrote to the database, and
every FULL_REFRESH seconds (a safety net: such a pass re-plans every device).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

from reup.core.model import BuildResult, DeviceObservation, DeviceState, Observed
from reup.loop.state import StateDB

FULL_REFRESH = 300.0  # seconds between passes that read every device again


def present(b: BuildResult) -> bool:
    """A failed build, or one whose output is still in the store (not garbage-collected): a build
    whose output went is not built any more."""
    return not b.ok or bool(b.toplevel and os.path.exists(b.toplevel))


class PlannerInputs:
    def __init__(self, store: StateDB) -> None:
        self.store = store
        self.devices: dict[str, DeviceObservation] = {}
        self.builds: dict[str, BuildResult] = {}
        self.touched: set[str] = set()  # devices whose push or probe started, changed phase or ended
        self._next_full = 0.0

    def update(self, busy: Mapping[str, DeviceState], building: Iterable[str]
               ) -> tuple[Observed, set[str] | None, set[str]]:
        """(observed, devices changed since the last call or None for all, build results changed)."""
        names, drvs = self.store.take_changes()
        touched, self.touched = self.touched, set()

        def with_busy(n: str, o: DeviceObservation) -> DeviceObservation:
            return replace(o, busy=busy.get(n)) if n in busy else o

        changed: set[str] | None
        if names is None or time.monotonic() >= self._next_full:
            self._next_full = time.monotonic() + FULL_REFRESH
            self.devices = {n: with_busy(n, o) for n, o in self.store.observations().items()}
            self.builds = {d: b for d, b in self.store.build_results().items() if present(b)}
            changed = None
        else:
            changed = names | touched
            rows = self.store.observations(changed)
            for n in changed:
                o = rows.get(n)
                if o is None:  # no longer an active device
                    self.devices.pop(n, None)
                else:
                    self.devices[n] = with_busy(n, o)
            found = self.store.build_results(drvs)
            for drv in drvs:
                b = found.get(drv)
                if b is not None and present(b):
                    self.builds[drv] = b
                else:  # forgotten, or its output was garbage-collected
                    self.builds.pop(drv, None)
        observed = Observed(devices=self.devices, builds=self.builds, building=frozenset(building),
                            control=self.store.rollout_control())
        return observed, changed, drvs
