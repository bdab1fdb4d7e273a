"""Unit tests of the controller's pure parts and small executors: command builders and parsers,
the SQLite store, metrics fed by events, the HTTP endpoint, the delta cache and status table."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import generate_latest
from reup.cli.status import format_status
from reup.core.errors import PermanentError, TemporaryError, UnreachableError
from reup.core.model import AttemptKind, BuildResult, Decision, DeviceState, Target
from reup.delta.cache import DeltaCache
from reup.io.answers import (
    BrokenBaseError,
    classify_exit,
    ordered_bases,
    parse_receive,
    parse_status,
)
from reup.io.nix import (
    TOPLEVELS_OF_NAMES_APPLY,
    add_root_cmd,
    eval_json_cmd,
    parse_toplevels,
    toplevel_drv_installable,
)
from reup.loop.events import (
    BuildFinished,
    DevicesSnapshot,
    DeviceUpdated,
    EventBus,
    GitFetched,
    ReconcileDone,
    ReconcileError,
    RevisionSeen,
    TransferFinished,
)
from reup.loop.http import HttpServer
from reup.loop.metrics import Metrics
from reup.loop.state import StateDB
from reup_receiver.protocol import receive_command

P1, P2 = "/nix/store/aaaa-sys-1", "/nix/store/bbbb-sys-2"


# --- push: builders, parsers, classification ---------------------------------------


def test_receive_command() -> None:
    assert receive_command() == "receive --activate switch"
    assert receive_command("boot") == "receive --activate boot"


def test_parse_status() -> None:
    st = parse_status(json.dumps({"current": P1, "generations": [{"number": 1, "toplevel": P2}, {"number": 2, "toplevel": P1}],
                                  "paths": [P1, P2], "staged": ["/nix/store/cccc-x"]}))
    assert st.current == P1 and st.paths == (P1, P2) and st.staged == ("/nix/store/cccc-x",)
    assert st.generation_of(P1) == 2 and st.generation_of("/nix/store/none") is None
    empty = parse_status(b'{"current": null, "generations": [], "paths": [], "staged": []}')
    assert empty.current is None and empty.generations == ()


def test_parse_receive() -> None:
    r = parse_receive(b'{"generation": 3, "toplevel": "%s", "installed": ["%s"], "bytes_read": 120, "seconds": 0.5}'
                      % (P1.encode(), P1.encode()))
    assert (r.generation, r.toplevel, r.installed, r.bytes_read, r.seconds) == (3, P1, (P1,), 120, 0.5)


@pytest.mark.parametrize(
    ("status", "stderr", "kind", "text"),
    [
        (None, "", UnreachableError, "connection lost"),
        (255, "ssh: broken", UnreachableError, "broken"),
        (11, "reup-receive: stream truncated\n", TemporaryError, "truncated: reup-receive: stream truncated"),
        (19, "reup-receive: locked", TemporaryError, "locked"),
        (20, "x\nreup-receive: activation failed (switch, exit 1): boom", PermanentError, "boom"),
        (2, "reup-receive: refused: 'id' is not a reup-receive verb", PermanentError, "refused"),
        (13, "", PermanentError, "exit status 13"),
    ],
)
def test_classify_exit(status: int | None, stderr: str, kind: type[Exception], text: str) -> None:
    err = classify_exit(status, stderr)
    assert type(err) is kind and text in str(err)


def test_broken_base_names_the_store_path() -> None:
    path = "/nix/store/0cff2f14jci52chnwb2sqn71mkhbjl8p-glibc-2.40"
    err = classify_exit(14, f"reup-receive: missing-base: base file missing: {path}/lib/libc.so.6\n")
    assert isinstance(err, BrokenBaseError) and err.path == path and isinstance(err, PermanentError)
    err = classify_exit(21, "reup-receive: missing-path: a reference is missing")
    assert isinstance(err, BrokenBaseError) and err.path is None


def test_ordered_bases_current_and_newest_generations_first() -> None:
    st = parse_status(json.dumps({"current": P1, "generations": [{"number": 1, "toplevel": P1}, {"number": 2, "toplevel": P2}],
                                  "paths": ["/nix/store/zzzz-lib", P2, P1, "/nix/store/aaaa-gone"], "staged": []}))
    assert ordered_bases(st, lambda p: p != "/nix/store/aaaa-gone") == (P1, P2, "/nix/store/zzzz-lib")
    assert ordered_bases(parse_status('{"current": null}'), lambda p: True) == ()


# --- nix builders for the controller ----------------------------------------------------


def test_toplevels_apply_and_parse() -> None:
    expr = TOPLEVELS_OF_NAMES_APPLY  # constant: configuration names come as data (REUP_NAMES_FILE)
    assert expr.startswith("cs: ") and 'builtins.getEnv "REUP_NAMES_FILE"' in expr
    assert "builtins.tryEval" in expr and "deepSeq" in expr
    assert "--impure" in eval_json_cmd("f#x", apply=expr, impure=True)
    assert parse_toplevels({"a": ["/nix/store/x.drv", "/nix/store/x"], "b": None}) == {
        "a": ("/nix/store/x.drv", "/nix/store/x"), "b": None}
    with pytest.raises(ValueError):
        parse_toplevels({"a": [1, 2]})
    with pytest.raises(ValueError):
        parse_toplevels([])
    assert toplevel_drv_installable("git+file:///r?rev=1", "gw") == (
        'git+file:///r?rev=1#nixosConfigurations."gw".config.system.build.toplevel.drvPath')
    assert add_root_cmd(P1, "/s/gcroots/a") == ["nix-store", "--add-root", "/s/gcroots/a", "--realise", P1]


# --- the store -----------------------------------------------------------------------------


def test_store_round_trip_survives_reopen(tmp_path: os.PathLike[str]) -> None:
    d = str(tmp_path)
    s = StateDB(d)
    targets = [Target("a", "c1", "default", P1 + ".drv", P1), Target("b", "c1", "w2", None, None, "eval error")]
    s.record_revision("c1", 10.0, targets, None)
    s.record_build(BuildResult(P1 + ".drv", "c1", True, P1), 1.5, 11.0)
    s.record_ack("a", "c1", P1, 1, 12.0, 300, 9000)
    assert s.record_failure("b", "c1", P2, AttemptKind.UNREACHABLE, "refused", 12.5, 1.0) == 1
    assert s.record_failure("b", "c1", P2, AttemptKind.UNREACHABLE, "refused", 13.0, lambda n: 2.5 * n) == 2
    changed = s.set_states([Decision("a", DeviceState.IN_SYNC), Decision("b", DeviceState.FAILED, None, "eval error")], 14.0)
    assert ("b", "pending", "failed") in changed
    s.close()

    s = StateDB(d)  # what a restarted controller sees
    assert s.revision() == ("c1", 10.0)
    desired = s.desired()
    assert desired.targets["a"].toplevel == P1 and desired.targets["b"].error == "eval error"
    obs = s.observed({"b": DeviceState.TRANSFERRING})
    assert obs.devices["a"].acked_toplevel == P1 and obs.devices["a"].attempt is None
    assert obs.devices["b"].busy == DeviceState.TRANSFERRING
    assert obs.devices["b"].attempt is not None and obs.devices["b"].attempt.retry_at == 18.0
    assert obs.builds[P1 + ".drv"].ok
    s.reset_retry_timers()
    attempt = s.observed({}).devices["b"].attempt
    assert attempt is not None and attempt.retry_at == 0
    assert s.toplevels_in_use() == {P1}
    status = s.status()
    assert status["revision"] == "c1"
    a = status["devices"][0]
    assert (a["name"], a["state"], a["target"], a["acknowledged"], a["generation"]) == ("a", "in_sync", P1, P1, 1)
    assert status["devices"][1]["last_error"] == "eval error"
    assert [h["result"] for h in s.history()] == ["committed", "unreachable", "unreachable"]
    assert s.record_failure("b", "c2", P2, AttemptKind.TRANSIENT, "locked", 30.0, 0.0) == 1  # a new commit starts over
    assert s.get_meta("x") is None
    # A new revision without b drops it from the fleet.
    s.record_revision("c2", 20.0, [Target("a", "c2", "default", P2 + ".drv", P2)], None)
    assert [d["name"] for d in s.status()["devices"]] == ["a"]
    assert s.complete_revision("c2", 21.0) and not s.complete_revision("c2", 22.0)
    s.close()
    journal = StateDB(d).db.execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


# --- metrics fed by events, scraped over real HTTP -------------------------------------


def _serve(metrics: Metrics, status: dict[str, Any], hooks: list[int]) -> HttpServer:
    server = HttpServer("127.0.0.1", 0, registry=metrics.registry, status=lambda: status,
                        webhook=lambda: hooks.append(1))
    server.start()
    return server


def _get(server: HttpServer, path: str, data: bytes | None = None) -> tuple[int, str]:
    host, port = server.address
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}{path}", data=data), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_metrics_from_events_over_http() -> None:
    metrics = Metrics(device_info=True)
    bus = EventBus()
    bus.subscribe(metrics)
    bus.emit(GitFetched(1.0, "success", "c1"))
    bus.emit(GitFetched(2.0, "error", error="down"))
    bus.emit(RevisionSeen(2.0, "c0"))
    bus.emit(RevisionSeen(3.0, "c1", 2))
    bus.emit(BuildFinished(4.0, "x.drv", "success", 2.0))
    bus.emit(BuildFinished(4.0, "y.drv", "failure", 1.0, error="boom"))
    bus.emit(TransferFinished(5.0, "a", 100, 1000, 0.1))
    bus.emit(TransferFinished(5.0, "b", 50, 1000, 0.1))
    bus.emit(DeviceUpdated(6.0, "a", "committed", "c1", P1, seconds_since_seen=3.0))
    bus.emit(DeviceUpdated(6.0, "b", "failed", "c1", P1, error="activation failed"))
    bus.emit(DeviceUpdated(6.0, "b", "retry", "c1", P1, error="locked"))
    bus.emit(ReconcileError(6.0, "build", "boom"))
    bus.emit(DevicesSnapshot(7.0, (("a", "in_sync", "default", "1"), ("b", "failed", "canary", ""))))
    bus.emit(ReconcileDone(8.0, "c1", True))
    hooks: list[int] = []
    server = _serve(metrics, {"revision": "c1", "devices": []}, hooks)
    try:
        code, text = _get(server, "/metrics")
        assert code == 200
        lines = set(text.splitlines())
        for expected in [
            'reup_source_revision_info{revision="c1"} 1.0',
            'reup_git_fetches_total{result="success"} 1.0',
            'reup_git_fetches_total{result="error"} 1.0',
            'reup_builds_total{result="success"} 1.0',
            'reup_builds_total{result="failure"} 1.0',
            "reup_build_duration_seconds_count 2.0",
            'reup_transfer_bytes_total{kind="delta"} 150.0',
            'reup_transfer_bytes_total{kind="full_equivalent"} 2000.0',
            "reup_delta_ratio_count 2.0",
            'reup_device_updates_total{result="committed"} 1.0',
            'reup_device_updates_total{result="failed"} 1.0',
            "reup_update_duration_seconds_count 1.0",
            "reup_update_duration_seconds_sum 3.0",
            'reup_reconcile_errors_total{stage="build"} 1.0',
            'reup_devices{state="in_sync",wave="default"} 1.0',
            'reup_devices{state="failed",wave="canary"} 1.0',
            'reup_devices{state="pending",wave="default"} 0.0',
            "reup_last_reconcile_timestamp_seconds 8.0",
            'reup_device_info{device="a",generation="1",state="in_sync"} 1.0',
        ]:
            assert expected in lines, expected
        ratio_sum = next(float(ln.split()[1]) for ln in lines if ln.startswith("reup_delta_ratio_sum "))
        assert ratio_sum == pytest.approx(0.15)
        assert 'reup_source_revision_info{revision="c0"} 1.0' not in lines
        assert not any(ln.startswith(("reup_device_updates_total", "reup_transfer_bytes_total")) and "device=" in ln
                       for ln in lines)
        assert _get(server, "/healthz") == (200, "ok\n")
        code, body = _get(server, "/api/status")
        assert code == 200 and json.loads(body) == {"revision": "c1", "devices": []}
        assert _get(server, "/webhook", data=b'{"ref": "refs/heads/main"}')[0] == 202 and hooks == [1]
        assert _get(server, "/nope")[0] == 404
    finally:
        server.stop()


def test_device_info_is_opt_in() -> None:
    metrics = Metrics()
    metrics(DevicesSnapshot(1.0, (("a", "in_sync", "default", "1"),)))
    assert b"reup_device_info" not in generate_latest(metrics.registry)


# --- delta cache -------------------------------------------------------------------------------


def test_delta_cache_encodes_once_and_prunes(tmp_path: os.PathLike[str]) -> None:
    calls: list[tuple[list[str], str, list[str]]] = []

    class Stats:
        stream_bytes = 5
        nar_bytes = 50

    def fake_encoder(held: Any, target: str, out: str, staged: Any, avoid: Any, codecs: Any) -> Stats:
        calls.append((list(held), target, list(staged) + list(avoid)))
        with open(out, "wb") as f:
            f.write(b"hello")
        return Stats()

    cache = DeltaCache(str(tmp_path), fake_encoder, max_entries=2, min_age=0.0, prune_every=0.0)
    e1 = cache.get([P2, P1], "/nix/store/t1")
    e2 = cache.get([P2, P1, P2], "/nix/store/t1")  # the same holdings: cached
    assert len(calls) == 1 and not e1.cached and e2.cached and e2.path == e1.path
    e3 = cache.get([P2, P1], "/nix/store/t1", avoid=[P1])  # a broken base: another stream
    assert len(calls) == 2 and not e3.cached and calls[-1][2] == [P1]
    assert (e2.stream_bytes, e2.nar_bytes) == (5, 50)
    with open(e2.path, "rb") as f:
        assert f.read() == b"hello"
    cache.get([], "/nix/store/t2")
    assert len([n for n in os.listdir(str(tmp_path)) if n.endswith(".stream")]) == 2


def test_delta_cache_keeps_streams_in_use(tmp_path: os.PathLike[str]) -> None:
    """A stream handed out recently is being sent: however many others were encoded since (every device
    its own system), it is not pruned under the transfer's feet."""

    def encoder(held: Any, target: str, out: str, staged: Any, avoid: Any, codecs: Any) -> None:
        with open(out, "wb") as f:
            f.write(target.encode())

    cache = DeltaCache(str(tmp_path), encoder, max_entries=2, prune_every=0.0)  # default min_age: minutes
    entries = [cache.get([], f"/nix/store/t{i}") for i in range(6)]
    for e in entries:
        with open(e.path, "rb") as f:
            assert f.read()
    old = time.time() - 3600
    for e in entries[:4]:
        os.utime(e.path, (old, old))
    cache.get([], "/nix/store/t6")
    assert sorted(n for n in os.listdir(str(tmp_path)) if n.endswith(".stream")) == sorted(
        os.path.basename(e.path) for e in [*entries[4:], cache.get([], "/nix/store/t6")])


