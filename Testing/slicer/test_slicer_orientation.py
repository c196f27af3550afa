"""One result whatever way a volume is stored, through ProtoSAMLogic on real MRML.

The logic hands the engine KJI arrays with their ijkToWorld and the plane of the slice view;
the engine's canonical order (protosam.orientation) is a pure permutation/flip of the stored
arrays, so differently stored copies of one volume give bit-identical engine inputs and hence
bit-identical results: equality is asserted exactly (it holds by construction on any CPU).
"""

import dataclasses

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

import protosam
from ProtoSAMSlicerLib import mrml_io
from ProtoSAMSlicerLib.logic import ProtoSAMLogic
from ProtoSAMSlicerLib.models import engineCacheForDevice
from protosam.errors import InputError
from slicer_mrml_helpers import addSegmentation, addVolume, homogeneous, ijkToRasFrom, rotationMatrix

LPS = np.diag([-1.0, -1.0, 1.0])
TILT = rotationMatrix((1.0, 2.0, 3.0), 12.0)  # a tilted acquisition
# name -> (KJI permutation, flips) of the stored copy; see storedDifferently.
STORAGE = {
    "as_acquired": ((0, 1, 2), (False, False, False)),
    "slices_reversed": ((0, 1, 2), (True, False, False)),
    "ras_instead_of_lps": ((0, 1, 2), (False, True, True)),
    "stored_sagittally": ((2, 0, 1), (False, False, False)),
    "permuted_and_flipped": ((1, 2, 0), (True, False, True)),
}


def storedDifferently(array_Kji, ijkToRas, permutation, flips):
    """(array, ijkToRas) of the same volume with KJI axes transposed by ``permutation`` then
    flipped where ``flips`` says; every voxel keeps its RAS position."""
    array = np.transpose(array_Kji, permutation)
    shape = array.shape
    array = np.ascontiguousarray(np.flip(array, axis=[a for a in range(3) if flips[a]]))
    newToOldKji = np.zeros((4, 4))
    newToOldKji[3, 3] = 1
    for newAxis, oldAxis in enumerate(permutation):
        newToOldKji[oldAxis, newAxis] = -1 if flips[newAxis] else 1
        newToOldKji[oldAxis, 3] = shape[newAxis] - 1 if flips[newAxis] else 0
    reverse = np.eye(4)[[2, 1, 0, 3]]  # IJK <-> KJI index order
    return array, ijkToRas @ reverse @ newToOldKji @ reverse


def restored(array_Kji, permutation, flips):
    """Inverse of storedDifferently for arrays."""
    return np.transpose(np.flip(array_Kji, axis=[a for a in range(3) if flips[a]]), np.argsort(permutation))


PAINTED = 2  # the slice the user painted; its mirror in 7 slices is 4


def acquisition(seed=0):
    """A tilted, LPS-stored, anisotropic axial acquisition: (image, liver painted on slice
    PAINTED, the whole off-centre blob, ijkToRas). ``seed`` changes the noise only."""
    rng = np.random.default_rng(seed)
    shape = (7, 22, 26)
    image = rng.normal(0, 20, size=shape).astype(np.float32)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    blob = (yy - 9) ** 2 / 36 + (xx - 15) ** 2 / 64 + (zz - 3) ** 2 / 9 <= 1  # off-centre: not symmetric
    image[blob] += 300
    liver = np.zeros(shape, np.uint8)
    liver[PAINTED] = blob[PAINTED]
    return image, liver, blob, ijkToRasFrom(TILT @ LPS, (0.9, 0.8, 2.5), (4.0, -6.0, 9.0))


def axialViewNormal(ijkToRas):
    """The axial view after "rotate to volume plane": its normal along the volume's K axis."""
    return ijkToRas[:3, 2] / np.linalg.norm(ijkToRas[:3, 2])


