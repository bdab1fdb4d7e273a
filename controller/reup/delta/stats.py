"""What one encode produced: bytes by kind, NAR bytes of the missing paths, time and memory.

Filled by delta/encode.py and delta/strategy.py; read by the delta cache, the controller's events and bench/.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeltaStats:
    stream_bytes: int = 0
    nar_bytes: int = 0  # NAR bytes of the paths the device lacks (what `nix copy` would move)
    paths: int = 0
    files: int = 0
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    ops_by_kind: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # set by the controller's encoder (cache.nix_encoder): thread + diff workers
    peak_rss_bytes: int = 0

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + nbytes
        self.ops_by_kind[kind] = self.ops_by_kind.get(kind, 0) + 1

    def to_json(self) -> dict[str, object]:
        return {
            "stream_bytes": self.stream_bytes,
            "nar_bytes": self.nar_bytes,
            "ratio": round(self.stream_bytes / self.nar_bytes, 6) if self.nar_bytes else None,
            "paths": self.paths,
            "files": self.files,
            "bytes_by_kind": self.bytes_by_kind,
            "ops_by_kind": self.ops_by_kind,
            "seconds": round(self.seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
        }
