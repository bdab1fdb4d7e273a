"""Issue 2, Bad input: every malformed, hostile or impossible stream is refused cleanly.

Each case asserts a one-line `reup-receive: <kind>: ...` on stderr, the exit
code of errors.py / docs/stream-format.md, and that the device is exactly as
before (`snapshot`: profile links, visible store paths, Nix DB rows, the
receiver's records, activations), with whatever it staged complete and
verified. Streams are crafted from the real encoder's output with the receiver's
own wire/model modules, re-framed with a correct trailer digest and size, so
only the check under test can catch them.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator

import pytest
from reup_receiver import cli
from reup_receiver.format.model import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry, Method
from reup_receiver.format.nar import nar_hash_tree
from reup_receiver.format.wire import HEADER, T_ENTRY, T_PATH_END
from support.nixflake import Generations
from support.receiverkit import (
    Run,
    StreamCache,
    assert_one_line_error,
    receive,
    snapshot,
    status,
    visible_paths,
)
from support.streams import Node, Stream, build_records, decode, parse_records, record_offsets

pytestmark = pytest.mark.slow

ERROR_CODES = set(range(10, 23))
Records = list[tuple[int, bytes]]


@pytest.fixture
def delta(gens: Generations, streams: StreamCache) -> bytes:
    """gen1 -> gen2: new paths built from literals, COPYs of device files, symlinks, dirs."""
    return streams.get([gens.gen1], gens.gen2)


def check_staged(root: str) -> None:
    """Every staged path is complete: its tree's NAR hash is the one its record names."""
    done = os.path.join(root, "nix/store/.reup-staging/done")
    if not os.path.isdir(done):
        return
    for name in os.listdir(done):
        if name.endswith(".json"):
            continue
        with open(os.path.join(done, name + ".json")) as fh:
            rec = json.load(fh)
        assert nar_hash_tree(os.path.join(done, name))[0].hex() == rec["narHash"], name


def refused(root: str, stream: bytes, code: int, *needles: str) -> Run:
    """Receive `stream` (a real subprocess); it must fail with `code`, leaving the device as it was."""
    before = snapshot(root)
    run = receive(root, stream)
    assert_one_line_error(run, code, *needles)
    assert snapshot(root) == before
    check_staged(root)
    return run


def receive_inproc(root: str, stream: bytes) -> Run:
    """`reup-receive --root ROOT` in this process (cli.main), for exhaustive loops.

    stdout/stderr behave as a real process's (stderr escapes undecodable names).
    """
    saved = sys.stdin, sys.stdout, sys.stderr
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    sys.stdin = io.TextIOWrapper(io.BytesIO(stream))
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main(["--root", root])
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    out.flush()
    err.flush()
    return Run(code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode())


def is_file(relpath: bytes, method: Method | None = None) -> object:
    return lambda e: e.kind == KIND_FILE and e.relpath == relpath and (
        method is None or e.method == method)


# --- header ------------------------------------------------------------------


def test_wrong_magic(gen1_root: str, delta: bytes) -> None:
    refused(gen1_root, b"\x89NOPE\r\n\x1a" + delta[8:], 10, "bad-magic", "bad magic")
    refused(gen1_root, b"#!/bin/sh\necho pwned\n" * 4, 10, "bad-magic")


def test_wrong_version(gen1_root: str, delta: bytes) -> None:
    stream = build_records(parse_records(delta), version=3)  # this receiver reads versions 1 and 2
    refused(gen1_root, stream, 10, "bad-magic", "version 3")


def test_empty_stream(gen1_root: str) -> None:
    refused(gen1_root, b"", 11, "truncated", "empty")


# --- truncation --------------------------------------------------------------


def truncation_points(stream: bytes, n_random: int, seed: int) -> list[int]:
    points = {1, HEADER.size - 1, HEADER.size, len(stream) - 1, len(stream) - 32}
    for off in record_offsets(stream):
        points.update({off, off + 1, off + 2, off + 3, off + 4})
    rng = random.Random(seed)
    points.update(rng.randrange(1, len(stream)) for _ in range(n_random))
    return sorted(p for p in points if 0 < p < len(stream))


