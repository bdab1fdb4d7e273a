"""Issue 2, Tests: SIGKILL the receiver at random points; the device stays consistent; resume.

Each kill runs a real `reup-receive` fed through a pipe and kills it with
SIGKILL either after a random number of stream bytes (while it reads, builds
and stages) or at a random moment after the whole stream was written (while it
verifies, installs, registers, switches or activates). After every kill:

- every visible store path is an old valid one or a complete new one (its NAR
  hash equals the host's), and every Nix DB row names a complete path;
- the profile points at a complete generation (all of its closure registered);
- whatever is staged is complete and verified;
- a re-run of the same stream completes and `nix store verify` passes.

Resume: a receive killed after the big path was staged reports it in
`--status`, and `reup delta --staged` then writes a much smaller stream that
completes the install.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

import pytest
from reup_lab.nixenv import nix_env
from reup_receiver.format.manifest import decode_manifest
from reup_receiver.format.nar import nar_hash_tree
from reup_receiver.format.wire import T_MANIFEST, T_PATH_END, Buf
from support.nixflake import Generations
from support.receiverkit import (
    RECEIVE,
    REUP,
    SCRATCH,
    StreamCache,
    copy_root,
    current_toplevel,
    db_rows,
    empty_db_root,
    host_nar_hash,
    nix_verify,
    profile_links,
    receive,
    status,
    visible_paths,
)
from support.streams import parse_records, record_offsets

pytestmark = pytest.mark.slow

KILLS = 25


@pytest.fixture(scope="module")
def nar_hashes(gens: Generations) -> Callable[[str], bytes]:
    cache: dict[str, bytes] = {}

    def get(path: str) -> bytes:
        if path not in cache:
            cache[path] = host_nar_hash(path)
        return cache[path]

    return get


def start(root: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([RECEIVE, "--root", root], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=nix_env())


def kill(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL; True if the receiver was still running."""
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            with contextlib.suppress(BrokenPipeError):
                pipe.close()
    return running


def feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
    except BrokenPipeError:
        pass


def assert_consistent(root: str, gens: Generations, old_valid: set[str],
                      nar: Callable[[str], bytes]) -> None:
    allowed = old_valid | set(gens.closure(gens.gen2))
    visible = visible_paths(root)
    assert visible <= allowed, visible - allowed
    for path in visible - old_valid:  # new ones must be complete
        assert nar_hash_tree(os.path.join(root, path.lstrip("/")))[0] == nar(path), path
    registered = {row[0] for row in db_rows(root)[0]}
    assert registered <= visible
    links = profile_links(root)
    if "system" in links:
        assert links["system"] in links, links  # never dangling
    current = current_toplevel(root)
    assert current in (None, gens.gen1, gens.gen2)
    if current is not None:
        assert set(gens.closure(current)) <= registered, current
    done = os.path.join(root, "nix/store/.reup-staging/done")
    if os.path.isdir(done):
        for name in os.listdir(done):
            if not name.endswith(".json"):
                continue
            if not os.path.lexists(os.path.join(done, name[:-5])):
                continue  # a record without its tree is cleaned up by the next receive
            with open(os.path.join(done, name)) as fh:
                rec = json.load(fh)
            assert nar_hash_tree(os.path.join(done, name[:-5]))[0].hex() == rec["narHash"]


def scenario(kind: str, gens: Generations, streams: StreamCache, gen1_template: str,
             tmp: str) -> tuple[str, bytes, set[str]]:
    """(device root, stream, valid paths before)."""
    root = os.path.join(tmp, "device")
    if kind == "fresh":  # an empty Nix DB receives the whole gen2 closure
        return empty_db_root(root), streams.get([], gens.gen2), set()
    # gen1 receives a stream carrying all of gen2 (some of it present already).
    copy_root(gen1_template, root)
    return root, streams.get([], gens.gen2), set(gens.closure(gens.gen1))


def staged_count(root: str) -> int:
    done = os.path.join(root, "nix/store/.reup-staging/done")
    return sum(n.endswith(".json") for n in os.listdir(done)) if os.path.isdir(done) else 0


def feed_all_but_trailer(proc: subprocess.Popen[bytes], root: str, stream: bytes) -> None:
    """Feed all but the last byte and wait until every carried path is staged (phase 1 done)."""
    feed(proc, stream[:-1])
    carried = sum(1 for tag, _ in parse_records(stream) if tag == T_PATH_END)
    deadline = time.monotonic() + 30
    while staged_count(root) < carried and time.monotonic() < deadline:
        time.sleep(0.002)
    assert staged_count(root) == carried


