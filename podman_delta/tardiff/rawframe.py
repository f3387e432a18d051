"""zstd frames with uncompressed literals, for op 5 (ZSTD_DICT).

An op-5 payload is a zstd frame inside the op stream, and the op stream is compressed again as
a whole. A normal frame Huffman-codes its literals, which makes them opaque to that outer
compressor: a string that a frame emits as literal cannot be matched against the same string
elsewhere in the stream. A frame whose literals are stored raw leaves that redundancy to the
outer compressor, which sees the whole stream. Measured on the benchmark corpus: 0.5 % smaller
deltas for a Python app update and an OS major update, with the same frames' content.

Any zstd decoder reads such frames (raw literals are an ordinary block type), so Go tar-patch
applies them unchanged. python-zstandard does not expose the literal compression mode, so the
frame is made by the system libzstd through ctypes; when libzstd cannot be loaded,
:func:`compress` returns None and the caller makes a normal frame.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# zstd.h parameter and enum values (stable since zstd 1.4.0; the literal mode is the
# experimental parameter 5, ``ZSTD_c_literalCompressionMode``).
_C_LEVEL = 100
_C_WINDOW_LOG = 101
_C_CONTENT_SIZE = 200
_C_CHECKSUM = 201
_C_LITERAL_MODE = 1002
_PS_DISABLE = 2  # ZSTD_ps_disable: literals are always stored uncompressed
_DLM_BY_REF = 1
_DCT_RAW_CONTENT = 1


def _typed(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> None:
    """Declare a libzstd function's C signature, so ctypes passes sizes and pointers right."""
    func = getattr(lib, name)
    func.restype = restype
    func.argtypes = list(argtypes)


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The system libzstd with the few functions used here typed, or None."""
    name = ctypes.util.find_library("zstd")
    if name is None:
        return None
    ptr, size, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    try:
        lib = ctypes.CDLL(name)
        _typed(lib, "ZSTD_versionNumber", ctypes.c_uint)
        if lib.ZSTD_versionNumber() < 10400:  # the parameter numbers above need 1.4
            return None
        _typed(lib, "ZSTD_createCCtx", ptr)
        _typed(lib, "ZSTD_freeCCtx", size, ptr)
        _typed(lib, "ZSTD_CCtx_setParameter", size, ptr, c_int, c_int)
        _typed(
            lib, "ZSTD_CCtx_loadDictionary_advanced", size, ptr, ctypes.c_char_p, size, c_int, c_int
        )
        _typed(lib, "ZSTD_compress2", size, ptr, ptr, size, ctypes.c_char_p, size)
        _typed(lib, "ZSTD_compressBound", size, size)
        _typed(lib, "ZSTD_isError", ctypes.c_uint, size)
    except (OSError, AttributeError) as exc:
        log.debug("libzstd unusable (%s): op-5 frames keep compressed literals", exc)
        return None
    return lib


def available() -> bool:
    """Whether raw-literal frames can be made on this machine."""
    return _lib() is not None


def compress(data: bytes, dictionary: bytes, level: int, window_log: int) -> bytes | None:
    """A zstd frame of ``data`` with ``dictionary`` as raw-content dictionary, literals raw.

    The frame records neither the content size nor a checksum, like the differ's other op-5
    frames (the size is random bytes to the outer compressor: 2.6 bytes a frame). Returns
    None when libzstd is unavailable or refuses a parameter (the caller falls back).
    """
    lib = _lib()
    if lib is None:
        return None
    cctx = lib.ZSTD_createCCtx()
    if not cctx:
        return None
    try:
        for param, value in (
            (_C_LEVEL, level),
            (_C_WINDOW_LOG, window_log),
            (_C_CONTENT_SIZE, 0),
            (_C_CHECKSUM, 0),
            (_C_LITERAL_MODE, _PS_DISABLE),
        ):
            if lib.ZSTD_isError(lib.ZSTD_CCtx_setParameter(cctx, param, value)):
                return None
        if lib.ZSTD_isError(
            lib.ZSTD_CCtx_loadDictionary_advanced(
                cctx, dictionary, len(dictionary), _DLM_BY_REF, _DCT_RAW_CONTENT
            )
        ):
            return None
        capacity = lib.ZSTD_compressBound(len(data))
        out = ctypes.create_string_buffer(capacity)
        n = lib.ZSTD_compress2(cctx, out, capacity, data, len(data))
        if lib.ZSTD_isError(n):
            return None
        return out.raw[:n]
    finally:
        lib.ZSTD_freeCCtx(cctx)
