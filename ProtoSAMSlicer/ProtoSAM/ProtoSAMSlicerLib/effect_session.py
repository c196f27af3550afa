"""Behaviour of the ProtoSAM Segment Editor effect, without Qt.

The effect class (SegmentEditorProtoSAMLib/SegmentEditorEffect.py) builds widgets and forwards
user actions here, with two callables bound to the Segment Editor:

- ``saveStateForUndo()`` -> ``scriptedEffect.saveStateForUndo()``
- ``modifySegment(labelmap, segmentId)`` -> ``scriptedEffect.modifySegmentByLabelmap(
  segmentationNode, segmentId, labelmap, ModificationModeAdd)``, which applies the editor's
  masking settings (editable area, editable intensity range, overwrite other segments).
- ``defaultModifierLabelmap()`` (optional) -> ``scriptedEffect.defaultModifierLabelmap()``: an
  empty labelmap on the segmentation's reference geometry. The result is written on that grid,
  never on the source volume's: Slicer's masking needs the modifier on the reference geometry
  (with another grid it skips the editable area, and with an editable intensity range it writes
  nothing). Without it, ``mrml_io.referenceGeometryImage`` builds the same grid.

Tests pass the same operations of ``vtkSlicerSegmentEditorLogic`` with a real
vtkMRMLSegmentEditorNode, so the masking and undo exercised are Slicer's own.

Flow: ``start`` (support = the selected segment's painted slices along the current view) ->
preview segmentation -> ``apply`` (one undo state, segment modified once) or ``cancel``.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import numpy as np

from protosam.errors import InputError

from . import geometry, mrml_io, results
from .logic import ProcessOptions, PropagationJob, PropagationResult, ProtoSAMLogic, sliceViewGeometry

logger = logging.getLogger(__name__)

#: More painted slices than this are not "a few examples" any more (e.g. a previous result):
#: then only the slice shown in the view is used as support, if it is painted.
MAX_SUPPORT_SLICES = 8

IDLE, RUNNING, PREVIEW = "idle", "running", "preview"


def paintedSlices(mask_Kji: np.ndarray, kjiAxis: int) -> List[int]:
    """Indices along ``kjiAxis`` of the slices where a (K, J, I) mask has voxels."""
    other = tuple(a for a in range(3) if a != kjiAxis)
    return [int(i) for i in np.flatnonzero(np.asarray(mask_Kji).any(axis=other))]


def chooseSupportSlices(painted: Sequence[int], currentSlice: Optional[int],
                        maximum: int = MAX_SUPPORT_SLICES) -> List[int]:
    """Support slices from the painted ones: all of them if few, else the current one."""
    painted = sorted(painted)
    if not painted:
        raise InputError("The selected segment is empty: paint the structure on one slice (or a few) in "
                         "this view, then click Propagate.")
    if len(painted) <= maximum:
        return painted
    if currentSlice is not None and currentSlice in painted:
        logger.info("Segment covers %d slices; using the slice shown in the view (%d) as the example.",
                    len(painted), currentSlice)
        return [currentSlice]
    raise InputError(
        f"The selected segment already covers {len(painted)} slices. ProtoSAM learns from a few painted "
        "slices: show one of them in the view, or paint a new segment on one slice.")


class EffectSession:
    """State machine idle -> running -> preview -> idle of one Segment Editor effect instance."""

    def __init__(self, logic: ProtoSAMLogic, saveStateForUndo: Callable[[], None],
                 modifySegment: Callable[[object, str], None],
                 defaultModifierLabelmap: Optional[Callable[[], object]] = None):
        self.logic = logic
        self.saveStateForUndo = saveStateForUndo
        self.modifySegment = modifySegment
        self.defaultModifierLabelmap = defaultModifierLabelmap
        self.state = IDLE
        self.job: Optional[PropagationJob] = None
        self.result: Optional[PropagationResult] = None
        self.segmentationNode = None
        self.segmentId = ""
        self.sourceVolumeNode = None
        self.lastError: Optional[BaseException] = None
        self._onFinished: Optional[Callable[["EffectSession"], None]] = None

    def start(self, sourceVolumeNode, segmentationNode, segmentId: str, sliceNode=None, *,
              sliceNormal_World=None, slicePoint_World=None, options: ProcessOptions = ProcessOptions(),
              sliceRange=None, waitForCompletion: bool = False,
              progressCallback: Optional[Callable[[int, int], None]] = None,
              onFinished: Optional[Callable[["EffectSession"], None]] = None):
        """Propagate the selected segment from its painted slices along the view into a preview.

        The view is ``sliceNode`` (a vtkMRMLSliceNode) or an explicit World normal and point.
        Returns the PropagationJob (or, with waitForCompletion, the result after preview).
        """
        if self.state != IDLE:
            raise RuntimeError(f"ProtoSAM is {self.state}: apply or cancel first.")
        if sourceVolumeNode is None:
            raise InputError("Select a source volume in the Segment Editor.")
        if not segmentId:
            raise InputError("Select the segment to propagate.")
        if sliceNode is not None:
            sliceNormal_World, slicePoint_World = sliceViewGeometry(sliceNode)
        if sliceNormal_World is None:
            raise ValueError("give a sliceNode or sliceNormal_World")
        ijkToWorld = mrml_io.ijkToWorldMatrix(sourceVolumeNode)
        axis = geometry.sliceAxisFromNormal(sliceNormal_World, ijkToWorld)
        mask = mrml_io.segmentToArray(segmentationNode, segmentId, sourceVolumeNode)
        current = None
        if slicePoint_World is not None:
            current = geometry.sliceIndexFromWorld(slicePoint_World, ijkToWorld, axis.ijkAxis, mask.shape)
        support = chooseSupportSlices(paintedSlices(mask, axis.kjiAxis), current)

        self.segmentationNode, self.segmentId, self.sourceVolumeNode = segmentationNode, segmentId, sourceVolumeNode
        self.lastError = None
        self._onFinished = onFinished
        self.state = RUNNING
        try:
            self.job = self.logic.process(
                sourceVolumeNode, segmentationNode, [segmentId], supportVolumeNode=sourceVolumeNode,
                sliceNormal_World=sliceNormal_World, supportSlices={segmentId: support}, sliceRange=sliceRange,
                options=options, waitForCompletion=False, progressCallback=progressCallback,
                onFinished=self._jobFinished)
        except Exception:
            self.state = IDLE
            raise
        if not waitForCompletion:
            return self.job
        self.job.worker.runUntilFinished(self.job.job, idle=self.logic.idle)
        if self.lastError is not None:
            raise self.lastError
        return self.result

    def _jobFinished(self, job: PropagationJob) -> None:
        if job is not self.job:
            return
        self.job = None
        if job.error is not None:
            self.lastError = job.error
            self.state = IDLE
        else:
            self.result = job.result
            self.state = PREVIEW
        if self._onFinished is not None:
            self._onFinished(self)

    @property
    def progress(self):
        return self.job.progress if self.job is not None else (0, 0)

    def apply(self) -> None:
        """Add the preview to the selected segment: one undo state, one modification."""
        if self.state != PREVIEW or self.result is None:
            raise RuntimeError("There is no ProtoSAM preview to apply.")
        preview = self.result.previewSegmentationNode
        for node in (preview, self.segmentationNode, self.sourceVolumeNode):
            if node.GetScene() is None or not node.GetScene().IsNodePresent(node):
                self.cancel()
                raise InputError("The segmentation, source volume or preview was removed; nothing was applied.")
        if self.segmentationNode.GetSegmentation().GetSegment(self.segmentId) is None:
            self.cancel()
            raise InputError("The selected segment was deleted; nothing was applied.")
        labelmap = self.defaultModifierLabelmap() if self.defaultModifierLabelmap is not None else None
        if labelmap is None:
            labelmap = mrml_io.referenceGeometryImage(self.segmentationNode, self.sourceVolumeNode)
        mrml_io.segmentIntoImage(preview, self.segmentId, labelmap, self.segmentationNode)
        self.saveStateForUndo()
        with mrml_io.renderPaused():
            self.modifySegment(labelmap, self.segmentId)
        logger.info("ProtoSAM result applied to segment '%s'.", self.segmentId)
        self._reset()

    def cancel(self) -> None:
        """Stop a running propagation or discard the preview; the segment is left as it was."""
        if self.job is not None:
            self.job.cancel("Cancelled by the user; nothing was changed.")
            return  # _jobFinished resets the state when the worker stops
        self._reset()

    def stopRun(self) -> None:
        """Cancel a running propagation only; a preview is kept (the effect was deactivated)."""
        if self.job is not None:
            self.job.cancel("The ProtoSAM effect was deactivated; the run was cancelled and nothing was changed.")

    def _reset(self) -> None:
        if self.result is not None:
            results.removeNode(self.result.previewSegmentationNode)
        self.result = None
        self.state = IDLE
