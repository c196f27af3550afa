"""The review queue: a run's volumes and slices from least confident, and jumping to one.

The engine scores every result slice and volume (``protosam.confidence``; the formula is in
docs/cohorts.md) and the worker sends the scores back with the masks; the logic keeps them
in :class:`ProtoSAMSlicerLib.logic.PropagationResult` (``sliceConfidence``,
``segmentConfidence``, ``volumeConfidence``), rescored after each correction and update of
the preview (``ProtoSAMLogic.rescoreFromSession``); slices the user painted or corrected
(``confirmedSlices``) are not listed. This module orders them into rows the module's
Review section lists, and moves the slice views to a row's slice. MRML only, no Qt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import numpy as np

import slicer

from . import mrml_io

#: Column titles of the two review tables.
VOLUME_COLUMNS = ("Volume", "Confidence", "Least confident slice")
SLICE_COLUMNS = ("Volume", "Segment", "Slice", "Confidence")


@dataclasses.dataclass(frozen=True)
class ReviewRow:
    """One row of the review queue. ``result``: the PropagationResult it comes from;
    ``segmentId`` / ``sliceIndex``: the slice a click jumps to (for a volume row: its least
    confident slice; -1 when none is scored); ``sliceIndex`` is the IJK index along
    ``result.sliceAxis.ijkAxis``; ``score`` in [0, 1]."""

    result: object
    segmentId: str
    sliceIndex: int
    score: float

    @property
    def volumeName(self) -> str:
        node = self.result.targetVolumeNode
        return node.GetName() if node is not None else ""

    @property
    def segmentName(self) -> str:
        """The support segment's name (the preview's segment IDs are the support's)."""
        segment = self.result.supportSegmentationNode.GetSegmentation().GetSegment(self.segmentId) \
            if self.segmentId and self.result.supportSegmentationNode is not None else None
        return segment.GetName() if segment is not None else self.segmentId


def _sliceItems(result):
    """(score, segmentId, sliceIndex) of every scored slice of ``result`` that the user has not
    confirmed (painted or corrected: ``result.confirmedSlices``; they need no second look)."""
    items = []
    confirmed = getattr(result, "confirmedSlices", None) or {}
    for segmentId, scores in (getattr(result, "sliceConfidence", None) or {}).items():
        skipped = set(confirmed.get(segmentId, ()))
        for index, score in enumerate(np.asarray(scores, np.float64).ravel()):
            if math.isfinite(score) and index not in skipped:
                items.append((float(score), str(segmentId), index))
    return items


def sliceRows(results: Sequence, count: Optional[int] = None) -> List[ReviewRow]:
    """Every scored slice of ``results`` from least confident (ties: volume order, segment,
    slice), at most ``count`` (all with None)."""
    rows = []
    for position, result in enumerate(results):
        for score, segmentId, index in _sliceItems(result):
            rows.append((score, position, segmentId, index, ReviewRow(result, segmentId, index, score)))
    rows.sort(key=lambda item: item[:4])
    rows = [item[-1] for item in rows]
    return rows if count is None else rows[:max(0, int(count))]


def volumeRows(results: Sequence) -> List[ReviewRow]:
    """One row per result with a volume confidence, from least confident (ties: run order);
    each row points at that volume's least confident slice."""
    rows = []
    for position, result in enumerate(results):
        volume = getattr(result, "volumeConfidence", None)
        if volume is None:
            continue
        worst = sliceRows([result], 1)
        segmentId, index = (worst[0].segmentId, worst[0].sliceIndex) if worst else ("", -1)
        rows.append((float(volume), position, ReviewRow(result, segmentId, index, float(volume))))
    rows.sort(key=lambda item: item[:2])
    return [item[-1] for item in rows]


def volumeRowTexts(row: ReviewRow) -> List[str]:
    """The cells of a volume row (VOLUME_COLUMNS)."""
    where = f"{row.segmentName} @ {row.sliceIndex}" if row.sliceIndex >= 0 else ""
    return [row.volumeName, f"{row.score:.2f}", where]


def sliceRowTexts(row: ReviewRow) -> List[str]:
    """The cells of a slice row (SLICE_COLUMNS)."""
    return [row.volumeName, row.segmentName, str(row.sliceIndex), f"{row.score:.2f}"]


def sliceCenter_World(volumeNode, ijkAxis: int, sliceIndex: int) -> np.ndarray:
    """World (RAS, parent transforms applied) position of the centre of slice ``sliceIndex``
    along IJK axis ``ijkAxis`` of ``volumeNode``."""
    shape = mrml_io.volumeShapeKji(volumeNode)
    dimensions = (shape[2], shape[1], shape[0])  # I, J, K
    if not 0 <= int(sliceIndex) < dimensions[ijkAxis]:
        raise ValueError(f"slice {sliceIndex} is outside '{volumeNode.GetName()}' (0..{dimensions[ijkAxis] - 1})")
    ijk = [(size - 1) / 2.0 for size in dimensions]
    ijk[ijkAxis] = float(sliceIndex)
    return (mrml_io.ijkToWorldMatrix(volumeNode) @ np.array(ijk + [1.0]))[:3]


def jumpToRow(row: ReviewRow, scene=None) -> np.ndarray:
    """Centre every slice view of ``scene`` (default: the volume's) on ``row``'s slice: the
    views that cut across that slice show it; returns the World position jumped to.
    (vtkMRMLSliceNode::JumpAllSlices in CenteredJumpSlice mode, as a click in the Markups or
    Segment Statistics tables does.)"""
    volumeNode = row.result.targetVolumeNode
    if row.sliceIndex < 0:
        raise ValueError("this row has no scored slice to jump to")
    if volumeNode is None or volumeNode.GetScene() is None:
        raise ValueError("the volume of this row is no longer in the scene")
    scene = scene if scene is not None else volumeNode.GetScene()
    position = sliceCenter_World(volumeNode, row.result.sliceAxis.ijkAxis, row.sliceIndex)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *position, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return position
