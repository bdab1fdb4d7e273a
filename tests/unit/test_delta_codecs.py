"""The encoder's codecs against the receiver's decoders, on random old/new pairs (hypothesis).

Every codec the encoder may emit must round-trip through reup_receiver's
apply_patch, after the store-hash rewrite both sides share.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reup.delta.codecs import candidates, diff_job, make_patch
from reup_receiver.format.literal import MemorySink
from reup_receiver.format.model import PATCH_CODECS, Codec
from reup_receiver.format.rewrite import rewrite_bytes
from reup_receiver.patches import apply_patch

ALPHABET = b"0123456789abcdfghijklmnpqrsvwxyz"


def applied(codec: Codec, old: bytes, patch: bytes, size: int) -> bytes:
    """The patch applied as the receiver does, with the output size the stream's entry declares."""
    sink = MemorySink()
    apply_patch(codec, old, patch, sink, size)
    return bytes(sink.out)


def mutate(data: bytes, rnd: random.Random, edits: int) -> bytes:
    out = bytearray(data)
    for _ in range(edits):
        op = rnd.randrange(3)
        pos = rnd.randrange(len(out) + 1)
        chunk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
        if op == 0:
            out[pos:pos] = chunk
        elif op == 1:
            del out[pos : pos + len(chunk)]
        else:
            out[pos : pos + len(chunk)] = chunk
    return bytes(out)


pairs = st.tuples(st.binary(min_size=0, max_size=4096), st.integers(0, 2**32), st.integers(0, 12))


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_every_codec_round_trips(pair: tuple[bytes, int, int]) -> None:
    old, seed, edits = pair
    new = mutate(old, random.Random(seed), edits)
    for codec in PATCH_CODECS:
        if codec == Codec.ZSTD_PREFIX and len(old) < 8:
            continue  # the encoder never emits a prefix shorter than zstd's minimum
        assert applied(codec, old, make_patch(codec, old, new), len(new)) == new, codec


@settings(max_examples=40, deadline=None)
@given(pairs)
def test_best_candidate_round_trips(pair: tuple[bytes, int, int]) -> None:
    old, seed, edits = pair
    new = mutate(old, random.Random(seed), edits)
    for codec, patch in candidates(old, new):
        assert applied(codec, old, patch, len(new)) == new


def _hash(rnd: random.Random) -> bytes:
    return bytes(rnd.choice(ALPHABET) for _ in range(32))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32))
def test_diff_job_rewrite_then_patch(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    """A file that differs only in store hashes is a pure rewrite; more changes get a patch."""
    rnd = random.Random(seed)
    old_h, new_h = _hash(rnd), _hash(rnd)
    body = [os.urandom(rnd.randrange(0, 300)) for _ in range(4)]
    old = b"/nix/store/" + old_h + b"-lib/lib".join(body)
    new = old.replace(old_h, new_h)
    d = tmp_path_factory.mktemp("pair")
    (d / "old").write_bytes(old)
    (d / "new").write_bytes(new)
    rewrites = {old_h: new_h}
    result = diff_job(bytes(d / "old"), bytes(d / "new"), rewrites, hashlib.sha256(new).digest())
    assert result.kind == "rewrite" and result.rewritten and result.data == b""
    assert rewrite_bytes(old, rewrites) == new

    changed = new + os.urandom(rnd.randrange(1, 200))
    (d / "new").write_bytes(changed)
    result = diff_job(bytes(d / "old"), bytes(d / "new"), rewrites, hashlib.sha256(changed).digest(),
                      [Codec.HDIFFPATCH])
    assert result.codec == Codec.HDIFFPATCH
    assert applied(Codec.HDIFFPATCH, rewrite_bytes(old, rewrites), result.data, len(changed)) == changed


def test_large_file_uses_zstd_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the HDiffPatch cap only the flat-memory zstd prefix mode is used."""
    import reup.delta.codecs as codecs

    monkeypatch.setattr(codecs, "HDIFF_MAX", 1 << 16)
    rnd = random.Random(7)
    old = bytes(rnd.randrange(256) for _ in range(200_000))
    new = mutate(old, rnd, 20)
    found = codecs.candidates(old, new)
    assert [c for c, _ in found] == [Codec.ZSTD_PREFIX]
    assert applied(Codec.ZSTD_PREFIX, old, found[0][1], len(new)) == new


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"/", b"-", b"x" * 31, b"aa", b"0"]) | st.binary(max_size=40), max_size=20),
       st.integers(0, 2**32))
def test_whole_buffer_and_streaming_rewrites_agree(parts: list[bytes], seed: int) -> None:
    """The receiver streams COPY rewrites and rewrites patch bases whole: same bytes either way."""
    from reup_receiver.format.rewrite import rewrite_chunks

    rnd = random.Random(seed)
    hashes = [_hash(rnd) for _ in range(3)]
    data = b"".join(rnd.choice([*hashes, p]) for p in parts)
    mapping = {hashes[0]: hashes[1], hashes[1]: hashes[2]}
    cuts = sorted(rnd.sample(range(len(data) + 1), min(len(data) + 1, 4)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert b"".join(rewrite_chunks(chunks, mapping)) == rewrite_bytes(data, mapping)
