"""Progress display for long work: one redrawn line on a terminal, sized to it; plain logs otherwise.

Subscribed to the event bus by `reup run` (cli/run.py) when stderr is a terminal; without a terminal
the log subscriber (loop/events.py) already writes one line per event. Sizes read as `core.preview.human` writes them.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from reup.core.preview import human as human_size
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
            # Fit the terminal as it is now (it may have been resized) and clear the rest of the line,
            # instead of padding: a padded line wraps on a narrow terminal and the redraw breaks.
            columns = shutil.get_terminal_size((80, 24)).columns - 1
            self.stream.write(line[:columns + 1] + "\x1b[K")
            if done == total:
                self.stream.write("\n")
            self.stream.flush()
