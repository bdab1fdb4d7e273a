"""Issue 13, a cheaper manifest: version-2 streams from the real encoder, applied by the receiver.

- The compact stream applies and verifies (`nix store verify`) and is smaller than version 1.
- A receiver that does not list `stream_v2` in its status gets version 1 (the delta cache's
  encoder and `reup delta --codecs` both follow the capability); this receiver lists it.
- A short id that resolves on the device to another path than the encoder meant is refused
  (by the trailer digest, which covers the resolved names), leaving the device as it was.
- A damaged base file behind a mirrored COPY (no per-file hash in version 2) is blamed on the
  base path by the path's NAR hash, so the controller can re-encode without it.
- Version-2 PATH records carry no index: one with an index, or a path sent twice, is refused.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess

import pytest
from reup.delta.cache import nix_encoder
from reup_receiver.format.manifest2 import MIN_ID_CHARS, decode_manifest_v2, names_block
from reup_receiver.format.model import Codec
from reup_receiver.format.wire import (
    DIGEST_SIZE,
    HEADER,
    T_MANIFEST,
    T_PATH,
    T_TRAILER,
    Buf,
    RecordWriter,
    put_varint,
    record_head,
)
from reup_receiver.protocol import STREAM_V2
from support.receiverkit import (
    REUP,
    assert_one_line_error,
    copy_root,
    nix_copy,
    receive,
    set_generations,
    snapshot,
)
from support.streams import parse_records
from test_delta_roundtrip import (
    Gens,
    apply_and_verify,
    closure,
    gens,
    root_a,
    run_encode,
    template_a,
)

pytestmark = pytest.mark.slow
__all__ = ["gens", "root_a", "template_a"]  # fixtures shared with the delta round trip


def version_of(stream: bytes) -> int:
    return int(HEADER.unpack(stream[:HEADER.size])[1])


def test_v2_applies_and_is_smaller(gens: Gens, root_a: str, tmp_path: os.PathLike[str]) -> None:
    v1, s1 = run_encode(tmp_path, [gens.a], gens.b, version=1)
    v2, s2 = run_encode(tmp_path, [gens.a], gens.b)
    assert (version_of(v1), version_of(v2)) == (1, 2)
    assert s2.bytes_by_kind["manifest"] < s1.bytes_by_kind["manifest"], (s1.bytes_by_kind, s2.bytes_by_kind)
    assert len(v2) < len(v1)
    apply_and_verify(root_a, v2, gens.b)


def test_capability_chooses_the_version(gens: Gens, root_a: str, tmp_path: os.PathLike[str]) -> None:
    reported = receive(root_a, None, "--status").json()["codecs"]
    assert STREAM_V2 in reported
    encoder = nix_encoder()
    older = [c.name.lower() for c in Codec]  # a receiver from before version 2
    for codecs, want in ((older, 1), ([*older, STREAM_V2], 2), (None, 2)):
        out = os.path.join(tmp_path, f"s{want}")
        encoder([gens.a], gens.b, out, [], [], codecs)
        with open(out, "rb") as fh:
            assert version_of(fh.read()) == want, codecs
    for names, want in (("zstd_prefix,bsdiff4", 1), (f"zstd_prefix,{STREAM_V2}", 2)):
        out = os.path.join(tmp_path, "cli")
        subprocess.run([REUP, "delta", "--from", gens.a, "--to", gens.b, "-o", out, "--codecs", names],
                       check=True, capture_output=True)
        with open(out, "rb") as fh:
            assert version_of(fh.read()) == want, names
    with open(os.path.join(tmp_path, "s1"), "rb") as fh:
        apply_and_verify(root_a, fh.read(), gens.b)  # what an older receiver gets still applies


def test_short_id_resolving_to_another_path_is_refused(gens: Gens, tmp_path: os.PathLike[str]) -> None:
    """A rollback stream names the old toplevel by short id; the device lost it and holds another
    path with that id: the stream must not switch to it."""
    root = str(tmp_path) + "/dev-ab"
    nix_copy(root, [gens.a, gens.b])
    set_generations(root, [gens.a, gens.b])
    stream, stats = run_encode(tmp_path, [gens.b, gens.a], gens.a)
    assert stats.paths == 0 and len(stream) < 80
    store = os.path.join(root, "nix/store")
    name = os.path.basename(gens.a)
    twin = name[:MIN_ID_CHARS] + ("0" if name[MIN_ID_CHARS] != "0" else "1") + name[MIN_ID_CHARS + 1:]
    os.chmod(store, 0o755)
    os.rename(os.path.join(store, name), os.path.join(store, twin))  # same tree, another name
    with sqlite3.connect(os.path.join(root, "nix/var/nix/db/db.sqlite")) as db:
        db.execute("UPDATE ValidPaths SET path = ? WHERE path = ?", (f"/nix/store/{twin}", gens.a))
    before = snapshot(root)
    run = receive(root, stream)
    assert_one_line_error(run, 12, "digest")  # corrupt: never switched to the twin
    assert snapshot(root) == before


def test_damaged_mirrored_copy_blames_its_base(gens: Gens, tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path) + "/dev-b"
    nix_copy(root, [gens.b])
    set_generations(root, [gens.b])
    stream, stats = run_encode(tmp_path, [gens.b], gens.c)  # mass rebuild: mirrors of COPYs
    assert stats.ops_by_kind.get("mirror", 0) >= 1
    base = next(p for p in closure(gens.b) if p.endswith("-libbase-1.0"))
    damaged = os.path.join(root, base.lstrip("/"), "lib/base.txt")
    os.chmod(os.path.dirname(damaged), 0o755)
    os.chmod(damaged, 0o644)
    with open(damaged, "r+b") as fh:
        fh.write(b"B")  # same size: only the content check can see it
    before = snapshot(root)
    run = receive(root, stream)
    assert_one_line_error(run, 14, base)
    assert snapshot(root) == before
    shutil.rmtree(root, ignore_errors=True)


def rebuild_v2(records: list[tuple[int, bytes]]) -> bytes:
    """A version-2 stream of these records with a correct size and trailer digest (what an
    attacker who can write streams can do: only the receiver's own checks stand)."""
    body = [(t, p) for t, p in records if t != T_TRAILER]
    buf = Buf(body[0][1], "manifest")
    buf.varint()
    rest = body[0][1][buf.pos:]
    m = decode_manifest_v2(bytes(body[0][1]), lambda: [os.fsencode(n) for n in os.listdir("/nix/store")])
    size = 0
    while True:
        head = bytearray()
        put_varint(head, size)
        payload = bytes(head) + rest
        total = (HEADER.size + len(record_head(T_MANIFEST, len(payload))) + len(payload)
                 + sum(len(record_head(t, len(p))) + len(p) for t, p in body[1:])
                 + len(record_head(T_TRAILER, DIGEST_SIZE)) + DIGEST_SIZE)
        if total == size:
            break
        size = total
    out = io.BytesIO()
    w = RecordWriter(out, version=2)
    w.record(T_MANIFEST, payload)
    w.digest.update(names_block(m))
    for tag, p in body[1:]:
        w.record(tag, p)
    w.trailer()
    return out.getvalue()


def test_v2_path_framing_is_checked(gens: Gens, root_a: str, tmp_path: os.PathLike[str]) -> None:
    stream, _ = run_encode(tmp_path, [gens.a], gens.b)
    records = parse_records(stream)
    run = receive(copy_root(root_a, os.path.join(tmp_path, "same")), rebuild_v2(records))
    assert run.returncode == 0, run.stderr  # the rebuilt stream itself is fine
    first_path = next(i for i, (t, _) in enumerate(records) if t == T_PATH)
    named = [*records[:first_path], (T_PATH, b"\x00"), *records[first_path + 1:]]
    refused(root_a, rebuild_v2(named), 12, "names no index")
    last = max(i for i, (t, _) in enumerate(records) if t == T_PATH)
    extra = [*records[:-1], *records[last:-1], records[-1]]  # the last path twice: one too many
    refused(root_a, rebuild_v2(extra), 12, "does not expect")


def refused(root: str, stream: bytes, code: int, needle: str) -> None:
    before = snapshot(root)
    assert_one_line_error(receive(root, stream), code, needle)
    assert snapshot(root) == before