def tinyEngine(options):
    return engineCacheForDevice("cpu").get(options.models, options.preset, "cpu", cacheBytes=options.cacheBytes)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_logic_gives_one_label_map_for_every_storage_order(scene, tinyOptions, preset):
    image, liver, _, ijkToRas = acquisition()
    options = dataclasses.replace(tinyOptions, preset=preset)
    logic = ProtoSAMLogic()
    masks = {}
    for name, (permutation, flips) in STORAGE.items():
        stored, storedToRas = storedDifferently(image, ijkToRas, permutation, flips)
        storedLiver = storedDifferently(liver, ijkToRas, permutation, flips)[0]
        volume = addVolume(scene, stored, storedToRas, name=name)
        segmentation, ids = addSegmentation(scene, volume, {"liver": storedLiver})
        result = logic.process(volume, segmentation, [ids["liver"]], sliceNormal_World=axialViewNormal(ijkToRas),
                               options=options)
        out = mrml_io.segmentToArray(result.previewSegmentationNode, ids["liver"], volume)
        # Slice numbers come back in the node's own IJK order: the painted slice.
        (supportSlice,) = result.supportSlices[ids["liver"]]
        assert np.take(storedLiver, supportSlice, axis=result.sliceAxis.kjiAxis).any()
        masks[name] = restored(out, permutation, flips)
        if name == "as_acquired":
            # The same engine call the Python API and the command line make on these arrays.
            reference = protosam.segment_volume(tinyEngine(options), image, None, {"liver": liver},
                                                query_ijk_to_ras=ijkToRas, plane="axial", auto_extent=False)
            assert np.array_equal(out, reference.masks["liver"])
    assert masks["as_acquired"].any()
    for name, mask in masks.items():
        assert np.array_equal(mask, masks["as_acquired"]), name


def test_logic_hands_a_reversed_support_volume_to_the_engine_with_its_geometry(scene, tinyOptions):
    """Another scan (other noise) stored with its slices reversed, under a parent transform,
    painted on two slices: the run equals the engine's on the acquisition-order arrays, and the
    support slices come back as the support node's own (reversed) slice numbers. (Which
    target slice each support slice seeds is tested with observable stand-in encoders in
    Testing/engine/test_orientation.py.)"""
    image, _, blob, ijkToRas = acquisition(seed=0)
    other, _, _, _ = acquisition(seed=1)
    painted = np.zeros(blob.shape, np.uint8)
    painted[[PAINTED, 5]] = blob[[PAINTED, 5]]
    target = addVolume(scene, image, ijkToRas, name="target")
    reversal = ((0, 1, 2), (True, False, False))
    storedOther, storedToRas = storedDifferently(other, ijkToRas, *reversal)
    storedPainted = storedDifferently(painted, ijkToRas, *reversal)[0]
    shift = homogeneous(np.eye(3), (30.0, 0.0, 0.0))
    support = addVolume(scene, storedOther, np.linalg.inv(shift) @ storedToRas, name="support", parentTransform=shift)
    segmentation, ids = addSegmentation(scene, support, {"liver": storedPainted})
    result = ProtoSAMLogic().process(target, segmentation, [ids["liver"]], supportVolumeNode=support,
                                     supportSlices=[6 - PAINTED, 6 - 5], sliceNormal_World=axialViewNormal(ijkToRas),
                                     options=tinyOptions)
    assert result.supportSlices == {ids["liver"]: [6 - 5, 6 - PAINTED]}
    reference = protosam.segment_volume(tinyEngine(tinyOptions), image, other, {"liver": painted},
                                        query_ijk_to_ras=ijkToRas, support_ijk_to_ras=ijkToRas, plane="axial",
                                        support_slices={"liver": [PAINTED, 5]}, auto_extent=False)
    out = mrml_io.segmentToArray(result.previewSegmentationNode, ids["liver"], target)
    assert np.array_equal(out, reference.masks["liver"])


def test_logic_reports_support_slices_that_seed_one_target_slice(scene, tinyOptions):
    image, _, blob, ijkToRas = acquisition()
    painted = np.zeros(blob.shape, np.uint8)
    painted[[3, 4]] = blob[[3, 4]]
    target = addVolume(scene, image[::3].copy(), ijkToRas @ np.diag([1.0, 1.0, 3.0, 1.0]), name="thick")
    support = addVolume(scene, image, ijkToRas, name="thin")
    segmentation, ids = addSegmentation(scene, support, {"liver": painted})
    nodesBefore = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match="Support slices 3 and 4 of .* both map to the same slice"):
        ProtoSAMLogic().process(target, segmentation, [ids["liver"]], supportVolumeNode=support,
                                supportSlices=[3, 4], sliceNormal_World=axialViewNormal(ijkToRas), options=tinyOptions)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodesBefore
