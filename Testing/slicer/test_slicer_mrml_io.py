"""Volumes and segments <-> KJI arrays against real MRML (ProtoSAMSlicerLib.mrml_io)."""

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

import slicer
from ProtoSAMSlicerLib import mrml_io
from protosam.errors import InputError
from slicer_mrml_helpers import addSegmentation, addVolume, homogeneous, ijkToRasFrom, rotationMatrix

LPS = np.diag([-1.0, -1.0, 1.0])
PERMUTED = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
GEOMETRIES = {
    "identity": (np.eye(3), (1.0, 1.0, 1.0), None),
    "lps_anisotropic": (LPS, (0.6, 0.8, 2.5), None),
    "permuted": (PERMUTED, (0.7, 1.1, 1.9), None),
    "rotated_with_parent_transform": (
        rotationMatrix((1, 1, 0), 30), (0.9, 0.9, 3.0),
        homogeneous(rotationMatrix((0, 0, 1), 90), (12.0, -4.0, 7.5))),
}
SHAPE = (7, 9, 11)  # K, J, I


def blob(shape, center, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    return (np.linalg.norm(grid - np.reshape(center, (3, 1, 1, 1)), axis=0) <= radius).astype(np.uint8)


@pytest.fixture(params=sorted(GEOMETRIES))
def volume(request, scene):
    directions, spacing, parent = GEOMETRIES[request.param]
    rng = np.random.default_rng(0)
    array = rng.normal(size=SHAPE).astype(np.float32)
    node = addVolume(scene, array, ijkToRasFrom(directions, spacing, (5.0, -3.0, 8.0)),
                     name=request.param, parentTransform=parent)
    return node, array, directions, spacing, parent


def test_volume_array_and_world_matrix(volume):
    node, array, directions, spacing, parent = volume
    assert mrml_io.volumeShapeKji(node) == SHAPE
    out = mrml_io.volumeToArray(node)
    assert out.dtype == np.float32 and np.array_equal(out, array)
    out[0, 0, 0] += 1  # a copy: the node is unchanged
    assert np.array_equal(mrml_io.volumeToArray(node), array)
    expected = ijkToRasFrom(directions, spacing, (5.0, -3.0, 8.0))
    if parent is not None:
        expected = parent @ expected
    assert np.allclose(mrml_io.ijkToWorldMatrix(node), expected)


def test_segments_round_trip_on_shared_labelmap_other_segments_untouched(scene, volume):
    node = volume[0]
    a = blob(SHAPE, (3, 4, 5), 2.5)
    b = blob(SHAPE, (3, 4, 8), 2.0) * (a == 0)
    segmentation, ids = addSegmentation(scene, node, {"a": a, "b": b})
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1  # one shared labelmap, two labels
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["a"], node), a)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["b"], node), b)

    new = np.zeros(SHAPE, np.uint8)
    new[1:3, 2:5, 1:4] = 1
    box = mrml_io.writeSegmentFromArray(new, segmentation, ids["a"], node)
    changed = (new != a)
    (k0, k1), (j0, j1), (i0, i1) = box
    assert changed.sum() == changed[k0:k1, j0:j1, i0:i1].sum()  # box holds every change
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["a"], node), new)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["b"], node), b)
    # Writing the same mask again changes nothing.
    assert mrml_io.writeSegmentFromArray(new, segmentation, ids["a"], node) is None


def test_changed_box_is_tight():
    old = np.zeros((5, 6, 7), np.uint8)
    new = old.copy()
    assert mrml_io.changedBox(new, old) is None
    new[1, 2, 3] = 1
    new[3, 4, 3] = 1
    assert mrml_io.changedBox(new, old) == ((1, 4), (2, 5), (3, 4))
    assert mrml_io.changedBox(new, None) == ((1, 4), (2, 5), (3, 4))


