"""Checks on user arrays, with messages that say what to do."""
from __future__ import annotations

import numpy as np

from .errors import InputError

__all__ = ["as_float_slices", "as_binary_mask", "check_finite"]


def check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(
            f"{name} contains {bad} NaN or infinite values: fill or mask them (e.g. replace with the "
            "background intensity) before segmenting."
        )


def as_float_slices(array, name: str, ndim: int) -> np.ndarray:
    """Return ``array`` as C-contiguous float32 with exactly ``ndim`` dims, finite values."""
    array = np.asarray(array)
    if array.ndim != ndim:
        what = "one 2-D slice (H x W)" if ndim == 2 else ("a stack of 2-D slices (N x H x W)" if ndim == 3 else f"{ndim}-D")
        raise InputError(f"{name} must be {what}; got an array of shape {array.shape}.")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise InputError(f"{name} must hold real numbers; got dtype {array.dtype}.")
    if min(array.shape) == 0:
        raise InputError(f"{name} is empty (shape {array.shape}).")
    if np.issubdtype(array.dtype, np.floating):
        check_finite(array, name)
    with np.errstate(over="ignore"):  # overflow is reported below, with advice
        converted = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(converted).all():
        raise InputError(
            f"{name} has intensities beyond the float32 range (|value| > 3.4e38): rescale the image first."
        )
    return converted


def as_binary_mask(array, name: str, shape) -> np.ndarray:
    """Return a bool mask of ``shape``; any non-zero value counts as foreground."""
    array = np.asarray(array)
    if array.shape != tuple(shape):
        raise InputError(f"{name} has shape {array.shape} but its image has shape {tuple(shape)}; they must match.")
    if np.issubdtype(array.dtype, np.floating):
        check_finite(array, name)
    return array != 0
