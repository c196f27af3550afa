"""Accept outside the Segment Editor can be undone (scene undo is off by default in Slicer).

Real MRML (slicer-core): a preview made by results.createPreview is accepted into the user's
segmentation, then ProtoSAMLogic.undoAccept restores exactly the voxels and segments that were
there before, with scene undo left off as the Slicer application leaves it.
"""

import numpy as np


import slicer
from ProtoSAMSlicerLib import mrml_io, results
from ProtoSAMSlicerLib.logic import PropagationResult, ProtoSAMLogic
from slicer_mrml_helpers import addSegmentation, addVolume, ijkToRasFrom

SHAPE = (5, 12, 14)


def makeResult(scene, targetIsSupport=True):
    image = np.zeros(SHAPE, np.float32)
    volume = addVolume(scene, image, ijkToRasFrom(np.eye(3), (1.0, 1.0, 2.0), (3.0, -4.0, 5.0)), "ct")
    painted = np.zeros(SHAPE, np.uint8)
    painted[2, 3:8, 4:9] = 1
    other = np.zeros(SHAPE, np.uint8)
    other[0:5, 0:2, 0:3] = 1
    segmentation, ids = addSegmentation(scene, volume, {"liver": painted, "other": other})
    target = volume
    if not targetIsSupport:
        target = addVolume(scene, image, ijkToRasFrom(np.eye(3), (1.0, 1.0, 2.0), (3.0, -4.0, 5.0)), "other scan")
    propagated = np.zeros(SHAPE, np.uint8)
    propagated[1:4, 2:9, 3:10] = 1
    preview = results.createPreview(target, segmentation, {ids["liver"]: propagated})
    result = PropagationResult(targetVolumeNode=target, supportVolumeNode=volume, supportSegmentationNode=segmentation,
                               previewSegmentationNode=preview, segmentIds=[ids["liver"]], sliceAxis=None,
                               supportSlices={}, processedSlices={}, seconds=0.0)
    return volume, segmentation, ids, painted, other, propagated, result


def read(segmentation, segmentId, volume):
    return mrml_io.segmentToArray(segmentation, segmentId, volume)


def test_replace_then_undo_restores_the_painted_segment(scene):
    volume, segmentation, ids, painted, other, propagated, result = makeResult(scene)
    assert not scene.GetUndoFlag()  # as in the Slicer application
    undo = results.AcceptUndo()
    logic = ProtoSAMLogic()
    written = logic.accept(result, mode=results.ACCEPT_REPLACE, undo=undo)
    assert written == {ids["liver"]: ids["liver"]}
    assert np.array_equal(read(segmentation, ids["liver"], volume), propagated)  # the painting is overwritten
    assert not undo.empty
    logic.undoAccept(undo)
    assert np.array_equal(read(segmentation, ids["liver"], volume), painted)
    assert np.array_equal(read(segmentation, ids["other"], volume), other)
    assert mrml_io.segmentIds(segmentation) == [ids["liver"], ids["other"]]
    assert undo.empty


def test_new_segments_and_new_segmentation_are_removed_on_undo(scene):
    volume, segmentation, ids, painted, other, propagated, result = makeResult(scene)
    undo = results.AcceptUndo()
    logic = ProtoSAMLogic()
    written = logic.accept(result, mode=results.ACCEPT_NEW, undo=undo)
    assert segmentation.GetSegmentation().GetSegment(written[ids["liver"]]).GetName() == "liver (ProtoSAM)"
    logic.undoAccept(undo)
    assert mrml_io.segmentIds(segmentation) == [ids["liver"], ids["other"]]
    assert np.array_equal(read(segmentation, ids["liver"], volume), painted)

    _, segmentation2, ids2, *_, result2 = makeResult(scene, targetIsSupport=False)
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    logic.accept(result2, undo=undo)
    created = scene.GetFirstNodeByName("other scan ProtoSAM")
    assert created is not None and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    logic.undoAccept(undo)
    assert not scene.IsNodePresent(created)


def test_undo_skips_what_the_user_deleted_since(scene):
    volume, segmentation, ids, painted, other, propagated, result = makeResult(scene)
    undo = results.AcceptUndo()
    ProtoSAMLogic().accept(result, mode=results.ACCEPT_REPLACE, undo=undo)
    segmentation.GetSegmentation().RemoveSegment(ids["liver"])
    results.undoAccept(undo)  # nothing to restore into: no error, nothing recreated
    assert mrml_io.segmentIds(segmentation) == [ids["other"]]


def test_terminology_read_through_the_tag_every_slicer_version_has(scene):
    """results.segmentTerminology reads the "TerminologyEntry" tag (Slicer 5.8 has no
    vtkSegment.GetTerminology); it agrees with GetTerminology where that exists (5.10+)."""
    segment = slicer.vtkSegment()
    entry = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~" \
            "SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
    assert results.segmentTerminology(segment) == entry == segment.GetTerminology()
    copy = slicer.vtkSegment()
    results.copySegmentAppearance(segment, copy)
    assert results.segmentTerminology(copy) == entry
    untagged = slicer.vtkSegment()
    untagged.RemoveTag(slicer.vtkSegment.GetTerminologyEntryTagName())
    assert results.segmentTerminology(untagged) == ""
