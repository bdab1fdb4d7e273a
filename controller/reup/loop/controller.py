"""The reconcile loop: level-triggered, kopf style. Called by `reup run` and `reup demo`.

Each pass: fetch the fleet repo if due (poll interval, a watchdog ref change, a
webhook), evaluate a new head once (fleet.toml + one `nix eval`) and record its
targets, then ask the pure planner (planner.py) what each device needs given
the desired state, the observed state in SQLite and what is in flight, persist
the planned states, and start executors for the actions: builds (nix, at most
`[build] max_parallel`) and pushes (ssh), as asyncio tasks. Executors report
outcomes, which are written to the store and emitted as events (events.py);
metrics and logs subscribe to those. One device's trouble never blocks another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import IO, Any

from reup.config.fleet_toml import parse_fleet
from reup.config.reup_toml import Config
from reup.core import planner
from reup.core.errors import ConfigError, PermanentError, ReupError, TemporaryError
from reup.core.model import BuildResult, DeviceState, Fleet, Observed, Plan, Target
from reup.core.shard import Shard, select
from reup.delta.cache import DeltaCache, Encoder, nix_encoder
from reup.io.builder import Builder, GcRoots
from reup.io.nix import NixExecutor
from reup.io.retry import retrying
from reup.io.signing import verify_commit
from reup.io.source import GitSource
from reup.io.ssh import SshPusher
from reup.loop.events import (
    BuildFinished,
    CommitRefused,
    DevicesSnapshot,
    DeviceStateChanged,
    EventBus,
    GitFetched,
    ReconcileDone,
    ReconcileError,
    RevisionSeen,
    RolloutChanged,
    log_subscriber,
    store_subscriber,
)
from reup.loop.executors import UpdateExecutor
from reup.loop.http import HttpServer
from reup.loop.metrics import Metrics
from reup.loop.state import StateDB

log = logging.getLogger(__name__)
BUILD_BATCH = 100  # derivations per `nix build` when many systems are due at once


class Controller(UpdateExecutor):
    def __init__(self, cfg: Config, *, encoder: Encoder | None = None, clock: Callable[[], float] = time.time,
                 shard: Shard | None = None) -> None:
        self.cfg = cfg
        self.shard = shard or Shard()
        self.clock = clock
        state_dir = cfg.state.dir
        self.store = StateDB(state_dir)
        self.nix = NixExecutor(options=cfg.build.nix_options)
        self.source = GitSource(cfg.source.url, cfg.source.branch, os.path.join(state_dir, "repo.git"))
        self.builder = Builder(self.nix, log_dir=os.path.join(state_dir, "logs"))
        self.gcroots = GcRoots(self.nix, os.path.join(state_dir, "gcroots"))
        self.deltas = DeltaCache(os.path.join(state_dir, "deltas"), encoder or nix_encoder(self.nix))
        self.pusher = SshPusher(self.deltas, key=cfg.ssh.key, connect_timeout=cfg.ssh.connect_timeout,
                                attempts=cfg.ssh.attempts, max_connections=cfg.ssh.max_connections)
        self.bus = EventBus()
        self.metrics = Metrics(device_info=cfg.http.device_info, poll_interval=cfg.source.poll_interval,
                               shard=(self.shard.index, self.shard.count))
        self.bus.subscribe(store_subscriber(self.store))
        self.bus.subscribe(self.metrics)
        self.bus.subscribe(log_subscriber())
        self.fleet: Fleet | None = None
        self.busy: dict[str, DeviceState] = {}
        self.building: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.probing: set[str] = set()
        self.probe_failures: dict[str, int] = {}
        self._next_probe: float | None = None
        self._wake: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._fetch_requested = True
        self._next_poll = 0.0
        self._build_slots = asyncio.Semaphore(cfg.build.max_parallel)
        self._snapshot_due = True  # the first pass reports every device, and syncs the GC roots
        self._roots_due = True
        self._chores: set[str] = set()  # background steps running (gcroots, prune)
        self._rooted: set[str] | None = None  # the systems the GC roots last synced keep
        self._next_prune = 0.0

    # --- triggers ---------------------------------------------------------------

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def request_fetch(self) -> None:
        self._fetch_requested = True
        self.wake()

    def stop(self) -> None:
        """Ask a running `run()` to finish its pass and return (from the loop's thread)."""
        if self._stopping is not None:
            self._stopping.set()
            self.wake()

    def request_fetch_threadsafe(self) -> None:
        """For other threads (the webhook handler, the watchdog observer)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.request_fetch)
        else:
            self._fetch_requested = True

    def start_http(self, listen: tuple[str, int] | None = None) -> HttpServer | None:
        """Serve /metrics, /healthz, /api/status and /webhook on `[http] listen` (or `listen`)."""
        if listen is None and not self.cfg.http.listen:
            return None
        host, port = listen or self.cfg.http.host_port
        server = HttpServer(host, port, registry=self.metrics.registry, status=self.store.status,
                            webhook=self.request_fetch_threadsafe)
        server.start()
        return server

    # --- the source and evaluation ------------------------------------------------

    def load_fleet(self, commit: str) -> Fleet:
        text = self.source.read_file(commit, self.cfg.source.fleet_file)
        if text is None:
            raise ConfigError(f"{self.cfg.source.fleet_file}: missing at {commit[:12]}")
        return select(parse_fleet(text, where=self.cfg.source.fleet_file), self.shard)

    def evaluate(self, commit: str) -> tuple[Fleet | None, list[Target], str | None]:
        """(fleet, targets, fleet error) of `commit`; a broken fleet.toml fails the last good fleet's devices."""
        try:
            fleet = self.load_fleet(commit)
        except ConfigError as exc:
            known = self.fleet or self._last_good_fleet()
            devices = known.devices.values() if known else ()
            return None, [Target(d.name, commit, d.wave, error=str(exc)) for d in devices], str(exc)
        return fleet, self.builder.evaluate(self.source.flake_ref(commit), fleet, commit), None

    def _last_good_fleet(self) -> Fleet | None:
        commit = self.store.get_meta("fleet_commit")
        if commit is None:
            return None
        try:
            return self.load_fleet(commit)
        except (ConfigError, KeyError):
            return None

    async def fetch(self) -> None:
        now = self.clock()
        self._fetch_requested = False
        self._next_poll = now + self.cfg.source.poll_interval
        try:
            head = await retrying(lambda: asyncio.to_thread(self.source.fetch), attempts=3, max_wait=2.0)
        except TemporaryError as exc:
            self.bus.emit(GitFetched(now, "error", error=str(exc)))
            self.bus.emit(ReconcileError(now, "fetch", str(exc)))
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
        self._roots_due = True
        if fleet is not None:
            self.fleet = fleet
            self.store.set_meta("fleet_commit", head)
        self.bus.emit(RevisionSeen(seen, head, len(targets), fleet_error))

    async def _signed(self, head: str, now: float) -> bool:
        """With `[source] require_signed`: refuse a head not signed by an allowed key (once per head)."""
        src = self.cfg.source
        if not src.require_signed:
            return True
        refused = json.loads(self.store.get_meta("refused") or "null")
        if refused and refused.get("revision") == head:
            return False
        verdict = await asyncio.to_thread(verify_commit, self.source.mirror_dir, head,
                                          allowed_signers=src.allowed_signers, gpg_home=src.gpg_home)
        if verdict.ok:
            self.store.set_meta("refused", "null")
            return True
        self.store.set_meta("refused", json.dumps({"revision": head, "reason": verdict.reason,
                                                   "error": verdict.message, "at": now}))
        self.bus.emit(CommitRefused(now, head, verdict.reason, verdict.message))
        return False

    # --- one pass -----------------------------------------------------------------

    def observe(self) -> Observed:
        observed = self.store.observed(self.busy, self.building)
        # A build whose output was garbage-collected is not built any more.
        builds = {d: b for d, b in observed.builds.items() if not b.ok or (b.toplevel and os.path.exists(b.toplevel))}
        return replace(observed, builds=builds)

    async def step(self) -> Plan:
        if self._fetch_requested or self.clock() >= self._next_poll:
            await self.fetch()
        if self.fleet is None and self.store.revision() is not None:
            self.fleet = await asyncio.to_thread(self._last_good_fleet)
        now = self.clock()
        desired = self.store.desired()
        plan = planner.plan(desired, self.observe(), self.policy, now)
        for device, old, new in self.store.set_states(plan.decisions.values(), now):
            self._snapshot_due = True
            self.bus.emit(DeviceStateChanged(now, device, old, new, plan.decisions[device].reason))
        self._rollout_changed(plan, now)
        due = [drv for drv in plan.builds if drv not in self.building] if desired.commit else []
        self.building.update(due)
        if len(due) <= self.cfg.build.max_parallel:
            for drv in due:
                self._spawn(self._build(drv, desired.commit or ""))
        else:  # many systems (one per device): one `nix build` of many installables per batch
            for i in range(0, len(due), BUILD_BATCH):
                self._spawn(self._build_batch(due[i:i + BUILD_BATCH], desired.commit or ""))
        for push in plan.pushes():
            if push.device not in self.busy:
                self.busy[push.device] = DeviceState.PENDING
                self._spawn(self._push(push, desired.seen_at))
        self._next_probe = self._probe_timeouts(desired, now)
        self._background(now)
        if self._snapshot_due:
            self._emit_snapshot()
        if desired.commit and plan.settled() and not self.tasks and self.store.complete_revision(desired.commit, now):
            log.info("revision %s: rollout settled", desired.commit[:12])
        self.bus.emit(ReconcileDone(self.clock(), desired.commit, plan.settled() and not self.tasks))
        return plan

    def _rollout_changed(self, plan: Plan, now: float) -> None:
        r = plan.rollout
        doc = dataclasses.asdict(r)
        doc["waves"] = {w.pop("name"): w for w in doc["waves"]}
        text = json.dumps(doc, sort_keys=True)
        if text != self.store.get_meta("rollout"):
            self.store.set_meta("rollout", text)
            self.bus.emit(RolloutChanged(now, r.revision, r.wave, r.wave_index, r.halted, r.progress, doc))

    def _snapshot(self) -> None:
        """A device changed (executors call this per outcome): the next pass emits one snapshot."""
        self._snapshot_due = True
        self.wake()

    def _emit_snapshot(self) -> None:
        """Every device's state as one event per pass that changed some (the reup_devices gauge follows it)."""
        self._snapshot_due = False
        self._roots_due = True
        self.bus.emit(DevicesSnapshot(self.clock(), self.store.device_rows()))

    def _background(self, now: float) -> None:
        """Work kept out of the pass, at most one of each at a time: GC roots when the set of distinct
        systems changed, and retention (pruning events, history and old revisions) now and then."""
        if "gcroots" not in self._chores and self._roots_due:
            self._roots_due = False
            needed = {p for p in self.store.toplevels_in_use() if os.path.exists(p)}  # built ones: per system
            if needed != self._rooted:
                self._chore("gcroots", self._sync_gcroots(needed))
        if "prune" not in self._chores and now >= self._next_prune:
            self._next_prune = now + self.cfg.state.prune_interval
            self._chore("prune", self._prune(now))

    def _chore(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self._chores.add(name)
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda _: self._chores.discard(name))

    async def _prune(self, now: float) -> None:
        st = self.cfg.state
        try:
            counts = await asyncio.to_thread(self.store.prune, now, keep_days=st.keep_days,
                                             keep_revisions=st.keep_revisions)
            if any(counts.values()):
                log.info("retention: pruned %s", counts)
        except Exception as exc:  # retention is housekeeping: report, carry on
            self.bus.emit(ReconcileError(self.clock(), "retention", str(exc)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("executor task failed", exc_info=task.exception())
        self.wake()

    async def _sync_gcroots(self, needed: set[str]) -> None:
        try:
            await asyncio.to_thread(self.gcroots.sync, needed)
            self._rooted = needed
        except Exception as exc:  # roots are a safety net: report, carry on (tried again next pass)
            self._roots_due = True
            self.bus.emit(ReconcileError(self.clock(), "gcroots", str(exc)))

    # --- executors ------------------------------------------------------------------

    async def _build(self, drv: str, commit: str) -> None:
        try:
            async with self._build_slots:
                start = time.monotonic()
                try:
                    out = await asyncio.to_thread(self.builder.build, drv)
                    result = BuildResult(drv, commit, True, out)
                except PermanentError as exc:
                    result = BuildResult(drv, commit, False, None, str(exc))
                    self.bus.emit(ReconcileError(self.clock(), "build", str(exc)))
                except TemporaryError as exc:
                    self.bus.emit(ReconcileError(self.clock(), "build", str(exc)))
                    await asyncio.sleep(5)
                    return
                seconds = time.monotonic() - start
                self.store.record_build(result, seconds, self.clock())
                self.bus.emit(BuildFinished(self.clock(), drv, "success" if result.ok else "failure", seconds,
                                            result.toplevel, result.error))
        finally:
            self.building.discard(drv)

    async def _build_batch(self, drvs: list[str], commit: str) -> None:
        try:
            async with self._build_slots:
                start = time.monotonic()
                try:
                    results = await asyncio.to_thread(self.builder.build_many, drvs)
                except TemporaryError as exc:
                    self.bus.emit(ReconcileError(self.clock(), "build", str(exc)))
                    await asyncio.sleep(5)
                    return
                seconds = time.monotonic() - start
                for drv, out in results.items():
                    if isinstance(out, str):
                        result = BuildResult(drv, commit, True, out)
                    else:
                        result = BuildResult(drv, commit, False, None, str(out))
                        self.bus.emit(ReconcileError(self.clock(), "build", str(out)))
                    self.store.record_build(result, seconds, self.clock())
                    self.bus.emit(BuildFinished(self.clock(), drv, "success" if result.ok else "failure", seconds,
                                                result.toplevel, result.error))
        finally:
            self.building.difference_update(drvs)

    # --- the loop -----------------------------------------------------------------------

    async def run(self, *, once: bool = False, on_start: Callable[[], None] | None = None) -> int:
        """Reconcile until stopped (or, with `once`, until every device settled); 0 if all in sync."""
        lock = self._lock_state_dir()
        loop = self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        stopping = self._stopping = asyncio.Event()
        self.store.reset_retry_timers()

        def on_ref_change() -> None:
            loop.call_soon_threadsafe(self.request_fetch)

        stop_watch: Callable[[], None] = _noop if once else self.source.watch(on_ref_change)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stopping.set)
        if on_start is not None:
            on_start()
        try:
            while not stopping.is_set():
                self._wake.clear()
                started = time.monotonic()
                plan = await self.step()
                # A pass costs O(fleet); outcomes arrive O(fleet) times. Spacing passes by their own
                # duration keeps the total pass work linear in the fleet (a fetch is never delayed).
                spent = time.monotonic() - started
                if spent > 0.02 and not self._fetch_requested:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), timeout=min(spent, 2.0))
                if once and not self.tasks and plan.settled() and not self._fetch_requested:
                    break
                wakeups = [w for w in (plan.next_wakeup(), None if once else self._next_poll,
                                       None if once else self._next_probe) if w is not None]
                timeout = max(0.05, min(wakeups) - self.clock()) if wakeups else 3600.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(timeout, 3600.0))
        finally:
            stop_watch()
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            lock.close()
        status = self.store.status()
        return 0 if status["devices"] and all(d["state"] == "in_sync" for d in status["devices"]) else 1

    def _lock_state_dir(self) -> IO[str]:
        """One controller per state dir; the kernel drops the lock when the process dies (kill -9 too)."""
        f = open(os.path.join(self.cfg.state.dir, "controller.lock"), "w")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ReupError(f"another reup controller is running on {self.cfg.state.dir}") from None
        f.write(str(os.getpid()))
        f.flush()
        return f

    def close(self) -> None:
        self.store.close()


def _noop() -> None:
    pass
