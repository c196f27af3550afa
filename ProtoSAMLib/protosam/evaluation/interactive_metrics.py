"""Scores of the CVPR 2025 interactive challenge: DSC, NSD at 2 mm, their areas under the
click curve, and the time budget.

Definitions (from the challenge's ``CVPR25_iter_eval.py`` at commit 748e862, re-implemented):

* **DSC** of a class: ``2 |P & G| / (|P| + |G|)``; of a case: the mean over the classes of
  the ground truth (background 0 excluded).
* **NSD** of a class: the normalized surface Dice of DeepMind's ``surface-distance`` (surface
  elements weighted by their area, with the voxel spacing in mm) at a 2 mm tolerance; of a
  case: the mean over classes, and 0 when the case's DSC is 0.2 or lower (the challenge does
  not compute it then). Here it is computed by MONAI's ``compute_surface_dice`` with
  ``use_subvoxels=True``, which implements the same surface-element areas.
* **DSC_AUC / NSD_AUC**: the trapezoidal area under the scores after the five clicks (the box
  step is left out because the box is optional), with unit spacing: four intervals, so the
  largest value is 4.
* **Time**: seconds per step; the budget is 90 s per class for all steps of a case together.

Per-class rows apply the NSD rule to the class's own DSC (the challenge only reports cases).
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import numpy as np

from ..errors import InputError

#: NSD tolerance of the challenge, in mm.
NSD_TOLERANCE_MM = 2.0
#: A case whose mean DSC is at most this gets NSD 0 (not computed).
NSD_MIN_DSC = 0.2
#: Number of simulated clicks after the (optional) box.
CHALLENGE_CLICKS = 5
#: Time budget per class, over all steps of a case, in seconds.
SECONDS_PER_CLASS = 90.0


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """DSC of two binary masks; NaN when both are empty (as the challenge's definition)."""
    prediction = np.asarray(prediction) != 0
    truth = np.asarray(truth) != 0
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int((prediction & truth).sum()) / total


def _compute_surface_dice():
    try:
        from monai.metrics import compute_surface_dice
    except ImportError:  # pragma: no cover - the evaluation extra installs it
        raise InputError("The normalized surface Dice needs MONAI: pip install 'protosam[evaluation]' "
                         "(or pip install monai).") from None
    return compute_surface_dice


def surface_dice(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                 tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalized surface Dice of two binary 3-D masks at ``tolerance_mm``; ``spacing`` in mm
    per array axis. 0 when exactly one mask is empty, NaN when both are."""
    import torch

    prediction = np.asarray(prediction) != 0
    truth = np.asarray(truth) != 0
    if prediction.shape != truth.shape or prediction.ndim != 3:
        raise ValueError(f"NSD needs two 3-D masks of one shape: {prediction.shape} vs {truth.shape}.")
    spacing = tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1))
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise InputError(f"The voxel spacing must be three positive numbers (mm), got {spacing}.")
    if not prediction.any() and not truth.any():
        return float("nan")
    if not prediction.any() or not truth.any():
        return 0.0
    compute = _compute_surface_dice()
    with warnings.catch_warnings():
        # MONAI warns about one of its own internal arguments (deprecated since 1.5).
        warnings.simplefilter("ignore", FutureWarning)
        value = compute(torch.from_numpy(prediction[None, None]), torch.from_numpy(truth[None, None]),
                        class_thresholds=[float(tolerance_mm)], include_background=True, spacing=spacing,
                        use_subvoxels=True)
    return float(value.reshape(-1)[0])


def class_scores(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """DSC and NSD of one class; NSD 0 when its DSC is at most 0.2 (the case rule per class)."""
    dsc = dice(prediction, truth)
    nsd = surface_dice(prediction, truth, spacing) if dsc > NSD_MIN_DSC else 0.0
    return {"dsc": dsc, "nsd": nsd}


def case_scores(prediction_labels: np.ndarray, truth_labels: np.ndarray, spacing: Sequence[float],
                classes: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """The challenge's scores of one step on label volumes: mean DSC over the classes, and
    mean NSD over the classes when that DSC is above 0.2 (else 0)."""
    prediction_labels = np.asarray(prediction_labels)
    truth_labels = np.asarray(truth_labels)
    if classes is None:
        classes = [int(c) for c in np.unique(truth_labels) if c != 0]
    dsc = float(np.mean([dice(prediction_labels == c, truth_labels == c) for c in classes]))
    if dsc > NSD_MIN_DSC:
        nsd = float(np.mean([surface_dice(prediction_labels == c, truth_labels == c, spacing) for c in classes]))
    else:
        nsd = 0.0
    return {"dsc": dsc, "nsd": nsd}


def scores_from_classes(per_class: Sequence[Dict[str, float]], nsd_per_class: Sequence[float]) -> Dict[str, float]:
    """Case scores from per-class DSCs and raw per-class NSDs (computed whatever the DSC):
    the same numbers :func:`case_scores` gives when the classes do not overlap."""
    dsc = float(np.mean([row["dsc"] for row in per_class]))
    nsd = float(np.mean(nsd_per_class)) if dsc > NSD_MIN_DSC else 0.0
    return {"dsc": dsc, "nsd": nsd}


def click_auc(values: Sequence[float], clicks: int = CHALLENGE_CLICKS) -> float:
    """Trapezoidal area (unit spacing) under the last ``clicks`` values, i.e. the scores after
    each click; the box step before them does not count."""
    values = [float(v) for v in values]
    if len(values) < clicks or clicks < 2:
        raise ValueError(f"The AUC needs the scores of {clicks} click steps, got {len(values)} values.")
    tail = values[-clicks:]
    return float(sum((a + b) / 2.0 for a, b in zip(tail[:-1], tail[1:])))


def time_budget(classes: int) -> float:
    """Seconds allowed for all steps of a case with ``classes`` classes."""
    return SECONDS_PER_CLASS * int(classes)
