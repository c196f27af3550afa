"""Behaviour of the ProtoSAM Segment Editor effect, without Qt.

The effect class (SegmentEditorProtoSAMLib/SegmentEditorEffect.py) builds widgets and forwards
user actions here, with two callables bound to the Segment Editor:

- ``saveStateForUndo()`` -> ``scriptedEffect.saveStateForUndo()``
- ``modifySegment(labelmap, segmentId)`` -> ``scriptedEffect.modifySegmentByLabelmap(
  segmentationNode, segmentId, labelmap, ModificationModeAdd)``, which applies the editor's
  masking settings (editable area, editable intensity range, overwrite other segments).
- ``editedSegmentationNode()`` (optional) -> ``scriptedEffect.parameterSetNode().GetSegmentationNode()``:
  the segmentation the Segment Editor edits now. A preview outlives deactivation, and the user
  may select another segmentation meanwhile: Apply and corrections are then refused (naming
  both) and the preview is kept, since ``modifySegment`` writes into the editor's segmentation.
- ``defaultModifierLabelmap()`` (optional) -> ``scriptedEffect.defaultModifierLabelmap()``: an
  empty labelmap on the segmentation's reference geometry. The result is written on that grid,
  never on the source volume's: Slicer's masking needs the modifier on the reference geometry
  (with another grid it skips the editable area, and with an editable intensity range it writes
  nothing). Without it, ``mrml_io.referenceGeometryImage`` builds the same grid.

Tests pass the same operations of ``vtkSlicerSegmentEditorLogic`` with a real
vtkMRMLSegmentEditorNode, so the masking and undo exercised are Slicer's own.

Flow: ``start`` (support = the selected segment's painted slices along the current view) ->
preview segmentation -> optional corrections -> ``apply`` (one undo state, segment modified
once) or ``cancel``.

Corrections (while the preview is shown), each in World points of a slice view aligned with
the propagation axis (views oblique to the volume are refused, as for Propagate):
``addClick`` (positive or negative) re-decodes that slice with SAM from the engine's cached
embedding and updates the preview's slice; ``addBox`` (two corners), ``addScribble`` (the
mouse's path) and ``addLasso`` (a closed path) are protosam.session's gestures of the same names;
``undoCorrection`` takes back the last of them, of any slice (one entry per click or gesture),
``clearSliceCorrections`` all of a slice; ``updateVolume`` re-propagates with every corrected
slice as a support (protosam.session). The clicks are drawn as control points of a markups node
("+" / "-") and kept per slice until Apply or Cancel. With ``otherSegmentsAsNegatives`` (on by
default), the segmentation's other visible segments are negatives of the structure ("not this")
for the run and every update: removed from its result, negative points and background examples
where they appear (protosam.segment_volume's and Session.set_negatives' ``negatives``).
The correction session lives on the worker that ran the preview (the worker process
in the GUI) and shares that engine's cache (``ProcessOptions.cacheBytes``), so the run's
encodings serve the clicks and the update; a click is one small request.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from protosam.errors import CancelledError, InputError

from . import geometry, mrml_io, results
from .logic import (
    ProcessOptions, PropagationJob, PropagationResult, ProtoSAMLogic, correctionOrientation, sliceViewGeometry,
)

logger = logging.getLogger(__name__)

#: More painted slices than this are not "a few examples" any more (e.g. a previous result):
#: then only the slice shown in the view is used as support, if it is painted.
MAX_SUPPORT_SLICES = 8

IDLE, RUNNING, PREVIEW, UPDATING = "idle", "running", "preview", "updating"

#: The correction tools (the effect's tool buttons) and the kinds of the correction undo stack.
CLICK, BOX, SCRIBBLE, LASSO = "click", "box", "scribble", "lasso"
TOOLS = (CLICK, BOX, SCRIBBLE, LASSO)
_SINGULAR = {"Clicks": "click", "Boxes": "box", "Scribbles": "scribble", "Lassos": "lasso"}


@dataclasses.dataclass
class _Correction:
    """One entry of the effect's correction undo stack: a click or a gesture on a slice (index
    along the propagation axis). ``clicksBefore``: for a box, the slice's clicks (log and World
    points) before it, which it may have dropped."""

    sliceIndex: int
    kind: str
    clicksBefore: Optional[Tuple[list, list]] = None


def paintedSlices(mask_Kji: np.ndarray, kjiAxis: int) -> List[int]:
    """Indices along ``kjiAxis`` of the slices where a (K, J, I) mask has voxels."""
    other = tuple(a for a in range(3) if a != kjiAxis)
    return [int(i) for i in np.flatnonzero(np.asarray(mask_Kji).any(axis=other))]


#: A drag reports a point at every mouse move; points closer than this (voxels) to the last
#: one kept add nothing to a scribble or a lasso and are left out (the last point is kept).
MIN_GESTURE_STEP_VOXELS = 0.25


def _thinned(xy: np.ndarray) -> np.ndarray:
    """``[P, 2]`` points without those within MIN_GESTURE_STEP_VOXELS of the previous kept one."""
    if len(xy) <= 2:
        return xy
    kept = [0]
    for n in range(1, len(xy) - 1):
        if np.hypot(*(xy[n] - xy[kept[-1]])) >= MIN_GESTURE_STEP_VOXELS:
            kept.append(n)
    kept.append(len(xy) - 1)
    return xy[kept]


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
    """State machine idle -> running -> preview -> idle of one Segment Editor effect instance.

    ``updating``: an Update volume runs in the worker (preview <-> updating). Meanwhile only
    ``cancel`` is accepted (it stops the update; the preview stays as it was): Apply, clicks,
    Undo correction, Clear slice and another update are refused. ``stateChanged()`` (optional,
    set by the effect) is called when an update starts and ends, so the GUI follows at once:
    the wait processes GUI events.
    """

    def __init__(self, logic: ProtoSAMLogic, saveStateForUndo: Callable[[], None],
                 modifySegment: Callable[[object, str], None],
                 defaultModifierLabelmap: Optional[Callable[[], object]] = None,
                 editedSegmentationNode: Optional[Callable[[], object]] = None):
        self.logic = logic
        self.editedSegmentationNode = editedSegmentationNode
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
        self.options = ProcessOptions()
        self.corrections = None  # WorkerSession (LocalSession on the deprecated thread worker), opened at the 1st click
        self.clickMarkups = None  # vtkMRMLMarkupsFiducialNode drawing the clicks
        self._corrections: List[_Correction] = []  # clicks and gestures, in order (Undo correction)
        self._clickLog: dict = {}  # slice -> [(x, y, label)] in clickTarget's frame
        self._clickWorld: dict = {}  # slice -> [(point_World, positive)], as _clickLog (the markers)
        #: "Other segments as not this": the segmentation's other visible segments are negatives of
        #: the propagated structure (at Propagate and at each Update volume).
        self.otherSegmentsAsNegatives = True
        self._negativesSent = False  # the correction session holds negatives
        self._orientation = None  # protosam.orientation.Orientation of the correction session
        self._updateCancel: Optional[threading.Event] = None  # set by cancel() during an update
        self.stateChanged: Optional[Callable[[], None]] = None

    def start(self, sourceVolumeNode, segmentationNode, segmentId: str, sliceNode=None, *,
              sliceNormal_World=None, slicePoint_World=None, options: ProcessOptions = ProcessOptions(),
              sliceRange=None, waitForCompletion: bool = False,
              progressCallback: Optional[Callable[[int, int], None]] = None,
              onFinished: Optional[Callable[["EffectSession"], None]] = None,
              bankFolder: Optional[str] = None):
        """Propagate the selected segment from its painted slices along the view into a preview.

        The view is ``sliceNode`` (a vtkMRMLSliceNode) or an explicit World normal and point.
        ``bankFolder``: propagate from that example bank instead, from the examples of the
        structure named as the segment (taken in the view's plane; the segment need not be
        painted). Every check is made before the run starts: the segment is never changed by a
        refused start. Returns the PropagationJob (or, with waitForCompletion, the result after
        preview).
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
        examples, supportSlices = None, None
        if bankFolder is not None:
            from . import bank

            if segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
                raise InputError("Select the segment to propagate.")
            examples = bank.examplesForSegments(bankFolder, segmentationNode, [segmentId],
                                                bank.runPlane(sourceVolumeNode, sliceNormal_World))
        else:
            mask = mrml_io.segmentToArray(segmentationNode, segmentId, sourceVolumeNode)
            current = None
            if slicePoint_World is not None:
                current = geometry.sliceIndexFromWorld(slicePoint_World, ijkToWorld, axis.ijkAxis, mask.shape)
            supportSlices = {segmentId: chooseSupportSlices(paintedSlices(mask, axis.kjiAxis), current)}
        negatives = None
        if self.otherSegmentsAsNegatives:
            others = self.otherSegmentsMask(segmentationNode, segmentId, sourceVolumeNode)
            negatives = None if others is None else {segmentId: others}

        self.segmentationNode, self.segmentId, self.sourceVolumeNode = segmentationNode, segmentId, sourceVolumeNode
        self.options = options
        self.lastError = None
        self._onFinished = onFinished
        self.state = RUNNING
        try:
            self.job = self.logic.process(
                sourceVolumeNode, segmentationNode, [segmentId], supportVolumeNode=sourceVolumeNode,
                sliceNormal_World=sliceNormal_World, supportSlices=supportSlices, sliceRange=sliceRange,
                options=options, waitForCompletion=False, progressCallback=progressCallback,
                onFinished=self._jobFinished, negatives=negatives, examples=examples,
                paintedSupports=examples is None)
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
        self._refuseWhileUpdating("applied")
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
        self._requireEditedSegmentation("applied")
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
        """Stop a running propagation or discard the preview; the segment is left as it was.
        During an update: stop the update only (the preview stays as it was before it)."""
        if self.state == UPDATING:
            if self._updateCancel is not None:
                self._updateCancel.set()
            return  # updateVolume returns to the preview when the worker has stopped
        if self.job is not None:
            self.job.cancel("Cancelled by the user; nothing was changed.")
            return  # _jobFinished resets the state when the worker stops
        self._reset()

    def stopRun(self) -> None:
        """Cancel a running propagation only; a preview is kept (the effect was deactivated)."""
        if self.job is not None:
            self.job.cancel("The ProtoSAM effect was deactivated; the run was cancelled and nothing was changed.")
        if self.state == UPDATING and self._updateCancel is not None:
            self._updateCancel.set()

    @property
    def updating(self) -> bool:
        return self.state == UPDATING

    def _refuseWhileUpdating(self, action: str) -> None:
        if self.state == UPDATING:
            raise InputError(f"ProtoSAM is updating the preview; it can be {action} when the update has finished "
                             "(or Cancel the update).")

    def _requireEditedSegmentation(self, action: str) -> None:
        """Refuse (the preview is kept) when the Segment Editor now edits another segmentation
        than the one the preview was made for: Apply would write into that one."""
        if self.editedSegmentationNode is None or self.segmentationNode is None:
            return
        edited = self.editedSegmentationNode()
        if edited is self.segmentationNode:
            return
        editedName = f"'{edited.GetName()}'" if edited is not None else "no segmentation"
        ownName = self.segmentationNode.GetName()
        raise InputError(f"The ProtoSAM preview was made for segmentation '{ownName}', but the Segment Editor now "
                         f"edits {editedName}: the preview can be {action} only in '{ownName}'. Select '{ownName}' "
                         "in the Segment Editor again, or Cancel the preview. The preview is kept.")

    # ------------------------------------------------------------------ corrections
    def clickTarget(self, point_World, sliceNormal_World) -> Tuple[int, int, int]:
        """``(slice, x, y)`` of a click: the slice index along the propagation axis and the
        voxel's column ``x`` / row ``y`` in that slice of the KJI array (the correction session
        itself runs in the engine's canonical order, see _toCanonical). Refuses views oblique
        to the volume or along another axis."""
        sliceIndex, xy = self._sliceTarget([point_World], sliceNormal_World, "Clicks")
        x, y = np.floor(xy[0] + 0.5).astype(int)
        shape = mrml_io.volumeShapeKji(self.sourceVolumeNode)
        kjiAxis = self.result.sliceAxis.kjiAxis
        rows, cols = [a for a in range(3) if a != kjiAxis]
        if not (0 <= x < shape[cols] and 0 <= y < shape[rows]):
            raise InputError("The click is outside the volume.")
        return sliceIndex, int(x), int(y)

    def _sliceTarget(self, points_World, sliceNormal_World, what: str) -> Tuple[int, np.ndarray]:
        """The slice of a click or gesture (the slice of its first point, along the propagation
        axis) and its points as continuous ``(x, y)`` ``[P, 2]`` (column, row of that slice of
        the KJI array; a voxel centre is a whole number), through the volume's IJK-to-World
        matrix with parent transforms. Refuses (InputError) without a preview, while updating,
        views oblique to the volume (ObliqueSliceError, the same message for every tool) or
        along another axis, and a first point outside the volume's slices."""
        self._refuseWhileUpdating("corrected")
        if self.state != PREVIEW or self.result is None:
            raise InputError(f"{what} correct a ProtoSAM preview: propagate first.")
        self._requireEditedSegmentation("corrected")
        ijkToWorld = mrml_io.ijkToWorldMatrix(self.sourceVolumeNode)
        axis = geometry.sliceAxisFromNormal(sliceNormal_World, ijkToWorld)
        if axis.ijkAxis != self.result.sliceAxis.ijkAxis:
            raise InputError(f"{what} correct in a slice view along the axis the preview was propagated on "
                             "(the view you propagated from), not across it.")
        points = np.asarray(points_World, dtype=np.float64).reshape(-1, 3)
        if not len(points):
            raise InputError(f"{what} need at least one point.")
        kji = np.array([geometry.ijkFromWorld(point, ijkToWorld)[::-1] for point in points])
        shape = mrml_io.volumeShapeKji(self.sourceVolumeNode)
        kjiAxis = axis.kjiAxis
        sliceIndex = int(np.floor(kji[0, kjiAxis] + 0.5))
        if not 0 <= sliceIndex < shape[kjiAxis]:
            raise InputError(f"The {_SINGULAR[what]} is outside the volume.")
        rows, cols = [a for a in range(3) if a != kjiAxis]
        return sliceIndex, _thinned(np.stack([kji[:, cols], kji[:, rows]], axis=1))

    def _sliceSize(self) -> Tuple[int, int]:
        """(columns, rows) of a slice along the propagation axis (KJI frame)."""
        shape = mrml_io.volumeShapeKji(self.sourceVolumeNode)
        rows, cols = [a for a in range(3) if a != self.result.sliceAxis.kjiAxis]
        return shape[cols], shape[rows]

    def addClick(self, point_World, sliceNormal_World, positive: bool = True,
                 progressCallback: Optional[Callable[[int, int], None]] = None) -> int:
        """Correct the preview on the clicked slice; returns that slice's index (along the axis).

        A slice whose SAM embedding is cached is one small request. A slice without one (never
        encoded, or evicted) is encoded first: ``progressCallback(0, 1)`` when that starts and
        ``(1, 1)`` when it is done (the effect shows "Encoding slice k..."); meanwhile the wait
        processes GUI events (``logic.idle``), so Slicer stays responsive."""
        sliceIndex, x, y = self.clickTarget(point_World, sliceNormal_World)
        session = self._correctionSession()
        canonicalSlice, row, column = self._toCanonical(sliceIndex, x, y)
        mask = session.correct(self.segmentId, canonicalSlice, [[column, row]], [1 if positive else 0],
                               progress=progressCallback)
        self._showSlice(canonicalSlice, mask)
        self._corrections.append(_Correction(sliceIndex, CLICK))
        self._clickLog.setdefault(sliceIndex, []).append((float(x), float(y), 1 if positive else 0))
        self._clickWorld.setdefault(sliceIndex, []).append((tuple(np.asarray(point_World, float)[:3]), bool(positive)))
        self._drawClick(point_World, positive, sliceIndex)
        return sliceIndex

    def addBox(self, corner_World, oppositeCorner_World, sliceNormal_World,
               progressCallback: Optional[Callable[[int, int], None]] = None) -> int:
        """A box dragged from one corner to the other in a slice view (World points): the voxels
        under the two corners are its inclusive corners (a box dragged past the volume's edge
        ends at the edge). It replaces the slice's prompt sets by one box; the slice's clicks
        inside it stay, the others are dropped (protosam.session.Session.box). Works with every
        refiner (MedSAM too). ``progressCallback`` as for addClick. Returns the slice index."""
        sliceIndex, xy = self._sliceTarget([corner_World, oppositeCorner_World], sliceNormal_World, "Boxes")
        columns, rows = self._sliceSize()
        corners = np.floor(xy + 0.5)
        if (corners[:, 0].max() < 0 or corners[:, 1].max() < 0 or corners[:, 0].min() > columns - 1
                or corners[:, 1].min() > rows - 1):
            raise InputError("The box is outside the volume.")
        corners = np.clip(corners, 0, [columns - 1, rows - 1]).astype(int)
        session = self._correctionSession()
        canonical = [self._toCanonical(sliceIndex, x, y) for x, y in corners]
        canonicalSlice = canonical[0][0]
        box = [canonical[0][2], canonical[0][1], canonical[1][2], canonical[1][1]]
        mask = session.box(self.segmentId, canonicalSlice, box, progress=progressCallback)
        self._showSlice(canonicalSlice, mask)
        # The session dropped the slice's clicks outside the box: so do the log and the markers
        # (kept in the record, for Undo correction).
        (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
        log, world = self._clickLog.get(sliceIndex, []), self._clickWorld.get(sliceIndex, [])
        record = _Correction(sliceIndex, BOX, clicksBefore=(list(log), list(world)))
        inside = [n for n, (x, y, _) in enumerate(log) if x0 <= x <= x1 and y0 <= y <= y1]
        self._clickLog[sliceIndex] = [log[n] for n in inside]
        self._clickWorld[sliceIndex] = [world[n] for n in inside]
        self._redrawClicks(sliceIndex)
        self._corrections.append(record)
        return sliceIndex

    def addScribble(self, points_World, sliceNormal_World, positive: bool = True, *, radius: float = 0.0,
                    progressCallback: Optional[Callable[[int, int], None]] = None) -> int:
        """A scribble (the mouse's path in a slice view, World points in drawing order): the
        voxels it covers become structure (positive) or not (negative) and points sampled along
        it guide the refiner (protosam.session.Session.scribble). Points past the volume's edge
        are left out. Refused for box-only refiners (MedSAM), with nothing changed. Returns the
        slice index."""
        sliceIndex, xy = self._sliceTarget(points_World, sliceNormal_World, "Scribbles")
        columns, rows = self._sliceSize()
        inside = (xy[:, 0] >= -0.5) & (xy[:, 0] <= columns - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= rows - 0.5)
        if not inside.any():
            raise InputError("The scribble is outside the volume.")
        xy = np.clip(xy[inside], 0, [columns - 1, rows - 1])
        session = self._correctionSession()
        canonicalSlice, points = self._toCanonicalPoints(sliceIndex, xy)
        mask = session.scribble(self.segmentId, canonicalSlice, points, bool(positive), radius=float(radius),
                                progress=progressCallback)
        self._showSlice(canonicalSlice, mask)
        self._corrections.append(_Correction(sliceIndex, SCRIBBLE))
        return sliceIndex

    def addLasso(self, points_World, sliceNormal_World, positive: bool = True) -> int:
        """A lasso (a closed path in a slice view, World points; the last joins the first): the
        voxels it encloses are added to (positive) or removed from (negative) the slice's mask
        directly, with every refiner (protosam.session.Session.lasso). Points past the volume's
        edge are moved onto it. Returns the slice index."""
        sliceIndex, xy = self._sliceTarget(points_World, sliceNormal_World, "Lassos")
        if len(xy) < 3:
            raise InputError("A lasso needs at least three points: drag round the region.")
        columns, rows = self._sliceSize()
        if (xy[:, 0].max() < -0.5 or xy[:, 1].max() < -0.5 or xy[:, 0].min() > columns - 0.5
                or xy[:, 1].min() > rows - 0.5):
            raise InputError("The lasso is outside the volume.")
        xy = np.clip(xy, 0, [columns - 1, rows - 1])
        session = self._correctionSession()
        canonicalSlice, points = self._toCanonicalPoints(sliceIndex, xy)
        mask = session.lasso(self.segmentId, canonicalSlice, points, bool(positive))
        self._showSlice(canonicalSlice, mask)
        self._corrections.append(_Correction(sliceIndex, LASSO))
        return sliceIndex

    @property
    def hasCorrections(self) -> bool:
        return bool(self._corrections)

    hasClicks = hasCorrections  # before #25 every correction was a click

    def correctionKinds(self) -> List[Tuple[int, str]]:
        """``(slice, kind)`` of every correction Undo correction can take back, oldest first;
        kind is "click", "box", "scribble" or "lasso"."""
        return [(c.sliceIndex, c.kind) for c in self._corrections]

    def clicks(self, sliceIndex: int) -> List[Tuple[float, float, int]]:
        """Clicks of a slice as ``(x, y, label)`` in the slice's voxel frame (see clickTarget)."""
        return list(self._clickLog.get(sliceIndex, []))

    def undoCorrection(self) -> Optional[Tuple[int, str]]:
        """Undo the last correction (a click, box, scribble or lasso, of any slice): its slice is
        given back exactly as it was before it. Returns ``(slice, kind)``, None when there was none."""
        self._refuseWhileUpdating("corrected")
        if not self._corrections:
            return None
        self._requireEditedSegmentation("corrected")
        record = self._corrections[-1]
        canonicalSlice = self._canonicalSlice(record.sliceIndex)
        self._showSlice(canonicalSlice, self.corrections.undo(self.segmentId, canonicalSlice))
        self._corrections.pop()
        if record.kind == CLICK:
            self._clickLog[record.sliceIndex].pop()
            self._clickWorld[record.sliceIndex].pop()
            self._redrawClicks(record.sliceIndex)
        elif record.clicksBefore is not None:
            self._clickLog[record.sliceIndex], self._clickWorld[record.sliceIndex] = record.clicksBefore
            self._redrawClicks(record.sliceIndex)
        return record.sliceIndex, record.kind

    def undoClick(self) -> Optional[int]:
        """Undo the last correction (see undoCorrection); returns its slice, None when there was none."""
        undone = self.undoCorrection()
        return None if undone is None else undone[0]

    def clearSliceCorrections(self, sliceIndex: int) -> None:
        """Forget every correction of one slice; the slice gets back its propagated mask."""
        self._refuseWhileUpdating("corrected")
        if self.corrections is None:
            return
        self._requireEditedSegmentation("corrected")
        canonicalSlice = self._canonicalSlice(sliceIndex)
        self._showSlice(canonicalSlice, self.corrections.clear_clicks(self.segmentId, canonicalSlice))
        self._clickLog.pop(sliceIndex, None)
        self._clickWorld.pop(sliceIndex, None)
        self._corrections = [c for c in self._corrections if c.sliceIndex != sliceIndex]
        self._redrawClicks(sliceIndex)

    clearSliceClicks = clearSliceCorrections

    # ------------------------------------------------------------------ other segments as "not this"
    def otherSegmentsMask(self, segmentationNode=None, segmentId: Optional[str] = None, sourceVolumeNode=None):
        """KJI uint8 mask (source volume's grid) of the segmentation's other visible segments:
        every segment but ``segmentId`` shown in the segmentation's display node (the
        segmentation itself shown). None when there are none or they are empty."""
        segmentationNode = segmentationNode or self.segmentationNode
        segmentId = segmentId if segmentId is not None else self.segmentId
        sourceVolumeNode = sourceVolumeNode or self.sourceVolumeNode
        display = segmentationNode.GetDisplayNode()
        if display is not None and not display.GetVisibility():
            return None
        union = None
        segmentation = segmentationNode.GetSegmentation()
        for otherId in segmentation.GetSegmentIDs():
            if otherId == segmentId or (display is not None and not display.GetSegmentVisibility(otherId)):
                continue
            mask = mrml_io.segmentToArray(segmentationNode, otherId, sourceVolumeNode) != 0
            union = mask if union is None else (union | mask)
        if union is None or not union.any():
            return None
        return union.astype(np.uint8)

    def updateVolume(self, progressCallback: Optional[Callable[[int, int], None]] = None) -> None:
        """Propagate again with every corrected slice as a support; corrected slices are kept.

        The state is ``updating`` meanwhile (the wait processes GUI events). ``cancel()`` stops
        the update: CancelledError is raised and the preview stays as it was, also when the
        worker had finished its last slice before the cancel reached it."""
        self._refuseWhileUpdating("updated again")
        if self.state != PREVIEW or self.result is None:
            raise InputError("There is no ProtoSAM preview to update.")
        self._requireEditedSegmentation("updated")
        cancel = self._updateCancel = threading.Event()
        self._setState(UPDATING)
        stopped = None  # the worker's own CancelledError, when it stopped the update
        try:
            session = self._correctionSession()
            self._sendNegatives(session)
            if cancel.is_set():
                raise CancelledError("Update cancelled; the preview is as it was.")
            try:
                mask = session.update(self.segmentId, progress=progressCallback, cancel=cancel)
            except CancelledError as error:
                cancel.set()
                stopped = error
            if cancel.is_set():  # also when Cancel came after the worker's last slice
                raise CancelledError("Update cancelled; the preview is as it was.") from stopped
        finally:
            self._updateCancel = None
            self._setState(PREVIEW)
        preview = self.result.previewSegmentationNode
        if preview.GetScene() is None or not preview.GetScene().IsNodePresent(preview):
            raise InputError("The preview was removed during the update; nothing was written.")
        self._writePreview(self._orientation.from_canonical(mask))
        self.logic.rescoreFromSession(self.result, self.corrections)  # every slice scored again

    def _sendNegatives(self, session) -> None:
        """"Other segments as not this" for the update: the other visible segments as they are
        now (the user may have edited or hidden some since Propagate), or none when it is off."""
        others = self.otherSegmentsMask() if self.otherSegmentsAsNegatives else None
        if others is None and not self._negativesSent:
            return  # nothing to send, nothing to take back
        session.set_negatives(self.segmentId, None if others is None else self._orientation.to_canonical(others))
        self._negativesSent = others is not None

    def _setState(self, state: str) -> None:
        self.state = state
        if self.stateChanged is not None:
            self.stateChanged()

    def _correctionSession(self):
        """The correction session, opened at the first click on the worker that ran the preview
        (ProtoSAMLogic.openCorrectionSession, shared with the module's Update preview), so the
        run's cached encodings serve the clicks."""
        if self.corrections is None:
            self.corrections = self.logic.openCorrectionSession(self.result, [self.segmentId])
            self._orientation = correctionOrientation(self.result)
        return self.corrections

    def _canonicalSlice(self, sliceIndex: int) -> int:
        count = mrml_io.volumeShapeKji(self.sourceVolumeNode)[self.result.sliceAxis.kjiAxis]
        return self._orientation.canonical_slice(sliceIndex, count)

    def _toCanonical(self, sliceIndex: int, x, y) -> Tuple:
        """A voxel given as (slice, x, y) of clickTarget -> (slice, row, column) of the canonical
        array (continuous x, y give continuous row and column: a flip maps c to n - 1 - c)."""
        kjiAxis = self.result.sliceAxis.kjiAxis
        rows, cols = [a for a in range(3) if a != kjiAxis]
        kji = [0, 0, 0]
        kji[kjiAxis], kji[rows], kji[cols] = sliceIndex, y, x
        shape = mrml_io.volumeShapeKji(self.sourceVolumeNode)
        orientation = self._orientation
        return tuple(shape[axis] - 1 - kji[axis] if flip else kji[axis]
                     for axis, flip in zip(orientation.permutation, orientation.flips))

    def _toCanonicalPoints(self, sliceIndex: int, xy) -> Tuple[int, np.ndarray]:
        """Continuous ``(x, y)`` points of a slice (clickTarget's frame) -> (canonical slice,
        ``[P, 2]`` (column, row) points of the correction session's slice)."""
        converted = [self._toCanonical(sliceIndex, x, y) for x, y in np.asarray(xy, dtype=np.float64)]
        points = np.array([[column, row] for _, row, column in converted], dtype=np.float64)
        return int(round(converted[0][0])), points

    def _showSlice(self, canonicalSlice: int, mask) -> None:
        """Put a canonical slice's mask ``[rows, columns]`` into the preview: that slice alone is
        read and written (mrml_io's box write keeps the segment's voxels outside it)."""
        kjiAxis = self.result.sliceAxis.kjiAxis
        shape = mrml_io.volumeShapeKji(self.sourceVolumeNode)
        storedSlice = self._orientation.stored_slice(canonicalSlice, shape[kjiAxis])
        box = tuple((storedSlice, storedSlice + 1) if axis == kjiAxis else (0, n) for axis, n in enumerate(shape))
        # A one-slice canonical array back to KJI: its slice axis has length 1, so the flip of
        # that axis is a no-op and the row/column transposes and flips are the volume's.
        slice_Kji = self._orientation.from_canonical(np.asarray(mask, dtype=np.uint8)[np.newaxis])
        mrml_io.writeSegmentFromArray(slice_Kji, self.result.previewSegmentationNode, self.segmentId,
                                      self.sourceVolumeNode, box=box)
        # The session's reply rescored the slice and its neighbours: the preview's review scores follow.
        self.logic.rescoreFromSession(self.result, self.corrections)

    def _writePreview(self, mask_Kji) -> None:
        """Replace the whole preview segment (after an update)."""
        mask_Kji = np.asarray(mask_Kji)
        mrml_io.writeSegmentFromArray(mask_Kji, self.result.previewSegmentationNode, self.segmentId,
                                      self.sourceVolumeNode, previous_Kji=(mask_Kji == 0))

    def _markups(self):
        if self.clickMarkups is None or self.clickMarkups.GetScene() is None:
            scene = self.sourceVolumeNode.GetScene()
            # Adding a markups node makes it Slicer's active place list (vtkSlicerMarkupsLogic::
            # OnMRMLSceneNodeAdded -> SetActiveList): the user's next toolbar points would go into
            # this hidden node, deleted on Apply/Cancel. The user's active list is put back.
            selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton") or scene.GetFirstNodeByClass(
                "vtkMRMLSelectionNode")
            previous = None
            if selection is not None:
                previous = (selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID())
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "ProtoSAM clicks")
            node.SetHideFromEditors(True)
            node.SetSaveWithScene(False)
            node.CreateDefaultDisplayNodes()
            if selection is not None:
                className, nodeId = previous
                if selection.GetActivePlaceNodeClassName() != className:
                    selection.SetReferenceActivePlaceNodeClassName(className)
                if selection.GetActivePlaceNodeID() != nodeId:
                    selection.SetReferenceActivePlaceNodeID(nodeId)
            self.clickMarkups = node
        return self.clickMarkups

    def _redrawClicks(self, sliceIndex: int) -> None:
        """The slice's click markers, again from the log (after an undo, a box or a clear)."""
        if self.clickMarkups is None or self.clickMarkups.GetScene() is None:
            if not self._clickWorld.get(sliceIndex):
                return
        markups = self._markups()
        for n in reversed(range(markups.GetNumberOfControlPoints())):
            if markups.GetNthControlPointDescription(n) == str(sliceIndex):
                markups.RemoveNthControlPoint(n)
        for point_World, positive in self._clickWorld.get(sliceIndex, []):
            self._drawClick(point_World, positive, sliceIndex)

    def _drawClick(self, point_World, positive: bool, sliceIndex: int) -> None:
        markups = self._markups()
        n = markups.AddControlPoint(list(np.asarray(point_World, float)[:3]), "+" if positive else "-")
        markups.SetNthControlPointDescription(n, str(sliceIndex))
        markups.SetNthControlPointLocked(n, True)

    def _reset(self) -> None:
        if self.result is not None:
            results.removeNode(self.result.previewSegmentationNode)
        if self.clickMarkups is not None:
            results.removeNode(self.clickMarkups)
        self.clickMarkups = None
        if self.corrections is not None and hasattr(self.corrections, "close"):
            self.corrections.close()
        self.corrections = None
        self._corrections = []
        self._clickLog = {}
        self._clickWorld = {}
        self._negativesSent = False
        self.result = None
        self.state = IDLE
