"""Small hostile streams against the receiver's resource bounds (issue 11, section 2).

Each class is a stream of a few KiB; the receiver must refuse it with its exit code while its
peak RSS (the child's ru_maxrss, measured by wait4) and the staging area stay within the
documented bounds (docs/device-invariants.md), leave the device unchanged, and take the next
good stream. `pytest -s` prints the measured figures.
"""

from __future__ import annotations

import bz2
import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import bsdiff4.core
import pytest
import zstandard
from reup_lab.nixenv import nix_env
from reup_receiver.format.manifest import MANIFEST_ZSTD
from reup_receiver.format.model import KIND_FILE, Codec, Method
from reup_receiver.format.wire import STREAM_BYTES, T_MANIFEST, put_bytes, put_varint
from support.chaoskit import verify_generations
from support.nixflake import Generations
from support.receiverkit import RECEIVE, StreamCache, current_toplevel, snapshot
from support.streams import Stream, TreeEncoder, build_records, decode, fake_store_name

pytestmark = pytest.mark.slow

MiB = 1 << 20
RSS_BOUND = 200 * MiB  # interpreter + codecs + the 64 MiB manifest bound, with room


@dataclass
class Measured:
    code: int
    stderr: str
    peak_rss: int
    staging: int
    seconds: float


def staging_bytes(root: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(os.path.join(root, "nix/store/.reup-staging")):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def run_measured(root: str, stream: bytes) -> Measured:
    start = time.monotonic()
    proc = subprocess.Popen([RECEIVE, "--root", root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=nix_env())
    _out, err = proc.communicate(stream, timeout=120)
    seconds = time.monotonic() - start
    return Measured(proc.returncode, err.decode(), 0, staging_bytes(root), seconds)


# The receiver's own peak RSS: VmHWM of its address space at exit (ru_maxrss would include the
# forking test process's pages).
_HWM = ("import os, sys\nfrom reup_receiver.cli import main\ncode = main(sys.argv[1:])\n"
        "with open('/proc/self/status') as fh:\n"
        "    hwm = [line.split()[1] for line in fh if line.startswith('VmHWM')][0]\n"
        "with open(os.environ['REUP_TEST_HWM'], 'w') as fh:\n    fh.write(hwm)\nsys.exit(code)\n")


def run_rss(root: str, stream: bytes) -> Measured:
    """Run the receiver (its real entry point, cli.main) and read its own peak RSS."""
    start = time.monotonic()
    hwm = os.path.join(os.path.dirname(root), "hwm")
    proc = subprocess.run([sys.executable, "-c", _HWM, "--root", root], input=stream, capture_output=True,
                          env={**nix_env(), "REUP_TEST_HWM": hwm}, timeout=120, check=False)
    with open(hwm) as fh:
        peak = int(fh.read()) * 1024
    return Measured(proc.returncode, proc.stderr.decode(), peak, staging_bytes(root), time.monotonic() - start)


def report(kind: str, stream: bytes, m: Measured) -> None:
    print(f"\n| {kind} | {len(stream)} B | exit {m.code} | peak RSS {m.peak_rss / MiB:.1f} MiB | "
          f"staging {m.staging / 1024:.1f} KiB | {m.seconds:.2f} s |")


def refused_within_bounds(root: str, stream: bytes, code: int, kind: str) -> Measured:
    before = snapshot(root)
    staging_before = staging_bytes(root)
    m = run_rss(root, stream)
    report(kind, stream, m)
    assert m.code == code, m.stderr
    assert m.peak_rss < RSS_BOUND, m.peak_rss
    assert m.staging <= staging_before
    assert m.seconds < 30
    assert snapshot(root) == before
    return m


def _file_entry(s: Stream, method: Method = Method.LITERAL) -> tuple[int, int]:
    for pi, p in enumerate(s.paths):
        for ni, n in enumerate(p.nodes):
            if n.entry.kind == KIND_FILE and n.entry.method == method and n.entry.size > 0:
                return pi, ni
    raise AssertionError("no such file entry")


def deep_dirs(top: str, depth: int, mode: int = 0o755) -> None:
    """`depth` nested directories under `top` (os.makedirs would recurse), made read-only on request."""
    os.makedirs(top, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    fds = [fd]
    for _ in range(depth):
        os.mkdir("d", dir_fd=fds[-1])
        fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    for fd in reversed(fds):
        os.fchmod(fd, mode)
        os.close(fd)


@pytest.fixture
def delta(gens: Generations, streams: StreamCache) -> bytes:
    return streams.get([gens.gen1], gens.gen2)


def test_patch_bomb(gen1_root: str, delta: bytes) -> None:
    """A bsdiff4 patch of a few hundred bytes declaring a 4 GiB output: refused before decoding
    (before the bound, bsdiff4 allocated the whole declared output)."""
    s = decode(delta)
    pi, ni = _file_entry(s)
    node = s.paths[pi].nodes[ni]
    e = node.entry
    size = 4 << 30
    ctrl = bz2.compress(bsdiff4.core.encode_int64(size) + bsdiff4.core.encode_int64(0) + bsdiff4.core.encode_int64(0))
    empty = bz2.compress(b"")
    patch = (b"BSDIFF40" + bsdiff4.core.encode_int64(len(ctrl)) + bsdiff4.core.encode_int64(len(empty))
             + bsdiff4.core.encode_int64(size) + ctrl + empty + bz2.compress(b"\0" * (1 << 20)))
    # the patch bound is checked at the entry, before the path's NAR size and before any decoding
    node.entry = dataclasses.replace(e, method=Method.PATCH, codec=Codec.BSDIFF4, size=size,
                                     source=len(s.manifest.paths), source_relpath=b"", data_len=len(patch))
    node.data = [patch]
    stream = s.encode()
    refused_within_bounds(gen1_root, stream, 17, "bsdiff4 patch declaring 4 GiB")


def test_literal_bomb_beyond_its_nar_size(gen1_root: str, delta: bytes) -> None:
    """An 8 KiB literal expanding to 512 MiB in a path whose declared NAR size is small: refused
    at the file's header, nothing written (before: hundreds of MiB went into staging)."""
    s = decode(delta)
    pi, ni = _file_entry(s)
    node = s.paths[pi].nodes[ni]
    size = 512 << 20
    zc = zstandard.ZstdCompressor(level=19).compressobj()
    zeros = b"\0" * (1 << 20)
    data = b"".join(zc.compress(zeros) for _ in range(size >> 20)) + zc.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    node.entry = dataclasses.replace(node.entry, size=size, data_len=len(data))
    node.data = [data[o:o + (1 << 20)] for o in range(0, len(data), 1 << 20)]
    refused_within_bounds(gen1_root, s.encode(), 17, "literal of 512 MiB zeros")


def test_declared_sizes_beyond_free_space(gen1_root: str, delta: bytes) -> None:
    """A manifest announcing more than the store's filesystem has free: refused before staging."""
    s = decode(delta)
    i = s.paths[0].index
    s.manifest.paths[i] = dataclasses.replace(s.manifest.paths[i], nar_size=1 << 50)
    m = refused_within_bounds(gen1_root, s.encode(), 18, "manifest declaring 1 PiB")
    assert "free" in m.stderr


def _manifest_record(body: bytes, stream_bytes: int = 1 << 40) -> bytes:
    packed = zstandard.ZstdCompressor(level=19).compress(body)
    return STREAM_BYTES.pack(stream_bytes) + bytes([MANIFEST_ZSTD]) + packed


def test_manifest_bomb(gen1_root: str) -> None:
    """An ~11 KiB compressed manifest expanding to 100 MiB: refused at the 64 MiB body bound, fast
    (before: decompressed whole, then parsed)."""
    body = bytearray()
    put_bytes(body, b"/nix/store")
    zc = zstandard.ZstdCompressor(level=19).compressobj()
    zeros = b"\0" * (1 << 20)
    packed = zc.compress(bytes(body)) + b"".join(zc.compress(zeros) for _ in range(100)) + zc.flush()
    stream = build_records([(T_MANIFEST, STREAM_BYTES.pack(1 << 40) + bytes([MANIFEST_ZSTD]) + packed)])
    refused_within_bounds(gen1_root, stream, 17, "manifest of 100 MiB compressed")


def test_manifest_duplicates(gen1_root: str) -> None:
    """200,000 copies of one name: refused at the second, as read."""
    body = bytearray()
    put_bytes(body, b"/nix/store")
    name = fake_store_name(1, "dup")
    from reup_receiver.format.manifest import put_store_name

    put_varint(body, 200_000)
    for _ in range(200_000):
        put_store_name(body, name)
    stream = build_records([(T_MANIFEST, _manifest_record(bytes(body)))])
    m = refused_within_bounds(gen1_root, stream, 12, "manifest listing one path 200,000 times")
    assert "twice" in m.stderr


def test_deep_tree(gen1_root: str, gens: Generations, streams: StreamCache, dev_tmp: str) -> None:
    """1,100 nested directories: refused by the depth limit (before: RecursionError, and every
    later receive and gc failed on the leftover tree); the device then takes a good stream."""
    tree = os.path.join(dev_tmp, "deep")
    deep_dirs(tree, 1100)
    enc = TreeEncoder()
    enc.add(tree, fake_store_name(7, "deep"))
    stream = enc.stream().encode()
    # the receiver's own delete: the tree is too deep for shutil (imported here: older receivers lack it)
    from reup_receiver.device import delete_tree

    delete_tree(tree)
    refused_within_bounds(gen1_root, stream, 15, "tree 1,100 directories deep")
    good = run_measured(gen1_root, streams.get([gens.gen1], gens.gen2))
    assert good.code == 0, good.stderr
    gc = subprocess.run([RECEIVE, "--root", gen1_root, "--gc"], capture_output=True, env=nix_env(), check=False)
    assert gc.returncode == 0, gc.stderr
    assert current_toplevel(gen1_root) == gens.gen2
    assert verify_generations(gen1_root) is None


def test_leftover_deep_work_tree_is_removed(gen1_root: str, gens: Generations, streams: StreamCache) -> None:
    """A work tree 1,100 levels deep left by an older receiver is deleted without recursion."""
    work = os.path.join(gen1_root, "nix/store/.reup-staging/work")
    deep_dirs(work, 1100, mode=0o555)
    good = run_measured(gen1_root, streams.get([gens.gen1], gens.gen2))
    assert good.code == 0, good.stderr
    assert os.listdir(work) == []