def test_truncated_everywhere(gen1_root: str, delta: bytes) -> None:
    """Cut at every record boundary, inside every record header, and at 150 random offsets."""
    before = snapshot(gen1_root)
    points = truncation_points(delta, 150, seed=2)
    assert len(points) > 200
    for cut in points:
        run = receive_inproc(gen1_root, delta[:cut])
        assert run.returncode == 11, (cut, run.stderr)
        assert run.stderr.count("\n") == 1 and "truncated" in run.stderr, (cut, run.stderr)
        assert snapshot(gen1_root) == before, cut
    check_staged(gen1_root)
    # Whatever was staged along the way, the complete stream still installs.
    assert receive(gen1_root, delta).returncode == 0


@pytest.mark.parametrize("seed", range(6))
def test_truncated_subprocess(gen1_root: str, delta: bytes, seed: int) -> None:
    points = truncation_points(delta, 0, 0)
    cut = random.Random(seed).choice(points)
    refused(gen1_root, delta[:cut], 11, "truncated")


# --- flipped bits ------------------------------------------------------------


@pytest.mark.parametrize("index", range(40))
def test_flipped_bit(gen1_root: str, delta: bytes, index: int) -> None:
    """A single flipped bit anywhere (40 offsets, fixed seed): always refused, device unchanged."""
    rng = random.Random(1000 + index)
    off = rng.randrange(len(delta))
    bad = bytearray(delta)
    bad[off] ^= 1 << rng.randrange(8)
    before = snapshot(gen1_root)
    run = receive(gen1_root, bytes(bad))
    assert run.returncode in ERROR_CODES, (off, run.returncode, run.stderr)
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("reup-receive: ")
    assert snapshot(gen1_root) == before
    check_staged(gen1_root)


def test_flipped_bits_exhaustive(gen1_root: str, delta: bytes, gens: Generations,
                                 streams: StreamCache) -> None:
    """400 more flips in-process, over the delta and a fresh-install stream (big literal data)."""
    before = snapshot(gen1_root)
    fresh = streams.get([], gens.gen2)
    rng = random.Random(7)
    for stream in (delta, fresh):
        for _ in range(200):
            off = rng.randrange(len(stream))
            bad = bytearray(stream)
            bad[off] ^= 1 << rng.randrange(8)
            run = receive_inproc(gen1_root, bytes(bad))
            assert run.returncode in ERROR_CODES, (off, run.returncode, run.stderr)
            assert run.stderr.count("\n") == 1, run.stderr
    assert snapshot(gen1_root) == before
    check_staged(gen1_root)


# --- hash mismatches ---------------------------------------------------------


def test_file_hash_mismatch(gen1_root: str, delta: bytes) -> None:
    sha = decode(delta).find(is_file(b"bin/tool")).entry.sha256
    bad = decode(delta).replace(is_file(b"bin/tool", Method.LITERAL), sha256=bytes(len(sha)))
    refused(gen1_root, bad.encode(), 13, "hash-mismatch", "content hash mismatch", "bin/tool")


def test_copy_of_wrong_base_file_is_hash_mismatch(gen1_root: str, delta: bytes) -> None:
    """A COPY pointed at another existing file of the same size: only the content hash sees it."""
    s = decode(delta)
    node = s.find(is_file(b"etc/-leading dash", Method.COPY))
    node.entry = dataclasses.replace(node.entry, source_relpath=b"etc/ssh/sshd_config", size=8)
    refused(gen1_root, s.encode(), 13, "hash-mismatch", "-leading dash")


def test_nar_hash_mismatch(gen1_root: str, delta: bytes) -> None:
    s = decode(delta)
    first = s.manifest.paths[0]
    s.manifest.paths[0] = dataclasses.replace(first, nar_hash=bytes(32))
    refused(gen1_root, s.encode(), 13, "hash-mismatch", "NAR hash mismatch", first.name.decode())


def test_nar_size_mismatch(gen1_root: str, delta: bytes) -> None:
    s = decode(delta)
    p = s.manifest.paths[1]
    s.manifest.paths[1] = dataclasses.replace(p, nar_size=p.nar_size + 8)
    refused(gen1_root, s.encode(), 13, "hash-mismatch")


def test_reencoded_stream_is_accepted(gen1_root: str, delta: bytes) -> None:
    """Control for the crafted cases: decode + encode unchanged gives an installable stream."""
    run = receive(gen1_root, decode(delta).encode())
    assert run.returncode == 0, run.stderr


