"""The reconcile loop's source intake: fetch the fleet repo, take in a new head once, and read fleet.toml.

Owned by the Controller (controller.py), whose `fetch` runs `SourceIntake.fetch` when due (poll
interval, a watchdog ref change, a webhook). A new head is checked against `[source] require_signed`
(refused once per head, the refusal kept in the store's meta), then evaluated once (fleet.toml + one
`nix eval`) and its targets recorded; a head seen before (a branch moved back) reuses its evaluation.
A broken fleet.toml fails the devices of the last good fleet. `reup plan` (`evaluate`) and `reup
export`/`import` (`load_fleet`) reach this through the Controller. The source, builder and current
fleet are read through callables at each use, as the controller (and its tests) may replace them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from reup.config.fleet_toml import parse_fleet
from reup.config.reup_toml import SourceConfig
from reup.core.errors import ConfigError, TemporaryError
from reup.core.model import Fleet, Target
from reup.core.shard import Shard, select
from reup.io.gitfetch import SourceRefused
from reup.io.retry import retrying
from reup.io.signing import verify_commit
from reup.io.source import GitSource
from reup.loop.events import CommitRefused, EventBus, GitFetched, ReconcileError, RevisionSeen
from reup.loop.executors import SystemBuilder
from reup.loop.state import StateDB


class SourceIntake:
    def __init__(self, cfg: SourceConfig, shard: Shard, store: StateDB, bus: EventBus, clock: Callable[[], float],
                 *, source: Callable[[], GitSource], builder: Callable[[], SystemBuilder],
                 fleet: Callable[[], Fleet | None], on_revision: Callable[[Fleet | None], None]) -> None:
        """`on_revision(fleet)` is called when a new head's targets are recorded, before RevisionSeen is
        emitted; `fleet` is its fleet, None if its fleet.toml is broken or unreadable."""
        self.cfg = cfg
        self.shard = shard
        self.store = store
        self.bus = bus
        self.clock = clock
        self.source = source
        self.builder = builder
        self.fleet = fleet
        self._on_revision = on_revision

    def load_fleet(self, commit: str) -> Fleet:
        text = self.source().read_file(commit, self.cfg.fleet_file)
        if text is None:
            raise ConfigError(f"{self.cfg.fleet_file}: missing at {commit[:12]}")
        return select(parse_fleet(text, where=self.cfg.fleet_file), self.shard)

    def evaluate(self, commit: str) -> tuple[Fleet | None, list[Target], str | None]:
        """(fleet, targets, fleet error) of `commit`; a broken fleet.toml fails the last good fleet's devices."""
        try:
            fleet = self.load_fleet(commit)
        except ConfigError as exc:
            known = self.fleet() or self.last_good_fleet()
            devices = known.devices.values() if known else ()
            return None, [Target(d.name, commit, d.wave, error=str(exc)) for d in devices], str(exc)
        return fleet, self.builder().evaluate(self.source().flake_ref(commit), fleet, commit), None

    def last_good_fleet(self) -> Fleet | None:
        commit = self.store.get_meta("fleet_commit")
        if commit is None:
            return None
        try:
            return self.load_fleet(commit)
        except (ConfigError, KeyError):
            return None

    async def fetch(self, now: float) -> None:
        """Fetch (`now`: when this fetch started) and take in the head if it is new."""
        try:
            head = await retrying(lambda: asyncio.to_thread(self.source().fetch), attempts=3, max_wait=2.0)
        except TemporaryError as exc:
            self.bus.emit(GitFetched(now, "error", error=str(exc)))
            self.bus.emit(ReconcileError(now, "fetch", str(exc)))
            return
        except SourceRefused as exc:  # untrusted server or bad credentials: stay on the last good commit
            self.bus.emit(GitFetched(now, exc.result, error=str(exc)))
            self.bus.emit(ReconcileError(now, "source", str(exc)))
            return
        self.bus.emit(GitFetched(now, "success", revision=head))
        current = self.store.revision()
        if current is not None and current[0] == head:
            return
        if not await self._signed(head, now):
            return
        if not self.store.has_targets(head):
            fleet, targets, fleet_error = await asyncio.to_thread(self.evaluate, head)
            for t in targets:
                if t.error is not None:
                    self.bus.emit(ReconcileError(self.clock(), "fleet" if fleet_error else "eval", t.error, t.device))
        else:  # seen before (a branch moved back): reuse its evaluation
            fleet, fleet_error = None, None
            with contextlib.suppress(ConfigError, KeyError):
                fleet = self.load_fleet(head)
            targets = list(self.store.desired(head).targets.values())
        seen = now  # when the fetch that found it started
        self.store.record_revision(head, seen, targets, fleet_error)
        self._on_revision(fleet)
        if fleet is not None:
            self.store.set_meta("fleet_commit", head)
        self.bus.emit(RevisionSeen(seen, head, len(targets), fleet_error))

    async def _signed(self, head: str, now: float) -> bool:
        """With `[source] require_signed`: refuse a head not signed by an allowed key (once per head)."""
        src = self.cfg
        if not src.require_signed:
            return True
        refused = json.loads(self.store.get_meta("refused") or "null")
        if refused and refused.get("revision") == head:
            return False
        verdict = await asyncio.to_thread(verify_commit, self.source().mirror_dir, head,
                                          allowed_signers=src.allowed_signers, gpg_home=src.gpg_home)
        if verdict.ok:
            self.store.set_meta("refused", "null")
            return True
        self.store.set_meta("refused", json.dumps({"revision": head, "reason": verdict.reason,
                                                   "error": verdict.message, "at": now}))
        self.bus.emit(CommitRefused(now, head, verdict.reason, verdict.message))
        return False