def test_segment_resampled_from_other_geometry_and_transform(scene):
    """Support segment stored on a 2x finer grid, under a different transform than the volume."""
    volume = addVolume(scene, np.zeros(SHAPE, np.float32), ijkToRasFrom(LPS, (1.0, 1.0, 2.0)), "v",
                       parentTransform=homogeneous(np.eye(3), (10.0, 0.0, 0.0)))
    fineShape = (SHAPE[0] * 2, SHAPE[1] * 2, SHAPE[2] * 2)
    # Same physical box; the fine grid is not transformed but shifted by the same 10 mm in R,
    # so every coarse voxel centre falls on a fine voxel of the same region.
    fineIjkToRas = ijkToRasFrom(LPS, (0.5, 0.5, 1.0), (10.0 + 0.25, 0.25, -0.5))
    fine = addVolume(scene, np.zeros(fineShape, np.float32), fineIjkToRas, "fine")
    coarseMask = np.zeros(SHAPE, np.uint8)
    coarseMask[2:5, 3:6, 4:8] = 1
    fineMask = coarseMask.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    segmentation, ids = addSegmentation(scene, fine, {"s": fineMask})
    assert segmentation.GetParentTransformNode() is None
    out = mrml_io.segmentToArray(segmentation, ids["s"], volume)
    assert out.dtype == np.uint8
    assert np.array_equal(out, coarseMask)
    # Writing back through the different geometry lands on the same physical voxels.
    newMask = np.zeros(SHAPE, np.uint8)
    newMask[1:3, 1:4, 2:5] = 1
    mrml_io.writeSegmentFromArray(newMask, segmentation, ids["s"], volume)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["s"], volume), newMask)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["s"], fine),
                          newMask.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_empty_segment_reads_as_zeros(scene):
    volume = addVolume(scene, np.zeros(SHAPE, np.float32), ijkToRasFrom(np.eye(3)), "v")
    segmentation, ids = addSegmentation(scene, volume, {"empty": np.zeros(SHAPE, np.uint8)})
    out = mrml_io.segmentToArray(segmentation, ids["empty"], volume)
    assert out.shape == SHAPE and not out.any()


