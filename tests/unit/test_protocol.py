"""The device protocol is defined once (reup_receiver.protocol): every receiver error has an exit
code the controller knows how to handle, and the answers' readers refuse what a lying device sends."""

from __future__ import annotations

import json

import pytest
from reup.core.errors import PermanentError, TemporaryError, UnreachableError
from reup.io.answers import (
    BrokenBaseError,
    RolledBackError,
    classify_exit,
    parse_receive,
    parse_status,
)
from reup_receiver import errors
from reup_receiver.protocol import EXITS, ExitCode, ProtocolError, ReceiveAnswer, Retry, retry_class

ERROR_CLASSES = [c for c in vars(errors).values()
                 if isinstance(c, type) and issubclass(c, errors.ReceiveError)]
EXPECTED = {Retry.TRANSIENT: TemporaryError, Retry.UNREACHABLE: UnreachableError,
            Retry.REENCODE: BrokenBaseError, Retry.ROLLED_BACK: RolledBackError, Retry.PERMANENT: PermanentError}


def test_every_receiver_error_has_its_own_exit_code_in_the_protocol() -> None:
    codes = [c.exit_code for c in ERROR_CLASSES]
    assert len(codes) == len(set(codes))
    assert set(codes) == set(EXITS) - {ExitCode.SSH_FAILURE}  # 255 is ssh's, not the receiver's
    for cls in ERROR_CLASSES:
        assert cls.exit_code in EXITS, cls
        err = cls.__new__(cls)
        assert err.kind == EXITS[cls.exit_code][0]


@pytest.mark.parametrize("code", [c for c in ExitCode if c != ExitCode.OK])
def test_controller_handles_every_exit_code_as_the_protocol_says(code: ExitCode) -> None:
    err = classify_exit(int(code), f"reup-receive: {EXITS[code][0]}: something\n")
    assert type(err) is EXPECTED[retry_class(int(code))]


def test_unknown_and_missing_exit_codes() -> None:
    assert retry_class(None) == Retry.UNREACHABLE
    assert retry_class(77) == Retry.PERMANENT
    assert type(classify_exit(77, "")) is PermanentError


def test_receive_answer_round_trips() -> None:
    a = ReceiveAnswer(3, "/nix/store/" + "a" * 32 + "-x", ("/nix/store/" + "b" * 32 + "-y",), 120, 0.5,
                      confirm_deadline=99.0, confirm_remaining=60.0)
    assert parse_receive(json.dumps(a.to_json())) == a


@pytest.mark.parametrize("answer", [
    b"", b"\xff\xfe", b"[]", b'"status"', b'{"current": 5}', b'{"current": null, "generations": {}}',
    b'{"current": null, "generations": [{"number": "1", "toplevel": "/x"}]}',
    b'{"current": null, "paths": [1, 2]}', b'{"current": null, "pending": {"generation": 1, "deadline": "soon"}}',
    b'{"current": null, "pending": {"generation": true, "deadline": 1}}', b'{"current": null, "codecs": "zstd"}',
    b'{"current": null, "last_rollback": []}',
])
def test_status_garbage_is_a_protocol_error(answer: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_status(answer)


@pytest.mark.parametrize("answer", [b"{}", b'{"toplevel": 1}', b'{"toplevel": "/x", "generation": 1.5}',
                                    b'{"toplevel": "/x", "confirm_deadline": NaN}', b'{"toplevel": "/x", "installed": "a"}'])
def test_receive_garbage_is_a_protocol_error(answer: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_receive(answer)


def test_pending_is_retried_later() -> None:
    """A receive while a generation awaits confirmation: the controller retries after the deadline."""
    assert retry_class(ExitCode.PENDING) == Retry.TRANSIENT
    assert isinstance(classify_exit(ExitCode.PENDING, "reup-receive: pending: generation 2 awaits"), TemporaryError)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.5, 86401.0])
def test_confirm_timeout_out_of_range_is_refused(value: float) -> None:
    from reup_receiver.protocol import check_confirm_timeout, receive_command

    with pytest.raises(ValueError, match="confirm-timeout"):
        check_confirm_timeout(value)
    with pytest.raises(ValueError):
        receive_command("switch", value)
    assert receive_command("switch", 60) == "receive --activate switch --confirm-timeout 60"
