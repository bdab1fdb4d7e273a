"""Rates, windows and slow links over real sshd: token-bucket rates within a tolerance on loopback,
a transfer that pauses when its window closes and resumes from the device's kept partial, and
devices in a network namespace behind a veth pair where a throttled link (a userspace proxy: tc
netem is not available here) holds back only its own device."""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from reup.core.errors import TemporaryError
from reup.core.model import Device
from reup.io.ssh import SshPusher
from reup.io.transfer import WINDOW, TokenBucket, TransferPaused
from reup_lab.simdevice import SSHD, SimDevice, generate_key
from support.linkproxy import LinkProxy
from support.receiverkit import SCRATCH, status
from support.transferkit import Streams, make_stream


@pytest.fixture
def lab() -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        yield tmp, generate_key(os.path.join(tmp, "id_ed25519"))


def start(tmp: str, pub: str, name: str) -> SimDevice:
    dev = SimDevice(name, os.path.join(tmp, name), pub)
    dev.prepare()
    dev.start()
    return dev


def target(sim: SimDevice, port: int | None = None) -> Device:
    return Device(sim.name, "127.0.0.1", sim.host_key, port=port or sim.port, user=getpass.getuser())


async def timed_push(pusher: SshPusher, dev: Device, toplevel: str) -> float:
    t0 = time.monotonic()
    await pusher.push(dev, toplevel, activation="none")
    return time.monotonic() - t0


RATE = 400_000.0


def test_device_and_shared_rates_within_tolerance(lab: tuple[str, str]) -> None:
    tmp, pub = lab
    path, toplevel = make_stream(tmp, 5, 1 << 20)
    size = os.path.getsize(path)
    a, b = start(tmp, pub, "a"), start(tmp, pub, "b")
    try:
        pusher = SshPusher(Streams({toplevel: path}), key=os.path.join(tmp, "id_ed25519"), attempts=1)
        # One device at 400 kB/s (low enough for a loaded 2-core machine to keep up): the bytes after
        # the bucket's initial burst go at the rate.
        bucket = TokenBucket(RATE)
        pusher.rate_limits = lambda d: [bucket]
        asyncio.run(timed_push(pusher, target(a), toplevel))
        p = pusher.transfers["a"]
        rate = (size - bucket.burst) / (p.last_write - p.first_write)
        assert 0.8 * RATE <= rate <= 1.05 * RATE, rate
        # Two devices sharing a total of 400 kB/s (the controller's [transfer] max_rate).
        total = TokenBucket(RATE)
        pusher.rate_limits = lambda d: [total]
        status_reset(a)
        asyncio.run(both(pusher, [target(a), target(b)], toplevel))
        pa, pb = pusher.transfers["a"], pusher.transfers["b"]
        rate = (2 * size - total.burst) / (max(pa.last_write, pb.last_write) - min(pa.first_write, pb.first_write))
        assert 0.8 * RATE <= rate <= 1.05 * RATE, rate
    finally:
        a.stop()
        b.stop()


async def both(pusher: SshPusher, devs: list[Device], toplevel: str) -> list[float]:
    return list(await asyncio.gather(*(timed_push(pusher, d, toplevel) for d in devs)))


def status_reset(sim: SimDevice) -> None:
    """Forget the device's generations so that the same target is sent again."""
    profiles = os.path.join(sim.root, "nix/var/nix/profiles")
    for name in os.listdir(profiles):
        if name.startswith("system"):
            os.unlink(os.path.join(profiles, name))


def test_window_closing_pauses_at_a_chunk_boundary_and_resumes(lab: tuple[str, str]) -> None:
    tmp, pub = lab
    path, toplevel = make_stream(tmp, 6, 4 << 20)
    size = os.path.getsize(path)
    sim = start(tmp, pub, "w")
    try:
        pusher = SshPusher(Streams({toplevel: path}), key=os.path.join(tmp, "id_ed25519"), attempts=1)
        dev = target(sim)
        pusher.may_transfer = lambda d: pusher.transfers.get(d.name) is None or pusher.transfers[d.name].position < size // 2
        with pytest.raises(TransferPaused):
            asyncio.run(pusher.push(dev, toplevel, activation="none"))
        progress = pusher.transfers["w"]
        assert progress.waiting_for_window
        kept = status(sim.root)["resume"]
        assert kept is not None and size // 2 - WINDOW <= kept["offset"] <= progress.position
        pusher.may_transfer = lambda d: True  # the window opens again
        asyncio.run(pusher.push(dev, toplevel, activation="none"))
        assert progress.offset == kept["offset"] and not progress.waiting_for_window
        assert progress.sent <= size + WINDOW
        assert status(sim.root)["current"] == toplevel
    finally:
        sim.stop()


