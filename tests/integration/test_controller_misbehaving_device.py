"""The controller against misbehaving devices (issue 11, section 3), behind a real sshd.

- a device whose forced command answers garbage: a TemporaryError naming the device;
- a device that streams without end: cut off at the protocol's bound with a clear error, on
  the status verb and on a resumable receive (stderr flooding while the stream goes out);
- a device whose clock is hours behind (no RTC, before NTP): still confirmed, because the
  controller counts the remaining seconds the device reports on its own monotonic clock. The
  skew is faked by the receiver's test-only REUP_TEST_CLOCK_SKEW, set by a wrapper script as the
  forced command: it shifts the device's wall clock only, as a wrong RTC does.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from reup.core.errors import TemporaryError
from reup.core.model import Device
from reup.io.ssh import SshPusher
from support.nixflake import Generations
from support.receiverkit import RECEIVE, current_toplevel
from support.sshd import SimDevice, generate_key

pytestmark = pytest.mark.slow


def script(path: str, body: str) -> str:
    with open(path, "w") as fh:
        fh.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def device(tmp: str, receiver: str) -> tuple[SimDevice, Device, str]:
    key = os.path.join(tmp, "id_ed25519")
    sim = SimDevice("liar", os.path.join(tmp, "dev"), generate_key(key), receiver=receiver)
    sim.prepare()
    sim.start()
    return sim, Device("liar", "127.0.0.1", sim.host_key, port=sim.port, user=getpass.getuser()), key


@pytest.mark.parametrize("answer", ['{"current": 5}', "not json", '{"generations": [{"number": "x"}]}', "[]"])
def test_garbage_answer_is_a_temporary_error_naming_the_device(tmp_path: os.PathLike[str], answer: str) -> None:
    liar = script(os.path.join(tmp_path, "liar"), f"printf '%s' '{answer}'")
    sim, dev, key = device(str(tmp_path), liar)
    try:
        pusher = SshPusher(None, key=key, connect_timeout=5, attempts=1)  # type: ignore[arg-type]
        with pytest.raises(TemporaryError, match="liar: malformed answer"):
            asyncio.run(pusher.status(dev))
    finally:
        sim.stop()


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_endless_output_is_cut_off(tmp_path: os.PathLike[str], stream: str) -> None:
    redirect = "" if stream == "stdout" else " 1>&2"
    liar = script(os.path.join(tmp_path, "liar"), f"exec yes 0123456789abcdef{redirect}")
    sim, dev, key = device(str(tmp_path), liar)
    try:
        pusher = SshPusher(None, key=key, connect_timeout=20, attempts=1)  # type: ignore[arg-type]
        start = time.monotonic()
        with pytest.raises(TemporaryError, match="more than .* bytes of (answer|stderr): cut off"):
            asyncio.run(pusher.status(dev))
        assert time.monotonic() - start < 60
    finally:
        sim.stop()


def _vm_rss() -> int:
    with open("/proc/self/status") as fh:
        return int([line.split()[1] for line in fh if line.startswith("VmRSS")][0]) * 1024


def test_endless_stderr_during_a_resumable_receive_is_cut_off(tmp_path: os.PathLike[str],
                                                              gens: Generations) -> None:
    """The real receiver (status answers `resume`, so the controller takes the resumable path),
    with a flood on stderr beside it for the whole receive: cut off with an error naming the
    device, without the controller's memory following the flood."""
    flooding = script(os.path.join(tmp_path, "flooding"),
                      'case "$SSH_ORIGINAL_COMMAND" in receive*) yes stderr-flood-0123456789 1>&2 & ;; esac\n'
                      f'exec {RECEIVE} "$@"')
    sim, dev, key = device(str(tmp_path), flooding)
    streams = os.path.join(tmp_path, "streams")
    os.makedirs(streams)
    peak, done = [_vm_rss()], threading.Event()
    sent_from: list[int] = []  # where in `peak` the sending began: the encoder's own memory is not the point

    def sample() -> None:
        while not done.wait(0.05):
            peak.append(_vm_rss())

    def stream_ready() -> None:
        peak.append(_vm_rss())
        sent_from.append(len(peak) - 1)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        pusher = SshPusher(_Encoder(streams, on_ready=stream_ready), key=key, connect_timeout=10, attempts=1)
        assert asyncio.run(pusher.status(dev)).resumable
        sampler.start()
        start = time.monotonic()
        with pytest.raises(TemporaryError, match="liar: .*more than .* bytes of stderr: cut off"):
            asyncio.run(asyncio.wait_for(pusher.push(dev, gens.gen2, activation="switch"), 90))
        assert time.monotonic() - start < 60
    finally:
        done.set()
        sim.stop()
    base = peak[sent_from[0]]
    assert max(peak[sent_from[0]:]) - base < 64 << 20, (base, max(peak[sent_from[0]:]))


@dataclass
class _Entry:
    path: str
    stream_bytes: int
    nar_bytes: int


class _Encoder:
    """A StreamSource: the real encoder, one stream per call."""

    def __init__(self, directory: str, on_ready: Callable[[], None] | None = None) -> None:
        self.directory = directory
        self.on_ready = on_ready  # called once a stream is written (before it is sent)

    def get(self, held: Sequence[str], target: str, staged: Sequence[str] = (), avoid: Sequence[str] = (),
            codecs: Sequence[str] | None = None) -> _Entry:
        from reup.delta.encode import encode

        out = os.path.join(self.directory, f"s{len(os.listdir(self.directory))}.reup")
        stats = encode(list(held), target, out, staged=list(staged), avoid=list(avoid))
        if self.on_ready is not None:
            self.on_ready()
        return _Entry(out, os.path.getsize(out), stats.nar_bytes)


def test_device_clock_hours_behind_is_still_confirmed(tmp_path: os.PathLike[str], gens: Generations) -> None:
    skewed = script(os.path.join(tmp_path, "skewed"), f'REUP_TEST_CLOCK_SKEW=-10800 exec {RECEIVE} "$@"')
    sim, dev, key = device(str(tmp_path), skewed)
    streams = os.path.join(tmp_path, "streams")
    os.makedirs(streams)
    try:
        pusher = SshPusher(_Encoder(streams), key=key, connect_timeout=10, attempts=1)
        outcome = asyncio.run(pusher.push(dev, gens.gen2, activation="switch", confirm_timeout=20))
        assert outcome.generation == 1 and outcome.confirm_deadline is not None
        # the deadline is on the controller's clock, from the seconds the device says remain
        assert 0 < outcome.confirm_deadline - time.monotonic() <= 20
        asyncio.run(pusher.confirm(dev, gens.gen2, outcome.generation, outcome.confirm_deadline, None))
        st = asyncio.run(pusher.status(dev))
        assert st.pending is None  # confirmed, not waiting for a deadline 3 hours away or past
        assert current_toplevel(sim.root) == gens.gen2
        time.sleep(0.5)
        assert current_toplevel(sim.root) == gens.gen2
    finally:
        sim.stop()
