"""Raw LZMA2 with a preset dictionary, through liblzma itself (ctypes).

Python's `lzma` module cannot give the LZMA2 encoder a preset dictionary, but
liblzma can (`lzma_options_lzma.preset_dict`). Such a stream starts with a
chunk that resets state and properties but not the dictionary, so a standard
decoder that first receives the dictionary as LZMA2 *uncompressed* chunks
decodes it; that is what the receiver does (reup_receiver.format.lzmaprefix), with
nothing but the standard library. The library is the one Python's own `_lzma`
module loaded (found in /proc/self/maps), so no new dependency; `available()`
is False where it cannot be found, and the encoder then keeps zstd.
Called by reup.delta.solid (SOLID_LZMA) and reup.delta.lzmaprefix (LZMA_PREFIX).
"""

from __future__ import annotations

import ctypes
import lzma
from functools import cache

_LZMA_FILTER_LZMA2 = 0x21
_VLI_UNKNOWN = (1 << 64) - 1
_FINISH = 3
_OK, _STREAM_END = 0, 1
_PRESET_EXTREME = 0x80000000


class _Filter(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("options", ctypes.c_void_p)]


class _OptionsLzma(ctypes.Structure):
    # liblzma 5.x layout; the reserved tail (ints, enums, pointers) is left zero as required.
    _fields_ = [("dict_size", ctypes.c_uint32), ("preset_dict", ctypes.c_void_p),
                ("preset_dict_size", ctypes.c_uint32), ("lc", ctypes.c_uint32), ("lp", ctypes.c_uint32),
                ("pb", ctypes.c_uint32), ("mode", ctypes.c_int), ("nice_len", ctypes.c_uint32),
                ("mf", ctypes.c_int), ("depth", ctypes.c_uint32), ("reserved", ctypes.c_uint8 * 128)]


class _Stream(ctypes.Structure):
    _fields_ = [("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_size_t), ("total_in", ctypes.c_uint64),
                ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_size_t), ("total_out", ctypes.c_uint64),
                ("allocator", ctypes.c_void_p), ("internal", ctypes.c_void_p),
                ("reserved", ctypes.c_uint8 * 128)]


@cache
def _lib() -> ctypes.CDLL | None:
    # `lzma` (imported above) has loaded the liblzma whose path /proc/self/maps now shows.
    assert lzma.FORMAT_RAW is not None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            paths = {line.split()[-1] for line in fh if "liblzma" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.lzma_lzma_preset.argtypes = [ctypes.POINTER(_OptionsLzma), ctypes.c_uint32]
        lib.lzma_lzma_preset.restype = ctypes.c_int
        lib.lzma_raw_encoder.argtypes = [ctypes.POINTER(_Stream), ctypes.POINTER(_Filter)]
        lib.lzma_raw_encoder.restype = ctypes.c_int
        lib.lzma_code.argtypes = [ctypes.POINTER(_Stream), ctypes.c_int]
        lib.lzma_code.restype = ctypes.c_int
        lib.lzma_end.argtypes = [ctypes.POINTER(_Stream)]
        lib.lzma_end.restype = None
        return lib
    return None


def available() -> bool:
    return _lib() is not None


PRESET_9E = 9 | _PRESET_EXTREME


def compress(data: bytes, preset_dict: bytes, dict_size: int, lc: int = 3, lp: int = 0, pb: int = 0,
             preset: int = PRESET_9E) -> bytes:
    """Raw LZMA2 (ending with its end marker) of `data`, with `preset_dict` already in the window."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("liblzma not found")
    opts = _OptionsLzma()
    if lib.lzma_lzma_preset(ctypes.byref(opts), preset):
        raise RuntimeError("lzma_lzma_preset failed")
    dict_buf = ctypes.create_string_buffer(preset_dict, len(preset_dict))
    opts.dict_size, opts.lc, opts.lp, opts.pb = dict_size, lc, lp, pb
    if preset_dict:
        opts.preset_dict = ctypes.cast(dict_buf, ctypes.c_void_p)
        opts.preset_dict_size = len(preset_dict)
    filters = (_Filter * 2)(_Filter(_LZMA_FILTER_LZMA2, ctypes.cast(ctypes.pointer(opts), ctypes.c_void_p)),
                            _Filter(_VLI_UNKNOWN, None))
    strm = _Stream()
    ret = lib.lzma_raw_encoder(ctypes.byref(strm), filters)
    if ret != _OK:
        raise RuntimeError(f"lzma_raw_encoder: {ret}")
    try:
        inbuf = ctypes.create_string_buffer(data, len(data))
        strm.next_in, strm.avail_in = ctypes.cast(inbuf, ctypes.c_void_p), len(data)
        out = bytearray()
        cap = max(1 << 16, len(data) // 2)
        outbuf = ctypes.create_string_buffer(cap)
        while True:
            strm.next_out, strm.avail_out = ctypes.cast(outbuf, ctypes.c_void_p), cap
            ret = lib.lzma_code(ctypes.byref(strm), _FINISH)
            out += outbuf.raw[: cap - strm.avail_out]
            if ret == _STREAM_END:
                return bytes(out)
            if ret != _OK:
                raise RuntimeError(f"lzma_code: {ret}")
    finally:
        lib.lzma_end(ctypes.byref(strm))