@pytest.fixture(scope="module")
def install_seconds(gens: Generations, streams: StreamCache, gen1_template: str) -> float:
    """How long phases 2-3 (install, register, switch, activate) take after the last byte."""
    d = tempfile.mkdtemp(prefix="reup-test-", dir=SCRATCH)
    try:
        root, stream, _ = scenario("fresh", gens, streams, gen1_template, d)
        proc = start(root)
        feed_all_but_trailer(proc, root, stream)
        t0 = time.monotonic()
        feed(proc, stream[-1:])
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait() == 0
        elapsed = time.monotonic() - t0
        kill(proc)
        return elapsed
    finally:
        shutil.rmtree(d, ignore_errors=True)


def random_cut(stream: bytes, rng: random.Random) -> int:
    """A cut point inside a random record (records, not bytes, are uniform: the big file's
    DATA would otherwise take nearly every cut)."""
    offsets = record_offsets(stream) + [len(stream)]
    i = rng.randrange(len(offsets) - 1)
    return rng.randrange(offsets[i], offsets[i + 1])


@pytest.mark.parametrize("point", range(KILLS))
def test_sigkill_anywhere(point: int, gens: Generations, streams: StreamCache,
                          gen1_template: str, dev_tmp: str, install_seconds: float,
                          nar_hashes: Callable[[str], bytes]) -> None:
    rng = random.Random(4242 + point)
    kind = "fresh" if point % 2 else "delta"
    root, stream, old_valid = scenario(kind, gens, streams, gen1_template, dev_tmp)
    proc = start(root)
    if point % 5 < 3:  # phase 1 (read, build, verify, stage): inside a random record
        feed(proc, stream[:random_cut(stream, rng)])
        time.sleep(rng.uniform(0, 0.02))
    else:  # phases 2-3: a random moment after the trailer arrived
        feed_all_but_trailer(proc, root, stream)
        feed(proc, stream[-1:])
        assert proc.stdin is not None
        proc.stdin.close()
        time.sleep(rng.uniform(0, install_seconds))
    was_running = kill(proc)
    assert was_running or point % 5 >= 3  # phase-1 kills always hit a running receiver
    assert_consistent(root, gens, old_valid, nar_hashes)

    run = receive(root, stream)
    assert run.returncode == 0, run.stderr
    assert current_toplevel(root) == gens.gen2
    assert_consistent(root, gens, old_valid, nar_hashes)
    for path in gens.closure(gens.gen2):
        assert nar_hash_tree(os.path.join(root, path.lstrip("/")))[0] == nar_hashes(path)
    proc_v = nix_verify(root, gens.gen2)
    assert proc_v.returncode == 0, proc_v.stderr


def path_end_offsets(stream: bytes) -> dict[str, int]:
    """For each carried path, the stream offset just after its PATH_END record."""
    records = parse_records(stream)
    offsets = record_offsets(stream) + [len(stream)]
    m = decode_manifest(records[0][1])
    assert records[0][0] == T_MANIFEST
    out = {}
    for i, (tag, payload) in enumerate(records):
        if tag == T_PATH_END:
            out[m.store_path(Buf(payload, "path").varint())] = offsets[i + 1]
    return out


def test_resume_after_kill(gens: Generations, streams: StreamCache, dev_tmp: str,
                           nar_hashes: Callable[[str], bytes]) -> None:
    root = empty_db_root(os.path.join(dev_tmp, "device"))
    stream = streams.get([], gens.gen2)
    ends = path_end_offsets(stream)
    data = gens.parts["data"]
    assert data in ends
    done = os.path.join(root, "nix/store/.reup-staging/done", os.path.basename(data))
    proc = start(root)
    feed(proc, stream[:ends[data] + 3])  # past the big path's end, not to the trailer
    deadline = time.monotonic() + 30
    while not os.path.exists(done + ".json") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert kill(proc), "the receiver ended before it was killed"
    assert visible_paths(root) == set()
    st = status(root)
    assert data in st["staged"]
    assert set(st["staged"]) <= set(gens.closure(gens.gen2))
    assert st["current"] is None and st["paths"] == []

    out = os.path.join(dev_tmp, "resume.reup")
    enc = subprocess.run([REUP, "delta", "--staged", *st["staged"], "--to", gens.gen2, "-o", out],
                         env=nix_env(), capture_output=True, text=True, check=False)
    assert enc.returncode == 0, enc.stderr
    with open(out, "rb") as fh:
        resumed = fh.read()
    assert len(resumed) < len(stream) // 4, (len(resumed), len(stream))
    run = receive(root, resumed)
    assert run.returncode == 0, run.stderr
    result = run.json()
    assert result["generation"] == 1 and result["toplevel"] == gens.gen2
    assert sorted(result["installed"]) == gens.closure(gens.gen2)
    assert status(root)["staged"] == []
    for path in gens.closure(gens.gen2):
        assert nar_hash_tree(os.path.join(root, path.lstrip("/")))[0] == nar_hashes(path)
    proc_v = nix_verify(root, gens.gen2)
    assert proc_v.returncode == 0, proc_v.stderr
