"""Keep freed memory in the process while a propagation runs (Linux / glibc only).

Why: on a CPU, PyTorch gets every tensor from ``malloc``. glibc serves blocks above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps them on ``free``, so each large
intermediate (an MLP's hidden activations, a SAM attention map of 64 MiB per head) is
page-faulted and zero-filled by the kernel again on every layer of every slice. Measured on
this project's 2-core benchmark machine, that kernel work is a third of SAM ViT-B's encoder time
(7.3 of 22.5 CPU seconds per slice).

:func:`reuse_freed_memory` switches glibc to serve every block from its heap and not to
return freed memory to the system while a run is in progress, so the same pages are reused
from slice to slice. Arithmetic is untouched (results are bit-identical); only where the
bytes live changes. On exit the defaults are restored and ``malloc_trim`` hands the freed
pages back, so a long-lived host (3D Slicer) does not keep the run's peak memory.

It is process-wide (``mallopt``); nested and concurrent runs are reference-counted. Set the
environment variable ``PROTOSAM_REUSE_FREED_MEMORY=0`` to leave the allocator alone. Other C
libraries (macOS, Windows, musl) are left alone too.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import threading
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

__all__ = ["reuse_freed_memory", "reusing_freed_memory", "freed_memory_reuse_available"]

# mallopt parameters and glibc's defaults (malloc/malloc.c).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
# mallopt takes a C int: the largest trim threshold it can express (2 GiB - 1).
_KEEP_ALL_FREED = 2**31 - 1

_lock = threading.Lock()
_active_runs = 0
_libc: Optional[ctypes.CDLL] = None
_libc_checked = False


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc, _libc_checked
    if not _libc_checked:
        _libc_checked = True
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.mallopt.restype = ctypes.c_int
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.malloc_trim.restype = ctypes.c_int
                _libc = libc
            except (OSError, AttributeError) as error:  # a stripped or unusual libc
                logger.debug("glibc allocator tuning unavailable: %s", error)
    return _libc


def _enabled_by_environment() -> bool:
    return os.environ.get("PROTOSAM_REUSE_FREED_MEMORY", "1").strip().lower() not in ("0", "false", "no", "off")


def freed_memory_reuse_available() -> bool:
    """True where :func:`reuse_freed_memory` changes anything (glibc, not disabled)."""
    return _enabled_by_environment() and _glibc() is not None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Serve large blocks from the heap and keep freed ones for reuse until the block ends.

    Yields whether the allocator was tuned (False on non-glibc systems or when disabled).
    """
    global _active_runs
    libc = _glibc() if _enabled_by_environment() else None
    if libc is None:
        yield False
        return
    with _lock:
        _active_runs += 1
        if _active_runs == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL_FREED)
    try:
        yield True
    finally:
        with _lock:
            _active_runs -= 1
            if _active_runs == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def reusing_freed_memory(function: Callable) -> Callable:
    """Decorator: run ``function`` inside :func:`reuse_freed_memory`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with reuse_freed_memory():
            return function(*args, **kwargs)

    return wrapper