# --- status table ------------------------------------------------------------------------------


def test_format_status() -> None:
    status = {"revision": "0123456789abcdef", "fleet_error": None, "devices": [
        {"name": "a", "state": "in_sync", "wave": "default", "generation": 2, "acknowledged": "/nix/store/" + "x" * 32 + "-nixos-system-a",
         "target": "/nix/store/" + "x" * 32 + "-nixos-system-a", "updated_at": 90.0, "last_error": None},
        {"name": "b", "state": "failed", "wave": "default", "generation": None, "acknowledged": None,
         "target": None, "updated_at": 95.0, "last_error": "evaluation failed:\nerror: boom"},
    ]}
    text = format_status(status, now=100.0)
    lines = text.splitlines()
    assert lines[0] == "revision 0123456789ab: 1/2 devices in sync"
    assert lines[1].split() == ["DEVICE", "STATE", "WAVE", "GEN", "ACKNOWLEDGED", "TARGET", "UPDATED", "ERROR"]
    assert lines[2].split()[:4] == ["a", "in_sync", "default", "2"] and "10s ago" in lines[2]
    assert lines[3].split()[:4] == ["b", "failed", "default", "-"] and lines[3].endswith("error: boom")


# --- retries ---------------------------------------------------------------------------------


def test_retrying_retries_only_temporary_errors() -> None:
    import asyncio

    from reup.io.retry import retrying

    calls: list[str] = []

    async def flaky() -> str:
        calls.append("flaky")
        if len(calls) < 3:
            raise UnreachableError("refused")
        return "ok"

    assert asyncio.run(retrying(flaky, attempts=3, multiplier=0.001, max_wait=0.01)) == "ok" and len(calls) == 3

    async def broken() -> str:
        calls.append("broken")
        raise PermanentError("activation failed")

    calls.clear()
    with pytest.raises(PermanentError):
        asyncio.run(retrying(broken, attempts=5, multiplier=0.001, max_wait=0.01))
    assert calls == ["broken"]

    async def down() -> str:
        calls.append("down")
        raise TemporaryError("locked")

    calls.clear()
    with pytest.raises(TemporaryError, match="locked"):
        asyncio.run(retrying(down, attempts=2, multiplier=0.001, max_wait=0.01))
    assert calls == ["down", "down"]


