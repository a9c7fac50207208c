"""Freed host memory kept for the next tile: glibc's heap told not to hand it back to the OS.

Every tile allocates the same tensors again. By default glibc serves large allocations with
``mmap`` (at first over 128 KiB, then over the largest freed so far, up to 32 MiB) and returns
the top of its heap to the OS once more than twice that is free, so a tile's tensors come back as
fresh pages that the kernel must fault in and zero at first touch: measured on this project's
2-core build machine (2026-12-03), a 2-thread tiled inference of four convolution blocks on
192 px tiles faulted in ~7,000 pages per step, 12-20 ms of 44 ms, while the same ops replayed
back to back faulted none; a 100 MB tensor product took 32-42 ms on fresh pages, 7 ms on reused
ones. A GPU's caching allocator keeps freed blocks for the same reason.

``keep`` (called by the tile interpreter before it runs tiles on the CPU) raises glibc's mmap
threshold to 1 GiB and its trim threshold to 2 GiB, once per process, so that tensors up to 1 GiB
come from the heap and up to 2 GiB of free heap stays mapped: the process's resident memory stays
near its peak instead of shrinking between tiles (``release`` hands the free memory back). It
does nothing where the allocator is not glibc's, where the user tuned it (any ``MALLOC_*_``
variable or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``), or with
``BIGPICTURE_HOST_HEAP=system``. ``policy()`` says which applies; a calibration records it, as
times measured under one policy hold for runs under the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 2**30
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_state: dict = {"kept": None}  # None: not asked yet; then True / False


def _libc():
    """glibc, or None on other C libraries and systems."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # musl and others: no gnu_get_libc_version, other mallopt semantics
    return libc


def policy() -> str:
    """``"kept"`` where ``keep`` applies (or has applied) here, else why not: ``"system"`` (turned off
    with BIGPICTURE_HOST_HEAP=system, or glibc refused the settings), ``"user"`` (malloc tuned by
    the environment), ``"other"`` (not glibc)."""
    if _state["kept"] is not None:  # asked already: what happened
        return "kept" if _state["kept"] else _why_not()
    return _why_not() or "kept"


def _why_not() -> str:
    """Why ``keep`` does not apply here (see ``policy``), or "" where it would, or "system" where
    it was tried and glibc refused."""
    setting = os.environ.get("BIGPICTURE_HOST_HEAP", "kept").strip().lower()
    if setting not in ("kept", "system"):
        raise ValueError(f"BIGPICTURE_HOST_HEAP={setting!r}: use 'kept' (the default) or 'system'")
    if setting == "system":
        return "system"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(v in os.environ for v in _USER_VARIABLES) or "glibc.malloc" in tunables:
        return "user"
    if _libc() is None:
        return "other"
    return "system" if _state["kept"] is False else ""


def keep() -> bool:
    """Keep freed host memory for reuse (see the module); True where it applies. Once per process."""
    if _state["kept"] is None:
        libc = _libc() if not _why_not() else None
        _state["kept"] = bool(
            libc is not None
            and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    return _state["kept"]


def release() -> None:
    """Hand the heap's free memory back to the OS now (``malloc_trim``), e.g. after a run, before
    other work that needs the host's memory. Nothing where the allocator is not glibc's."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
