"""The module's review queue (ProtoSAMSlicerLib/review.py) on real MRML (slicer-core): the order
and columns of the volume and slice rows, and a jump that puts the slice views on the row's
slice, through the volume's IJK-to-RAS matrix and its parent transform."""

import numpy as np
import pytest

from ProtoSAMSlicerLib import geometry, mrml_io, review
from ProtoSAMSlicerLib.logic import PropagationResult, sliceViewGeometry
from slicer_mrml_helpers import addSegmentation, addSliceNode, addVolume, homogeneous, ijkToRasFrom, rotationMatrix

SHAPE = (7, 10, 12)  # K, J, I
LPS = np.diag([-1.0, -1.0, 1.0])
NAN = np.nan


def _result(scene, name, scores, volumeConfidence, parentTransform=None, sliceAxis=None):
    volume = addVolume(scene, np.zeros(SHAPE, np.float32), ijkToRasFrom(LPS, (0.8, 0.9, 2.5), (5.0, -3.0, 10.0)),
                       name, parentTransform=parentTransform)
    masks = {segment: np.zeros(SHAPE, np.uint8) for segment in scores}
    segmentation, ids = addSegmentation(scene, volume, masks, name=name + " segments")
    axis = sliceAxis or geometry.SliceAxis(ijkAxis=2, kjiAxis=0, sign=1, angleDegrees=0.0)
    return PropagationResult(
        targetVolumeNode=volume, supportVolumeNode=volume, supportSegmentationNode=segmentation,
        previewSegmentationNode=None, segmentIds=[ids[s] for s in scores], sliceAxis=axis, supportSlices={},
        processedSlices={}, seconds=0.0,
        sliceConfidence={ids[s]: np.array(v, np.float32) for s, v in scores.items()},
        segmentConfidence={ids[s]: float(np.nanmin(v + [1.0])) for s, v in scores.items()},
        volumeConfidence=volumeConfidence), ids


def test_rows_list_volumes_and_slices_from_least_confident(scene):
    first, firstIds = _result(scene, "first", {"liver": [NAN, 0.9, 0.4, 1.0, 0.7, NAN, NAN],
                                               "spleen": [NAN, NAN, 0.8, 0.95, NAN, NAN, NAN]}, 0.7)
    second, secondIds = _result(scene, "second", {"liver": [NAN, 0.3, 0.6, NAN, NAN, NAN, NAN]}, 0.45)
    unscored, _ = _result(scene, "old", {"liver": [NAN] * 7}, None)

    volumes = review.volumeRows([first, second, unscored])
    assert [(row.volumeName, row.score) for row in volumes] == [("second", 0.45), ("first", 0.7)]
    # A volume row points at its least confident slice.
    assert (volumes[0].segmentId, volumes[0].sliceIndex) == (secondIds["liver"], 1)
    assert review.volumeRowTexts(volumes[1]) == ["first", "0.70", "liver @ 2"]

    slices = review.sliceRows([first, second, unscored])
    assert [(row.volumeName, row.segmentName, row.sliceIndex, round(row.score, 4)) for row in slices] == [
        ("second", "liver", 1, 0.3), ("first", "liver", 2, 0.4), ("second", "liver", 2, 0.6),
        ("first", "liver", 4, 0.7), ("first", "spleen", 2, 0.8), ("first", "liver", 1, 0.9),
        ("first", "spleen", 3, 0.95), ("first", "liver", 3, 1.0)]
    assert review.sliceRowTexts(slices[0]) == ["second", "liver", "1", "0.30"]
    assert len(review.SLICE_COLUMNS) == len(review.sliceRowTexts(slices[0]))
    assert len(review.VOLUME_COLUMNS) == len(review.volumeRowTexts(volumes[0]))
    assert [row.sliceIndex for row in review.sliceRows([first, second], 2)] == [1, 2]


@pytest.mark.parametrize("transformed", [False, True])
def test_a_jump_puts_the_slice_views_on_the_rows_slice(scene, transformed):
    parent = homogeneous(rotationMatrix((0, 0, 1), 12.0), (4.0, -7.0, 3.0)) if transformed else None
    result, ids = _result(scene, "ct", {"liver": [NAN, 0.5, 0.2, 0.8, NAN, NAN, NAN]}, 0.5, parentTransform=parent)
    red = addSliceNode(scene, "Red", "Axial")
    yellow = addSliceNode(scene, "Yellow", "Sagittal")
    ijkToWorld = mrml_io.ijkToWorldMatrix(result.targetVolumeNode)
    normal = sliceViewGeometry(red)[0]
    # The view looks along K when the volume is not rotated; with the rotation about S, K still is the normal.
    assert geometry.sliceAxisFromNormal(normal, ijkToWorld).ijkAxis == 2

    row = review.sliceRows([result])[0]
    assert row.sliceIndex == 2
    position = review.jumpToRow(row)
    expected = ijkToWorld @ np.array([(SHAPE[2] - 1) / 2, (SHAPE[1] - 1) / 2, 2.0, 1.0])
    np.testing.assert_allclose(position, expected[:3], atol=1e-9)
    # The red view's plane now goes through slice 2: its origin maps back to k = 2 in the volume.
    normal, point = sliceViewGeometry(red)
    k = (np.linalg.inv(ijkToWorld) @ np.append(point, 1.0))[2]
    assert k == pytest.approx(2.0, abs=1e-6)
    assert float(normal @ point) == pytest.approx(float(normal @ expected[:3]))  # the slice offset
    # The other views are centred on the same point.
    yellowNormal, yellowPoint = sliceViewGeometry(yellow)
    assert float(yellowNormal @ yellowPoint) == pytest.approx(float(yellowNormal @ expected[:3]))

    # Another slice along another axis: a result sliced along I (sagittal) jumps along I.
    sagittal, _ = _result(scene, "sag", {"liver": [0.9] * 5 + [0.1] + [NAN] * 6}, 0.2,
                          sliceAxis=geometry.SliceAxis(ijkAxis=0, kjiAxis=2, sign=-1, angleDegrees=0.0))
    review.jumpToRow(review.sliceRows([sagittal])[0])
    normal, point = sliceViewGeometry(yellow)
    i = (np.linalg.inv(mrml_io.ijkToWorldMatrix(sagittal.targetVolumeNode)) @ np.append(point, 1.0))[0]
    assert i == pytest.approx(5.0, abs=1e-6)


def test_a_row_whose_volume_left_the_scene_says_so(scene):
    result, _ = _result(scene, "gone", {"liver": [0.5] + [NAN] * 6}, 0.5)
    row = review.sliceRows([result])[0]
    scene.RemoveNode(result.targetVolumeNode)
    with pytest.raises(ValueError, match="no longer in the scene"):
        review.jumpToRow(row)
    volumeRow = review.ReviewRow(result, "", -1, 0.5)
    with pytest.raises(ValueError, match="no scored slice"):
        review.jumpToRow(volumeRow)
