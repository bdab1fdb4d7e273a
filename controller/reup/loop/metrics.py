"""Prometheus metrics, fed only by controller events (events.py).

Created by controller.py with its own `CollectorRegistry`; served on `/metrics`
by http.py. Names follow Prometheus practice: `reup_` prefix, base units,
counters end in `_total`, no device label on counters or histograms; the
per-device `reup_device_info` gauge is opt-in (`[http] device_info`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from reup.core.model import ALL_STATES, UpdateResult
from reup.io.gitfetch import REFUSED_RESULTS
from reup.loop.events import (
    BuildFinished,
    CommitRefused,
    DevicesSnapshot,
    DeviceUpdated,
    Event,
    GitFetched,
    ReconcileDone,
    ReconcileError,
    RevisionSeen,
    RolloutChanged,
    TransferFinished,
)

DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
UPDATE_RESULTS = tuple(str(r) for r in UpdateResult if r.counted)
RATIO_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, device_info: bool = False,
                 poll_interval: float = 60.0, shard: tuple[int, int] = (0, 1)) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.revision_info = Gauge("reup_source_revision_info", "Revision of the fleet repo being deployed",
                                   ["revision"], registry=r)
        self.git_fetches = Counter("reup_git_fetches", "Fetches of the fleet repo", ["result"], registry=r)
        self.git_last_success = Gauge("reup_git_last_success_timestamp_seconds",
                                      "End of the last successful fetch of the fleet repo", registry=r)
        # Constant, so that alerts can say "no successful fetch for N poll intervals".
        Gauge("reup_source_poll_interval_seconds", "Configured poll interval of the fleet repo",
              registry=r).set(poll_interval)
        # Constant: which devices this replica manages (`reup run --shard i/n`); sum() across replicas.
        Gauge("reup_shard_info", "This controller's shard of the fleet", ["shard", "shards"],
              registry=r).labels(str(shard[0]), str(shard[1])).set(1)
        self.builds = Counter("reup_builds", "Builds of device systems", ["result"], registry=r)
        self.build_duration = Histogram("reup_build_duration_seconds", "Time to build one system",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.devices = Gauge("reup_devices", "Devices by state and wave", ["state", "wave"], registry=r)
        self.updates = Counter("reup_device_updates", "Device update outcomes", ["result"], registry=r)
        self.transfer_bytes = Counter("reup_transfer_bytes", "Bytes sent to devices (delta) and what a full "
                                      "copy of the missing paths would have been (full_equivalent)", ["kind"], registry=r)
        self.delta_ratio = Histogram("reup_delta_ratio", "Stream bytes / NAR bytes of the missing paths",
                                     buckets=RATIO_BUCKETS, registry=r)
        self.update_duration = Histogram("reup_update_duration_seconds", "Commit seen to device acknowledged",
                                         buckets=DURATION_BUCKETS, registry=r)
        self.reconcile_errors = Counter("reup_reconcile_errors", "Errors by reconcile stage", ["stage"], registry=r)
        self.passes = Counter("reup_reconcile_passes", "Reconcile passes run", registry=r)
        self.last_reconcile = Gauge("reup_last_reconcile_timestamp_seconds", "End of the last reconcile pass",
                                    registry=r)
        self.rollout_wave = Gauge("reup_rollout_wave", "Index of the wave being rolled out", registry=r)
        self.rollout_halted = Gauge("reup_rollout_halted", "1 while the rollout is halted or paused", registry=r)
        self.rollout_progress = Gauge("reup_rollout_progress_ratio", "Share of devices running the current target",
                                      registry=r)
        self.commits_refused = Counter("reup_commits_refused", "Fleet repo heads refused (signature)", ["reason"],
                                       registry=r)
        self.device_info = (
            Gauge("reup_device_info", "Per-device state (opt-in)", ["device", "state", "generation"], registry=r)
            if device_info else None
        )
        for result in ("success", "error", *REFUSED_RESULTS):
            self.git_fetches.labels(result)
        for result in ("success", "failure"):
            self.builds.labels(result)
        for result in UPDATE_RESULTS:
            self.updates.labels(result)
        for reason in ("unsigned", "bad_signature"):
            self.commits_refused.labels(reason)
        for kind in ("delta", "full_equivalent"):
            self.transfer_bytes.labels(kind)
        self._seen_waves: set[str] = set()

    def __call__(self, event: Event) -> None:
        if isinstance(event, GitFetched):
            self.git_fetches.labels(event.result).inc()
            if event.result == "success":
                self.git_last_success.set(event.at)
        elif isinstance(event, RevisionSeen):
            self.revision_info.clear()
            self.revision_info.labels(event.revision).set(1)
        elif isinstance(event, BuildFinished):
            self.builds.labels(event.result).inc()
            self.build_duration.observe(event.seconds)
        elif isinstance(event, TransferFinished):
            self.transfer_bytes.labels("delta").inc(event.stream_bytes)
            self.transfer_bytes.labels("full_equivalent").inc(event.nar_bytes)
            if event.nar_bytes > 0:
                self.delta_ratio.observe(event.stream_bytes / event.nar_bytes)
        elif isinstance(event, DeviceUpdated):
            if event.result in UPDATE_RESULTS:
                self.updates.labels(event.result).inc()
            if event.result == UpdateResult.COMMITTED and event.seconds_since_seen is not None:
                self.update_duration.observe(max(0.0, event.seconds_since_seen))
        elif isinstance(event, ReconcileError):
            self.reconcile_errors.labels(event.stage).inc()
        elif isinstance(event, RolloutChanged):
            self.rollout_wave.set(event.wave_index)
            self.rollout_halted.set(1 if event.halted else 0)
            self.rollout_progress.set(event.progress)
        elif isinstance(event, CommitRefused):
            self.commits_refused.labels(event.reason).inc()
        elif isinstance(event, DevicesSnapshot):
            self._snapshot(event)
        elif isinstance(event, ReconcileDone):
            self.last_reconcile.set(event.at)
            self.passes.inc()

    def _snapshot(self, event: DevicesSnapshot) -> None:
        counts: dict[tuple[str, str], int] = {}
        waves = self._seen_waves | {wave for _, _, wave, _ in event.devices}
        for wave in waves:
            for s in ALL_STATES:
                counts[(str(s), wave)] = 0
        for _, st, wv, _ in event.devices:
            counts[(st, wv)] = counts.get((st, wv), 0) + 1
        for (st, wv), n in counts.items():
            self.devices.labels(st, wv).set(n)
        self._seen_waves = waves
        if self.device_info is not None:
            self.device_info.clear()
            for name, state, _, generation in event.devices:
                self.device_info.labels(name, state, generation).set(1)
