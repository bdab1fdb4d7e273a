"""What the CLI writes fits the terminal and the reader: tables and the progress line sized to the
terminal, colour only on a terminal and never with NO_COLOR, and each push failure logged once."""

from __future__ import annotations

import io
import logging
import re

import pytest
from reup.cli.common import render_table
from reup.cli.progress import TerminalProgress
from reup.loop.events import (
    DevicesSnapshot,
    DeviceStateChanged,
    DeviceUpdated,
    ReconcileError,
    log_subscriber,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


ROWS = [("pi-01", "failed", "error: " + "x" * 300), ("board-01", "in_sync", "")]


def test_table_fits_an_80_column_terminal_and_colours_only_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = render_table(("DEVICE", "STATE", "ERROR"), ROWS, stream=Tty())
    assert ANSI.search(tty)  # bold header on a terminal
    assert all(len(ANSI.sub("", line)) <= 80 for line in tty.splitlines())
    plain = render_table(("DEVICE", "STATE", "ERROR"), ROWS, stream=io.StringIO())
    assert not ANSI.search(plain) and len(plain.splitlines()) == 3  # a pipe: one row per line, whole
    monkeypatch.setenv("NO_COLOR", "1")
    assert not ANSI.search(render_table(("DEVICE", "STATE", "ERROR"), ROWS, stream=Tty()))


def test_progress_line_fits_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = io.StringIO()
    progress = TerminalProgress(out)
    devices = tuple((f"device-with-a-long-name-{i}", "transferring", "default", "") for i in range(20))
    progress(DevicesSnapshot(0.0, devices))
    line = out.getvalue().replace("\x1b[K", "")
    assert line.startswith("\r") and len(line) <= 81


def test_a_push_failure_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    emit = log_subscriber(logging.getLogger("test.events"))
    error = "activation failed (switch, exit 1): sensord did not start"
    with caplog.at_level(logging.INFO, logger="test.events"):
        emit(DeviceStateChanged(1.0, "pi-01", "activating", "failed", error))
        emit(DeviceUpdated(1.0, "pi-01", "failed", "c" * 40, "/nix/store/x", error=error))
        emit(ReconcileError(1.0, "push", error, "pi-01"))
    said = [r for r in caplog.records if error in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert any("activating -> failed" in r.getMessage() for r in caplog.records)  # the change, without the why
