"""Issue 2, Tests: property-based tests (hypothesis) of the framing and the tree encoding.

- Framing: random record sequences round-trip through RecordWriter/RecordReader;
  any flipped, dropped, inserted or truncated byte is detected.
- Manifest and entry encodings round-trip for random values.
- Trees: random trees (directories, files with random bytes and exec bits,
  symlinks, random legal byte names, repeated contents that become COPY
  operations, single-file and single-symlink store paths) are written as new
  store paths, streamed with the wire/model modules (support/streams.py) and
  installed by the receiver into a device root: the result is the same tree
  (types, bytes, exec bits, link targets, NAR hash), with Nix's read-only modes.
- Random corruption of those streams is always refused with a ReceiveError and
  leaves the device as it was.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reup_receiver.device import Device
from reup_receiver.errors import ReceiveError
from reup_receiver.format.entries import EntryCoder
from reup_receiver.format.manifest import decode_manifest, encode_manifest
from reup_receiver.format.model import (
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    Entry,
    Manifest,
    Method,
    PathEntry,
)
from reup_receiver.format.nar import nar_hash_tree
from reup_receiver.format.wire import (
    MAX_PAYLOAD,
    T_DATA,
    T_ENTRY,
    T_PATH,
    T_PATH_END,
    T_TRAILER,
    Buf,
    RecordReader,
    RecordWriter,
    put_bytes,
    put_varint,
)
from reup_receiver.receive import receive
from support.streams import FILE_HASH_LEN, TreeEncoder, fake_store_name

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- framing -----------------------------------------------------------------

body_tags = st.sampled_from([T_PATH, T_ENTRY, T_DATA, T_PATH_END])
records = st.lists(body_tags.flatmap(
    lambda t: st.tuples(st.just(t), st.binary(max_size=min(40, MAX_PAYLOAD[t])))), max_size=20)


def write_records(recs: list[tuple[int, bytes]]) -> bytes:
    out = io.BytesIO()
    w = RecordWriter(out)
    for tag, payload in recs:
        w.record(tag, payload)
    w.trailer()
    return out.getvalue()


def read_records(data: bytes) -> list[tuple[int, bytes]]:
    r = RecordReader(io.BytesIO(data))
    out: list[tuple[int, bytes]] = []
    while True:
        tag, payload = r.next()
        if tag == T_TRAILER:
            r.check_trailer(payload)
            return out
        out.append((tag, payload))


@SETTINGS
@given(records)
def test_records_round_trip(recs: list[tuple[int, bytes]]) -> None:
    assert read_records(write_records(recs)) == recs


@SETTINGS
@given(records, st.data())
def test_records_corruption_detected(recs: list[tuple[int, bytes]], data: st.DataObject) -> None:
    good = write_records(recs)
    bad = data.draw(mutations(good))
    assume(bad != good)
    with pytest.raises(ReceiveError):
        read_records(bad)


def mutations(good: bytes) -> st.SearchStrategy[bytes]:
    n = len(good)
    flip = st.tuples(st.integers(0, n - 1), st.integers(0, 7)).map(
        lambda t: good[:t[0]] + bytes([good[t[0]] ^ (1 << t[1])]) + good[t[0] + 1:])
    truncate = st.integers(0, n - 1).map(lambda k: good[:k])
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=8)).map(
        lambda t: good[:t[0]] + t[1] + good[t[0]:])
    delete = st.tuples(st.integers(0, n - 1), st.integers(1, 8)).map(
        lambda t: good[:t[0]] + good[t[0] + t[1]:])
    return st.one_of(flip, truncate, insert, delete)


@SETTINGS
@given(st.lists(st.integers(0, 2**64 - 1), max_size=10), st.lists(st.binary(max_size=300), max_size=5))
def test_varints_and_bytes_round_trip(ints: list[int], blobs: list[bytes]) -> None:
    out = bytearray()
    for i in ints:
        put_varint(out, i)
    for b in blobs:
        put_bytes(out, b)
    buf = Buf(bytes(out), "test")
    assert [buf.varint() for _ in ints] == ints
    assert [buf.bytes() for _ in blobs] == blobs
    buf.end()


def test_oversized_record_length_is_refused_before_reading() -> None:
    out = io.BytesIO()
    w = RecordWriter(out)
    w._write(bytes([T_PATH]))
    head = bytearray()
    put_varint(head, MAX_PAYLOAD[T_PATH] + 1)
    w._write(head)
    with pytest.raises(ReceiveError):
        read_records(out.getvalue())


# --- manifest and entries ----------------------------------------------------

nix32 = st.text(alphabet="0123456789abcdfghijklmnpqrsvwxyz", min_size=32, max_size=32)
store_names = st.tuples(nix32, st.from_regex(r"[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,39}", fullmatch=True)).map(
    lambda t: f"{t[0]}-{t[1]}".encode())  # Nix's grammar: the name after the hash never starts with "."


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    names = draw(st.lists(store_names, min_size=1, max_size=8, unique_by=lambda n: n[:32]))
    n_new = draw(st.integers(1, len(names)))
    table_len = len(names)
    paths = [PathEntry(
        name=names[i],
        nar_hash=draw(st.binary(min_size=32, max_size=32)),
        nar_size=draw(st.integers(0, 2**40)),
        references=tuple(sorted(set(draw(st.lists(st.integers(0, table_len - 1), max_size=4))))),
        deriver=draw(st.one_of(st.just(b""), store_names)),
        carried=draw(st.booleans()),
    ) for i in range(n_new)]
    return Manifest(b"/nix/store", names[n_new:], paths, draw(st.integers(0, table_len - 1)),
                    draw(st.lists(st.tuples(st.integers(0, table_len - 1),
                                            st.integers(0, table_len - 1)), max_size=3)),
                    draw(st.integers(0, 2**40)))


@SETTINGS
@given(manifests())
def test_manifest_round_trip(m: Manifest) -> None:
    assert decode_manifest(encode_manifest(m)) == m


component = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
relpaths = st.lists(component, min_size=1, max_size=4).map(b"/".join)


@st.composite
def entry_lists(draw: st.DrawFn) -> tuple[list[bytes], list[Entry]]:
    table = draw(st.lists(store_names, min_size=1, max_size=4, unique=True))
    out = []
    for rel in draw(st.lists(relpaths, max_size=12)):
        kind = draw(st.sampled_from([KIND_DIR, KIND_SYMLINK, KIND_FILE]))
        if kind == KIND_DIR:
            out.append(Entry(KIND_DIR, rel))
        elif kind == KIND_SYMLINK:
            into_store = draw(st.booleans())
            target = (b"/nix/store/" + draw(st.sampled_from(table)) + draw(st.sampled_from([b"", b"/bin/x"]))
                      if into_store else draw(st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b)))
            out.append(Entry(KIND_SYMLINK, rel, target=target))
        else:
            method = draw(st.sampled_from([Method.LITERAL, Method.COPY]))
            sha = draw(st.binary(min_size=FILE_HASH_LEN, max_size=FILE_HASH_LEN))
            if method == Method.LITERAL:
                out.append(Entry(KIND_FILE, rel, flags=draw(st.sampled_from([0, 1])),
                                 size=draw(st.integers(0, 2**30)), sha256=sha,
                                 data_len=draw(st.integers(0, 2**20))))
            else:
                out.append(Entry(KIND_FILE, rel, flags=draw(st.sampled_from([0, 1, 2, 3])),
                                 size=draw(st.integers(0, 2**30)), sha256=sha, method=Method.COPY,
                                 source=draw(st.integers(0, len(table) - 1)),
                                 source_relpath=draw(st.one_of(st.just(rel), st.just(b""), relpaths))))
    return table, out


@SETTINGS
@given(entry_lists())
def test_entries_round_trip(case: tuple[list[bytes], list[Entry]]) -> None:
    table, entries = case
    enc, dec = EntryCoder(table), EntryCoder(table)
    assert [dec.decode(enc.encode(e)) for e in entries] == entries


# --- trees through the receiver ------------------------------------------------

# The receiver fsyncs each record and link; a RAM disk keeps 100+ receives fast.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

POOL = [b"", b"x", b"shared content\n", bytes(range(256)) * 4]
contents = st.one_of(st.sampled_from(POOL), st.binary(max_size=3000))
names = st.binary(min_size=1, max_size=16).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
link_targets = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)

Tree = Any  # ("file", bytes, exec) | ("link", target) | ("dir", {name: Tree})
leaves = st.one_of(
    st.tuples(st.just("file"), contents, st.booleans()),
    st.tuples(st.just("link"), link_targets),
)
trees = st.recursive(leaves, lambda kids: st.tuples(st.just("dir"), st.dictionaries(names, kids, max_size=5)),
                     max_leaves=20)
root_trees = st.one_of(st.tuples(st.just("dir"), st.dictionaries(names, trees, max_size=6)), leaves)


def materialise(tree: Tree, path: bytes) -> None:
    if tree[0] == "file":
        with open(path, "wb") as fh:
            fh.write(tree[1])
        os.chmod(path, 0o755 if tree[2] else 0o644)
    elif tree[0] == "link":
        os.symlink(tree[1], path)
    else:
        os.mkdir(path)
        for name, kid in tree[1].items():
            materialise(kid, os.path.join(path, name))


def describe(path: bytes) -> Any:
    st_ = os.lstat(path)
    if stat.S_ISLNK(st_.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISREG(st_.st_mode):
        with open(path, "rb") as fh:
            return ("file", fh.read(), bool(st_.st_mode & 0o100))
    return ("dir", {n: describe(os.path.join(path, n)) for n in sorted(os.listdir(path))})


def modes_canonical(path: bytes) -> bool:
    st_ = os.lstat(path)
    if stat.S_ISLNK(st_.st_mode):
        return True
    want = 0o555 if stat.S_ISDIR(st_.st_mode) or st_.st_mode & 0o100 else 0o444
    if stat.S_IMODE(st_.st_mode) != want or st_.st_mtime != 1:
        return False
    return not stat.S_ISDIR(st_.st_mode) or all(
        modes_canonical(os.path.join(path, n)) for n in os.listdir(path))


def device_state(root: str) -> tuple[list[str], list[str]]:
    store = os.path.join(root, "nix/store")
    profiles = os.path.join(root, "nix/var/nix/profiles")
    return (sorted(n for n in os.listdir(store) if not n.startswith(".")) if os.path.isdir(store) else [],
            sorted(os.listdir(profiles)) if os.path.isdir(profiles) else [])


def with_trees(new: list[Tree], known: Tree | None,
               check: Callable[[str, bytes, TreeEncoder, list[bytes]], None]) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        src = os.path.join(tmp, "src").encode()
        os.mkdir(src)
        root = os.path.join(tmp, "device")
        store = os.path.join(root, "nix/store")
        os.makedirs(store)
        enc = TreeEncoder()
        if known is not None:
            name = fake_store_name(99, "known")
            materialise(known, os.path.join(store.encode(), name))
            enc.add_known(os.path.join(store, os.fsdecode(name)), name)
        names_ = []
        for i, tree in enumerate(new):
            name = fake_store_name(i, f"tree{i}")
            materialise(tree, os.path.join(src, name))
            enc.add(os.fsdecode(os.path.join(src, name)), name)
            names_.append(name)
        check(root, src, enc, names_)


@SETTINGS
@given(st.lists(root_trees, min_size=1, max_size=3), st.one_of(st.none(), root_trees))
def test_trees_round_trip(new: list[Tree], known: Tree | None) -> None:
    def check(root: str, src: bytes, enc: TreeEncoder, names_: list[bytes]) -> None:
        stream = enc.stream().encode()
        result = receive(Device(root), io.BytesIO(stream), activate="none")
        assert result.generation == 1 and len(result.installed) == len(names_)
        for name in names_:
            installed = os.path.join(root.encode(), b"nix/store", name)
            assert describe(installed) == describe(os.path.join(src, name))
            assert nar_hash_tree(os.fsdecode(installed)) == nar_hash_tree(os.fsdecode(os.path.join(src, name)))
            assert modes_canonical(installed)
        assert os.listdir(os.path.join(root, "nix/store/.reup-staging/done")) == []

    with_trees(new, known, check)


@SETTINGS
@given(st.lists(root_trees, min_size=1, max_size=2), st.one_of(st.none(), root_trees), st.data())
def test_tree_stream_corruption_detected(new: list[Tree], known: Tree | None,
                                         data: st.DataObject) -> None:
    def check(root: str, src: bytes, enc: TreeEncoder, names_: list[bytes]) -> None:
        good = enc.stream().encode()
        bad = data.draw(mutations(good))
        assume(bad != good)
        before = device_state(root)
        with pytest.raises(ReceiveError) as info:
            receive(Device(root), io.BytesIO(bad), activate="none")
        assert 10 <= info.value.exit_code <= 22
        assert device_state(root) == before
        # The device still takes the good stream afterwards.
        receive(Device(root), io.BytesIO(good), activate="none")
        for name in names_:
            installed = os.path.join(root.encode(), b"nix/store", name)
            assert describe(installed) == describe(os.path.join(src, name))

    with_trees(new, known, check)


def test_copy_from_single_file_store_path(tmp_path: Any) -> None:
    """A COPY whose source is a store path that is itself a file (empty source relpath)."""
    new = ("dir", {b"a": ("file", b"same bytes", False), b"b": ("file", b"same bytes", True)})
    known = ("file", b"same bytes", False)

    def check(root: str, src: bytes, enc: TreeEncoder, names_: list[bytes]) -> None:
        s = enc.stream()
        copies = [n.entry for p in s.paths for n in p.nodes if n.entry.method == Method.COPY]
        assert any(e.source_relpath == b"" for e in copies)
        receive(Device(root), io.BytesIO(s.encode()), activate="none")
        assert describe(os.path.join(root.encode(), b"nix/store", names_[0])) == new

    with_trees([new], known, check)
