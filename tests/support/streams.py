"""Reading and writing reup streams in tests, with the receiver's own wire/model modules.

`decode` turns a stream into a `Stream` (manifest + each carried path's entries
with their DATA chunks); `Stream.encode` writes it back with a correct size and
trailer digest, so a test can change one field (a hash, a name, a length) and
only the check under test can catch it. `parse_records` / `build_records` work
one level lower, on raw records. `TreeEncoder` writes a stream for trees on disk
(literal zstd data, COPY for repeated content), independent of the controller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

import zstandard
from reup_receiver.format import model
from reup_receiver.format.entries import EntryCoder
from reup_receiver.format.manifest import decode_manifest, encode_manifest
from reup_receiver.format.model import (
    F_EXECUTABLE,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    Entry,
    Manifest,
    Method,
    PathEntry,
)
from reup_receiver.format.nar import nar_hash_tree, walk_nar_order
from reup_receiver.format.wire import (
    DIGEST_SIZE,
    HEADER,
    MAGIC,
    STREAM_BYTES,
    T_DATA,
    T_ENTRY,
    T_MANIFEST,
    T_PATH,
    T_PATH_END,
    T_TRAILER,
    Buf,
    RecordWriter,
    put_varint,
    record_head,
)

Records = list[tuple[int, bytes]]
V1 = 1  # the stream version whose manifest (manifest.py) these helpers read and write
FILE_HASH_LEN: int = getattr(model, "FILE_HASH_LEN", 32)  # bytes of sha256 an entry carries


# --- raw records -------------------------------------------------------------


def _head(stream: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, payload length, payload offset) of the record at `pos`."""
    tag = stream[pos]
    length = shift = 0
    pos += 1
    while True:
        byte = stream[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return tag, length, pos


def parse_records(stream: bytes) -> Records:
    """The records of a well-formed stream (header skipped, trailer included), no checks."""
    assert stream[:8] == MAGIC
    out = []
    pos = HEADER.size
    while pos < len(stream):
        tag, length, pos = _head(stream, pos)
        out.append((tag, stream[pos:pos + length]))
        pos += length
    assert out[-1][0] == T_TRAILER
    return out


def record_offsets(stream: bytes) -> list[int]:
    """Byte offset of every record."""
    offsets = []
    pos = HEADER.size
    while pos < len(stream):
        offsets.append(pos)
        _tag, length, pos = _head(stream, pos)
        pos += length
    return offsets


def build_records(records: Sequence[tuple[int, bytes]], *, version: int = V1,
                  fix_size: bool = True, size_delta: int = 0) -> bytes:
    """A stream of these records (trailer records dropped) with a correct trailer digest.

    With `fix_size` the manifest's stream_bytes (its first 8 bytes) is set to the real
    size + `size_delta`.
    """
    body = [(t, p) for t, p in records if t != T_TRAILER]
    if fix_size and body and body[0][0] == T_MANIFEST:
        size = (HEADER.size + sum(len(record_head(t, len(p))) + len(p) for t, p in body)
                + len(record_head(T_TRAILER, DIGEST_SIZE)) + DIGEST_SIZE)
        body[0] = (T_MANIFEST, STREAM_BYTES.pack(size + size_delta) + body[0][1][STREAM_BYTES.size:])
    out = io.BytesIO()
    w = RecordWriter(out, header=False)
    w._write(HEADER.pack(MAGIC, version, 0))
    for tag, payload in body:
        w.record(tag, payload)
    w.trailer()
    return out.getvalue()


# --- decoded streams ---------------------------------------------------------


@dataclass
class Node:
    entry: Entry
    data: list[bytes] = field(default_factory=list)  # DATA payloads after the entry


@dataclass
class CarriedPath:
    index: int
    nodes: list[Node]


@dataclass
class Stream:
    manifest: Manifest
    paths: list[CarriedPath]

    def encode(self, *, version: int = V1, size_delta: int = 0) -> bytes:
        m = self.manifest
        records: Records = [(T_MANIFEST, encode_manifest(m))]
        coder = EntryCoder(m.table, m.store_dir)
        for p in self.paths:
            head = bytearray()
            put_varint(head, p.index)
            records.append((T_PATH, bytes(head)))
            coder.prev = b""
            for node in p.nodes:
                records.append((T_ENTRY, coder.encode(node.entry)))
                records += [(T_DATA, chunk) for chunk in node.data]
            records.append((T_PATH_END, bytes(head)))
        return build_records(records, version=version, size_delta=size_delta)

    def nodes(self) -> list[tuple[CarriedPath, Node]]:
        return [(p, n) for p in self.paths for n in p.nodes]

    def find(self, pred: object) -> Node:
        for _p, node in self.nodes():
            if pred(node.entry):  # type: ignore[operator]
                return node
        raise AssertionError("no such entry in the stream")

    def replace(self, pred: object, **changes: object) -> Stream:
        node = self.find(pred)
        node.entry = dataclasses.replace(node.entry, **changes)  # type: ignore[arg-type]
        return self


def decode(stream: bytes) -> Stream:
    records = parse_records(stream)
    assert records[0][0] == T_MANIFEST
    m = decode_manifest(records[0][1])
    coder = EntryCoder(m.table, m.store_dir)
    paths: list[CarriedPath] = []
    for tag, payload in records[1:]:
        if tag == T_PATH:
            buf = Buf(payload, "path")
            paths.append(CarriedPath(buf.varint(), []))
            coder.prev = b""
        elif tag == T_ENTRY:
            paths[-1].nodes.append(Node(coder.decode(payload)))
        elif tag == T_DATA:
            paths[-1].nodes[-1].data.append(payload)
    return Stream(m, paths)


# --- writing trees -------------------------------------------------------------

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def fake_store_name(seed: int, name: str) -> bytes:
    digest = hashlib.sha256(f"{seed}-{name}".encode()).digest()
    return ("".join(NIX32[b % 32] for b in digest[:32]) + "-" + name).encode()


class TreeEncoder:
    """Streams for trees on disk as new store paths: LITERAL data, COPY for repeats.

    `add(tree, name)` adds a new path (its NAR hash computed from the tree);
    `known` names paths the device already has (trees in `known_trees`, for COPY).
    """

    def __init__(self, store_dir: bytes = b"/nix/store", chunk: int = 1 << 20) -> None:
        self.store_dir = store_dir
        self.chunk = chunk
        self.paths: list[tuple[bytes, str]] = []
        self.known: list[bytes] = []
        self.known_trees: dict[bytes, str] = {}

    def add(self, tree: str, name: bytes) -> None:
        self.paths.append((name, tree))

    def add_known(self, tree: str, name: bytes) -> None:
        self.known.append(name)
        self.known_trees[name] = tree

    def stream(self, toplevel: int = 0) -> Stream:
        table = [n for n, _ in self.paths] + self.known
        seen: dict[tuple[bytes, bool], tuple[int, bytes]] = {}
        for name, tree in self.known_trees.items():
            for parts, st in walk_nar_order(tree):
                if stat.S_ISREG(st.st_mode):
                    rel = b"/".join(parts)
                    seen.setdefault((_sha(tree, rel)[:FILE_HASH_LEN], bool(st.st_mode & 0o100)),
                                    (table.index(name), rel))
        zc = zstandard.ZstdCompressor(level=3).compressobj()
        entries = []
        carried = []
        for i, (name, tree) in enumerate(self.paths):
            nar_hash, nar_size = nar_hash_tree(tree)
            entries.append(PathEntry(name, nar_hash, nar_size, ()))
            nodes = []
            btree = os.fsencode(tree)
            for parts, st in walk_nar_order(tree):
                rel = b"/".join(parts)
                full = os.path.join(btree, rel) if rel else btree
                if stat.S_ISDIR(st.st_mode):
                    nodes.append(Node(Entry(KIND_DIR, rel)))
                elif stat.S_ISLNK(st.st_mode):
                    nodes.append(Node(Entry(KIND_SYMLINK, rel, target=os.readlink(full))))
                else:
                    with open(full, "rb") as fh:
                        content = fh.read()
                    exe = bool(st.st_mode & 0o100)
                    sha = hashlib.sha256(content).digest()[:FILE_HASH_LEN]
                    flags = F_EXECUTABLE if exe else 0
                    src = seen.get((sha, exe))
                    if src is not None:
                        nodes.append(Node(Entry(KIND_FILE, rel, flags=flags, size=len(content),
                                                sha256=sha, method=Method.COPY, source=src[0],
                                                source_relpath=src[1])))
                        continue
                    seen[(sha, exe)] = (i, rel)
                    data = zc.compress(content) + zc.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                    chunks = [data[o:o + self.chunk] for o in range(0, len(data), self.chunk)]
                    nodes.append(Node(Entry(KIND_FILE, rel, flags=flags, size=len(content),
                                            sha256=sha, method=Method.LITERAL,
                                            data_len=len(data)), chunks))
            carried.append(CarriedPath(i, nodes))
        m = Manifest(self.store_dir, list(self.known), entries, toplevel)
        return Stream(m, carried)


def _sha(tree: str, rel: bytes) -> bytes:
    with open(os.path.join(os.fsencode(tree), rel) if rel else os.fsencode(tree), "rb") as fh:
        return hashlib.sha256(fh.read()).digest()
