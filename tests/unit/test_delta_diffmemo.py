"""The controller's diff pool (delta/diffmemo.py): a file diff asked again, with only rewrites that do
not occur in the old file changed (another device's own toplevel hash), is the remembered result, with
no worker CPU spent; a rewrite that does occur makes a new diff. Real diffs on a real process pool."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from reup.delta.codecs import diff_job
from reup.delta.diffmemo import DiffMemo


def test_a_diff_is_made_once_for_every_device(tmp_path: os.PathLike[str]) -> None:
    old = os.path.join(tmp_path, "old")
    new = os.path.join(tmp_path, "new")
    store_hash = b"a" * 32
    with open(old, "wb") as f:
        f.write(b"".join(b"line %d base 1 %s\n" % (i, store_hash if i == 7 else b"") for i in range(5000)))
    with open(new, "wb") as f:
        f.write(b"".join(b"line %d base 2\n" % i for i in range(5000)))
    sha = hashlib.sha256(Path(new).read_bytes()).digest()
    memo = DiffMemo(workers=1)
    try:
        first = memo.submit(diff_job, old.encode(), new.encode(), {b"x" * 32: b"y" * 32}, sha, None, None).result()
        cpu_first = memo.collect()
        # Another device: its own toplevel's hash pair, absent from the old file.
        again = memo.submit(diff_job, old.encode(), new.encode(), {b"z" * 32: b"w" * 32}, sha, None, None).result()
        assert again == first and (memo.hits, memo.misses) == (1, 1)
        assert cpu_first > 0 and memo.collect() == 0.0
        # A rewrite of a hash the old file holds changes the diff's input: diffed again.
        memo.submit(diff_job, old.encode(), new.encode(), {store_hash: b"b" * 32}, sha, None, None).result()
        assert (memo.hits, memo.misses) == (1, 2)
        # Worker CPU is owed to the thread that asked.
        seen: list[float] = []

        def other() -> None:
            memo.submit(diff_job, new.encode(), old.encode(), {}, hashlib.sha256(Path(old).read_bytes()).digest(),
                        None, None).result()
            seen.append(memo.collect())

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen[0] > 0 and memo.collect() > 0  # this thread's third diff, the other's own
    finally:
        memo.shutdown()