def test_clear_errors(scene):
    volume = addVolume(scene, np.zeros(SHAPE, np.float32), ijkToRasFrom(np.eye(3)), "v")
    segmentation, _ = addSegmentation(scene, volume, {"a": np.zeros(SHAPE, np.uint8)})
    with pytest.raises(InputError, match="not in"):
        mrml_io.segmentToArray(segmentation, "missing", volume)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "noimage")
    with pytest.raises(InputError, match="no image data"):
        mrml_io.volumeToArray(empty)
    rgb = slicer.util.addVolumeFromArray(np.zeros((2, 3, 4, 3), np.uint8), name="rgb",
                                         nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(InputError, match="3 components"):
        mrml_io.volumeToArray(rgb)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear transform.*Harden"):
        mrml_io.ijkToWorldMatrix(volume)
    with pytest.raises(ValueError):
        mrml_io.writeSegmentFromArray(np.zeros((1, 2, 3), np.uint8), segmentation, "a", volume)


def test_segment_into_reference_geometry_of_another_segmentation(scene):
    """The Segment Editor's grid: a segment on a volume's grid (under one transform) lands on the
    other segmentation's 2x finer reference geometry (under another transform), same World voxels."""
    volume = addVolume(scene, np.zeros(SHAPE, np.float32), ijkToRasFrom(LPS, (1.0, 1.0, 2.0)), "v",
                       parentTransform=homogeneous(np.eye(3), (10.0, 0.0, 0.0)))
    fineShape = (SHAPE[0] * 2, SHAPE[1] * 2, SHAPE[2] * 2)
    fine = addVolume(scene, np.zeros(fineShape, np.float32), ijkToRasFrom(LPS, (0.5, 0.5, 1.0), (10.25, 0.25, -0.5)),
                     "fine")
    editable, _ = addSegmentation(scene, fine, {"a": np.zeros(fineShape, np.uint8)})
    mask = blob(SHAPE, (3, 4, 5), 2)
    source, ids = addSegmentation(scene, volume, {"s": mask})
    assert source.GetParentTransformNode() is not None and editable.GetParentTransformNode() is None
    image = mrml_io.referenceGeometryImage(editable)
    assert image.GetExtent() == (0, fineShape[2] - 1, 0, fineShape[1] - 1, 0, fineShape[0] - 1)
    mrml_io.segmentIntoImage(source, ids["s"], image, editable)
    assert np.array_equal(mrml_io._imageArray(image), mask.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    # A segmentation without reference geometry edits on the source volume's grid.
    bare = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bare")
    with pytest.raises(InputError, match="no reference geometry"):
        mrml_io.referenceGeometryImage(bare)
    onVolume = mrml_io.referenceGeometryImage(bare, volume)
    mrml_io.segmentIntoImage(source, ids["s"], onVolume, bare)
    # "bare" has no parent transform: the segment is placed in World, i.e. shifted 10 mm in R.
    import vtk
    matrix = vtk.vtkMatrix4x4()
    onVolume.GetImageToWorldMatrix(matrix)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(matrix), ijkToRasFrom(LPS, (1.0, 1.0, 2.0), (10.0, 0.0, 0.0)))
    assert np.array_equal(mrml_io._imageArray(onVolume), mask)
    empty, emptyIds = addSegmentation(scene, volume, {"e": np.zeros(SHAPE, np.uint8)})
    mrml_io.segmentIntoImage(empty, emptyIds["e"], onVolume, bare)
    assert not mrml_io._imageArray(onVolume).any()


def _editBoxes():
    """(name, edit) pairs: each edit changes a multi-slice segment inside one small box only."""
    def oneSliceAdded(mask):
        mask[4, 1:3, 2:6] = 1
    def subBoxErased(mask):
        mask[2:4, 3:5, 4:6] = 0
    def subBoxSetAndErased(mask):
        mask[1:3, 6:8, 7:10] = 1 - mask[1:3, 6:8, 7:10]
    return [("one_slice_added", oneSliceAdded), ("sub_box_erased", subBoxErased),
            ("sub_box_flipped", subBoxSetAndErased)]


@pytest.mark.parametrize("shared", [False, True], ids=["own_layer", "shared_layer"])
@pytest.mark.parametrize("editName,edit", _editBoxes(), ids=[name for name, _ in _editBoxes()])
def test_box_write_keeps_every_voxel_outside_the_box(scene, volume, shared, editName, edit):
    """Regression: writing only the changed box must not drop the segment's voxels elsewhere.

    MODE_REPLACE with an extent replaces the whole segment by the (box-sized) modifier in Slicer
    (vtkSegmentationModifier::AppendLabelmapToSegment: CopyImage clipped to the extent, or
    ClearSegment + mask merge on a shared layer), which cleared every slice outside the box.
    """
    node = volume[0]
    a = np.zeros(SHAPE, np.uint8)
    a[1:6, 2:7, 3:8] = 1  # voxels on slices 1..5
    a[0, 0, 0] = 1  # and a lone voxel at a corner, far from every edit box
    b = np.zeros(SHAPE, np.uint8)
    b[0:7, 6:9, 8:11] = 1
    b[a != 0] = 0
    segmentation, ids = addSegmentation(scene, node, {"a": a, "b": b})
    segmentationObject = segmentation.GetSegmentation()
    if shared:
        segmentationObject.CollapseBinaryLabelmaps(False)
        assert segmentationObject.GetNumberOfLayers() == 1
    else:
        segmentationObject.SeparateSegmentLabelmap(ids["a"])
        assert segmentationObject.GetNumberOfLayers() == 2

    new = a.copy()
    edit(new)
    box = mrml_io.writeSegmentFromArray(new, segmentation, ids["a"], node)
    assert box is not None
    (k0, k1), (j0, j1), (i0, i1) = box
    outside = np.ones(SHAPE, bool)
    outside[k0:k1, j0:j1, i0:i1] = False
    assert outside.sum() > 0
    out = mrml_io.segmentToArray(segmentation, ids["a"], node)
    assert np.array_equal(out[outside], a[outside]), f"{int((out != a)[outside].sum())} voxels outside the box changed"
    assert np.array_equal(out, new)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["b"], node), b)
    # With the previous array passed in (results.acceptPreview's path) the result is the same.
    back = a.copy()
    mrml_io.writeSegmentFromArray(back, segmentation, ids["a"], node, previous_Kji=new)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["a"], node), a)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["b"], node), b)


