"""The HDiffPatch container's header, read before its decoder is called.

`hdiffpatch.apply` allocates the whole new file from the size the patch itself declares, and a
75-byte patch of covers can declare (and fill) hundreds of MiB. So the receiver reads that
declaration first and refuses a patch whose new or old size disagrees with what the manifest
declared for the entry and the base the device holds (docs/device-invariants.md, "Bounded
resources"). Only the format the encoder writes (reup.delta.codecs.hdiff: "HDIFF13&", the
compression's name, NUL, then HDiffPatch's packed integers) is accepted.

Called by patches.apply_patch (the caller has already checked `size` against the documented
output limit).
"""

from __future__ import annotations

from reup_receiver.errors import Corrupt, Oversized

MAGIC = b"HDIFF13&"
_MAX_TYPE_NAME = 32  # "lzma2", "zstd", ...: a longer name is not a patch the encoder wrote
_MAX_VARINT_BYTES = 10  # 7 bits each: enough for any 64-bit size


def _unpack(patch: bytes, i: int) -> tuple[int, int]:
    """HDiffPatch's packed unsigned integer (big-endian groups of 7 bits, high bit: more follow)."""
    value = 0
    for n in range(_MAX_VARINT_BYTES):
        if i >= len(patch):
            raise Corrupt("hdiffpatch patch: header ends inside a size")
        byte = patch[i]
        i += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, i
        if n == _MAX_VARINT_BYTES - 1:
            break
    raise Corrupt("hdiffpatch patch: size field too long")


def declared_sizes(patch: bytes) -> tuple[int, int]:
    """(new size, old size) as the patch's header declares them."""
    if not patch.startswith(MAGIC):
        raise Corrupt("not an hdiffpatch (HDIFF13) patch")
    end = patch.find(b"\0", len(MAGIC), len(MAGIC) + _MAX_TYPE_NAME + 1)
    if end < 0:
        raise Corrupt("hdiffpatch patch: bad compression name")
    new_size, i = _unpack(patch, end + 1)
    old_size, _ = _unpack(patch, i)
    return new_size, old_size


def check(patch: bytes, old_len: int, size: int | None, limit: int) -> None:
    """Refuse (Corrupt) a patch whose declared output is not the entry's `size` bytes, or whose
    declared base is not the `old_len` bytes the device holds; with no declared `size`, refuse
    (Oversized) an output over `limit`. All before anything is allocated."""
    new_size, old_size = declared_sizes(patch)
    if size is None and new_size > limit:
        raise Oversized(f"hdiffpatch patch declares {new_size} bytes, over the receiver's limit of {limit}")
    if size is not None and new_size != size:
        raise Corrupt(f"hdiffpatch patch declares {new_size} bytes, its entry's declared size is {size}")
    if old_size != old_len:
        raise Corrupt(f"hdiffpatch patch is for a base of {old_size} bytes, the device's has {old_len}")
