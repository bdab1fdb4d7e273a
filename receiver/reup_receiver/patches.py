"""Applying one patch: every patch codec the receiver knows, each bounded by the entry's
declared output size before anything is decoded (docs/device-invariants.md).

Called by builder.PathBuilder for PATCH entries, by maintenance (`--status` codecs) and by the
lab's fake fleet; the codecs' own formats are in format/.
"""

from __future__ import annotations

import zstandard

from reup_receiver.errors import Corrupt, Oversized, Unsupported
from reup_receiver.format import pyc
from reup_receiver.format.literal import MAX_WINDOW, MemorySink, Sink, zstd_feed
from reup_receiver.format.model import ELF_MAP_CODECS, PATCH_CODECS, SOLID_CODECS, Codec, Entry


def available_codecs() -> list[Codec]:
    """Patch codecs this device can apply (HDiffPatch is an optional dependency)."""
    # The standard library and zstandard suffice for these.
    out = [Codec.ZSTD_PREFIX, Codec.ELF_X86, *SOLID_CODECS, Codec.LITERAL_ELF, *ELF_MAP_CODECS,
           Codec.LZMA_PREFIX]
    if not pyc.usable():  # SOLID_PYC compiles with this receiver's own interpreter
        out.remove(Codec.SOLID_PYC)
    for codec, module in ((Codec.BSDIFF4, "bsdiff4"), (Codec.BSDIFF_LZMA, "bsdiff4"),
                          (Codec.HDIFFPATCH, "hdiffpatch")):
        try:
            __import__(module)
        except ImportError:
            continue
        out.append(codec)
    return sorted(out)


# Patch outputs (docs/device-invariants.md): codecs that build the whole new file in memory
# (bsdiff, HDiffPatch) are refused above MAX_WHOLE_OUTPUT before they decode, and their own
# headers' output sizes must equal the entry's (format/hdiff.py, _bsdiff4_bounded); zstd-prefix
# streams its output and is bounded by the declared size and a window no larger than
# base + new file.
MAX_WHOLE_OUTPUT = 64 << 20
MAX_PATCH_OUTPUT = 1 << 30


def check_patch_size(e: Entry) -> None:
    limit = MAX_PATCH_OUTPUT if e.codec == Codec.ZSTD_PREFIX else MAX_WHOLE_OUTPUT
    if e.size > limit or e.data_len > MAX_PATCH_OUTPUT:
        raise Oversized(f"{e.relpath!r}: patch output of {e.size} bytes exceeds the receiver's "
                        f"limit of {limit} for {e.codec.name if e.codec else 'its codec'}")


def apply_patch(codec: Codec, old: bytes, patch: bytes, sink: Sink, size: int | None = None) -> None:
    """Write `old` patched with `patch` to `sink` (`size`: the declared output size, checked
    before any decoding); codec errors propagate as the library raises them."""
    declared = size
    size = MAX_WHOLE_OUTPUT if size is None else size
    if size > MAX_PATCH_OUTPUT or (codec != Codec.ZSTD_PREFIX and size > MAX_WHOLE_OUTPUT):
        raise Oversized(f"patch output of {size} bytes exceeds the receiver's limit")
    if codec == Codec.BSDIFF4:
        sink.write(_bsdiff4_bounded(old, patch, size))
    elif codec == Codec.HDIFFPATCH:
        import hdiffpatch

        from reup_receiver.format import hdiff

        hdiff.check(patch, len(old), declared, size)  # the decoder allocates what the header says
        sink.write(hdiffpatch.apply(old, patch))
    elif codec == Codec.BSDIFF_LZMA:
        from reup_receiver.format import bsdiffxz

        sink.write(bsdiffxz.apply(old, patch, size))
    elif codec == Codec.ELF_X86:
        from reup_receiver.format import elfx86

        # The inner patch makes the normalised new file, of the new file's length.
        sink.write(bytes(elfx86.apply(old, patch, lambda inner, o, p: _apply_inner(inner, o, p, size))))
    elif codec in ELF_MAP_CODECS:
        apply_elf_map(old, patch, sink, declared, codec)
    elif codec == Codec.LZMA_PREFIX:
        from reup_receiver.format import lzmaprefix

        lzmaprefix.apply(old, patch, size, sink, exact=declared is not None)
    elif codec == Codec.ZSTD_PREFIX:
        d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        window = min(MAX_WINDOW, 1 << max(20, (len(old) + size).bit_length()))
        dctx = zstandard.ZstdDecompressor(dict_data=d, max_window_size=window)
        zstd_feed(dctx.decompressobj(), patch, sink)
    else:
        raise Unsupported(f"unknown codec {codec}")


