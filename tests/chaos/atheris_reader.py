"""Coverage-guided fuzzing of the stream reader with atheris (libFuzzer), for `make chaos`.

Run as a program: `python tests/chaos/atheris_reader.py -max_total_time=60`. The corpus starts
from a valid stream; any exception other than a ReceiveError is a crash libFuzzer reports
(and `make chaos` fails on). The hypothesis test (test_fuzz_reader.py) covers the same path in
`make test`; atheris is optional (skipped when it is not installed).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

try:
    import atheris
except ImportError:  # optional: the hypothesis fuzzing still runs
    print("atheris is not installed; skipping coverage-guided fuzzing")
    sys.exit(0)

with atheris.instrument_imports():
    from reup_receiver.errors import ReceiveError
    from test_fuzz_reader import _good_stream, read_all


def one(data: bytes) -> None:
    with contextlib.suppress(ReceiveError):
        read_all(data)


def main() -> None:
    seeds = tempfile.mkdtemp(prefix="reup-atheris-")
    with open(os.path.join(seeds, "good"), "wb") as fh:
        fh.write(_good_stream(tempfile.mkdtemp(prefix="reup-atheris-tree-")))
    atheris.Setup([sys.argv[0], *sys.argv[1:], "-rss_limit_mb=512", seeds], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