def test_terminal_progress_bar() -> None:
    import io

    from reup.cli.progress import TerminalProgress

    out = io.StringIO()
    bar = TerminalProgress(out, width=10)
    bar(TransferFinished(1.0, "a", 2048, 1 << 20, 0.5))
    bar(DevicesSnapshot(1.0, (("a", "in_sync", "default", "1"), ("b", "transferring", "default", ""))))
    bar(DevicesSnapshot(2.0, (("a", "in_sync", "default", "1"), ("b", "in_sync", "default", "1"))))
    first, second = out.getvalue().split("\r")[1:]
    assert first.startswith("[#####.....] 1/2 in sync, 2.0 KiB sent (1.0 MiB full) b:transferring")
    assert second.startswith("[##########] 2/2 in sync") and second.endswith("\n")


def test_one_controller_per_state_dir(tmp_path: os.PathLike[str]) -> None:
    from reup.config.reup_toml import Config, SourceConfig, StateConfig
    from reup.core.errors import ReupError
    from reup.loop.controller import Controller

    cfg = Config(source=SourceConfig(url=str(tmp_path)), state=StateConfig(dir=os.path.join(tmp_path, "state")))
    first, second = Controller(cfg), Controller(cfg)
    try:
        held = first._lock_state_dir()
        with pytest.raises(ReupError, match="another reup controller"):
            second._lock_state_dir()
        held.close()
        second._lock_state_dir().close()
    finally:
        first.close()
        second.close()
