"""How the C heap holds the engine's temporaries: reused while a run needs them, given back to
the operating system before the largest.

glibc keeps the pages of freed heap blocks mapped for reuse (only the top of the heap is
returned by itself). A propagation frees tens of megabytes of encoder temporaries per slice
among long-lived small objects, so those freed pages pile up between them: on the benchmark's
ViT-B paper run the heap's free part grew from 116 to 289 MiB over 20 slices while the memory
in use stayed at 0.98 GiB, and the resident memory grew with it. ``malloc_trim`` hands the free
pages back; touching them again later costs a page fault each.

The opposite happens in SAM decoding: each prompt set allocates 20-30 MB of 1-8 MB temporaries
(image-sized token matrices, the upscaled mask) and frees them. glibc's dynamic rule sets the
top-of-heap trim threshold to twice the largest block it has freed back to the system, here
8-16 MiB, so the free top left by each prompt set was handed back, and the next prompt set
faulted the same pages in again, zero-filled: about 4,700 page faults per prompt set (ViT-B,
2 CPU cores; 29-37 ms per set with them, 23.5-25.5 ms without).
:func:`reuse_freed_heap_blocks` fixes both thresholds at the values that rule reaches at most
(32 MiB for serving a block from the heap, 64 MiB of free top kept), so those temporaries
reuse the same resident pages.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Optional

__all__ = ["return_free_heap", "reuse_freed_heap_blocks", "user_chose_heap_settings", "MMAP_THRESHOLD",
           "TRIM_THRESHOLD", "KEEP_MALLOC_DEFAULTS"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest values glibc's dynamic rule reaches on 64-bit systems: blocks up to 32 MiB from
# the heap (DEFAULT_MMAP_THRESHOLD_MAX), and twice that of free top kept before trimming.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
# Set to 1: leave glibc's own (dynamic) thresholds alone, e.g. to measure a flow as published.
KEEP_MALLOC_DEFAULTS = "PROTOSAM_MALLOC_DEFAULTS"
# Where a user or a deployment already chose glibc's malloc settings, those stay.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    """glibc, loaded once; None where the C library is not glibc (not Linux, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def return_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim(0)``, a few
    milliseconds); whether this C library can (False elsewhere, where nothing is done)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def user_chose_heap_settings(environ=os.environ) -> bool:
    """Whether the environment sets glibc's mmap or trim threshold (``MALLOC_*_`` variables or
    ``GLIBC_TUNABLES``) or asks for glibc's defaults (``PROTOSAM_MALLOC_DEFAULTS=1``): then the
    process keeps what its user chose."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(KEEP_MALLOC_DEFAULTS, "").strip() == "1":
        return True
    return any(name in environ for name in _USER_SETTINGS) or any(name in tunables for name in _USER_TUNABLES)


def reuse_freed_heap_blocks() -> bool:
    """Fix glibc's mmap and trim thresholds at :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD`
    for this process, so temporaries of up to 32 MiB freed and allocated again (SAM decoding's,
    per prompt set) reuse resident pages instead of faulting fresh ones in (see the module's
    notes). Process-wide (calling it again changes nothing); :func:`return_free_heap` still
    gives every free page back where the engine calls it. Returns whether the thresholds were
    set: False on other C libraries, and where the environment already sets them
    (:func:`user_chose_heap_settings`)."""
    libc = _libc()
    if libc is None or user_chose_heap_settings():
        return False
    # The mmap threshold first: setting either one ends glibc's dynamic rule, which would
    # otherwise leave the other where that rule had it.
    mmap_set = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return mmap_set and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
