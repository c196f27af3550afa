"""Exclusive structures in the ProtoSAM module: the "Exclusive structures (each voxel to one
segment)" checkbox, stored in the parameter node, reaches the worker process's segment_volume
job and the preview's correction session; real MRML (slicer-core), the real module widget, real
tiny random-weight models, the real worker process. No voxel may end in two segments, after
the run and after an update of the preview."""

import numpy as np
from required_modules import require_slicer_core

require_slicer_core()

from test_slicer_module_update import IJK_TO_RAS, REPAINTED, SHAPE, image, previewOf, repaint
from test_slicer_module_widget import openModule, selectInputs

from slicer_mrml_helpers import addSegmentation, addVolume

PAINTED = 2


def overlapping():
    """Two segments painted on slice PAINTED that share a block of voxels (rows 5-8, columns 8-11)."""
    liver = np.zeros(SHAPE, np.uint8)
    liver[PAINTED, 5:15, 4:12] = 1
    spleen = np.zeros(SHAPE, np.uint8)
    spleen[PAINTED, 3:9, 8:20] = 1
    return {"liver": liver, "spleen": spleen}


def test_exclusive_checkbox_gives_each_voxel_to_one_segment_in_the_run_and_the_update(scene, slicerApp):
    target = addVolume(scene, image(5), IJK_TO_RAS, "target")
    painted = overlapping()
    segmentation, ids = addSegmentation(scene, target, painted)
    liverId, spleenId = ids["liver"], ids["spleen"]
    ProtoSAM, module, widget = openModule()
    selectInputs(widget, segmentation, [liverId, spleenId])
    parameters = widget._parameterNode
    widget.ui.rangeComboBox.setCurrentIndex(list(ProtoSAM.RangeMode).index(ProtoSAM.RangeMode.All))
    assert not parameters.exclusive and not widget.ui.exclusiveCheckBox.checked
    widget.ui.exclusiveCheckBox.checked = True
    assert parameters.exclusive  # stored in the scene's parameter node
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    assert widget.ui.statusLabel.text == "Preview ready: Accept or Discard."
    (result,) = widget.results
    assert result.options.exclusive
    liver, spleen = previewOf(result, liverId), previewOf(result, spleenId)
    assert liver.any() and spleen.any()
    assert not (liver & spleen).any(), "a voxel in two segments"
    # The painted overlap is a tie (both painted: probability 1): it goes to the first listed.
    np.testing.assert_array_equal(liver[PAINTED], painted["liver"][PAINTED])
    np.testing.assert_array_equal(spleen[PAINTED], painted["spleen"][PAINTED] & ~painted["liver"][PAINTED])

    # Repaint spleen over liver on another slice (the editor's "overwrite none": both hold the
    # block now); the update through the worker's exclusive session leaves no voxel in two.
    block = np.zeros(SHAPE, np.uint8)
    block[REPAINTED, 6:14, 6:16] = 1
    repaint(scene, result, spleenId, add_Kji=block)
    repainted = previewOf(result, spleenId)[REPAINTED].copy()
    liverBefore = previewOf(result, liverId)[REPAINTED].copy()
    assert (previewOf(result, liverId) & previewOf(result, spleenId)).any()
    assert widget.logic.updatePreviews([result]) == [{spleenId: [REPAINTED]}]
    liver, spleen = previewOf(result, liverId), previewOf(result, spleenId)
    assert not (liver & spleen).any(), "a voxel in two segments after the update"
    # The repainted slice is spleen's own (probability 1) against liver's adopted result (0.5).
    np.testing.assert_array_equal(spleen[REPAINTED], repainted)
    np.testing.assert_array_equal(liver[REPAINTED], liverBefore & ~repainted)
    assert widget.logic.repaintedSlices(result) == {}  # both segments were written
    widget.ui.discardButton.click()
    widget.exit()
    widget.cleanup()
