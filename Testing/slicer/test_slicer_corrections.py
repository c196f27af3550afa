"""Click corrections of a ProtoSAM preview (EffectSession) on real MRML with the tiny models.

Clicks are given as World (RAS) points, as a slice view reports them; the volumes are flipped
(LPS), rotated, anisotropic and under a parent transform, so the click must go through the
volume's full IJK-to-World chain to land on the right voxel of the right slice.
"""

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

import slicer
from ProtoSAMSlicerLib import effect_session, geometry, mrml_io
from ProtoSAMSlicerLib.effect_session import EffectSession
from ProtoSAMSlicerLib.logic import ProtoSAMLogic
from ProtoSAMSlicerLib.worker_client import workerForDevice
from ProtoSAMSlicerLib.worker_client import WorkerSession
from protosam.errors import InputError
from slicer_mrml_helpers import (addSegmentation, addVolume, homogeneous, ijkToRasFrom, rotationMatrix,
                                 segmentEditor)

SHAPE = (6, 16, 18)  # K, J, I
SAM_TINY_EMBEDDING_BYTES = 32 * 64 * 64 * 4  # float32 [1, 32, 64, 64] (sam_tiny)
LPS = np.diag([-1.0, -1.0, 1.0])

GEOMETRIES = {
    "flipped_anisotropic": (LPS, (0.8, 0.8, 2.5), None),
    "rotated": (rotationMatrix((1, 1, 0), 30) @ LPS, (1.0, 0.7, 2.0), None),
    "rotated_under_transform": (rotationMatrix((0, 1, 0), 20) @ LPS, (0.8, 1.1, 3.0),
                                homogeneous(rotationMatrix((0, 0, 1), 90), (5.0, -3.0, 1.0))),
}


