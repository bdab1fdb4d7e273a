"""Pure parts of resume and rate limiting: the resume arguments and answers of the protocol, the
progress lines, and the token bucket with a fake clock."""

from __future__ import annotations

import asyncio
import json

import pytest
from reup.io.transfer import TokenBucket, TransferProgress
from reup_receiver.protocol import (
    ProtocolError,
    StatusAnswer,
    parse_progress,
    progress_line,
    receive_command,
    resume_args,
)

SID = "ab" * 32


def test_resume_arguments() -> None:
    assert resume_args(SID) == f" --stream-id {SID}"
    assert resume_args(SID, 4096, "cd" * 32) == f" --stream-id {SID} --resume-from 4096 --resume-sha256 {'cd' * 32}"
    assert receive_command("none").startswith("receive --activate none")
    for bad in [("x" * 64, 0, None), (SID, -1, None), (SID, 10, None), (SID, 10, "zz")]:
        with pytest.raises(ValueError):
            resume_args(*bad)


def test_status_resume_field() -> None:
    old = StatusAnswer.from_json({"current": None})
    assert old.resume is None and not old.resumable  # an older receiver: plain streams
    none = StatusAnswer.from_json({"current": None, "resume": None})
    assert none.resumable and none.resume is None
    kept = StatusAnswer.from_json({"current": None, "resume": {"stream_id": SID, "offset": 7}})
    assert kept.resume is not None and (kept.resume.stream_id, kept.resume.offset) == (SID, 7)
    for bad in [{"stream_id": "nothex", "offset": 1}, {"stream_id": SID, "offset": -1},
                {"stream_id": SID, "offset": "1"}, [SID, 1]]:
        with pytest.raises(ProtocolError):
            StatusAnswer.from_json({"current": None, "resume": bad})


def test_progress_lines_and_the_answer_are_told_apart() -> None:
    assert parse_progress(progress_line(262144)) == 262144
    answer = json.dumps({"generation": 2, "toplevel": "/nix/store/x"}).encode()
    for line in [answer, b'{"verified": -1}\n', b'{"verified": true}\n', b'{"verified": 1', b""]:
        assert parse_progress(line) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_holds_the_rate_with_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()

    async def fake_sleep(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    bucket = TokenBucket(1000.0, burst=100.0, clock=clock)

    async def send(total: int, piece: int) -> None:
        for _ in range(total // piece):
            await bucket.take(piece)

    asyncio.run(send(10_000, 50))
    # 100 bytes of burst, the rest at 1000 bytes/s.
    assert clock.now == pytest.approx((10_000 - 100) / 1000.0, rel=1e-6)
    assert bucket.delay(50) > 0 and TokenBucket(5.0, clock=clock).delay(1) == 0.0
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_progress_rate_and_idle() -> None:
    p = TransferProgress(total=1000)
    p.note(10.0, 100)
    p.note(11.0, 300)
    assert p.sent == 400 and p.rate == pytest.approx(300.0)
    assert p.current_rate(11.5) == pytest.approx(300.0) and p.current_rate(14.0) == 0.0