# --- missing base ------------------------------------------------------------


def known_copy(s: Stream) -> Entry:
    return s.find(lambda e: e.kind == KIND_FILE and e.method == Method.COPY
                  and e.source >= len(s.manifest.paths)).entry


def test_missing_base_file_is_named(gen1_root: str, delta: bytes) -> None:
    s = decode(delta)
    e = known_copy(s)
    base = f"{s.manifest.store_path(e.source)}/{e.source_relpath.decode()}"
    host = os.path.join(gen1_root, base.lstrip("/"))
    os.chmod(os.path.dirname(host), 0o755)
    os.unlink(host)
    os.chmod(os.path.dirname(host), 0o555)
    refused(gen1_root, delta, 14, "missing-base", base)


def test_missing_base_store_path(gen1_root: str, delta: bytes) -> None:
    """A whole known path gone (not just unregistered): the first file needed from it is named."""
    s = decode(delta)
    path = s.manifest.store_path(known_copy(s).source)
    subprocess.run(["rm", "-rf", os.path.join(gen1_root, path.lstrip("/"))], check=True)
    refused(gen1_root, delta, 14, "missing-base", path)


def test_base_read_through_symlink_is_refused(gen1_root: str, delta: bytes) -> None:
    """A COPY whose source is a symlink on the device is not followed."""
    bad = decode(delta).replace(is_file(b"etc/ssh/sshd_config", Method.COPY),
                                source_relpath=b"etc/sshd_link")
    refused(gen1_root, bad.encode(), 14, "missing-base", "etc/sshd_link")


# --- unsafe names ------------------------------------------------------------

BAD_RELPATHS = [b"etc//x", b"etc/", b"/etc", b"etc/\0x", b"etc/.", b"etc/./x", b"..",
                b"etc/../../../../../tmp/x", b"."]


@pytest.mark.parametrize("relpath", BAD_RELPATHS, ids=repr)
def test_unsafe_entry_name(gen1_root: str, delta: bytes, relpath: bytes) -> None:
    bad = decode(delta).replace(lambda e: e.kind == KIND_DIR and e.relpath == b"empty",
                                relpath=relpath)
    refused(gen1_root, bad.encode(), 15, "unsafe-name")


@pytest.mark.parametrize("relpath", [b"", b"../../../etc/passwd", b"etc/\0", b"etc//sshd_config"],
                         ids=repr)
def test_unsafe_source_name(gen1_root: str, delta: bytes, relpath: bytes) -> None:
    s = decode(delta)
    node = s.find(is_file(b"etc/ssh/sshd_config", Method.COPY))
    # Keep the source explicit (not "same as relpath") by changing relpath only in the source.
    node.entry = dataclasses.replace(node.entry, source_relpath=relpath)
    # An empty source relpath names the source path itself, a directory: not a base file.
    refused(gen1_root, s.encode(), 14 if relpath == b"" else 15)


@pytest.mark.parametrize("suffix", [b"", b"-a/b", b"-a\0b", b"/..", b"x-name", b"-" + b"a" * 300],
                         ids=repr)
def test_unsafe_store_path_name(gen1_root: str, delta: bytes, suffix: bytes) -> None:
    s = decode(delta)
    p = s.manifest.paths[0]
    s.manifest.paths[0] = dataclasses.replace(p, name=p.name[:32] + suffix)
    run = refused(gen1_root, s.encode(), 15 if len(suffix) < 256 else 12)
    assert "unsafe-name" in run.stderr or "corrupt" in run.stderr


def test_unsafe_symlink_target(gen1_root: str, delta: bytes) -> None:
    bad = decode(delta).replace(lambda e: e.kind == KIND_SYMLINK, target=b"a\0b")
    refused(gen1_root, bad.encode(), 15, "unsafe-name")


# --- writes through symlinks ----------------------------------------------------


