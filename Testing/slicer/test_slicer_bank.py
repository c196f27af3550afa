"""The example bank in Slicer (ProtoSAMSlicerLib/bank.py, the module's "Example bank" section and
the effect's "Propagate from bank") on real MRML (slicer-core), with the real worker process and
tiny random-weight models.

The loop: volume A painted on one slice -> propagate -> a slice repainted and sent with Update
preview, another repainted before Accept -> Accept -> the three slices into the bank -> volume B
propagated from the bank alone, equal to a run given the same three slices of A explicitly.
"""

import json

import numpy as np
import pytest

from protosam.errors import InputError
from protosam.examples import ExampleBank
from ProtoSAMSlicerLib import bank, mrml_io
from ProtoSAMSlicerLib.logic import AXIAL_NORMAL, ProtoSAMLogic
from slicer_mrml_helpers import addSegmentation, addVolume, ijkToRasFrom

LPS = np.diag([-1.0, -1.0, 1.0])
A_SHAPE = (7, 20, 22)  # K, J, I
B_SHAPE = (9, 20, 22)


def _volume(scene, name, shape, seed, box):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 20, shape).astype(np.float32)
    image[box] += 400
    return addVolume(scene, image, ijkToRasFrom(LPS, (0.9, 0.9, 2.0), (4.0, 2.0, -3.0)), name)


def volumeA(scene):
    volume = _volume(scene, "A", A_SHAPE, 5, (slice(1, 6), slice(5, 15), slice(6, 17)))
    liver = np.zeros(A_SHAPE, np.uint8)
    liver[3, 5:15, 6:17] = 1
    segmentation, ids = addSegmentation(scene, volume, {"liver": liver})
    return volume, segmentation, ids["liver"]


def volumeB(scene):
    return _volume(scene, "B", B_SHAPE, 9, (slice(1, 8), slice(4, 14), slice(5, 16)))


def repaint(result, segmentId, k, rows, cols):
    """The user repaints slice ``k`` of the preview (a whole-slice mask, as the Segment Editor would)."""
    preview, volume = result.previewSegmentationNode, result.targetVolumeNode
    mask = mrml_io.segmentToArray(preview, segmentId, volume).copy()
    mask[k] = 0
    mask[k, rows, cols] = 1
    mrml_io.writeSegmentFromArray(mask, preview, segmentId, volume)
    return mask[k].copy()


def segmentUnchanged(segmentation, segmentId, volume, before):
    return np.array_equal(mrml_io.segmentToArray(segmentation, segmentId, volume), before)


def test_the_loop_a_painted_corrected_banked_then_b_from_the_bank_alone(scene, tinyOptions, tmp_path):
    folder = tmp_path / "liver-bank"
    logic = ProtoSAMLogic()
    a, segmentation, liver = volumeA(scene)
    result = logic.process(a, segmentation, [liver], sliceNormal_World=AXIAL_NORMAL, options=tinyOptions)
    assert result.supportSlices == {liver: [3]} and result.correctedSlices == {}

    repaint(result, liver, 1, slice(6, 14), slice(7, 16))
    logic.updatePreviews([result])
    assert result.correctedSlices == {liver: [1]}
    repaint(result, liver, 5, slice(6, 13), slice(8, 15))  # repainted, not updated: still the user's slice

    addition = logic.bankAddition(result)  # before Accept removes the preview
    assert addition.slicesBySegment == {liver: [1, 3, 5]} and addition.plane == "axial"
    assert "liver: slices 1, 3, 5" in bank.additionQuestion([addition], folder)
    logic.accept(result, mode="replace")  # into A's own segmentation, the painted segment replaced
    accepted = mrml_io.segmentToArray(segmentation, liver, a)
    added = logic.addToBank(folder, [addition])
    assert len(added) == 3 and ExampleBank(folder).structures() == {"liver": 3}
    assert [(row.structure, row.count, row.planes) for row in bank.bankRows(folder)] == [("liver", 3, "axial")]
    # Each example is the slice as the engine normalised it (here MRI: top 0.5 % clipped, z-score of the whole volume)
    # with the accepted whole mask, in the canonical order (axial: k increases superior, as stored here).
    from protosam.preprocessing import normalize_volume

    normalised = normalize_volume(mrml_io.volumeToArray(a).astype(np.float32), "auto")
    stored = ExampleBank(folder)
    for example in stored.list("liver"):
        image, mask = stored.arrays(example)
        assert example.slice_count == A_SHAPE[0] and example.modality == "mri"  # no air in this volume: MRI by the guess
        k = _storedSlice(a, example.slice_index)
        np.testing.assert_array_equal(mask, _canonicalSlice(a, accepted, k) != 0)
        np.testing.assert_array_equal(image, _canonicalSlice(a, normalised, k))
    assert sorted(_storedSlice(a, e.slice_index) for e in stored.list("liver")) == [1, 3, 5]

    # Volume B from the bank alone (no painting on B) ...
    b = volumeB(scene)
    examples = bank.examplesForSegments(folder, segmentation, [liver], "axial")
    fromBank = logic.process(b, segmentation, [liver], sliceNormal_World=AXIAL_NORMAL, options=tinyOptions,
                             examples=examples, paintedSupports=False)
    # ... equals a run given A's same three slices explicitly as supports.
    explicit = logic.process(b, segmentation, [liver], supportVolumeNode=a, sliceNormal_World=AXIAL_NORMAL,
                             supportSlices={liver: [1, 3, 5]}, options=tinyOptions)
    bankMask = mrml_io.segmentToArray(fromBank.previewSegmentationNode, liver, b)
    explicitMask = mrml_io.segmentToArray(explicit.previewSegmentationNode, liver, b)
    assert bankMask.any() and np.array_equal(bankMask, explicitMask)
    assert fromBank.supportSlices == {liver: []} and not fromBank.paintedSupports

    # Its preview can be updated: the correction session keeps the bank's examples.
    repaint(fromBank, liver, 4, slice(5, 13), slice(6, 15))
    logic.updatePreviews([fromBank])
    assert fromBank.correctedSlices == {liver: [4]}
    for result in (fromBank, explicit):
        logic.discard(result)
    logic.cleanup()


def _orientation(volume):
    from protosam.orientation import canonical_orientation

    return canonical_orientation(mrml_io.ijkToWorldMatrix(volume), "axial")


def _storedSlice(volume, canonicalIndex):
    return _orientation(volume).stored_slice(canonicalIndex, mrml_io.volumeShapeKji(volume)[0])


def _canonicalSlice(volume, array_Kji, k):
    orientation = _orientation(volume)
    return orientation.to_canonical(array_Kji)[orientation.canonical_slice(k, array_Kji.shape[0])]
