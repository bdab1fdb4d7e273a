"""Baseline (b): reUpNix-style whole-file dedup + bsdiff4 per paired file + zstd -19.

Called by `bench.baselines` for every scenario, and by the tests (with `decode`, which
exists only to prove that the baseline's sizes are for a stream that really rebuilds the
target). What it does, following reUpNix (`nix-store-send` v1 dedup, `nix store send` v2
pairing):

- every regular file of the new paths whose (SHA-256, exec bit) is already held, or was
  already sent in this stream, is sent as a reference (its 33-byte key);
- each new store path is paired with a held path of the same name (without hash), else
  of the same package name without version when that match is unique on both sides;
- a file with a same-relative-path regular-file partner in the paired path is sent as
  `bsdiff4.diff(old, new)`; everything else as literal bytes;
- the whole record stream goes through zstd level 19.

Stream records: u32 header length, JSON header, u64 blob length, blob.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, BinaryIO, cast

import bsdiff4
import zstandard

from bench.corpus import split_name, store_name
from bench.storefs import content_key, index_files, join, walk

ZSTD_LEVEL = 19


@dataclass
class FileDeltaStats:
    bytes: int = 0  # compressed stream size
    raw_bytes: int = 0  # before zstd
    seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)  # dedup / bsdiff / literal / symlink / dir
    op_bytes: Counter[str] = field(default_factory=Counter)  # payload bytes by op, before zstd


def pair_paths(new_paths: Iterable[str], old_paths: Iterable[str]) -> dict[str, str]:
    """New store path -> the held path it replaces: same name, else unique same package name."""
    new_list, old_list = sorted(new_paths), sorted(old_paths)
    by_name: dict[str, list[str]] = {}
    by_pname: dict[str, list[str]] = {}
    for old in old_list:
        by_name.setdefault(store_name(old), []).append(old)
        by_pname.setdefault(split_name(store_name(old))[0], []).append(old)
    new_pnames = Counter(split_name(store_name(p))[0] for p in new_list)
    out: dict[str, str] = {}
    for new in new_list:
        name = store_name(new)
        if by_name.get(name):
            out[new] = by_name[name][0]
            continue
        pname = split_name(name)[0]
        cands = by_pname.get(pname, [])
        if len(cands) == 1 and new_pnames[pname] == 1:
            out[new] = cands[0]
    return out


def _record(out: BinaryIO, header: Mapping[str, object], blob: bytes = b"") -> int:
    h = json.dumps(header, separators=(",", ":")).encode()
    out.write(struct.pack("<I", len(h)) + h + struct.pack("<Q", len(blob)))
    out.write(blob)
    return 4 + len(h) + 8 + len(blob)


def encode(
    held_paths: Sequence[str],
    new_paths: Sequence[str],
    out: BinaryIO,
    *,
    store_dirs: Mapping[str, str] | None = None,
    level: int = ZSTD_LEVEL,
) -> FileDeltaStats:
    """Write the baseline stream for `new_paths` against a device holding `held_paths`.

    Paths are store paths; `store_dirs` maps a path to where its tree can be read
    (default: the path itself).
    """
    t0 = time.perf_counter()

    def where(p: str) -> str:
        return (store_dirs or {}).get(p, p)

    stats = FileDeltaStats()
    known = index_files(where(p) for p in held_paths)
    pairs = pair_paths(new_paths, held_paths)
    counter = _CountingWriter(out)
    cctx = zstandard.ZstdCompressor(level=level)
    with cctx.stream_writer(cast(IO[bytes], counter), closefd=False) as z:
        for new in sorted(new_paths):
            base = pairs.get(new)
            stats.raw_bytes += _record(z, {"path": new, "base": base})
            root = where(new)
            for e in walk(root):
                if e.kind == "d":
                    stats.raw_bytes += _record(z, {"d": e.rel})
                    stats.ops["dir"] += 1
                elif e.kind == "l":
                    stats.raw_bytes += _record(z, {"l": e.rel, "t": e.target})
                    stats.ops["symlink"] += 1
                else:
                    stats.raw_bytes += _encode_file(z, root, e.rel, e.executable, base and where(base), known, stats)
        z.flush(zstandard.FLUSH_FRAME)
    stats.bytes = counter.count
    stats.seconds = time.perf_counter() - t0
    return stats


def _encode_file(
    z: BinaryIO,
    root: str,
    rel: str,
    executable: bool,
    base_dir: str | None,
    known: dict[bytes, str],
    stats: FileDeltaStats,
) -> int:
    full = join(root, rel)
    key = content_key(full, executable)
    head: dict[str, object] = {"f": rel, "x": int(executable)}
    if key in known:
        stats.ops["dedup"] += 1
        stats.op_bytes["dedup"] += len(key)
        return _record(z, {**head, "dup": key.hex()})
    known[key] = full
    with open(full, "rb") as f:
        new = f.read()
    old_file = join(base_dir, rel) if base_dir else None
    if old_file and os.path.isfile(old_file) and not os.path.islink(old_file):
        with open(old_file, "rb") as f:
            patch = bsdiff4.diff(f.read(), new)
        stats.ops["bsdiff"] += 1
        stats.op_bytes["bsdiff"] += len(patch)
        return _record(z, {**head, "bsdiff": 1}, patch)
    stats.ops["literal"] += 1
    stats.op_bytes["literal"] += len(new)
    return _record(z, {**head, "lit": 1}, new)


class _CountingWriter:
    """A sink that counts what zstd writes and passes it on."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def decode(
    stream: BinaryIO, held_dirs: Mapping[str, str], dest: str
) -> list[str]:
    """Rebuild the new paths under `dest/<basename>` (tests only). held_dirs: held path -> tree."""
    known = index_files(held_dirs.values())
    made: list[str] = []
    reader = zstandard.ZstdDecompressor().stream_reader(stream)
    root = base_dir = ""
    while True:
        raw = reader.read(4)
        if not raw:
            break
        (hlen,) = struct.unpack("<I", raw)
        head = json.loads(_read_exact(reader, hlen))
        (blen,) = struct.unpack("<Q", _read_exact(reader, 8))
        blob = _read_exact(reader, blen)
        if "path" in head:
            root = os.path.join(dest, os.path.basename(str(head["path"])))
            base = head.get("base")
            base_dir = held_dirs[str(base)] if base else ""
            made.append(root)
        elif "d" in head:
            os.makedirs(join(root, str(head["d"])), exist_ok=True)
        elif "l" in head:
            os.symlink(str(head["t"]), join(root, str(head["l"])))
        else:
            rel = str(head["f"])
            if "dup" in head:
                with open(known[bytes.fromhex(str(head["dup"]))], "rb") as f:
                    data = f.read()
            elif "bsdiff" in head:
                with open(join(base_dir, rel), "rb") as f:
                    data = bsdiff4.patch(f.read(), blob)
            else:
                data = blob
            path = join(root, rel)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o755 if head["x"] else 0o644)
            known.setdefault(content_key(path, bool(head["x"])), path)
    return made


def _read_exact(reader: zstandard.ZstdDecompressionReader, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = reader.read(n)
        if not chunk:
            raise EOFError("truncated baseline stream")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)
