"""Preview segmentations and accepted results (main thread, MRML, no Qt).

A run never writes into the user's segmentation: results first go to a separate *preview*
segmentation node on the target volume's grid. Accepting copies them into a destination
segmentation either as new segments named after the support segments, or
by replacing the segments of the same name; colour and terminology follow the support
segment. Discarding removes the preview. A failed or cancelled run leaves nothing behind.

Scene undo is off by default in the Slicer application, so an Accept outside the Segment
Editor is made undoable here: ``AcceptUndo`` records what an Accept added and a copy of every
segment it replaced, and ``undoAccept`` puts them back.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Mapping, Optional

import numpy as np

import slicer
from protosam.errors import InputError

from . import mrml_io

logger = logging.getLogger(__name__)

#: Node attribute that marks ProtoSAM preview segmentations.
PREVIEW_ATTRIBUTE = "ProtoSAM.Preview"
ACCEPT_NEW = "new"
ACCEPT_REPLACE = "replace"
ACCEPT_MODES = (ACCEPT_NEW, ACCEPT_REPLACE)
#: Suffix added to the name of a new segment when the destination already has that name.
RESULT_NAME_SUFFIX = "ProtoSAM"


def segmentTerminology(segment) -> str:
    """The segment's serialized terminology entry (standard coded name), or "" if none.

    Read as the "TerminologyEntry" tag, which is where every Slicer version keeps it:
    ``vtkSegment.GetTerminology()`` (Slicer >= 5.10 only) reads the same tag.
    """
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value) else ""


def copySegmentAppearance(source, target) -> None:
    """Copy colour and terminology (standard coded name) from one vtkSegment to another."""
    target.SetColor(*source.GetColor())
    terminology = segmentTerminology(source)
    if terminology:
        target.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)


def uniqueSegmentName(segmentationNode, baseName: str) -> str:
    """``baseName`` if unused in the segmentation, else "<base> (ProtoSAM)", "<base> (ProtoSAM 2)"..."""
    segmentation = segmentationNode.GetSegmentation()
    if not segmentation.GetSegmentIdBySegmentName(baseName):
        return baseName
    counter = 1
    while True:
        suffix = RESULT_NAME_SUFFIX if counter == 1 else f"{RESULT_NAME_SUFFIX} {counter}"
        name = f"{baseName} ({suffix})"
        if not segmentation.GetSegmentIdBySegmentName(name):
            return name
        counter += 1


def newSegmentationLike(volumeNode, name: str):
    """Empty segmentation node on a volume's grid, under the volume's parent transform."""
    scene = volumeNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    if volumeNode.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(volumeNode.GetParentTransformNode().GetID())
    return node


def createPreview(targetVolumeNode, supportSegmentationNode, masks_Kji: Mapping[str, np.ndarray]):
    """Preview segmentation with one segment per support segment ID -> (K, J, I) uint8 mask.

    Preview segments keep the support segment IDs, names, colours and terminology.
    Returns the preview node.
    """
    preview = newSegmentationLike(targetVolumeNode, f"{targetVolumeNode.GetName()} ProtoSAM preview")
    preview.SetAttribute(PREVIEW_ATTRIBUTE, "1")
    try:
        with mrml_io.renderPaused():
            for segmentId, mask in masks_Kji.items():
                source = supportSegmentationNode.GetSegmentation().GetSegment(segmentId)
                if source is None:
                    raise InputError(f"Support segment '{segmentId}' was removed during the run.")
                newId = preview.GetSegmentation().AddEmptySegment(segmentId, source.GetName(), source.GetColor())
                if not newId:
                    raise RuntimeError("Could not add a segment: the Segmentations module logic is not available.")
                copySegmentAppearance(source, preview.GetSegmentation().GetSegment(newId))
                mrml_io.writeSegmentFromArray(mask, preview, newId, targetVolumeNode,
                                              previous_Kji=np.zeros_like(mask))
    except Exception:
        removeNode(preview)
        raise
    return preview


def isPreview(node) -> bool:
    return node is not None and node.GetAttribute(PREVIEW_ATTRIBUTE) == "1"


def removeNode(node) -> None:
    """Remove a node and its display and storage nodes from its scene, if still there."""
    if node is None or node.GetScene() is None:
        return
    scene = node.GetScene()
    if not scene.IsNodePresent(node):
        return
    helpers = []
    for getCount, getNth in (("GetNumberOfDisplayNodes", "GetNthDisplayNode"),
                             ("GetNumberOfStorageNodes", "GetNthStorageNode")):
        if hasattr(node, getCount):
            helpers += [getattr(node, getNth)(n) for n in range(getattr(node, getCount)())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


@dataclasses.dataclass
class AcceptedChange:
    """What one Accept did to one destination segmentation.

    replacedLabelmaps: destination segment ID -> copy of its binary labelmap (vtkOrientedImageData,
    the segmentation's own geometry and frame) before it was overwritten.
    """

    destinationNode: object
    addedSegmentIds: List[str] = dataclasses.field(default_factory=list)
    replacedLabelmaps: Dict[str, object] = dataclasses.field(default_factory=dict)
    createdDestination: bool = False


@dataclasses.dataclass
class AcceptUndo:
    """Everything one Accept click changed (possibly several results), undone together.

    bankExamples: example bank folder -> IDs of the examples added to it after this Accept (its
    painted and corrected slices, when the user agreed); Undo accept offers to remove them.
    """

    changes: List[AcceptedChange] = dataclasses.field(default_factory=list)
    bankExamples: Dict[str, List[str]] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.changes


def _segmentLabelmapCopy(segmentationNode, segmentId: str):
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentationNode, segmentId, labelmap, False)
    return labelmap


def _isEmpty(image) -> bool:
    extent = image.GetExtent()
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def undoAccept(undo: AcceptUndo) -> None:
    """Restore what ``undo`` recorded, last change first: added segments (or a segmentation
    created by the Accept) are removed, replaced segments get their previous voxels back.
    Segments or nodes the user deleted since are skipped. The record is emptied."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    with mrml_io.renderPaused():
        for change in reversed(undo.changes):
            node = change.destinationNode
            if node.GetScene() is None or not node.GetScene().IsNodePresent(node):
                continue
            if change.createdDestination:
                removeNode(node)
                continue
            segmentation = node.GetSegmentation()
            for segmentId in change.addedSegmentIds:
                if segmentation.GetSegment(segmentId) is not None:
                    segmentation.RemoveSegment(segmentId)
            for segmentId, labelmap in change.replacedLabelmaps.items():
                if segmentation.GetSegment(segmentId) is None:
                    continue
                if _isEmpty(labelmap):  # the segment was empty: clear what the Accept wrote
                    labelmap = _segmentLabelmapCopy(node, segmentId)
                    if _isEmpty(labelmap):
                        continue
                    labelmap.GetPointData().GetScalars().Fill(0)
                if not logic.SetBinaryLabelmapToSegment(labelmap, node, segmentId, logic.MODE_REPLACE,
                                                        labelmap.GetExtent()):
                    raise RuntimeError(f"Restoring segment '{segmentId}' of '{node.GetName()}' failed.")
    logger.info("Undid the last ProtoSAM accept (%d segmentation(s))", len(undo.changes))
    undo.changes.clear()


def acceptPreview(previewNode, referenceVolumeNode, destinationNode, supportSegmentationNode,
                  mode: str = ACCEPT_NEW, undo: Optional[AcceptUndo] = None,
                  createdDestination: bool = False) -> Dict[str, str]:
    """Copy preview segments into ``destinationNode``; returns support segment ID -> written ID.

    mode "new": add segments named after the support segments (a suffix avoids duplicates).
    mode "replace": overwrite the segment of the same name (when the destination is the support
    segmentation: the support segment itself), creating it if absent.
    Other segments of the destination are not modified. A scene undo state is saved first when
    scene undo is on; ``undo`` (if given) records the change for ``undoAccept`` either way
    (``createdDestination``: the destination was made for this Accept and goes away on undo).
    The preview node is removed afterwards.
    """
    if mode not in ACCEPT_MODES:
        raise ValueError(f"mode must be one of {ACCEPT_MODES}, got {mode!r}")
    if not isPreview(previewNode):
        raise ValueError("previewNode is not a ProtoSAM preview segmentation")
    scene = destinationNode.GetScene()
    previewIds = mrml_io.segmentIds(previewNode)
    masks = {segmentId: mrml_io.segmentToArray(previewNode, segmentId, referenceVolumeNode)
             for segmentId in previewIds}
    if scene is not None and scene.GetUndoFlag():
        scene.SaveStateForUndo()
    change = AcceptedChange(destinationNode, createdDestination=createdDestination)
    if undo is not None:
        undo.changes.append(change)
    written = {}
    destination = destinationNode.GetSegmentation()
    with mrml_io.renderPaused():
        for segmentId in previewIds:
            previewSegment = previewNode.GetSegmentation().GetSegment(segmentId)
            source = supportSegmentationNode.GetSegmentation().GetSegment(segmentId) or previewSegment
            name = previewSegment.GetName()
            targetId = ""
            if mode == ACCEPT_REPLACE:
                if destinationNode is supportSegmentationNode and destination.GetSegment(segmentId) is not None:
                    targetId = segmentId
                else:
                    targetId = destination.GetSegmentIdBySegmentName(name)
            previous = None
            if targetId:
                if targetId not in change.replacedLabelmaps and targetId not in change.addedSegmentIds:
                    change.replacedLabelmaps[targetId] = _segmentLabelmapCopy(destinationNode, targetId)
            else:
                targetId = destination.AddEmptySegment("", uniqueSegmentName(destinationNode, name),
                                                       previewSegment.GetColor())
                if not targetId:
                    raise RuntimeError("Could not add a segment: the Segmentations module logic is not available.")
                change.addedSegmentIds.append(targetId)
                copySegmentAppearance(source, destination.GetSegment(targetId))
                previous = np.zeros_like(masks[segmentId])
            mrml_io.writeSegmentFromArray(masks[segmentId], destinationNode, targetId, referenceVolumeNode,
                                          previous_Kji=previous)
            written[segmentId] = targetId
    logger.info("Accepted %d ProtoSAM segment(s) into '%s' (%s)", len(written), destinationNode.GetName(), mode)
    removeNode(previewNode)
    return written