def _write_through_symlink(delta: bytes, target: bytes, at_root: bool) -> bytes:
    """A new path gets a symlink `A -> target`, then a file `A/b` (literal data); or, with
    `at_root`, the path itself is that symlink and a file `b` follows."""
    s = decode(delta)
    literal = s.find(is_file(b"bin/tool", Method.LITERAL))
    nodes = s.paths[0].nodes
    assert nodes[0].entry.relpath == b""
    if at_root:
        nodes[:] = [Node(Entry(KIND_SYMLINK, b"", target=target)),
                    Node(dataclasses.replace(literal.entry, relpath=b"b"), list(literal.data))]
    else:  # upper-case names sort before every other entry, right after the root
        nodes[1:1] = [Node(Entry(KIND_SYMLINK, b"A", target=target)),
                      Node(dataclasses.replace(literal.entry, relpath=b"A/b"), list(literal.data))]
    return s.encode()


@pytest.mark.parametrize("kind", ["absolute", "relative", "root"])
def test_write_through_symlink(gen1_root: str, delta: bytes, dev_tmp: str, kind: str) -> None:
    outside = os.path.join(dev_tmp, "outside")
    os.makedirs(outside)
    target = "../../../../../" + outside.lstrip("/") if kind == "relative" else outside
    stream = _write_through_symlink(delta, os.fsencode(target), at_root=kind == "root")
    refused(gen1_root, stream, 16, "unsafe-write", "through the symlink")
    assert os.listdir(outside) == []  # nothing written through the link


def test_existing_entry_is_not_overwritten(gen1_root: str, delta: bytes) -> None:
    """The same name twice in a path: refused (out of NAR order), the first copy untouched."""
    s = decode(delta)
    nodes = s.paths[0].nodes
    at = next(i for i, n in enumerate(nodes) if n.entry.relpath == b"empty")
    nodes.insert(at + 1, Node(nodes[at].entry))
    refused(gen1_root, s.encode(), 12, "corrupt", "order")


# --- oversized ---------------------------------------------------------------


def test_bytes_after_trailer(gen1_root: str, delta: bytes) -> None:
    refused(gen1_root, delta + b"x", 17, "oversized")
    refused(gen1_root, delta + delta, 17, "oversized")


def test_manifest_declares_fewer_bytes(gen1_root: str, delta: bytes) -> None:
    stream = build_records(parse_records(delta), size_delta=-100)
    refused(gen1_root, stream, 17, "oversized", "manifest declares")


def test_manifest_declares_more_bytes(gen1_root: str, delta: bytes) -> None:
    stream = build_records(parse_records(delta), size_delta=+100)
    refused(gen1_root, stream, 12, "corrupt", "manifest declares")


def test_file_data_longer_than_declared(gen1_root: str, delta: bytes) -> None:
    bad = decode(delta).replace(is_file(b"bin/tool", Method.LITERAL), size=21)
    refused(gen1_root, bad.encode(), 17, "oversized")
    s = decode(delta)
    node = s.find(is_file(b"bin/tool", Method.LITERAL))
    node.entry = dataclasses.replace(node.entry, data_len=node.entry.data_len - 1)
    refused(gen1_root, s.encode(), 17, "oversized")


# --- other refusals -------------------------------------------------------------


def test_unknown_entry_kind_is_unsupported(gen1_root: str, delta: bytes) -> None:
    """A newer encoder's entry kind: refused as unsupported (the controller can fall back)."""
    records = parse_records(delta)
    at = next(i for i, (t, _) in enumerate(records) if t == T_ENTRY)
    records[at] = (T_ENTRY, bytes([0x7E]) + records[at][1][1:])  # the kind is the first byte
    refused(gen1_root, build_records(records), 22, "unsupported")


def test_path_not_carried_nor_staged(gen1_root: str, gens: Generations,
                                     streams: StreamCache) -> None:
    new = sorted(set(gens.closure(gens.gen2)) - set(gens.closure(gens.gen1)))
    stream = streams.get([gens.gen1], gens.gen2, staged=[new[0]])
    refused(gen1_root, stream, 21, "missing-path", new[0])


def test_path_record_out_of_place(gen1_root: str, delta: bytes) -> None:
    records = parse_records(delta)
    ends = [i for i, (t, _) in enumerate(records) if t == T_PATH_END]
    del records[ends[0]]
    refused(gen1_root, build_records(records), 12, "corrupt")


# --- disk full, lock -----------------------------------------------------------


