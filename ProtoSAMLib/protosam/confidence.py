"""How sure a result is, per slice and per volume, from what the models already computed.

A review queue needs an order: which slices of which volumes a person should look at first.
No model is run for it. Each slice the engine propagated leaves three numbers behind
(:func:`slice_evidence`, taken in :func:`protosam.propagation.segment_volume` right after the
refiner ran) and the finished masks give a fourth; all four lie in ``[0, 1]``, 1 = sure:

``iou``
    The refiner's own predicted IoU of the mask(s) it chose (SAM's and MedSAM's IoU head),
    averaged over the slice's prompt sets and clipped to ``[0, 1]``.
``margin``
    ALPNet's prototype margin inside the result: the mean, over the refined mask's voxels, of
    ``p_fg - p_bg`` where ``(p_bg, p_fg)`` is the softmax of ALPNet's (background, foreground)
    prototype similarity scores; clipped below at 0 (voxels where the background prototypes
    win count against it). 1: every voxel of the result is clearly closer to the structure's
    prototypes than to the background's.
``agreement``
    Dice between the coarse mask (ALPNet's argmax) and the refined mask, both at the model
    input size: a refiner that had to move the boundary far is less to be trusted.
``neighbours``
    Dice between the slice's final mask and the more similar of its two adjacent slices'
    (only one at the volume's first and last slice): a blob unlike the slices on both sides is
    suspicious; a structure's first and last slice keep their inner neighbour.

The slice's score is the weighted mean ``sum(w_c * c) / sum(w_c)`` over the components it has,
with the weights :data:`WEIGHTS` (``iou`` 0.35, ``agreement`` 0.25, ``margin`` 0.2,
``neighbours`` 0.2; they sum to 1), so it lies in ``[0, 1]``. A component is missing only when
the refiner returned no IoU (then the other three are renormalised).

Which slices have a score: a structure's *extent* runs from the first to the last slice
where its result is not empty. Slices outside it have no score (``NaN``): they were either
never processed or found empty, and "nothing here" is not reviewed slice by slice. An empty
slice inside the extent (a hole in the structure) scores 0, so it is reviewed first. A slice
the user painted (the support itself, within one volume) scores 1.

In a correction session (:meth:`protosam.session.Session.confidence`) every *fixed* slice, one
the user painted or corrected (clicks, box, scribble, lasso, repaint), is user-confirmed: it
scores 1 like a painted slice, leaves the review queue and the structure's mean. A correction
changes one slice's mask, so only that slice and its two neighbours (whose ``neighbours``
component compares with it) are scored again (:func:`rescore_slices`); when the change is at
or beyond an end of the extent (the extent may move) every slice is. Undoing a slice's last
correction makes it propagated again: it gets back the score its evidence gives. An update
propagates again and scores every slice from the new evidence. The session scores each
structure's own mask (in an exclusive session, before voxels are given to one structure).

A structure's confidence is the mean score of its scored slices that were not painted (1 when
all of them were painted; 0 when nothing was found at all); a volume's is the lowest of its
structures' (a volume is as trustworthy as its worst structure).

These weights were chosen by reasoning, not fitted: calibrating them (and checking that a
low score does predict a low Dice) needs the pretrained weights and annotated volumes; with
random-weight test models the scores order slices but mean nothing absolute.

This module imports neither torch nor Slicer: :func:`slice_evidence` only calls methods of
the tensors it is given, so Slicer's process can use the ranking helpers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, Iterable, List, Mapping, Optional

import numpy as np

__all__ = ["WEIGHTS", "SliceEvidence", "slice_evidence", "evidence_array", "evidence_from_array", "combine",
           "slice_scores", "rescore_slices", "structure_score", "volume_score", "least_confident", "ReviewItem",
           "review_record"]

#: Weight of each component in a slice's score (they sum to 1).
WEIGHTS: Dict[str, float] = {"iou": 0.35, "agreement": 0.25, "margin": 0.2, "neighbours": 0.2}


@dataclass(frozen=True)
class SliceEvidence:
    """What the models computed on one propagated slice, each in ``[0, 1]`` (see the module
    docstring); ``iou`` is None when the refiner gave no predicted IoU."""

    iou: Optional[float]
    margin: float
    agreement: float


def evidence_array(evidence: Mapping[int, SliceEvidence], count: int) -> np.ndarray:
    """``[count, 3]`` float64 rows ``(iou, margin, agreement)`` of ``evidence`` (slice -> evidence),
    NaN where a slice has none (and ``iou`` NaN where the refiner gave none): the plain-array
    form that travels with a result (float64: the numbers come back exactly)."""
    rows = np.full((count, 3), np.nan, np.float64)
    for index, found in evidence.items():
        rows[int(index)] = (np.nan if found.iou is None else found.iou, found.margin, found.agreement)
    return rows


def evidence_from_array(rows) -> Dict[int, SliceEvidence]:
    """The inverse of :func:`evidence_array`: slice -> evidence for rows whose margin is a number."""
    rows = np.asarray(rows, np.float64)
    if rows.ndim != 2 or rows.shape[1] != 3:
        raise ValueError(f"slice evidence must be [N, 3] rows (iou, margin, agreement), got shape {rows.shape}")
    return {index: SliceEvidence(None if math.isnan(iou) else _clip(iou), _clip(margin), _clip(agreement))
            for index, (iou, margin, agreement) in enumerate(rows.tolist())
            if not (math.isnan(margin) or math.isnan(agreement))}


def _clip(value: float) -> float:
    return float(min(1.0, max(0.0, value)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (any shape, non-zero = in); 1 when both are empty."""
    a, b = np.asarray(a), np.asarray(b)
    # count_nonzero on bools: several times faster than sums (a session rescores at every click).
    a = a if a.dtype == bool else a > 0
    b = b if b.dtype == bool else b > 0
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def slice_evidence(logits, refined_mask, iou_scores) -> SliceEvidence:
    """The evidence of one slice: ``logits`` ``[2, S, S]`` ALPNet's (bg, fg) scores,
    ``refined_mask`` ``[S, S]`` bool the refiner's mask, ``iou_scores`` the refiner's predicted
    IoU of each prompt set's chosen mask (may be empty). Tensors or arrays; no copy to the host
    beyond three numbers."""
    scores = [float(s) for s in iou_scores if s is not None]
    iou = _clip(sum(scores) / len(scores)) if scores else None
    difference = logits[1] - logits[0]
    if hasattr(difference, "float"):  # a torch tensor: stay on its device
        difference, refined = difference.float(), refined_mask.bool()
    else:
        difference, refined = np.asarray(difference, np.float32), np.asarray(refined_mask) > 0
    coarse = difference > 0
    refined_count = float(refined.sum())
    total = refined_count + float(coarse.sum())
    agreement = 1.0 if total == 0 else 2.0 * float((coarse & refined).sum()) / total
    margin = 0.0
    if refined_count:
        inside = difference[refined] / 2
        # p_fg - p_bg of a two-way softmax is tanh of half the score difference.
        inside = inside.tanh() if hasattr(inside, "tanh") else np.tanh(inside)
        margin = _clip(float(inside.sum()) / refined_count)
    return SliceEvidence(iou, margin, _clip(agreement))