def test_box_write_through_another_geometry_keeps_voxels_outside_the_box(scene):
    """The segment lives on a 2x finer grid under another transform than the volume it is written
    on; a one-slice write keeps the other slices (seen on both grids)."""
    volume = addVolume(scene, np.zeros(SHAPE, np.float32), ijkToRasFrom(LPS, (0.8, 1.0, 2.5)), "v",
                       parentTransform=homogeneous(np.eye(3), (10.0, 0.0, 0.0)))
    fineShape = (SHAPE[0] * 2, SHAPE[1] * 2, SHAPE[2] * 2)
    fine = addVolume(scene, np.zeros(fineShape, np.float32),
                     ijkToRasFrom(LPS, (0.4, 0.5, 1.25), (10.0 + 0.2, 0.25, -0.625)), "fine")
    coarse = np.zeros(SHAPE, np.uint8)
    coarse[1:6, 2:7, 3:8] = 1
    segmentation, ids = addSegmentation(scene, fine, {"s": coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)})
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["s"], volume), coarse)
    new = coarse.copy()
    new[6, 1:3, 2:6] = 1
    assert mrml_io.writeSegmentFromArray(new, segmentation, ids["s"], volume) == ((6, 7), (1, 3), (2, 6))
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["s"], volume), new)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["s"], fine),
                          new.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_accept_replace_that_changes_one_slice_keeps_the_users_other_slices(scene):
    """Accept (results.acceptPreview, mode replace) writes through writeSegmentFromArray into the
    user's segmentation: a preview that differs from the user's segment on one slice only must
    leave the user's other slices, and the segment sharing its layer, as they were."""
    from ProtoSAMSlicerLib import results

    directions, spacing, _ = GEOMETRIES["lps_anisotropic"]
    volume = addVolume(scene, np.zeros(SHAPE, np.float32), ijkToRasFrom(directions, spacing, (5.0, -3.0, 8.0)), "ct")
    user = np.zeros(SHAPE, np.uint8)
    user[1:5, 2:7, 3:8] = 1
    other = np.zeros(SHAPE, np.uint8)
    other[:, 7:9, 8:11] = 1
    segmentation, ids = addSegmentation(scene, volume, {"liver": user, "other": other})
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)
    propagated = user.copy()
    propagated[5, 2:7, 3:8] = 1  # the preview adds slice 5 and keeps slices 1..4
    preview = results.createPreview(volume, segmentation, {ids["liver"]: propagated})
    written = results.acceptPreview(preview, volume, segmentation, segmentation, mode=results.ACCEPT_REPLACE)
    assert written == {ids["liver"]: ids["liver"]}
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["liver"], volume), propagated)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["other"], volume), other)


@pytest.mark.parametrize("shared", [False, True], ids=["own_layer", "shared_layer"])
@pytest.mark.parametrize("sliceAxis", [0, 2], ids=["k_slice", "i_slice"])
def test_one_slice_write_on_a_flipped_anisotropic_volume_keeps_the_other_slices(scene, shared, sliceAxis):
    """Regression (#21 item 11): a click writes one slice of the preview (``box`` = that slice).
    On a volume flipped along every axis (K too) with 2.5 mm slices, every voxel of the other
    slices must stay, and so must the segment sharing the layer. The bug behind the effect's
    whole-extent write was Slicer's MODE_REPLACE (it replaces the whole segment by the box-sized
    modifier); writeSegmentFromArray merges MIN then MASK inside the box instead."""
    flipped = np.diag([-1.0, -1.0, -1.0])
    volume = addVolume(scene, np.zeros(SHAPE, np.float32), ijkToRasFrom(flipped, (0.8, 0.6, 2.5), (5.0, -3.0, 8.0)),
                       "flipped")
    rng = np.random.default_rng(11)
    a = (rng.random(SHAPE) < 0.4).astype(np.uint8)  # voxels on every slice
    b = ((rng.random(SHAPE) < 0.3) & (a == 0)).astype(np.uint8)
    segmentation, ids = addSegmentation(scene, volume, {"a": a, "b": b})
    if shared:
        segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)
        assert segmentation.GetSegmentation().GetNumberOfLayers() == 1
    index = 3
    box = tuple((index, index + 1) if axis == sliceAxis else (0, n) for axis, n in enumerate(SHAPE))
    region = tuple(slice(lo, hi) for lo, hi in box)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["a"], volume, box=box), a[region])
    newSlice = np.zeros(mrml_io._boxShape(box), np.uint8)
    newSlice[(slice(None),) * 3] = rng.random(newSlice.shape) < 0.5
    written = mrml_io.writeSegmentFromArray(newSlice, segmentation, ids["a"], volume, box=box)
    assert written is not None and written[sliceAxis] == (index, index + 1)
    expected = a.copy()
    expected[region] = newSlice
    out = mrml_io.segmentToArray(segmentation, ids["a"], volume)
    others = np.ones(SHAPE, bool)
    others[region] = False
    assert np.array_equal(out[others], a[others]), f"{int((out != a)[others].sum())} voxels of other slices changed"
    assert np.array_equal(out, expected)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["b"], volume), b)
    with pytest.raises(ValueError, match="box"):
        mrml_io.writeSegmentFromArray(newSlice, segmentation, ids["a"], volume, box=((0, 1), (0, 99), (0, 11)))