def buildEditor(scene, directions, spacing, parent):
    rng = np.random.default_rng(3)
    image = rng.normal(0, 20, SHAPE).astype(np.float32)
    image[1:5, 4:12, 5:13] += 300
    ijkToRas = ijkToRasFrom(directions, spacing, (7.0, 3.0, -2.0))
    volume = addVolume(scene, image, ijkToRas, "ct", parentTransform=parent)
    liver = np.zeros(SHAPE, np.uint8)
    liver[2, 4:12, 5:13] = 1
    other = np.zeros(SHAPE, np.uint8)
    other[0:6, 0:16, 15:18] = 1
    segmentation, ids = addSegmentation(scene, volume, {"liver": liver, "other": other})
    # OverwriteNone: "other" keeps its voxels, which is checkable.
    editorNode, editorLogic = segmentEditor(scene, segmentation, volume, ids["liver"],
                                            slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    saves = []

    def saveStateForUndo():
        saves.append(1)
        editorLogic.SaveStateForUndo()

    def modifySegment(labelmap, segmentId):
        editorLogic.ModifySegmentByLabelmap(segmentation, segmentId, labelmap, editorLogic.ModificationModeAdd, True, False)

    session = EffectSession(ProtoSAMLogic(), saveStateForUndo, modifySegment)
    ijkToWorld = mrml_io.ijkToWorldMatrix(volume)
    return dict(volume=volume, segmentation=segmentation, ids=ids, editorLogic=editorLogic, session=session,
                saves=saves, ijkToWorld=ijkToWorld, arrays={"liver": liver, "other": other})


def world(ijkToWorld, ijk):
    return (ijkToWorld @ np.append(np.asarray(ijk, float), 1.0))[:3]


def startPreview(e, tinyOptions, ijkAxis=2):
    normal = e["ijkToWorld"][:3, ijkAxis]
    e["session"].start(e["volume"], e["segmentation"], e["ids"]["liver"], sliceNormal_World=normal,
                       slicePoint_World=world(e["ijkToWorld"], (9, 8, 2)), options=tinyOptions, waitForCompletion=True)
    return normal


def preview(e):
    return mrml_io.segmentToArray(e["session"].result.previewSegmentationNode, e["ids"]["liver"], e["volume"])


def read(e, name):
    return mrml_io.segmentToArray(e["segmentation"], e["ids"][name], e["volume"])


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_clicks_in_ras_land_on_the_right_voxel_of_the_right_slice(scene, tinyOptions, name, monkeypatch):
    e = buildEditor(scene, *GEOMETRIES[name])
    written = []  # (box argument, box written) of each preview write
    write = mrml_io.writeSegmentFromArray

    def recordingWrite(*args, **kwargs):
        written.append((kwargs.get("box"), write(*args, **kwargs)))
        return written[-1][1]

    monkeypatch.setattr(mrml_io, "writeSegmentFromArray", recordingWrite)
    idleCalls = []
    # What the GUI sets (slicer.app.processEvents): called while the logic waits on the worker.
    e["session"].logic.idle = lambda: idleCalls.append(1)
    normal = startPreview(e, tinyOptions)
    session = e["session"]
    before = preview(e)
    written.clear()
    # A point 0.3 voxel off the centre of voxel (i, j, k) = (14, 3, 4) still belongs to it.
    point = world(e["ijkToWorld"], (14.3, 2.7, 4.2))
    assert session.clickTarget(point, normal) == (4, 14, 3)  # slice k=4; column i=14, row j=3
    worker = workerForDevice("cpu")
    cachedBefore = worker.health().cache_bytes
    assert session.addClick(point, normal, positive=True) == 4
    # The session lives in the worker process, in the run's engine cache: at most the clicked
    # slice's SAM embedding is added (the run skips SAM where the coarse mask is empty), once.
    assert isinstance(session.corrections, WorkerSession)
    cachedAfter = worker.health().cache_bytes
    assert 0 < cachedBefore <= cachedAfter <= cachedBefore + SAM_TINY_EMBEDDING_BYTES
    session.addClick(world(e["ijkToWorld"], (13, 4, 4)), normal, positive=False)
    assert worker.health().cache_bytes == cachedAfter
    after = preview(e)
    # A click reads and writes its slice only (#21 item 11), not the whole extent.
    assert len(written) == 2 and all(box == ((4, 5), (0, SHAPE[1]), (0, SHAPE[2])) for box, _ in written)
    assert all(changed is None or changed[0] == (4, 5) for _, changed in written)
    assert session.clicks(4) == [(14.0, 3.0, 1), (13.0, 4.0, 0)]
    unchanged = [k for k in range(SHAPE[0]) if k != 4]
    np.testing.assert_array_equal(after[unchanged], before[unchanged])
    np.testing.assert_array_equal(after, session._orientation.from_canonical(session.corrections.mask(e["ids"]["liver"])))
    assert session.clickMarkups.GetNumberOfControlPoints() == 2
    np.testing.assert_allclose(session.clickMarkups.GetNthControlPointPositionWorld(0), point, atol=1e-6)
    assert np.array_equal(read(e, "liver"), e["arrays"]["liver"]), "nothing is written before Apply"
    beforeUpdate = worker.health().cache_bytes
    idleCalls.clear()
    updateProgress = []
    session.updateVolume(progressCallback=lambda done, total: updateProgress.append((done, total)))
    # The update runs in the worker; this (GUI) thread keeps processing events meanwhile and
    # shows the worker's progress, ending at the last slice.
    assert idleCalls, "the GUI was not kept responsive during the update"
    assert updateProgress and updateProgress[-1][0] == updateProgress[-1][1] > 0
    # The update reads the run's DINOv2 features from the engine cache: a session seeing another
    # volume (or the same one in another order) would add all SHAPE[0] feature maps (128 KiB
    # each, 1.5 SAM embeddings together); only whole SAM embeddings of newly non-empty slices
    # can be added here.
    assert (worker.health().cache_bytes - beforeUpdate) % SAM_TINY_EMBEDDING_BYTES == 0
    np.testing.assert_array_equal(preview(e)[4], after[4])


def test_views_across_the_axis_or_oblique_are_refused(scene, tinyOptions):
    e = buildEditor(scene, *GEOMETRIES["rotated"])
    startPreview(e, tinyOptions)
    point = world(e["ijkToWorld"], (9, 8, 2))
    with pytest.raises(InputError, match="along the axis the preview was propagated on"):
        e["session"].clickTarget(point, e["ijkToWorld"][:3, 0])
    oblique = e["ijkToWorld"][:3, 2] / np.linalg.norm(e["ijkToWorld"][:3, 2]) + 0.6 * e["ijkToWorld"][:3, 0]
    with pytest.raises(geometry.ObliqueSliceError):
        e["session"].clickTarget(point, oblique)
    with pytest.raises(InputError, match="outside the volume"):
        e["session"].clickTarget(world(e["ijkToWorld"], (30, 8, 2)), e["ijkToWorld"][:3, 2])


# Not under a parent transform: slicer-core's editor logic masks transformed segmentations in
# World while modifier labelmaps are in the segmentation's frame, so "overwrite none" cannot be
# checked headless there (see test_slicer_effect_session.test_masking_settings_are_respected).
@pytest.mark.parametrize("name", ["flipped_anisotropic", "rotated"])
def test_undo_clear_update_then_apply_is_one_undo_step(scene, tinyOptions, name):
    e = buildEditor(scene, *GEOMETRIES[name])
    normal = startPreview(e, tinyOptions)
    session = e["session"]
    start = preview(e)
    session.addClick(world(e["ijkToWorld"], (14, 3, 4)), normal, positive=True)
    afterFirst = preview(e)
    session.addClick(world(e["ijkToWorld"], (9, 8, 1)), normal, positive=False)
    assert session.undoClick() == 1
    np.testing.assert_array_equal(preview(e), afterFirst)
    session.clearSliceClicks(4)
    np.testing.assert_array_equal(preview(e), start)
    assert session.clickMarkups.GetNumberOfControlPoints() == 0

    session.addClick(world(e["ijkToWorld"], (14, 3, 4)), normal, positive=True)
    corrected = preview(e)[4].copy()
    session.updateVolume()
    updated = preview(e)
    np.testing.assert_array_equal(updated[4], corrected)  # the corrected slice survives the update
    np.testing.assert_array_equal(updated[2], e["arrays"]["liver"][2])  # so does the painted one
    session.apply()
    assert e["saves"] == [1] and session.state == effect_session.IDLE
    assert session.clickMarkups is None and scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 0
    np.testing.assert_array_equal(read(e, "liver"), np.maximum(updated, e["arrays"]["liver"]))
    np.testing.assert_array_equal(read(e, "other"), e["arrays"]["other"])
    e["editorLogic"].Undo()
    for name in ("liver", "other"):
        np.testing.assert_array_equal(read(e, name), e["arrays"][name])


def test_cancel_after_corrections_leaves_the_segmentation_as_it_was(scene, tinyOptions):
    e = buildEditor(scene, *GEOMETRIES["flipped_anisotropic"])
    normal = startPreview(e, tinyOptions)
    session = e["session"]
    previewNode = session.result.previewSegmentationNode
    session.addClick(world(e["ijkToWorld"], (14, 3, 4)), normal, positive=True)
    session.updateVolume()
    session.cancel()
    assert session.state == effect_session.IDLE and e["saves"] == []
    assert not scene.IsNodePresent(previewNode)
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 0
    for name in ("liver", "other"):
        np.testing.assert_array_equal(read(e, name), e["arrays"][name])
    with pytest.raises(InputError, match="propagate first"):
        session.addClick(world(e["ijkToWorld"], (14, 3, 4)), normal)


@pytest.mark.parametrize("userList", [True, False], ids=["user_point_list", "no_active_list"])
def test_the_clicks_markup_does_not_take_over_point_placement(scene, tinyOptions, markupsLogic, userList):
    """#21 item 7: adding the "ProtoSAM clicks" markups node made it Slicer's active place list
    (vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded -> SetActiveList, real logic here), so points the
    user then placed from the toolbar went into it and were deleted on Apply/Cancel."""
    e = buildEditor(scene, *GEOMETRIES["flipped_anisotropic"])
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    if userList:
        user = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
        expected = ("vtkMRMLMarkupsFiducialNode", user.GetID())
    else:
        expected = (selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID())
    assert (selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID()) == expected
    normal = startPreview(e, tinyOptions)
    e["session"].addClick(world(e["ijkToWorld"], (14, 3, 4)), normal, positive=True)
    assert e["session"].clickMarkups is not None
    assert (selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID()) == expected
    # What the toolbar's place mode does: the markups logic adds the point to the active list.
    assert markupsLogic.AddControlPoint(1.0, 2.0, 3.0) >= 0
    assert e["session"].clickMarkups.GetNumberOfControlPoints() == 1
    e["session"].cancel()
    placed = [node for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode")]
    assert len(placed) == 1 and placed[0].GetNumberOfControlPoints() == 1