@pytest.fixture
def small_fs(dev_tmp: str) -> Iterator[str]:
    mnt = os.path.join(dev_tmp, "tiny")
    os.makedirs(mnt)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", mnt],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_disk_full(small_fs: str, gens: Generations, streams: StreamCache) -> None:
    root = os.path.join(small_fs, "device")
    os.makedirs(os.path.join(root, "nix/store"))
    stream = streams.get([], gens.gen2)  # ~800 KiB of incompressible data into 512 KiB
    refused(root, stream, 18, "disk-full")
    assert visible_paths(root) == set()
    assert status(root)["staged"] == []  # the data path cannot have been completed
    # Once there is room, the same device takes the stream.
    subprocess.run(["mount", "-o", "remount,size=16m", small_fs], check=True)
    run = receive(root, stream)
    assert run.returncode == 0, run.stderr
    assert visible_paths(root) == set(gens.closure(gens.gen2))


def test_disk_full_errno_mapping() -> None:
    from reup_receiver.device import translate_oserror

    assert translate_oserror(OSError(errno.ENOSPC, "x"), "w").exit_code == 18


def test_second_receive_is_locked(gen1_root: str, delta: bytes) -> None:
    lock = os.path.join(gen1_root, "nix/var/reup/lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refused(gen1_root, delta, 19, "locked")
        before = snapshot(gen1_root)
        for verb in (["--rollback"], ["--gc", "--keep", "1"]):
            run = receive(gen1_root, None, *verb)
            assert_one_line_error(run, 19, "locked")
        assert snapshot(gen1_root) == before
    finally:
        os.close(fd)
    assert receive(gen1_root, delta).returncode == 0  # the lock is free again


# --- a MIRROR of a base path the device no longer holds intact ----------------------


def mirror_stream(gens: Generations) -> tuple[bytes, str]:
    """A new path that MIRRORs gen1's etc path (every file a COPY); the toplevel stays gen1."""
    import hashlib
    import stat

    from reup_receiver.format.model import KIND_MIRROR, Manifest, MirrorFile, PathEntry
    from reup_receiver.format.nar import walk_nar_order
    from support.streams import FILE_HASH_LEN, CarriedPath, fake_store_name

    etc1 = gens.parts["etc1"]
    specs = []
    for parts, st_ in walk_nar_order(etc1):
        if stat.S_ISREG(st_.st_mode):
            with open(os.path.join(os.fsencode(etc1), *parts), "rb") as fh:
                specs.append(MirrorFile(Method.COPY, hashlib.sha256(fh.read()).digest()[:FILE_HASH_LEN]))
    nar_hash, nar_size = nar_hash_tree(etc1)
    name = fake_store_name(1, "etc-mirror")
    m = Manifest(b"/nix/store", [os.fsencode(os.path.basename(etc1)),
                                 os.fsencode(os.path.basename(gens.gen1))],
                 [PathEntry(name, nar_hash, nar_size, ())], toplevel=2)
    mirror = Entry(KIND_MIRROR, b"", source=1, mirror=tuple(specs))
    return Stream(m, [CarriedPath(0, [Node(mirror)])]).encode(), etc1


def test_mirror_control(gen1_root: str, gens: Generations) -> None:
    stream, _ = mirror_stream(gens)
    run = receive(gen1_root, stream)
    assert run.returncode == 0, run.stderr
    assert run.json()["unchanged"] is True and len(run.json()["installed"]) == 1


@pytest.mark.parametrize("damage", ["deleted", "added", "replaced"])
def test_mirror_of_damaged_base_is_missing_base(gen1_root: str, gens: Generations,
                                                damage: str) -> None:
    """The base tree lost a file, gained one, or a file changed: the base is named (14)."""
    stream, etc1 = mirror_stream(gens)
    d = os.path.join(gen1_root, etc1.lstrip("/"), "etc")
    os.chmod(d, 0o755)
    if damage == "deleted":
        os.unlink(os.path.join(d, "big.conf"))
    elif damage == "added":
        with open(os.path.join(d, "zz-extra.conf"), "w") as fh:
            fh.write("extra\n")
    else:
        os.chmod(os.path.join(d, "hostname.conf"), 0o644)
        with open(os.path.join(d, "hostname.conf"), "w") as fh:
            fh.write("hostname = tampered\n")
    os.chmod(d, 0o555)
    refused(gen1_root, stream, 14, "missing-base", etc1)
