"""Overlap metrics used by the ProtoSAM and SSL-ALPNet evaluation scripts.

Two Dice definitions are reported, because the two reference scripts disagree:

* **2-D Dice** (ProtoSAM's ``validation_protosam.py``): Dice of every slice that contains the
  structure in the ground truth, then the plain mean over all those slices (pooled over all
  query scans). Slices without the structure are not evaluated at all.
* **3-D Dice** (SSL-ALPNet's ``Metric.get_mDice``): true/false positives and false negatives
  are summed over the evaluated slices of one scan, Dice is computed once per scan, then the
  mean over scans is taken.

Masks are numpy arrays of any integer/bool dtype; non-zero means foreground. Volumes are
indexed so that ``axis`` is the slice axis (axis 0 for SimpleITK ``GetArrayFromImage``
arrays, i.e. KJI order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class OverlapCounts:
    """Voxel counts of one comparison: true positives, false positives, false negatives."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: "OverlapCounts") -> "OverlapCounts":
        return OverlapCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def dice(self, empty: float = 1.0) -> float:
        """``2 tp / (2 tp + fp + fn)``; ``empty`` when both masks are empty (0 / 0)."""
        denominator = 2 * self.tp + self.fp + self.fn
        if denominator == 0:
            return float(empty)
        return 2.0 * self.tp / denominator


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be a numeric or boolean array, got dtype {array.dtype}")
    return array != 0


def _checked_pair(pred: np.ndarray, gt: np.ndarray):
    pred_b = _binary(pred, "pred")
    gt_b = _binary(gt, "gt")
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"pred and gt shapes differ: {pred_b.shape} vs {gt_b.shape}")
    return pred_b, gt_b


def overlap_counts(pred: np.ndarray, gt: np.ndarray) -> OverlapCounts:
    """Count TP/FP/FN voxels of two same-shape masks (non-zero = foreground)."""
    pred_b, gt_b = _checked_pair(pred, gt)
    tp = int(np.count_nonzero(pred_b & gt_b))
    fp = int(np.count_nonzero(pred_b & ~gt_b))
    fn = int(np.count_nonzero(~pred_b & gt_b))
    return OverlapCounts(tp, fp, fn)


def dice_score(pred: np.ndarray, gt: np.ndarray, *, empty: float = 1.0) -> float:
    """Dice of two same-shape masks, in [0, 1]. Both empty gives ``empty`` (default 1)."""
    return overlap_counts(pred, gt).dice(empty=empty)


def slices_containing(mask_volume: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sorted indices (int64) along ``axis`` of the slices where the mask has foreground."""
    volume = _binary(mask_volume, "mask_volume")
    if volume.ndim != 3:
        raise ValueError(f"mask_volume must be 3-D, got shape {volume.shape}")
    other_axes = tuple(a for a in range(3) if a != axis % 3)
    return np.flatnonzero(volume.any(axis=other_axes)).astype(np.int64)


def per_slice_dice(pred_volume: np.ndarray, gt_volume: np.ndarray, axis: int = 0,
                   slices: Iterable[int] | None = None) -> Dict[int, float]:
    """2-D Dice of each slice that contains the structure in ``gt_volume``.

    Returns ``{slice index: dice}`` in increasing slice order. ``slices`` restricts the
    evaluation further (only those of them that contain the structure are kept).
    """
    pred_b, gt_b = _checked_pair(pred_volume, gt_volume)
    if gt_b.ndim != 3:
        raise ValueError(f"volumes must be 3-D, got shape {gt_b.shape}")
    wanted = slices_containing(gt_b, axis)
    if slices is not None:
        wanted = np.intersect1d(wanted, np.asarray(list(slices), dtype=np.int64))
    result: Dict[int, float] = {}
    for index in wanted.tolist():
        result[int(index)] = dice_score(np.take(pred_b, index, axis=axis),
                                        np.take(gt_b, index, axis=axis))
    return result


def mean_or_nan(values: Iterable[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence (no evaluated slices or scans)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan
    return float(np.mean(values))


def std_or_nan(values: Iterable[float]) -> float:
    """Population standard deviation (numpy default, as the reference scripts); NaN if empty."""
    values = [float(v) for v in values]
    if not values:
        return math.nan
    return float(np.std(values))


def scan_dice_3d(pred_volume: np.ndarray, gt_volume: np.ndarray, axis: int = 0,
                 slices: Sequence[int] | None = None) -> float:
    """3-D Dice of one scan: counts summed over ``slices`` (all slices when None).

    The SSL-ALPNet script sums over the slices inside the query's ground-truth extent
    ``[z_min, z_max]``; pass ``slices=range(z_min, z_max + 1)`` for that definition.
    An empty prediction and an empty ground truth give 1.0.
    """
    pred_b, gt_b = _checked_pair(pred_volume, gt_volume)
    if slices is not None:
        index = np.asarray(list(slices), dtype=np.int64)
        pred_b = np.take(pred_b, index, axis=axis)
        gt_b = np.take(gt_b, index, axis=axis)
    return overlap_counts(pred_b, gt_b).dice()


@dataclass(frozen=True)
class OutsideFalsePositives:
    """Foreground predicted where the ground truth has none along the slice axis.

    ``slices_outside_extent``: predicted slices before the first or after the last GT slice;
    ``voxels_outside_extent``: predicted voxels on those slices;
    ``slices_without_structure``: predicted slices among all GT-empty slices (gaps included).
    """

    slices_outside_extent: int
    voxels_outside_extent: int
    slices_without_structure: int
    first_gt_slice: int
    last_gt_slice: int


def outside_false_positives(pred_volume: np.ndarray, gt_volume: np.ndarray,
                            axis: int = 0) -> OutsideFalsePositives:
    """False positives on slices outside the structure (see :class:`OutsideFalsePositives`).

    If the ground truth is empty, every predicted slice counts as outside and the extent is
    reported as ``(-1, -1)``.
    """
    pred_b, gt_b = _checked_pair(pred_volume, gt_volume)
    if gt_b.ndim != 3:
        raise ValueError(f"volumes must be 3-D, got shape {gt_b.shape}")
    other_axes = tuple(a for a in range(3) if a != axis % 3)
    gt_slices = gt_b.any(axis=other_axes)
    pred_voxels = pred_b.sum(axis=other_axes)
    if gt_slices.any():
        present = np.flatnonzero(gt_slices)
        first, last = int(present[0]), int(present[-1])
    else:
        first = last = -1
    index = np.arange(gt_slices.size)
    outside = (index < first) | (index > last) if first >= 0 else np.ones_like(gt_slices)
    return OutsideFalsePositives(
        slices_outside_extent=int(np.count_nonzero(outside & (pred_voxels > 0))),
        voxels_outside_extent=int(pred_voxels[outside].sum()),
        slices_without_structure=int(np.count_nonzero(~gt_slices & (pred_voxels > 0))),
        first_gt_slice=first,
        last_gt_slice=last,
    )
