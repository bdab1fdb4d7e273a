"""The HDiffPatch decoder is bounded before it allocates (issue 11, section 2).

`hdiffpatch.apply` allocates the whole output from the size in the patch's own header, so the
receiver reads that header first (reup_receiver.format.hdiff) and refuses a patch whose declared
output or base size disagrees with its entry. Measured: the peak RSS of a process applying a
75-byte patch whose covers expand a 256 KiB base 400 times, under an entry declaring 256 KiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hdiffpatch
import pytest
from reup_receiver.errors import Corrupt, Oversized
from reup_receiver.format import hdiff
from reup_receiver.format.literal import MemorySink
from reup_receiver.format.model import Codec
from reup_receiver.patches import MAX_WHOLE_OUTPUT, apply_patch

MiB = 1 << 20

_MAKE = """import os, sys, hdiffpatch
old = os.urandom(256 << 10)
patch = hdiffpatch.diff(old, old * 400, hdiffpatch.COMPRESSION_LZMA2, validate=False)
open(sys.argv[1], "wb").write(old); open(sys.argv[2], "wb").write(patch)
"""

# Applies the patch as the receiver does (entry size: the base's), reports VmHWM before and after.
_APPLY = """import json, sys
from reup_receiver.patches import apply_patch
from reup_receiver.format.literal import MemorySink
from reup_receiver.format.model import Codec
import hdiffpatch
def hwm():
    with open("/proc/self/status") as fh:
        return int([l.split()[1] for l in fh if l.startswith("VmHWM")][0]) * 1024
old, patch = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
before, error, sink = hwm(), None, MemorySink()
try:
    apply_patch(Codec.HDIFFPATCH, old, patch, sink, len(old))
except Exception as exc:
    error = type(exc).__name__
print(json.dumps({"before": before, "after": hwm(), "error": error, "out": len(sink.out)}))
"""


def pack(value: int) -> bytes:
    """HDiffPatch's packed unsigned integer (the inverse of hdiff._unpack)."""
    groups = [value & 0x7F]
    while value := value >> 7:
        groups.append(value & 0x7F)
    groups.reverse()
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def with_new_size(patch: bytes, size: int) -> bytes:
    start = patch.index(b"\0", len(hdiff.MAGIC)) + 1
    _old, end = hdiff._unpack(patch, start)
    return patch[:start] + pack(size) + patch[end:]


def test_covers_bomb_is_refused_before_the_decoder_allocates(tmp_path: os.PathLike[str]) -> None:
    old_p, patch_p = os.path.join(tmp_path, "old"), os.path.join(tmp_path, "patch")
    subprocess.run([sys.executable, "-c", _MAKE, old_p, patch_p], check=True, timeout=120)
    with open(patch_p, "rb") as fh:
        patch = fh.read()
    declared, _ = hdiff.declared_sizes(patch)
    out = subprocess.run([sys.executable, "-c", _APPLY, old_p, patch_p], capture_output=True, text=True,
                         check=True, timeout=120)
    got = json.loads(out.stdout)
    grown = got["after"] - got["before"]
    print(f"\n| hdiffpatch covers bomb | {len(patch)} B patch declaring {declared / MiB:.0f} MiB | "
          f"{got['error']} | peak RSS grew {grown / MiB:.1f} MiB |")
    assert got["error"] == "Corrupt", got
    assert got["out"] == 0
    assert grown < declared // 8, got  # nothing of the declared output was allocated


def test_header_disagreeing_with_the_entry_is_refused() -> None:
    old = bytes(range(256)) * 64
    new = old[:8000] + b"inserted" + old[8000:]
    patch = hdiffpatch.diff(old, new, hdiffpatch.COMPRESSION_LZMA2, validate=False)
    sink = MemorySink()
    apply_patch(Codec.HDIFFPATCH, old, patch, sink, len(new))
    assert bytes(sink.out) == new
    with pytest.raises(Corrupt, match="declares"):
        apply_patch(Codec.HDIFFPATCH, old, patch, MemorySink(), len(new) + 1)
    with pytest.raises(Corrupt, match="declares"):  # a header claiming far more than the entry
        apply_patch(Codec.HDIFFPATCH, old, with_new_size(patch, 1 << 40), MemorySink(), len(new))
    with pytest.raises(Corrupt, match="base"):
        apply_patch(Codec.HDIFFPATCH, old + b"x", patch, MemorySink(), len(new))
    with pytest.raises(Oversized):  # no entry size: the documented limit
        apply_patch(Codec.HDIFFPATCH, old, with_new_size(patch, MAX_WHOLE_OUTPUT + 1), MemorySink())


@pytest.mark.parametrize("patch", [b"", b"HDIFF13", b"HDIFF13&lzma2", b"HDIFF13&lzma2\0\x81",
                                   b"HDIFF13&" + b"x" * 64 + b"\0\x01\x01", b"HDIFF13&\0" + b"\xff" * 11,
                                   b"HDIFFSF20&zstd\0\x01\x01"])
def test_malformed_headers_are_corrupt(patch: bytes) -> None:
    with pytest.raises(Corrupt):
        hdiff.check(patch, 1, 1, MAX_WHOLE_OUTPUT)