def apply_elf_map(old: bytes | bytearray, patch: bytes | bytearray, sink: Sink, size: int | None = None,
                  codec: Codec = Codec.ELF_MAP) -> None:
    """ELF_MAP, ELF_MAP2 or ELF_SPLIT (format/elfmap.py); a bytearray base or patch is taken over
    and emptied, so neither the base nor the whole patch is held twice while the inner patch runs."""
    from reup_receiver.format import elfmap

    limit = MAX_WHOLE_OUTPUT if size is None else size
    if limit > MAX_WHOLE_OUTPUT:
        raise Oversized(f"patch output of {limit} bytes exceeds the receiver's limit")
    modes = {Codec.ELF_MAP: elfmap.MODES, Codec.ELF_MAP2: elfmap.MODES + elfmap.FILTERED_MODES,
             Codec.ELF_SPLIT: elfmap.MODES + elfmap.FILTERED_MODES + elfmap.SPLIT_MODES}[codec]
    elfmap.apply(old, patch, lambda inner, o, p, n: _inner_bytes(inner, o, p, limit if n is None else n),
                 sink, size, modes)


def _bz2_bounded(data: bytes, limit: int) -> bytes:
    import bz2

    d = bz2.BZ2Decompressor()
    out = d.decompress(data, max_length=limit + 1)
    if len(out) > limit:
        raise Oversized("bsdiff block larger than its file")
    return out


def _bsdiff4_bounded(old: bytes, patch: bytes, size: int) -> bytes:
    """bsdiff4's format, read with every block bounded by the declared output size."""
    import bsdiff4.core

    if len(patch) < 32 or patch[:7] != b"BSDIFF4":
        raise Corrupt("not a bsdiff4 patch")
    len_ctrl, len_diff, len_new = (bsdiff4.core.decode_int64(patch[i : i + 8]) for i in (8, 16, 24))
    if len_new != size or not 0 <= len_ctrl <= len(patch) - 32 or not 0 <= len_diff <= len(patch) - 32 - len_ctrl:
        raise Corrupt(f"bsdiff4 patch declares {len_new} bytes, its entry {size}")
    ctrl = _bz2_bounded(patch[32 : 32 + len_ctrl], 24 * (size + 1))
    diff = _bz2_bounded(patch[32 + len_ctrl : 32 + len_ctrl + len_diff], size)
    extra = _bz2_bounded(patch[32 + len_ctrl + len_diff :], size)
    if len(ctrl) % 24:
        raise Corrupt("bsdiff4 patch: bad control block")
    result: bytes = bsdiff4.core.patch(old, len_new, ctrl, diff, extra)
    return result


# What an ELF codec's inner patch may be: a plain patch codec, never another ELF codec.
_INNER_CODECS = frozenset(int(c) for c in PATCH_CODECS if c not in (Codec.ELF_X86, *ELF_MAP_CODECS))


def _apply_inner(inner: int, old: bytes, patch: bytes, size: int) -> bytearray:
    """ELF_X86's inner patch: any other patch codec, into memory (the caller bounds the size)."""
    if inner not in _INNER_CODECS:
        raise Corrupt(f"elf-x86 patch: bad inner codec {inner}")
    sink = MemorySink()
    apply_patch(Codec(inner), old, patch, sink, size)
    return sink.out


class _KeepSink:
    """Keeps what an inner codec writes without copying a single buffer (ELF_MAP's inner patch)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(data)
        return len(data)

    def result(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


def _inner_bytes(inner: int, old: bytes, patch: bytes, size: int) -> bytes:
    """ELF_MAP's inner patch: any other patch codec, as one bytes object (no second copy)."""
    if inner not in _INNER_CODECS:
        raise Corrupt(f"elf-map patch: bad inner codec {inner}")
    sink = _KeepSink()
    apply_patch(Codec(inner), old, patch, sink, size)
    return sink.result()