def combine(components: Mapping[str, Optional[float]]) -> float:
    """The weighted mean of the components present (None = missing), in ``[0, 1]``."""
    present = {name: value for name, value in components.items() if value is not None}
    weight = sum(WEIGHTS[name] for name in present)
    if not weight:
        return 0.0
    return _clip(sum(WEIGHTS[name] * float(value) for name, value in present.items()) / weight)


def neighbour_agreement(masks: np.ndarray, index: int) -> float:
    """Dice of slice ``index`` of ``masks`` ``[N, H, W]`` with the more similar adjacent slice."""
    values = [dice(masks[index], masks[other]) for other in (index - 1, index + 1) if 0 <= other < len(masks)]
    return max(values) if values else 1.0


def slice_scores(masks: np.ndarray, evidence: Mapping[int, SliceEvidence], painted: Iterable[int] = ()) -> np.ndarray:
    """Per-slice scores ``[N]`` float32 of one structure's final masks ``[N, H, W]`` (slices
    along axis 0): NaN outside the extent, 0 for holes, 1 for ``painted`` slices, otherwise
    :func:`combine` of the slice's ``evidence`` and its neighbour agreement."""
    masks = np.asarray(masks)
    count = masks.shape[0]
    scores = np.full(count, np.nan, np.float32)
    present = np.flatnonzero(masks.reshape(count, -1).any(axis=1))
    if not len(present):
        return scores
    painted = set(int(i) for i in painted)
    for index in range(int(present[0]), int(present[-1]) + 1):
        scores[index] = _slice_score(masks, index, evidence, painted)
    return scores


