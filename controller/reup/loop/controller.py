"""The reconcile loop: level-triggered, kopf style. Called by `reup run` and `reup demo`.

Each pass: fetch the fleet repo if due (poll interval, a watchdog ref change, a
webhook), evaluate a new head once (fleet.toml + one `nix eval`) and record its
targets, then ask the pure planner (planner.py) what each device needs given
the desired state, the observed state in SQLite and what is in flight, persist
the planned states, and start executors (executors.py) for the actions: builds
(nix, at most `[build] max_parallel`), pushes (ssh) and status probes of timed-out
confirmations (`planner.probes`), as asyncio tasks. Executors return outcomes
(core/outcomes.py); the recorder (record.py) writes each to the store and emits
its events (events.py); metrics and logs subscribe to those. The device
executor and the system builder are injected (production: SSH and Nix; tests:
fakes). One device's trouble never blocks another.
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
from reup.core.errors import ConfigError, ReupError, TemporaryError
from reup.core.model import (
    AttemptKind,
    BuildResult,
    Desired,
    DeviceState,
    Fleet,
    Observed,
    Plan,
    Push,
    RolloutPolicy,
    Target,
)
from reup.core.outcomes import (
    BuildDeferred,
    Built,
    Undecided,
    UpdateOutcome,
)
from reup.core.planner_incremental import IncrementalPlanner
from reup.core.shard import Shard, select
from reup.delta.cache import DeltaCache, Encoder, nix_encoder
from reup.delta.diffmemo import DiffMemo
from reup.delta.literalmemo import LiteralMemo
from reup.io.builder import Builder, GcRoots
from reup.io.gitfetch import SourceRefused, credentials_from
from reup.io.nix import NixExecutor
from reup.io.retry import retrying
from reup.io.signing import verify_commit
from reup.io.source import GitSource
from reup.io.ssh import SshPusher
from reup.io.transfer import TransferProgress
from reup.loop.events import (
    CommitRefused,
    DevicesSnapshot,
    DeviceStateChanged,
    EventBus,
    GitFetched,
    ReconcileDone,
    ReconcileError,
    RevisionSeen,
    RolloutChanged,
    TransferFinished,
    log_subscriber,
    store_subscriber,
)
from reup.loop.executors import (
    DeviceExecutor,
    SystemBuilder,
    execute_build,
    execute_probe,
    execute_push,
)
from reup.loop.http import HttpServer
from reup.loop.inputs import PlannerInputs, present
from reup.loop.metrics import Metrics
from reup.loop.record import OutcomeRecorder
from reup.loop.state import StateDB
from reup.loop.transfers import TransferLimits, register_gauges, transfer_status, waiting_for_window
from reup.loop.web import FleetPage

log = logging.getLogger(__name__)
BUILD_BATCH = 100  # derivations per `nix build` when many systems are due at once
SNAPSHOT_EVERY = 1.0  # seconds at least between fleet snapshots (the reup_devices gauge, the progress line)
ROOTS_DUTY = 10  # GC root syncs at most 10% of the time
SNAPSHOT_DUTY = 20  # and at least this many times a snapshot's own cost (it is O(fleet)): under 5% of the time


class Controller:
    def __init__(self, cfg: Config, *, encoder: Encoder | None = None, clock: Callable[[], float] = time.time,
                 shard: Shard | None = None, executor: DeviceExecutor | None = None,
                 builder: SystemBuilder | None = None) -> None:
        self.cfg = cfg
        self.shard = shard or Shard()
        self.clock = clock
        state_dir = cfg.state.dir
        self.store = StateDB(state_dir)
        self.nix = NixExecutor(options=cfg.build.nix_options)
        self.source = GitSource(cfg.source.url, cfg.source.branch, os.path.join(state_dir, "repo.git"),
                                credentials_from(cfg.source))
        self.builder: SystemBuilder = builder or Builder(self.nix, log_dir=os.path.join(state_dir, "logs"))
        self.gcroots = GcRoots(self.nix, os.path.join(state_dir, "gcroots"))
        # One diff pool for every encode, remembering its diffs, and the compressed literal groups of
        # paths already sent: devices with their own systems share both.
        self.diffs = DiffMemo()
        self.deltas = DeltaCache(os.path.join(state_dir, "deltas"),
                                 encoder or nix_encoder(self.nix, self.diffs, LiteralMemo()))
        # Rates and windows (transfers.py): buckets for the transport, schedules for the planner.
        self.limits = TransferLimits(cfg.transfer.max_rate, lambda: self.fleet, clock)
        self.transfers: dict[str, TransferProgress] = {}
        self.pusher: DeviceExecutor = executor or SshPusher(
            self.deltas, key=cfg.ssh.key, connect_timeout=cfg.ssh.connect_timeout, attempts=cfg.ssh.attempts,
            transfers=self.transfers, rate_limits=self.limits.buckets_for, may_transfer=self.limits.may_transfer,
            max_connections=cfg.ssh.max_connections)
        self.bus = EventBus()
        self.metrics = Metrics(device_info=cfg.http.device_info, poll_interval=cfg.source.poll_interval,
                               shard=(self.shard.index, self.shard.count))
        self.waiting: dict[str, float | None] = {}
        register_gauges(self.metrics.registry, self.transfers, self.waiting)
        self.bus.subscribe(store_subscriber(self.store))
        self.bus.subscribe(self.metrics)
        self.bus.subscribe(log_subscriber())
        self.recorder = OutcomeRecorder(self.store, self.bus, clock, retry_max=cfg.ssh.retry_max,
                                        snapshot=self._snapshot)
        self.fleet: Fleet | None = None
        self.busy: dict[str, DeviceState] = {}
        self.building: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.blocked: dict[str, str] = {}  # `run --once`: devices it left blocked behind unreachable ones
        self.probing: set[str] = set()
        self._next_probe: float | None = None
        self._wake: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._fetch_requested = True
        self._next_poll = 0.0
        self._build_slots = asyncio.Semaphore(cfg.build.max_parallel)
        self._page: FleetPage | None = None
        self._summaries: dict[str, tuple[str, str]] = {}
        self._snapshot_due = True  # the first pass reports every device, and syncs the GC roots
        self._roots_due = True
        self._chores: set[str] = set()  # background steps running (gcroots, prune)
        self._rooted: set[str] | None = None  # the systems the GC roots last synced keep
        self._next_roots = 0.0
        self._next_prune = 0.0
        self.planner = IncrementalPlanner()
        self.inputs = PlannerInputs(self.store)  # the planner's inputs, in memory between passes
        self._last_snapshot = 0.0
        self._snapshot_every = SNAPSHOT_EVERY

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
        server = HttpServer(host, port, registry=self.metrics.registry, status=self.status_with_transfers,
                            webhook=self.request_fetch_threadsafe, web=self.fleet_page(),
                            webhook_secret=os.environ.get("REUP_WEBHOOK_SECRET") or self.cfg.http.webhook_secret)
        server.start()
        return server

    def fleet_page(self) -> FleetPage:
        """The live fleet page at `/` (web.py), fed by the bus; one per controller."""
        if self._page is None:
            page = self._page = FleetPage(self.store.status, device=self._device_page, extras=self._page_extras,
                                          token=self.cfg.http.token, metrics_token=self.cfg.http.metrics_token)
            self.bus.subscribe(page.on_event)
        return self._page

    def _page_extras(self, status: dict[str, Any]) -> dict[str, Any]:
        commit = status.get("revision")
        if commit and commit not in self._summaries:
            with contextlib.suppress(Exception):  # a mirror not yet there: the page shows the id alone
                self._summaries[commit] = self.source.commit_summary(commit)
        author, message = self._summaries.get(commit or "", ("", ""))
        fleet = self.fleet
        return {"author": author, "message": message, "grafana_url": self.cfg.http.grafana_url,
                "tags": {n: list(d.tags) for n, d in fleet.devices.items() if d.tags} if fleet else {},
                "bytes_sent": self.store.bytes_sent()}

    def _device_page(self, name: str) -> dict[str, Any] | None:
        rows = [d for d in self.store.status()["devices"] if d["name"] == name]
        if not rows:
            return None
        dev = self.fleet.devices.get(name) if self.fleet else None
        return {"device": rows[0], "tags": list(dev.tags) if dev else [], "host": dev.host if dev else None,
                "events": self.store.recent_device_events(name, 50)}

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
        """Every device's observation, read now (`reup plan`)."""
        observed = self.store.observed(self.busy, self.building)
        return replace(observed, builds={d: b for d, b in observed.builds.items() if present(b)})

    def _touch(self, name: str) -> None:
        """A push or probe of `name` started, changed phase or ended: the next pass re-decides it."""
        self.inputs.touched.add(name)
        self.wake()

    async def step(self) -> Plan:
        if self._fetch_requested or self.clock() >= self._next_poll:
            await self.fetch()
        if self.fleet is None and self.store.revision() is not None:
            self.fleet = await asyncio.to_thread(self._last_good_fleet)
        now = self.clock()
        desired = self.store.desired()
        observed, changed, builds_changed = self.inputs.update(self.busy, self.building)
        plan = self.planner.plan(desired, observed, self.policy, now, self.limits.schedules(), changed, builds_changed)
        if changed is None:
            self.waiting.clear()
        for name in plan.changed:  # who waits for a transfer window (status, gauges), as re-decided
            self.waiting.pop(name, None)
        self.waiting.update(waiting_for_window(plan.changed))
        for device, old, new in self.store.set_states(plan.changed.values(), now):
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
                self.inputs.touched.add(push.device)
                self._spawn(self._push(push, desired.seen_at))
        # Only devices whose last attempt timed out can need a probe: the planner keeps that set.
        timed_out = {n: observed.devices[n] for n in self.planner.timed_out if n in observed.devices}
        self._next_probe = self._start_probes(desired, replace(observed, devices=timed_out), now)
        self._background(now)
        if self._snapshot_due and time.monotonic() >= self._last_snapshot + self._snapshot_every:
            self._emit_snapshot()
        if desired.commit and plan.settled() and not self.tasks and self.store.complete_revision(desired.commit, now):
            log.info("revision %s: rollout settled", desired.commit[:12])
        self.bus.emit(ReconcileDone(self.clock(), desired.commit, plan.settled() and not self.tasks))
        return plan

    def status_with_transfers(self, **page: Any) -> dict[str, Any]:
        """`/api/status` (`page`: offset, limit, state, wave) with the transfers in flight or waiting."""
        return {**self.store.status(**page), "transfers": transfer_status(self.transfers, self.waiting)}

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
        """Every device's state as one event (the reup_devices gauge, the progress line follow it), after
        passes that changed some, spaced by SNAPSHOT_EVERY and by SNAPSHOT_DUTY times its own cost."""
        self._snapshot_due = False
        self._roots_due = True
        start = time.monotonic()
        self.bus.emit(DevicesSnapshot(self.clock(), self.store.device_rows()))
        self._snapshot_every = min(30.0, max(SNAPSHOT_EVERY, SNAPSHOT_DUTY * (time.monotonic() - start)))
        self._last_snapshot = time.monotonic()

    def _background(self, now: float) -> None:
        """Work kept out of the pass, at most one of each at a time: GC roots when the set of distinct
        systems changed, and retention (pruning events, history and old revisions) now and then."""
        if "gcroots" not in self._chores and self._roots_due and time.monotonic() >= self._next_roots:
            self._roots_due = False
            self._chore("gcroots", self._sync_gcroots())
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

    async def _sync_gcroots(self) -> None:
        start = time.monotonic()

        def sync() -> set[str]:
            needed = {p for p in self.store.toplevels_in_use() if os.path.exists(p)}  # built ones: per system
            if needed != self._rooted:
                self.gcroots.sync(needed)
            return needed

        try:
            self._rooted = await asyncio.to_thread(sync)
        except Exception as exc:  # roots are a safety net: report, carry on (tried again next pass)
            self._roots_due = True
            self.bus.emit(ReconcileError(self.clock(), "gcroots", str(exc)))
        finally:
            # A sync is O(distinct systems): with a system per device the set changes with every
            # acknowledgement, so syncs are spaced by ROOTS_DUTY times their own duration.
            self._next_roots = time.monotonic() + min(30.0, ROOTS_DUTY * (time.monotonic() - start))

    # --- executors -------------------------------------------------------------------------

    @property
    def policy(self) -> RolloutPolicy:
        return self.fleet.rollout if self.fleet else RolloutPolicy()

    async def _build(self, drv: str, commit: str) -> None:
        try:
            async with self._build_slots:
                outcome = await execute_build(self.builder, drv, commit)
                self.recorder.build(outcome)
                if isinstance(outcome, BuildDeferred):
                    await asyncio.sleep(5)  # holding the slot: a broken Nix is not hammered
        finally:
            self.building.discard(drv)

    async def _push(self, push: Push, seen_at: float) -> None:
        name = push.device
        try:
            dev = self.fleet.devices.get(name) if self.fleet else None
            if dev is None:
                return

            def on_phase(state: DeviceState) -> None:
                self.busy[name] = state
                self._touch(name)

            def on_sent(stream_bytes: int, nar_bytes: int, seconds: float) -> None:
                self.bus.emit(TransferFinished(self.clock(), name, stream_bytes, nar_bytes, seconds))

            outcome = await execute_push(self.pusher, dev, push, self.policy, on_phase=on_phase, on_sent=on_sent)
            self.recorder.update(outcome, seen_at, self.busy.get(name))
        finally:
            self.busy.pop(name, None)
            self._touch(name)

    def _start_probes(self, desired: Desired, observed: Observed, now: float) -> float | None:
        """Start the status probes the planner says are due; returns the next probe time (a wake-up)."""
        due, later = planner.probes(desired, observed, now, in_flight=set(self.busy) | self.probing)
        for push in due:
            self.probing.add(push.device)
            self._spawn(self._probe(push, desired.seen_at))
        return later

    async def _probe(self, push: Push, seen_at: float) -> None:
        name = push.device
        outcome: UpdateOutcome | None = None
        try:
            dev = self.fleet.devices.get(name) if self.fleet else None
            if dev is None:
                return
            generation = self.store.attempt_generation(name, push.commit, push.toplevel, AttemptKind.TIMED_OUT)
            outcome = await execute_probe(self.pusher, dev, push, generation)
            self.recorder.update(outcome, seen_at)
        finally:
            self.probing.discard(name)
            if not (isinstance(outcome, Undecided) and outcome.verdict.ask_again):
                self.recorder.probe_failures.pop(name, None)
            self._touch(name)

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
                    result = (BuildResult(drv, commit, True, out) if isinstance(out, str)
                              else BuildResult(drv, commit, False, None, str(out)))
                    self.recorder.build(Built(result, seconds))
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
                loop.add_signal_handler(sig, self.stop)  # stop() also wakes a loop asleep until the next poll
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
                if once and not self.tasks and plan.quiescent() and not self._fetch_requested:
                    self.blocked = plan.blocked()
                    if self._snapshot_due:  # the last state, not held back by the snapshots' spacing
                        self._emit_snapshot()
                    break
                snapshot = (self.clock() + max(0.0, self._last_snapshot + self._snapshot_every - time.monotonic())
                            if self._snapshot_due else None)
                roots = (self.clock() + max(0.0, self._next_roots - time.monotonic())
                         if self._roots_due and not once else None)
                wakeups = [w for w in (plan.next_wakeup(), None if once else self._next_poll,
                                       None if once else self._next_probe, snapshot, roots) if w is not None]
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
        self.diffs.shutdown(wait=False)
        self.store.close()


def _noop() -> None:
    pass

