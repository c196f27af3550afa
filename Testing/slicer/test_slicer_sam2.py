"""The ProtoSAM module with a SAM 2 refiner: the model list offers SAM 2.1 and MedSAM2, and a
run with the tiny SAM 2 (random weights, official format) goes through the module's widgets,
the worker process and back into the scene as a preview."""

import numpy as np
import pytest

from required_modules import require_module, require_slicer_core

require_slicer_core()
require_module("sam2", "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 (see .ci/run)")

from protosam import catalogue  # noqa: E402
from ProtoSAMSlicerLib import mrml_io  # noqa: E402
from test_slicer_module_widget import buildCase, openModule, selectInputs  # noqa: E402


@pytest.fixture(scope="module")
def tinySam2(tmp_path_factory):
    from protosam.testing import write_tiny_sam2_checkpoint

    return write_tiny_sam2_checkpoint(tmp_path_factory.mktemp("tiny-sam2"), input_size=56)


def test_module_lists_sam2_refiners_and_propagates_with_sam2(scene, slicerApp, tinySam2):
    import qt

    settings = qt.QSettings()
    settings.setValue("ProtoSAM/SAM", tinySam2.sam)
    settings.setValue("ProtoSAM/SAMCheckpoint", tinySam2.sam_checkpoint)
    settings.sync()
    volume, segmentation, ids, liver, other = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    offered = [widget.ui.samComboBox.itemData(i) for i in range(widget.ui.samComboBox.count)]
    for name in (catalogue.SAM2_1_HIERA_TINY, catalogue.SAM2_1_HIERA_SMALL, catalogue.SAM2_1_HIERA_BASE_PLUS,
                 catalogue.SAM2_1_HIERA_LARGE, catalogue.MEDSAM2):
        assert name in offered
    assert catalogue.TINY_SAM2 not in offered  # test-only models are not offered

    selectInputs(widget, segmentation, [ids["liver"]])
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    assert widget.ui.statusLabel.text == "Preview ready: Accept or Discard."
    (result,) = widget.results
    preview = mrml_io.segmentToArray(result.previewSegmentationNode, ids["liver"], volume)
    assert preview.any() and np.array_equal(preview[2], liver[2])
    # The worker really ran the SAM 2 refiner: its log names the models it loaded.
    from ProtoSAMSlicerLib import worker_client

    log = worker_client.workerForDevice("cpu").logPath.read_text(encoding="utf-8", errors="replace")
    assert catalogue.TINY_SAM2 in log and "propagation per-slice" in log
    widget.ui.discardButton.click()

    # Memory mode, chosen in the Advanced section: stored in the settings, sent in the engine spec.
    combo = widget.ui.propagationComboBox
    combo.setCurrentIndex(combo.findData("memory"))
    assert qt.QSettings().value("ProtoSAM/Propagation") == "memory"
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    assert widget.ui.statusLabel.text == "Preview ready: Accept or Discard."
    (result,) = widget.results
    memory = mrml_io.segmentToArray(result.previewSegmentationNode, ids["liver"], volume)
    assert np.array_equal(memory[2], liver[2])  # the painted slice is the walk's conditioning frame
    log = worker_client.workerForDevice("cpu").logPath.read_text(encoding="utf-8", errors="replace")
    assert "propagation memory" in log
    widget.ui.discardButton.click()
    combo.setCurrentIndex(combo.findData("per-slice"))
    widget.exit()
    widget.cleanup()
