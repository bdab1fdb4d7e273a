"""Encoder-side binary diff: pick the smallest patch for one (old, new) file pair.

Measured on real binaries (bench/results.md and the closing notes): HDiffPatch
with LZMA2 gives small patches at a few MB/s; bsdiff's blocks recompressed
with tuned LZMA2 (BSDIFF_LZMA) are ~3% smaller again on executables but cost
bsdiff's time and memory, so they are tried up to `BSDIFF_MAX`; plain bsdiff4
wins only on some small files; zstd with the old file as raw prefix and
long-distance matching is the fastest and the only one with flat memory, so
it takes the files above `HDIFF_MAX`. Small files try every codec. The
receiver's decoders for all of them are in reup_receiver/builder.py.
`diff_job` is the unit the encoder's process pool runs. Called by strategy.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import bsdiff4
import pyzstd
import zstandard
from reup_receiver.format import bsdiffxz, elfmap, elfx86, x86split
from reup_receiver.format.model import PATCH_CODECS, Codec
from reup_receiver.format.rewrite import rewrite_bytes

from reup.delta import elfmap as layout
from reup.delta import lzmaprefix

SMALL = 1 << 20  # below: try all codecs and keep the smallest
HDIFF_MAX = 128 << 20
BSDIFF_MAX = 8 << 20  # bsdiff's suffix sort is slow and needs ~17x memory: medium files only  # above: zstd prefix only (HDiffPatch needs ~5-9x the old file)
ZSTD_PREFIX_LEVEL_SMALL = 19
ZSTD_PREFIX_LEVEL_LARGE = 12
MAX_WINDOW_LOG = 31


@dataclass(frozen=True)
class DiffResult:
    """What the stream says for one file: COPY with rewrite (data empty), a patch, or nothing."""

    kind: str  # "rewrite", "patch:<codec>", or "literal" (no patch beats the literal estimate)
    codec: Codec | None
    data: bytes
    rewritten: bool  # the old file changed under the rewrite map


def zstd_prefix(old: bytes, new: bytes, level: int) -> bytes:
    window = max(20, min(MAX_WINDOW_LOG, (len(old) + len(new)).bit_length()))
    opts: dict[int, int] = {
        pyzstd.CParameter.compressionLevel: level,
        pyzstd.CParameter.enableLongDistanceMatching: 1,
        pyzstd.CParameter.windowLog: window,
    }
    return pyzstd.compress(new, opts, pyzstd.ZstdDict(old, is_raw=True).as_prefix)


HDIFF: ModuleType | None
try:
    import hdiffpatch as HDIFF
except ImportError:  # optional: the Nix package of the controller goes without it
    HDIFF = None

ENCODER_CODECS = frozenset(c for c in PATCH_CODECS if (c != Codec.HDIFFPATCH or HDIFF is not None)
                           and (c != Codec.LZMA_PREFIX or lzmaprefix.AVAILABLE))
# LZMA_PREFIX: the receiver's dictionary is old + new; tried only where the best block
# diff is at least 1/LZMA_WORTH of the new file (most of it really changed), since on
# near-identical files block diffs win by far and LZMA's search costs seconds per MB.
LZMA_MAX = 16 << 20
LZMA_WORTH = 8
ELF_MAX = 16 << 20  # ELF_X86 costs the receiver a normalised copy of the old file; Python-speed filter


def hdiff(old: bytes, new: bytes) -> bytes:
    assert HDIFF is not None
    out = HDIFF.diff(old, new, HDIFF.COMPRESSION_LZMA2, validate=False, big_cache_match=True)
    return bytes(out)


def elf_patch(old: bytes, new: bytes, inner: Codec, mode: int = elfx86.RIP) -> bytes:
    """ELF_X86: `inner` between the normalised files (reup_receiver.format.elfx86)."""
    return elfx86.pack(old, new, int(inner), mode, lambda o, n: make_patch(inner, o, n))


def elf_inners(ok: frozenset[Codec] | set[Codec], old: bytes, new: bytes) -> list[Codec]:
    """Inner codecs worth trying for ELF_X86 on this pair (none if neither side is an x86-64 ELF)."""
    if Codec.ELF_X86 not in ok or max(len(old), len(new)) > ELF_MAX:
        return []
    if not (elfx86.exec_ranges(old) or elfx86.exec_ranges(new)):
        return []
    # One inner codec: the one that wins on executables (HDiffPatch), else bsdiff's blocks.
    if Codec.HDIFFPATCH in ok:
        return [Codec.HDIFFPATCH]
    if Codec.BSDIFF_LZMA in ok and max(len(old), len(new)) <= BSDIFF_MAX:
        return [Codec.BSDIFF_LZMA]
    return []


def map_patch(old: bytes, new: bytes, mode: int = elfmap.CALLS_RIP, inner: Codec | None = None) -> bytes:
    """ELF_MAP: `inner` (default HDiffPatch, else bsdiff's blocks) between the mapped files
    (reup.delta.elfmap)."""
    if inner is None:
        inner = Codec.HDIFFPATCH if HDIFF is not None else Codec.BSDIFF_LZMA
    chosen = inner
    if mode & elfmap.SPLIT and chosen == Codec.LZMA_PREFIX:
        return layout.pack(old, new, int(chosen), mode, lambda o, n, part: lzmaprefix.pack(o, n, SPLIT_PROPS[part]))
    return layout.pack(old, new, int(chosen), mode, lambda o, n, _part: make_patch(chosen, o, n))


# LZMA's literal context bits, position bits for literals and for matches (lc, lp, pb) per
# x86split part (the rest, then each kind). One-byte fields follow unrelated fields, so the
# byte before says nothing (lc 0); 4-byte displacements and targets line up with 4-byte
# positions (lp = pb = 2). On libzstd 1.5.5 -> 1.5.6 these took 985 B (0.6%) off the split
# patch against (3, 0, 2) everywhere (152,704 -> 151,719 B).
SPLIT_PROPS = {0: (3, 0, 2), 1 + x86split.OP: (3, 0, 2), 1 + x86split.DISP8: (0, 0, 0),
               1 + x86split.DISP32: (0, 2, 2), 1 + x86split.RIP32: (0, 2, 2), 1 + x86split.IMM8: (0, 0, 0),
               1 + x86split.IMM16: (0, 0, 0), 1 + x86split.IMM32: (0, 0, 0), 1 + x86split.IMM64: (0, 0, 0),
               1 + x86split.REL8: (0, 0, 0), 1 + x86split.REL32: (0, 2, 2)}


def map_codec(mode: int) -> Codec:
    """ELF_SPLIT for the split modes, ELF_MAP2 for the filtered ones (older receivers refuse
    either), else ELF_MAP."""
    if mode & elfmap.SPLIT:
        return Codec.ELF_SPLIT
    return Codec.ELF_MAP2 if mode & elfmap.FILTERED else Codec.ELF_MAP


def map_inner(ok: frozenset[Codec] | set[Codec], old: bytes, new: bytes) -> Codec | None:
    """The inner codec for ELF_MAP on this pair, or None if ELF_MAP does not apply: both
    files must be x86-64 ELF with code, within the receiver's limit."""
    if not ok & {Codec.ELF_MAP, Codec.ELF_MAP2} or max(len(old), len(new)) > elfmap.MAX_FILE:
        return None
    if not (elfmap.code_ranges(old) and elfmap.code_ranges(new)):
        return None
    if Codec.HDIFFPATCH in ok and HDIFF is not None:
        return Codec.HDIFFPATCH
    if Codec.BSDIFF_LZMA in ok and max(len(old), len(new)) <= BSDIFF_MAX:
        return Codec.BSDIFF_LZMA
    return None


def map_modes(old: bytes, new: bytes, ok: frozenset[Codec] | set[Codec] = frozenset(ENCODER_CODECS)) -> list[int]:
    """ELF_MAP modes worth trying on a pair (those of ELF_MAP2 where the receiver has it).

    Calls and RIP-relative operands (mode 6) win on rebuilt Rust binaries (pydantic-core
    2.23.3 -> 2.23.4: 97 KB against 132 KB for RIP-relative only and 111 KB with all
    branches, whose intra-function jumps are better left relative; ruff 0.6.8 -> 0.6.9:
    1% below mode 2); where most code really changed (zstd 1.5.5 -> 1.5.6) RIP-relative
    only (mode 2) does best. Files up to ELF_MAX try both, larger ones mode 6.
    Filtering the calls (mode 14, ELF_MAP2) keeps stray E8 bytes out: on zstd it beats
    mode 2 by 3%, so there mode 14 takes mode 6's place, and with the address tables
    mapped (mode 30, where they invert exactly) by 6%.
    """
    # (elfmap.pack falls back from 30 to 14 where the tables would not invert exactly.)
    calls = elfmap.CALLS_RIP_TABLES if Codec.ELF_MAP2 in ok else elfmap.CALLS_RIP
    if calls == elfmap.CALLS_RIP and Codec.ELF_MAP not in ok:
        return []
    if max(len(old), len(new)) <= ELF_MAX:
        return [calls, elfmap.RIP] if Codec.ELF_MAP in ok else [calls]
    return [calls]


def make_patch(codec: Codec, old: bytes, new: bytes) -> bytes:
    if codec == Codec.ELF_MAP:
        return map_patch(old, new)
    if codec == Codec.ELF_MAP2:
        return map_patch(old, new, map_modes(old, new, {Codec.ELF_MAP2})[0])
    if codec == Codec.ELF_SPLIT:
        return map_patch(old, new, map_modes(old, new, {Codec.ELF_MAP2})[0] | elfmap.SPLIT, Codec.LZMA_PREFIX)
    if codec == Codec.LZMA_PREFIX:
        return lzmaprefix.pack(old, new)
    if codec == Codec.ELF_X86:
        return elf_patch(old, new, Codec.HDIFFPATCH if HDIFF is not None else Codec.BSDIFF_LZMA)
    if codec == Codec.HDIFFPATCH:
        return hdiff(old, new)
    if codec == Codec.BSDIFF4:
        return bytes(bsdiff4.diff(old, new))
    if codec == Codec.BSDIFF_LZMA:
        return bsdiffxz.pack(old, new)
    return zstd_prefix(old, new, ZSTD_PREFIX_LEVEL_SMALL)


def candidates(old: bytes, new: bytes, only: Sequence[Codec] | None = None,
               allowed: Sequence[Codec] | None = None) -> list[tuple[Codec, bytes]]:
    """Patches to compare; `only` forces given codecs (tests, benchmarks); `allowed` is what
    the device can apply (its `--status`)."""
    if only is not None:
        return [(c, make_patch(c, old, new)) for c in only if c != Codec.ZSTD_PREFIX or len(old) >= 8]
    ok = ENCODER_CODECS & (set(PATCH_CODECS) if allowed is None else set(allowed))
    if len(old) > HDIFF_MAX or len(new) > HDIFF_MAX or not ok & {Codec.HDIFFPATCH, Codec.BSDIFF_LZMA}:
        if Codec.ZSTD_PREFIX in ok and len(old) >= 8:
            return [(Codec.ZSTD_PREFIX, zstd_prefix(old, new, ZSTD_PREFIX_LEVEL_LARGE))]
        return []
    out = []
    inner = map_inner(ok, old, new)
    modes = map_modes(old, new, ok) if inner is not None else []
    if modes and max(len(old), len(new)) > ELF_MAX:
        # A large executable: one diff only, the mapped one (encode time stays that of one
        # HDiffPatch run); on ruff 0.6.8 -> 0.6.9 it is 8% smaller than the plain diff.
        return [(map_codec(modes[0]), map_patch(old, new, modes[0], inner))]
    if Codec.HDIFFPATCH in ok:
        out.append((Codec.HDIFFPATCH, hdiff(old, new)))
    # bsdiff's blocks between the raw files lose to ELF_MAP wherever that applies (pydantic-core:
    # 170 KB against 97 KB; zstd: 198 KB against 186 KB) and cost most of the encode time.
    if Codec.BSDIFF_LZMA in ok and len(old) <= BSDIFF_MAX and len(new) <= BSDIFF_MAX and not modes:
        out.append((Codec.BSDIFF_LZMA, bsdiffxz.pack(old, new)))
    # Normalising RIP-relative operands only: on zstd 1.5.5 -> 1.5.6 normalising branches too
    # made the patch 8% larger (code moves with its callees); the format keeps both modes.
    # ELF_MAP in mode 2 does what ELF_X86 does and better: the latter only for older receivers.
    out += [(map_codec(mode), map_patch(old, new, mode, inner)) for mode in modes]
    if not modes:
        out += [(Codec.ELF_X86, elf_patch(old, new, inner, elfx86.RIP)) for inner in elf_inners(ok, old, new)]
    if len(old) <= SMALL and len(new) <= SMALL:
        if Codec.BSDIFF4 in ok:
            out.append((Codec.BSDIFF4, make_patch(Codec.BSDIFF4, old, new)))
        if Codec.ZSTD_PREFIX in ok and len(old) >= 8:  # zstd's minimum prefix
            out.append((Codec.ZSTD_PREFIX, zstd_prefix(old, new, ZSTD_PREFIX_LEVEL_SMALL)))
    if Codec.LZMA_PREFIX in ok and len(old) >= 8 and len(old) + len(new) <= LZMA_MAX and \
            (not out or min(len(p) for _, p in out) * LZMA_WORTH >= len(new)):
        out.append((Codec.LZMA_PREFIX, lzmaprefix.pack(old, new)))
        if modes:  # and with the references mapped (RIP-relative and filtered calls, else RIP only)
            mode = modes[0] if modes[0] & elfmap.FILTERED else elfmap.RIP
            out.append((map_codec(mode), map_patch(old, new, mode, Codec.LZMA_PREFIX)))
            if Codec.ELF_SPLIT in ok and mode & elfmap.FILTERED and max(len(old), len(new)) <= x86split.SPLIT_MAX:
                out.append((Codec.ELF_SPLIT, map_patch(old, new, mode | elfmap.SPLIT, Codec.LZMA_PREFIX)))
    if not out and Codec.ZSTD_PREFIX in ok and len(old) >= 8:
        out.append((Codec.ZSTD_PREFIX, zstd_prefix(old, new, ZSTD_PREFIX_LEVEL_LARGE)))
    return out


def literal_estimate(new: bytes) -> int:
    level = 19 if len(new) <= SMALL else 9
    return len(zstandard.ZstdCompressor(level=level).compress(new))


def diff_job(old_path: bytes, new_path: bytes, rewrites: dict[bytes, bytes], new_sha: bytes,
             only: Sequence[Codec] | None = None, allowed: Sequence[Codec] | None = None) -> DiffResult:
    """Run in a worker: rewrite the old file, then COPY if equal, else the best patch.

    With `only`, those codecs are used even where a literal would be smaller.
    """
    with open(old_path, "rb") as fh:
        old = fh.read()
    with open(new_path, "rb") as fh:
        new = fh.read()
    rewritten = rewrite_bytes(old, rewrites)
    changed = rewritten != old
    if len(rewritten) == len(new) and hashlib.sha256(rewritten).digest() == new_sha:
        return DiffResult("rewrite", None, b"", changed)
    patches = candidates(rewritten, new, only, allowed)
    if not patches:
        return DiffResult("literal", None, b"", changed)
    codec, data = min(patches, key=lambda c: (len(c[1]), c[0]))
    if only is None and len(data) >= literal_estimate(new):
        return DiffResult("literal", None, b"", changed)
    return DiffResult(f"patch:{codec.name.lower()}", codec, data, changed)
