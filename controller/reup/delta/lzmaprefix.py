"""Encoder of LZMA_PREFIX (reup_receiver.format.lzmaprefix): liblzma with a preset dictionary.

Python's lzma module has no preset dictionary, so this calls liblzma through ctypes
(`lzma_raw_buffer_encode` with `lzma_options_lzma.preset_dict`): the library the
standard module is built on, already loaded by `import lzma`, so opening it by its
soname finds it. With a preset dictionary liblzma's LZMA2 encoder starts with a
chunk that resets the state but not the dictionary, which is what the receiver's
trick needs. `AVAILABLE` is False when the library cannot be found; the codec is
then not offered. Called by reup.delta.codecs.
"""

from __future__ import annotations

import ctypes
import lzma

from reup_receiver.format import lzmaprefix
from reup_receiver.format.wire import put_varint

_FILTER_LZMA2 = 0x21
_VLI_UNKNOWN = 2**64 - 1
PRESET = 6  # measured on libzstd 1.5.5 -> 1.5.6: as small as 9e (the dictionary is set here anyway), twice as fast


class _Options(ctypes.Structure):
    """lzma_options_lzma (lzma/lzma12.h), reserved fields included."""

    _fields_ = [("dict_size", ctypes.c_uint32), ("preset_dict", ctypes.c_void_p),
                ("preset_dict_size", ctypes.c_uint32), ("lc", ctypes.c_uint32), ("lp", ctypes.c_uint32),
                ("pb", ctypes.c_uint32), ("mode", ctypes.c_int), ("nice_len", ctypes.c_uint32),
                ("mf", ctypes.c_int), ("depth", ctypes.c_uint32), ("reserved_int", ctypes.c_uint32 * 8),
                ("reserved_enum", ctypes.c_int * 4), ("reserved_ptr", ctypes.c_void_p * 2)]


class _Filter(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("options", ctypes.c_void_p)]


def _load() -> ctypes.CDLL | None:
    assert lzma.FILTER_LZMA2 == _FILTER_LZMA2  # the standard module loaded liblzma
    for name in ("liblzma.so.5", "liblzma.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.lzma_lzma_preset.argtypes = [ctypes.POINTER(_Options), ctypes.c_uint32]
        lib.lzma_lzma_preset.restype = ctypes.c_int
        lib.lzma_raw_buffer_encode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                               ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t]
        lib.lzma_raw_buffer_encode.restype = ctypes.c_int
        return lib
    return None


_LIB = _load()
AVAILABLE = _LIB is not None


def pack(old: bytes, new: bytes) -> bytes:
    """The LZMA_PREFIX patch: dictionary size, then raw LZMA2 of `new` with `old` preloaded."""
    if _LIB is None:
        raise RuntimeError("liblzma not found")
    opts = _Options()
    if _LIB.lzma_lzma_preset(ctypes.byref(opts), PRESET):
        raise RuntimeError("lzma_lzma_preset failed")
    dsize = lzmaprefix.dict_size(len(old), len(new))
    opts.dict_size = dsize
    preset = ctypes.create_string_buffer(old, len(old))
    opts.preset_dict = ctypes.cast(preset, ctypes.c_void_p)
    opts.preset_dict_size = len(old)
    filters = (_Filter * 2)(_Filter(_FILTER_LZMA2, ctypes.cast(ctypes.pointer(opts), ctypes.c_void_p)),
                            _Filter(_VLI_UNKNOWN, None))
    cap = len(new) + len(new) // 16 + (1 << 16)  # LZMA2 falls back to stored chunks: bounded growth
    out = ctypes.create_string_buffer(cap)
    written = ctypes.c_size_t(0)
    ret = _LIB.lzma_raw_buffer_encode(filters, None, new, len(new), out, ctypes.byref(written), cap)
    if ret:
        raise RuntimeError(f"lzma_raw_buffer_encode: error {ret}")
    head = bytearray()
    put_varint(head, dsize)
    return bytes(head) + out.raw[: written.value]
