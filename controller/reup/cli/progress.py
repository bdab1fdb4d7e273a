"""Progress display for long work: a redrawn progress bar on a terminal, plain logs otherwise.

Subscribed to the event bus by `reup run` (cli/run.py) and `reup demo` (the lab's demo.py)
when stderr is a terminal; without a terminal the log subscriber (loop/events.py)
already writes one line per event.
"""

from __future__ import annotations

import sys
from typing import TextIO

from reup.loop.events import DevicesSnapshot, Event, TransferFinished


class TerminalProgress:
    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.sent = 0
        self.full = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, TransferFinished):
            self.sent += event.stream_bytes
            self.full += event.nar_bytes
        elif isinstance(event, DevicesSnapshot) and event.devices:
            total = len(event.devices)
            done = sum(1 for _, state, _, _ in event.devices if state in ("in_sync", "failed", "unreachable"))
            synced = sum(1 for _, state, _, _ in event.devices if state == "in_sync")
            fill = int(self.width * done / total)
            busy = [f"{n}:{s}" for n, s, _, _ in event.devices if s not in ("in_sync", "failed", "unreachable")]
            line = (f"\r[{'#' * fill}{'.' * (self.width - fill)}] {synced}/{total} in sync, "
                    f"{human_size(self.sent)} sent ({human_size(self.full)} full) {' '.join(busy[:4])}")
            self.stream.write(line[:160].ljust(160))
            if done == total:
                self.stream.write("\n")
            self.stream.flush()


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
