"""The LZMA_PREFIX codec (reup_receiver.format.lzmaprefix, reup.delta.lzmaprefix): the old
file really serves as dictionary, round trips through the receiver, corrupt patches and
wrong declared sizes are refused, and the encoder offers it only where it can win and the
device lists it."""

from __future__ import annotations

import lzma
import random

import pytest
from reup.delta import lzmaprefix
from reup.delta.codecs import candidates
from reup_receiver.errors import Corrupt
from reup_receiver.format.literal import STEP, MemorySink
from reup_receiver.format.model import PATCH_CODECS, Codec
from reup_receiver.format.wire import put_varint
from reup_receiver.patches import apply_patch, available_codecs

pytestmark = pytest.mark.skipif(not lzmaprefix.AVAILABLE, reason="liblzma not loadable")


def applied(old: bytes, patch: bytes, size: int | None) -> bytes:
    sink = MemorySink()
    apply_patch(Codec.LZMA_PREFIX, old, patch, sink, size)
    return bytes(sink.out)


def _pair(seed: int = 1) -> tuple[bytes, bytes]:
    """An old file of random records and a new one that reorders, drops and edits them."""
    rnd = random.Random(seed)
    records = [rnd.randbytes(rnd.randrange(20, 400)) for _ in range(600)]
    old = b"".join(records)
    kept = [r if rnd.random() < 0.7 else bytes(b ^ 1 for b in r[:8]) + r[8:] for r in records if rnd.random() < 0.8]
    rnd.shuffle(kept)
    return old, b"".join(kept) + rnd.randbytes(3000)


def test_round_trip_uses_the_old_file() -> None:
    old, new = _pair()
    patch = lzmaprefix.pack(old, new)
    assert applied(old, patch, len(new)) == new
    alone = lzma.compress(new, lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    assert len(patch) * 3 < len(alone)  # random records: only the dictionary makes it small


def test_large_output_streams_in_steps() -> None:
    old = random.Random(2).randbytes(1 << 20)
    new = old[1000:] + old[:1000] + bytes(3 * STEP)  # compresses to little, expands past the output step
    assert applied(old, lzmaprefix.pack(old, new), len(new)) == new


def test_corrupt_and_wrong_sizes_are_refused() -> None:
    old, new = _pair(3)
    patch = lzmaprefix.pack(old, new)
    for wrong in (len(new) - 1, len(new) + 1):
        with pytest.raises(Corrupt):
            applied(old, patch, wrong)
    huge = bytearray()
    put_varint(huge, len(old) + len(new) + (1 << 30))  # a dictionary the sizes do not justify
    with pytest.raises(Corrupt, match="dictionary"):
        applied(old, bytes(huge) + patch[4:], len(new))
    with pytest.raises((Corrupt, lzma.LZMAError)):
        applied(old, patch[: len(patch) // 2], len(new))
    with pytest.raises((Corrupt, lzma.LZMAError)):
        applied(old, patch + b"\x00junk", len(new))


def test_offered_where_most_of_the_file_changed() -> None:
    assert Codec.LZMA_PREFIX in available_codecs()
    rnd = random.Random(4)
    old = _pair(4)[0]
    # Short strings of the old file between fresh bytes: too short for block diffs to cover.
    parts = []
    for _ in range(4000):
        at = rnd.randrange(len(old) - 16)
        parts += [old[at : at + rnd.randrange(6, 14)], rnd.randbytes(rnd.randrange(1, 4))]
    new = b"".join(parts)
    offered = dict(candidates(old, new))
    assert Codec.LZMA_PREFIX in offered
    assert applied(old, offered[Codec.LZMA_PREFIX], len(new)) == new
    older = [c for c in PATCH_CODECS if c != Codec.LZMA_PREFIX]
    assert Codec.LZMA_PREFIX not in dict(candidates(old, new, allowed=older))
    # Nearly the same file: block diffs are far smaller and LZMA is not even tried.
    same = old[:5000] + b"x" + old[5001:]
    assert Codec.LZMA_PREFIX not in dict(candidates(old, same))
