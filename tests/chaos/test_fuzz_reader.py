"""Property-based fuzzing of the stream reader for a fixed time budget (hypothesis).

Mutations of a valid stream (byte flips, cuts, insertions, spliced records, varint lengths
blown up) go through the receiver's whole reading path in this process: framing and trailer
digest (RecordReader), the manifest (decode_manifest) and every entry (EntryCoder). The only
acceptable failure is a ReceiveError (a clear refusal with an exit code); anything else, a
hang or memory growth is a bug. `make chaos` runs it for REUP_FUZZ_SECONDS (default 60);
`make test` for a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reup_receiver.errors import ReceiveError
from reup_receiver.format.entries import EntryCoder
from reup_receiver.format.manifest import decode_manifest
from reup_receiver.format.wire import T_ENTRY, T_MANIFEST, T_PATH, T_TRAILER, RecordReader
from support.streams import TreeEncoder, fake_store_name

BUDGET = float(os.environ.get("REUP_FUZZ_SECONDS") or (60 if os.environ.get("REUP_CHAOS") == "full" else 3))


def _good_stream(tmp: str) -> bytes:
    tree = os.path.join(tmp, "tree")
    os.makedirs(os.path.join(tree, "bin"))
    with open(os.path.join(tree, "bin", "tool"), "w") as fh:
        fh.write("#!/bin/sh\necho tool\n")
    os.chmod(os.path.join(tree, "bin", "tool"), 0o755)
    with open(os.path.join(tree, "data"), "wb") as fh:
        fh.write(bytes(range(256)) * 8)
    os.symlink("bin/tool", os.path.join(tree, "link"))
    enc = TreeEncoder()
    enc.add(tree, fake_store_name(3, "fuzz"))
    return enc.stream().encode()


def read_all(data: bytes) -> None:
    """The receiver's reading path, without the filesystem."""
    reader = RecordReader(io.BytesIO(data))
    tag, payload = reader.next()
    if tag != T_MANIFEST:
        return
    m = decode_manifest(payload)
    reader.limit = m.stream_bytes
    coder = EntryCoder(m.table, m.store_dir)
    while True:
        tag, payload = reader.next()
        if tag == T_TRAILER:
            reader.check_trailer(payload)
            return
        if tag == T_PATH:
            coder.prev = b""
        elif tag == T_ENTRY:
            coder.decode(payload)


def mutate(good: bytes) -> st.SearchStrategy[bytes]:
    n = len(good)

    def flip(pos: int, bit: int) -> bytes:
        b = bytearray(good)
        b[pos % n] ^= 1 << bit
        return bytes(b)

    return st.one_of(
        st.builds(flip, st.integers(0, n - 1), st.integers(0, 7)),
        st.builds(lambda p: good[: p % n], st.integers(0, n - 1)),
        st.builds(lambda p, junk: good[: p % n] + junk + good[p % n :], st.integers(0, n - 1),
                  st.binary(min_size=1, max_size=64)),
        st.builds(lambda p, junk: good[: p % n] + junk, st.integers(0, n - 1), st.binary(max_size=256)),
        st.builds(lambda p: good[: p % n] + b"\xff" * 10 + good[p % n :], st.integers(0, n - 1)),
        st.binary(max_size=512),
    )


def test_fuzz_stream_reader(tmp_path: os.PathLike[str]) -> None:
    good = _good_stream(str(tmp_path))
    read_all(good)  # the control: the unmutated stream reads through
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    examples = 0

    @settings(max_examples=300, deadline=2000, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutate(good))
    def one(data: bytes) -> None:
        nonlocal examples
        examples += 1
        with contextlib.suppress(ReceiveError):  # a refusal with an exit code is the right answer
            read_all(data)

    end = time.monotonic() + BUDGET
    while time.monotonic() < end:
        one()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    print(f"\nfuzzed the stream reader: {examples} streams in {BUDGET:.0f} s, peak RSS grew {grown / 1024:.1f} MiB")
    assert examples > 0
    assert grown < 256 * 1024  # KiB: no mutation made the reader allocate what a length claimed
