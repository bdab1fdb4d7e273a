"""What the `reup` command modules share: logging (text or JSON lines), width-aware tables, the
read-only state store, and the one place that turns errors into messages and exit codes.

Called by cli/main.py (logging, errors) and every command module (tables, state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from reup.core.errors import ReupError

if TYPE_CHECKING:
    from reup.config.reup_toml import Config
    from reup.loop.state import StateDB

EXIT_USAGE = 2  # operator errors: configuration, files, arguments
EXIT_INTERNAL = 70  # a bug: EX_SOFTWARE

# --- logging -----------------------------------------------------------------------------------

_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=_jsonable)


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("asyncssh", "watchdog"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# --- errors ------------------------------------------------------------------------------------


def run_command(func: Callable[[], int], *, debug: bool) -> int:
    """Run a command; an operator's mistake is one line on stderr and exit 2, never a traceback
    (those only with --debug); a closed stdout (`reup status | head`) is no error."""
    try:
        return func()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that does not fail too.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except ReupError as exc:
        if debug:
            raise
        print(f"reup: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"reup: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        print(f"reup: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


# --- state and tables --------------------------------------------------------------------------


@contextlib.contextmanager
def opened_store(config_path: str) -> Iterator[tuple[Config, StateDB]]:
    """The config and its state store, for the read-mostly commands."""
    from reup.config.reup_toml import load_config  # imported when used: `reup --help` stays quick
    from reup.loop.state import StateDB

    cfg = load_config(config_path)
    store = StateDB(cfg.state.dir)
    try:
        yield cfg, store
    finally:
        store.close()


def is_terminal(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, stream: TextIO | None = None,
                 wrap_last: bool = True) -> str:
    """A table sized to the terminal, in colour when `stream` is one (NO_COLOR honoured), plain text
    with one row per line otherwise (pipes, files, tests)."""
    from rich.console import Console
    from rich.table import Table

    stream = stream or sys.stdout
    tty = is_terminal(stream)
    styled = tty and "NO_COLOR" not in os.environ
    width = shutil.get_terminal_size((100, 24)).columns if tty else 100_000
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold" if styled else "")
    for i, h in enumerate(headers):
        last = i == len(headers) - 1
        table.add_column(h, no_wrap=not (last and wrap_last and tty), overflow="fold" if last else "ellipsis")
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=styled, no_color=not styled,
                      highlight=False, soft_wrap=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def ago(at: float | None, now: float | None = None) -> str:
    if not at:
        return "-"
    secs = int((time.time() if now is None else now) - at)
    return f"{secs}s ago" if secs < 120 else f"{secs // 60}m ago" if secs < 7200 else f"{secs // 3600}h ago"


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