# --- devices in a network namespace behind a veth pair -------------------------------------------

NETNS = f"reup16-{os.getpid()}"
HOST_ADDR, NS_ADDR = "169.254.216.1", "169.254.216.2"  # link-local, on this veth pair only


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    try:
        _ip("netns", "add", NETNS)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces not permitted here: {exc.stderr!r}")
    veth = f"r16h{os.getpid() % 100000}"
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", "r16d", "netns", NETNS)
        _ip("addr", "add", f"{HOST_ADDR}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", NETNS, "addr", "add", f"{NS_ADDR}/30", "dev", "r16d")
        _ip("-n", NETNS, "link", "set", "r16d", "up")
        _ip("-n", NETNS, "link", "set", "lo", "up")
        yield NETNS
    finally:
        subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], check=False, capture_output=True)


def start_in_netns(tmp: str, pub: str, name: str, ns: str) -> tuple[SimDevice, subprocess.Popen[bytes]]:
    dev = SimDevice(name, os.path.join(tmp, name), pub)
    dev.prepare()
    config = os.path.join(dev.base, "sshd_config")
    with open(config, encoding="ascii") as f:
        text = f.read().replace("ListenAddress 127.0.0.1", f"ListenAddress {NS_ADDR}")
    with open(config, "w", encoding="ascii") as f:
        f.write(text)
    log = open(os.path.join(dev.base, "sshd.log"), "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", config], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 10
    while subprocess.run(["ip", "netns", "exec", ns, "bash", "-c", f"</dev/tcp/{NS_ADDR}/{dev.port}"],
                         capture_output=True, check=False).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, dev.read_log()
        time.sleep(0.1)
    return dev, proc


@pytest.mark.slow
def test_slow_link_in_a_netns_holds_back_only_its_device(lab: tuple[str, str], netns: str) -> None:
    tmp, pub = lab
    path, toplevel = make_stream(tmp, 7, 2 << 20)
    fast, pf = start_in_netns(tmp, pub, "fast", netns)
    slow, ps = start_in_netns(tmp, pub, "slow", netns)
    try:
        with LinkProxy(fast.port, target_host=NS_ADDR) as fast_link, \
                LinkProxy(slow.port, target_host=NS_ADDR, rate=400_000) as slow_link:
            pusher = SshPusher(Streams({toplevel: path}), key=os.path.join(tmp, "id_ed25519"), attempts=1)
            alone = asyncio.run(timed_push(pusher, target(fast, fast_link.port), toplevel))
            status_reset(fast)
            # Same wave, no max_parallel: nothing but the link should set each device's pace.

            async def both() -> tuple[float, float]:
                slow_task = asyncio.create_task(timed_push(pusher, target(slow, slow_link.port), toplevel))
                fast_s = await timed_push(pusher, target(fast, fast_link.port), toplevel)
                assert not slow_task.done()  # the slow one is still going when the fast one is done
                return fast_s, await slow_task

            fast_s, slow_s = asyncio.run(both())
        assert status(fast.root)["current"] == toplevel and status(slow.root)["current"] == toplevel
        size = os.path.getsize(path)
        assert slow_s >= size / 400_000 * 0.8  # the throttle is real
        assert fast_s < 1.5 * alone + 1.0, (fast_s, alone, slow_s)  # no slower beside the slow device
    finally:
        for p in (pf, ps):
            p.terminate()
            p.wait(10)


def test_unreachable_when_the_link_is_gone(lab: tuple[str, str]) -> None:
    tmp, pub = lab
    path, toplevel = make_stream(tmp, 8, 1 << 20)
    sim = start(tmp, pub, "gone")
    sim.stop()
    pusher = SshPusher(Streams({toplevel: path}), key=os.path.join(tmp, "id_ed25519"), attempts=1, connect_timeout=2)
    with pytest.raises(TemporaryError):
        asyncio.run(pusher.push(target(sim), toplevel, activation="none"))