def _slice_score(masks: np.ndarray, index: int, evidence: Mapping[int, SliceEvidence], painted: set) -> float:
    """The score of slice ``index`` inside its structure's extent (:func:`slice_scores`)."""
    if index in painted:
        return 1.0
    if not masks[index].any():
        return 0.0
    found = evidence.get(index)
    components = {"neighbours": neighbour_agreement(masks, index)}
    if found is not None:
        components.update(iou=found.iou, margin=found.margin, agreement=found.agreement)
    return combine(components)


def rescore_slices(scores: np.ndarray, masks: np.ndarray, evidence: Mapping[int, SliceEvidence],
                   painted: Iterable[int], changed: Iterable[int]) -> np.ndarray:
    """:func:`slice_scores` after slices ``changed`` of ``masks`` changed (their mask, or whether
    they are painted), from the ``scores`` before: equal to scoring every slice again, computed
    on the changed slices and their neighbours only while each change lies strictly inside the
    extent the scores show (then the extent cannot have moved); otherwise every slice again."""
    masks = np.asarray(masks)
    scored = np.flatnonzero(np.isfinite(scores))
    changed = sorted({int(i) for i in changed})
    if not len(scored) or len(scores) != masks.shape[0] or any(i <= scored[0] or i >= scored[-1] for i in changed):
        return slice_scores(masks, evidence, painted)
    scores = np.array(scores, np.float32)
    painted = set(int(i) for i in painted)
    for index in sorted({j for i in changed for j in (i - 1, i, i + 1)}):
        scores[index] = _slice_score(masks, index, evidence, painted)
    return scores


def structure_score(scores: np.ndarray, painted: Iterable[int] = ()) -> float:
    """A structure's confidence from its :func:`slice_scores`: the mean over scored slices that
    were not painted; 1 when only painted slices are scored, 0 when none is."""
    scores = np.asarray(scores, np.float64)
    scored = np.isfinite(scores)
    if not scored.any():
        return 0.0
    own = scored.copy()
    own[[int(i) for i in painted if 0 <= int(i) < len(scores)]] = False
    if not own.any():
        return 1.0
    return float(scores[own].mean())


def volume_score(structure_scores: Mapping[Hashable, float]) -> float:
    """A volume's confidence: its least confident structure's (1 with no structure)."""
    return float(min(structure_scores.values())) if structure_scores else 1.0


@dataclass(frozen=True)
class ReviewItem:
    """One slice of the review queue: ``volume`` (a caller's name, may be ""), ``structure``,
    ``slice`` (index along the result's slicing axis, in the volume's own voxel order),
    ``score``."""

    volume: str
    structure: str
    slice: int
    score: float


def least_confident(slice_confidence: Mapping[Hashable, np.ndarray], count: Optional[int] = None, *,
                    volume: str = "", painted: Optional[Mapping[Hashable, Iterable[int]]] = None) -> List[ReviewItem]:
    """The scored slices of ``slice_confidence`` (structure -> ``[N]`` scores, NaN unscored)
    from least confident, at most ``count`` (all with None). Ties: structure name, then slice.
    Slices in ``painted`` (structure -> slices) are left out: the user drew them."""
    items = []
    for structure, scores in slice_confidence.items():
        skip = set(int(i) for i in (painted or {}).get(structure, ()))
        for index, score in enumerate(np.asarray(scores, np.float64).ravel()):
            if math.isfinite(score) and index not in skip:
                items.append(ReviewItem(volume, str(structure), index, float(score)))
    items.sort(key=lambda item: (item.score, item.volume, item.structure, item.slice))
    return items if count is None else items[:max(0, int(count))]


#: Voxel axis name of each array axis of a ``[k, j, i]`` volume.
_VOXEL_AXES = ("k", "j", "i")


def review_record(result, count: Optional[int] = None) -> dict:
    """A JSON-ready summary of a :class:`protosam.VolumeResult`'s confidence: ``volume`` (the
    volume's confidence), ``structures`` (each structure's, keys as strings), ``plane`` and
    ``slice_axis`` (the voxel axis, ``k``/``j``/``i`` of a ``[k, j, i]`` array, slices run
    along) and ``slices``: the ``count`` least confident (all scored ones with None) as
    ``{"structure", "slice", "score"}`` from least confident (painted slices score 1, last)."""
    queue = least_confident(result.slice_confidence, count)
    return {
        "volume": None if result.volume_confidence is None else round(float(result.volume_confidence), 4),
        "structures": {str(key): round(float(value), 4) for key, value in result.structure_confidence.items()},
        "plane": result.plane,
        "slice_axis": _VOXEL_AXES[result.axis],
        "slices": [{"structure": item.structure, "slice": item.slice, "score": round(item.score, 4)} for item in queue],
    }
