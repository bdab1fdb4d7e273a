"""Sharding a fleet across controller replicas: `reup run --shard i/n`.

Pure. Called by cli/run.py (parses the flag) and loop/controller.py (keeps only
its shard's devices of every fleet.toml it reads). Rendezvous hashing: each
device goes to the shard with the highest hash of (device name, shard index), so
going from n to n+1 replicas moves only about 1/(n+1) of the devices, and every
replica agrees without talking to the others. A moved device is not lost: the new
owner reads the device's status and sends from what the device holds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from reup.core.errors import ConfigError
from reup.core.model import Fleet


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def owns(self, device: str) -> bool:
        return self.count == 1 or shard_of(device, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(device: str, count: int) -> int:
    def weight(i: int) -> int:
        return int.from_bytes(hashlib.sha256(f"{i}:{device}".encode()).digest()[:8], "big")

    return max(range(count), key=weight)


def parse_shard(text: str) -> Shard:
    """'i/n' with 0 <= i < n (the StatefulSet ordinal and the replica count)."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise ConfigError(f"--shard: expected i/n with 0 <= i < n, got {text!r}")
    return Shard(int(index), int(count))


def select(fleet: Fleet, shard: Shard) -> Fleet:
    """The part of `fleet` this replica manages (the rollout policy applies to it alone)."""
    if shard.count == 1:
        return fleet
    return replace(fleet, devices={n: d for n, d in fleet.devices.items() if shard.owns(n)})
