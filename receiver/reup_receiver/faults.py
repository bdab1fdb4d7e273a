"""Deterministic fault injection for the project's fault campaign (`make chaos`, tests/chaos/).

Only the campaign sets `REUP_FAULT` (`kill:N`, `hup:N` or `count:FILE`); a device never does.
An audit hook counts every event with an effect on the filesystem or a child process (open for
writing, rename, unlink, mkdir, rmdir, symlink, link, chmod, utime, truncate, rmtree, subprocess
start) and, at the N-th, sends SIGKILL to the receiver or SIGHUP to its whole process group (as
sshd does when the session goes away) just *before* the operation happens. `count:FILE` writes
the number of such events a run had, so the campaign can aim at each of them in turn.
Installed by cli.main; children that outlive the receiver (watchdog, activation) do not inherit it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any

FAULT_ENV = "REUP_FAULT"
_EVENTS = frozenset({"os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.symlink", "os.link",
                     "os.chmod", "os.utime", "os.truncate", "shutil.rmtree", "subprocess.Popen",
                     "os.posix_spawn", "os.exec", "sqlite3.connect"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _is_effect(event: str, args: tuple[Any, ...]) -> bool:
    if event in _EVENTS:
        return True
    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            return True
        return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
    return False


def install() -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    how, _, arg = spec.partition(":")
    count = 0
    if how == "count":
        atexit.register(lambda: _write_count(arg, count))

    def hook(event: str, args: tuple[Any, ...]) -> None:
        nonlocal count
        if not _is_effect(event, args):
            return
        count += 1
        if how == "count":
            return
        if count == int(arg):
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif how == "hup":
                os.killpg(os.getpgrp(), signal.SIGHUP)

    sys.addaudithook(hook)


def _write_count(path: str, count: int) -> None:
    with open(path, "w") as fh:
        fh.write(str(count))
