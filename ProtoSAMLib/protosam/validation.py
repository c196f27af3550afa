"""Checks on user arrays, with messages that say what to do."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

from .errors import InputError

__all__ = ["as_float_slices", "as_binary_mask", "check_finite", "support_labels", "MAX_LABELS", "format_values",
           "MAX_LISTED"]

#: More distinct non-zero values than this in a support label map, with no labels picked, means
#: it is an intensity image (an MRI stored as integers has thousands): each label is a whole
#: propagation with its own mask volume, so thousands would run for days and take many GB.
MAX_LABELS = 255


#: How many values an error message lists before "... and N more".
MAX_LISTED = 10


def format_values(values: Sequence, limit: int = MAX_LISTED) -> str:
    """``values`` for a message: ``1, 2, 3``, or the first ``limit`` and how many more
    (``1, 2, ..., 10 and 19,990 more``), so that a long list never makes a huge line."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    if len(values) > limit:
        shown += f" ... and {len(values) - limit:,} more"
    return shown


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


def _is_whole(values: np.ndarray) -> bool:
    return not np.issubdtype(values.dtype, np.floating) or bool(np.array_equal(values, np.round(values)))


def _looks_like_image(values: np.ndarray) -> bool:
    return len(values) > MAX_LABELS or not _is_whole(values)


def support_labels(labelmap: np.ndarray, requested: Optional[Sequence[int]], *, mask_option: str,
                   mask_path: str, image_option: str, max_value: int,
                   image_values: Optional[Callable[[], np.ndarray]] = None) -> List[int]:
    """The labels to propagate from a support label map, checked before any model is loaded.

    Only ``np.unique`` of the map is computed (no per-label volumes), so a wrong file is
    refused at once.

    Args:
        labelmap: the support label map (any shape, integer or float dtype).
        requested: labels the user picked (``--labels``), or None for every label present.
        mask_option, mask_path: command-line name and value of the label map, for messages.
        image_option: command-line name of the image the labels were drawn on, for messages.
        max_value: the largest label value the output can hold.
        image_values: returns ``np.unique`` of the support image; called only to word the message
            when the label map looks like an image (to tell a swap from a wrong file).
    Returns:
        The labels, in the user's order (sorted when all are taken).
    Raises:
        InputError: non-integer values, too many labels with none picked (an image rather than
            a label map), no label, a requested label absent, or a label above ``max_value``.
    """
    values = np.unique(labelmap)
    positive = values[values > 0]
    whole = _is_whole(positive)
    if not whole or (requested is None and len(positive) > MAX_LABELS):
        what = ("has values that are not whole numbers" if not whole
                else f"has {len(positive):,} distinct values (more than {MAX_LABELS} labels)")
        message = f"{mask_option} {mask_path} {what}: it looks like an image, not a label map (0 = background, " \
                  "1, 2, ... = structures)."
        if image_values is not None and not _looks_like_image(image_values()):
            message += f" {image_option} looks like a label map: did you swap {image_option} and {mask_option}?"
        else:
            message += f" Check that {mask_option} names the label map."
        if whole:
            message += " If it really is a label map, pick the labels to propagate with --labels (e.g. --labels 1,2)."
        raise InputError(message)
    present = [int(v) for v in positive]
    if not present:
        raise InputError(f"{mask_option} {mask_path} is empty (no label above 0): paint the structure first.")
    labels = list(requested) if requested is not None else present
    present_set = set(present)
    missing = [label for label in labels if label not in present_set]
    if missing:
        raise InputError(f"Label(s) {format_values(missing)} do not occur in {mask_option} {mask_path}; it contains "
                         f"{format_values(present)}.")
    too_large = [label for label in labels if label > max_value]
    if too_large:
        raise InputError(
            f"Label(s) {format_values(too_large)} of {mask_option} {mask_path} are above {max_value}, the largest value the output "
            "label map can hold; renumber them, or pick others with --labels."
        )
    return labels
