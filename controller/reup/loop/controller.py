"""The reconcile loop: level-triggered, kopf style. Called by `reup run` and `reup demo`.

Each pass: fetch the fleet repo if due (poll interval, a watchdog ref change, a
webhook) and take in a new head once (intake.py: its signature, fleet.toml, one
`nix eval`, its targets recorded), then ask the pure planner (planner.py) what
each device needs given the desired state, the observed state in SQLite and what
is in flight, persist the planned states, and start executors (executors.py) for
the actions: builds (builds.py: nix, at most `[build] max_parallel`), pushes (ssh)
and status probes of timed-out confirmations (`planner.probes`), as asyncio tasks.
Executors return outcomes (core/outcomes.py); the recorder (record.py) writes each
to the store and emits its events (events.py); metrics and logs subscribe to
those. The device executor and the system builder are injected (production: SSH
and Nix; tests: fakes). One device's trouble never blocks another. Work kept out
of the passes (GC roots, retention, the spacing of fleet snapshots) is in
chores.py; what the fleet page shows beyond the status rows, in page_feed.py.
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

from reup.config.reup_toml import Config
from reup.core import planner
from reup.core.errors import ReupError
from reup.core.model import (
    AttemptKind,
    Desired,
    DeviceState,
    Fleet,
    Observed,
    Plan,
    Push,
    RolloutPolicy,
    Target,
)
from reup.core.outcomes import Undecided, UpdateOutcome
from reup.core.planner_incremental import IncrementalPlanner
from reup.core.shard import Shard
from reup.delta.cache import DeltaCache, Encoder, nix_encoder
from reup.delta.diffmemo import DiffMemo
from reup.delta.literalmemo import LiteralMemo
from reup.io.builder import Builder, GcRoots
from reup.io.gitfetch import credentials_from
from reup.io.nix import NixExecutor
from reup.io.source import GitSource
from reup.io.ssh import SshPusher
from reup.io.transfer import TransferProgress
from reup.loop.builds import BuildRunner
from reup.loop.chores import Chores
from reup.loop.events import (
    DeviceStateChanged,
    EventBus,
    ReconcileDone,
    RolloutChanged,
    TransferFinished,
    log_subscriber,
    store_subscriber,
)
from reup.loop.executors import DeviceExecutor, SystemBuilder, execute_probe, execute_push
from reup.loop.http import HttpServer
from reup.loop.inputs import PlannerInputs, present
from reup.loop.intake import SourceIntake
from reup.loop.metrics import Metrics
from reup.loop.page_feed import PageFeed
from reup.loop.record import OutcomeRecorder
from reup.loop.state import StateDB
from reup.loop.transfers import TransferLimits, register_gauges, transfer_status, waiting_for_window
from reup.loop.web import FleetPage

log = logging.getLogger(__name__)


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
        self.tasks: set[asyncio.Task[None]] = set()
        self.blocked: dict[str, str] = {}  # `run --once`: devices it left blocked behind unreachable ones
        self.probing: set[str] = set()
        self._next_probe: float | None = None
        self._wake: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._fetch_requested = True
        self._next_poll = 0.0
        self._page: FleetPage | None = None
        self.planner = IncrementalPlanner()
        self.inputs = PlannerInputs(self.store)  # the planner's inputs, in memory between passes
        # The source, builder, GC roots and fleet are read at each use: tests replace them.
        self.builds = BuildRunner(cfg.build.max_parallel, self.recorder, self.bus, clock,
                                  builder=lambda: self.builder, spawn=self._spawn)
        self.building = self.builds.building  # derivations being built (the same set)
        self.chores = Chores(self.store, self.bus, clock, cfg.state, lambda needed: self.gcroots.sync(needed))
        self.intake = SourceIntake(cfg.source, self.shard, self.store, self.bus, clock, source=lambda: self.source,
                                   builder=lambda: self.builder, fleet=lambda: self.fleet,
                                   on_revision=self._new_revision)

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
            feed = PageFeed(self.cfg.http, self.store, source=lambda: self.source, fleet=lambda: self.fleet)
            page = self._page = FleetPage(self.store.status, device=feed.device, extras=feed.extras,
                                          token=self.cfg.http.token, metrics_token=self.cfg.http.metrics_token)
            self.bus.subscribe(page.on_event)
        return self._page

    # --- the source and evaluation (intake.py) ---------------------------------------

    def load_fleet(self, commit: str) -> Fleet:
        return self.intake.load_fleet(commit)

    def evaluate(self, commit: str) -> tuple[Fleet | None, list[Target], str | None]:
        """(fleet, targets, fleet error) of `commit`; a broken fleet.toml fails the last good fleet's devices."""
        return self.intake.evaluate(commit)

    async def fetch(self) -> None:
        """Fetch the fleet repo now and take in its head if new (intake.py); the next poll is due later."""
        now = self.clock()
        self._fetch_requested = False
        self._next_poll = now + self.cfg.source.poll_interval
        await self.intake.fetch(now)

    def _new_revision(self, fleet: Fleet | None) -> None:
        """A new head's targets were recorded: its systems need GC roots; its fleet (if it parsed) is current."""
        self.chores.roots_due = True
        if fleet is not None:
            self.fleet = fleet

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
            self.fleet = await asyncio.to_thread(self.intake.last_good_fleet)
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
            self.chores.snapshot_due = True
            self.bus.emit(DeviceStateChanged(now, device, old, new, plan.decisions[device].reason))
        self._rollout_changed(plan, now)
        if desired.commit:
            self.builds.start(plan.builds, desired.commit)
        for push in plan.pushes():
            if push.device not in self.busy:
                self.busy[push.device] = DeviceState.PENDING
                self.inputs.touched.add(push.device)
                self._spawn(self._push(push, desired.seen_at))
        # Only devices whose last attempt timed out can need a probe: the planner keeps that set.
        timed_out = {n: observed.devices[n] for n in self.planner.timed_out if n in observed.devices}
        self._next_probe = self._start_probes(desired, replace(observed, devices=timed_out), now)
        self.chores.start(now)
        self.chores.snapshot_if_due()
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
        self.chores.snapshot_due = True
        self.wake()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("executor task failed", exc_info=task.exception())
        self.wake()

    # --- executors -------------------------------------------------------------------------

    @property
    def policy(self) -> RolloutPolicy:
        return self.fleet.rollout if self.fleet else RolloutPolicy()

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
                    if self.chores.snapshot_due:  # the last state, not held back by the snapshots' spacing
                        self.chores.emit_snapshot()
                    break
                snapshot, roots = self.chores.wakeups(once=once)
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

