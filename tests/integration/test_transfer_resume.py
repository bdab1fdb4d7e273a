"""Byte-level resume over real sshd through a link that drops: connections cut at random byte
offsets several times in one update, and the update still finishes, sending in total at most the
stream's size plus one window per cut. A changed stream and a damaged partial start over cleanly."""

from __future__ import annotations

import asyncio
import getpass
import os
import random
import tempfile
from collections.abc import Iterator

import pytest
from reup.core.errors import TemporaryError
from reup.core.model import Device
from reup.io.ssh import SshPusher
from reup.io.transfer import WINDOW
from reup_lab.simdevice import SimDevice, generate_key
from reup_receiver.resume import stream_id
from support.linkproxy import LinkProxy
from support.receiverkit import SCRATCH, status
from support.transferkit import Streams, make_stream


@pytest.fixture
def device() -> Iterator[tuple[SimDevice, str]]:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        key = os.path.join(tmp, "id_ed25519")
        dev = SimDevice("dev", os.path.join(tmp, "dev"), generate_key(key))
        dev.prepare()
        dev.start()
        try:
            yield dev, key
        finally:
            dev.stop()


def push_until_done(pusher: SshPusher, dev: Device, toplevel: str, tries: int = 25) -> int:
    failures = 0
    for _ in range(tries):
        try:
            asyncio.run(pusher.push(dev, toplevel, activation="none"))
            return failures
        except TemporaryError:
            failures += 1
    raise AssertionError(f"no success after {tries} attempts")


def test_cut_at_random_offsets_resumes_and_sends_at_most_one_window_per_cut(
        device: tuple[SimDevice, str], tmp_path: os.PathLike[str]) -> None:
    sim, key = device
    path, toplevel = make_stream(str(tmp_path), 1, 5 << 20)
    size = os.path.getsize(path)
    rng = random.Random(16)
    # Each connection's budget of link bytes (handshake, status, then stream): together less than
    # the stream, so every one of them is cut mid-stream.
    budgets = [rng.randrange(250_000, 1_000_000) for _ in range(4)]
    assert sum(budgets) < size - (1 << 20)
    with LinkProxy(sim.port, cuts=budgets) as proxy:
        pusher = SshPusher(Streams({toplevel: path}), key=key, connect_timeout=5, attempts=1)
        dev = Device("dev", "127.0.0.1", sim.host_key, port=proxy.port, user=getpass.getuser())
        failures = push_until_done(pusher, dev, toplevel)
    progress = pusher.transfers["dev"]
    st = status(sim.root)
    assert st["current"] == toplevel and st["resume"] is None
    assert failures >= len(budgets) and proxy.cut_count >= 1 and proxy.connections == failures + 1
    assert progress.resumed >= len(budgets) - 1  # every attempt after a cut mid-stream continued
    # Every failed attempt is a dropped connection (the proxy's cuts, or a reset it saw first).
    assert size <= progress.sent <= size + failures * WINDOW, (progress.sent, size, failures)
    assert not os.path.exists(os.path.join(sim.root, "nix/var/reup/partial/stream"))


def test_changed_stream_and_damaged_partial_start_over(device: tuple[SimDevice, str],
                                                     tmp_path: os.PathLike[str]) -> None:
    sim, key = device
    first, toplevel = make_stream(str(tmp_path), 2, 3 << 20)
    with LinkProxy(sim.port, cuts=[1_500_000]) as proxy:
        pusher = SshPusher(Streams({toplevel: first}), key=key, connect_timeout=5, attempts=1)
        dev = Device("dev", "127.0.0.1", sim.host_key, port=proxy.port, user=getpass.getuser())
        with pytest.raises(TemporaryError):
            asyncio.run(pusher.push(dev, toplevel, activation="none"))
        kept = status(sim.root)["resume"]
        assert kept["stream_id"] == stream_id(first) and 0 < kept["offset"] < os.path.getsize(first)

        # The device's copy is damaged: the replayed prefix no longer matches; it starts over.
        spool = os.path.join(sim.root, "nix/var/reup/partial/stream")
        with open(spool, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 1]))
        with pytest.raises(TemporaryError, match="resume-mismatch"):
            asyncio.run(pusher.push(dev, toplevel, activation="none"))
        assert status(sim.root)["resume"] is None

        # Cut again, then the stream for that target changes: the new one goes from byte 0.
        proxy.cuts.append(1_000_000)
        with pytest.raises(TemporaryError):
            asyncio.run(pusher.push(dev, toplevel, activation="none"))
        assert status(sim.root)["resume"]["stream_id"] == stream_id(first)
        second, again = make_stream(str(tmp_path), 3, 2 << 20, name_seed=2)
        assert again == toplevel
        os.replace(second, first)  # same target, other bytes (a re-encode)
        asyncio.run(pusher.push(dev, toplevel, activation="none"))
    progress = pusher.transfers["dev"]
    assert progress.stream_id == stream_id(first)  # the new stream: its own progress, from byte 0
    assert progress.offset == 0 and progress.sent == os.path.getsize(first)
    assert status(sim.root)["resume"] is None
