"""Fixed streams for transfer tests: one store path of random (incompressible) bytes, and a
StreamSource serving such files to SshPusher like the delta cache does (`get` and `find`)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from reup_receiver.resume import stream_id

from .streams import TreeEncoder, fake_store_name


@dataclass(frozen=True)
class Entry:
    path: str
    stream_bytes: int
    nar_bytes: int = 0


class Streams:
    """A StreamSource holding fixed stream files (the delta cache's `get` and `find`)."""

    def __init__(self, by_target: dict[str, str]) -> None:
        self.by_target = by_target

    def get(self, held: object, target: str, staged: object = (), avoid: object = (), codecs: object = None) -> Entry:
        path = self.by_target[target]
        return Entry(path, os.path.getsize(path))

    def find(self, sid: str, target: str) -> Entry | None:
        path = self.by_target.get(target)
        return Entry(path, os.path.getsize(path)) if path and stream_id(path) == sid else None


def make_stream(tmp: str, seed: int, size: int, name_seed: int | None = None) -> tuple[str, str]:
    """A stream carrying one path with `size` random (incompressible) bytes; (file, toplevel)."""
    src = os.path.join(tmp, f"src{seed}")
    name = fake_store_name(name_seed or seed, "big")
    tree = os.path.join(src, os.fsdecode(name))
    os.makedirs(tree)
    with open(os.path.join(tree, "blob"), "wb") as f:
        f.write(random.Random(seed).randbytes(size))
    enc = TreeEncoder()
    enc.add(tree, name)
    out = os.path.join(tmp, f"stream{seed}")
    with open(out, "wb") as f:
        f.write(enc.stream().encode())
    return out, "/nix/store/" + os.fsdecode(name)
