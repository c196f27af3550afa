"""The ProtoSAM module (ProtoSAMSlicer/ProtoSAM/ProtoSAM.py) driven through its widgets.

Real MRML (slicer-core), real Qt (PySide6, offscreen), real tiny models on the CPU; only what
the Slicer application alone provides comes from slicer_app_standins. Buttons are clicked and the
Qt event loop runs the module's QTimer, as in Slicer.
"""

import types
import unittest

import numpy as np
import pytest


import slicer
import slicer_app_standins as standins
from ProtoSAMSlicerLib import mrml_io
from ProtoSAMSlicerLib import logic as ProtoSAMLogicModule
from slicer_mrml_helpers import addSegmentation, addVolume, ijkToRasFrom

SHAPE = (5, 20, 22)
LPS = np.diag([-1.0, -1.0, 1.0])


def buildCase(scene):
    rng = np.random.default_rng(5)
    image = rng.normal(0, 20, SHAPE).astype(np.float32)
    image[1:4, 5:15, 6:17] += 400
    volume = addVolume(scene, image, ijkToRasFrom(LPS, (0.9, 0.9, 2.0), (4.0, 2.0, -3.0)), "ct")
    liver = np.zeros(SHAPE, np.uint8)
    liver[2, 5:15, 6:17] = 1
    other = np.zeros(SHAPE, np.uint8)
    other[0, 0:3, 0:3] = 1
    segmentation, ids = addSegmentation(scene, volume, {"liver": liver, "other": other})
    return volume, segmentation, ids, liver, other


def openModule():
    import ProtoSAM

    module = ProtoSAM.ProtoSAM(types.SimpleNamespace())
    panel = standins.ModulePanel()
    widget = ProtoSAM.ProtoSAMWidget(panel)
    widget.setup()
    panel.isEntered = True
    widget.enter()
    return ProtoSAM, module, widget


def selectInputs(widget, segmentation, segmentIds):
    widget.ui.supportSegmentationSelector.setCurrentNode(segmentation)
    widget.ui.supportSegmentsTableView.setSelectedSegmentIDs(segmentIds)


def test_propagate_progress_preview_accept_and_undo(scene, slicerApp):
    volume, segmentation, ids, liver, other = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    assert module.parent.acknowledgementText and module.parent.title == "ProtoSAM"
    assert not widget.ui.applyButton.enabled  # no segment selected yet
    selectInputs(widget, segmentation, [ids["liver"]])
    parameters = widget._parameterNode
    # The reference volume of the segmentation became the support volume and a target.
    assert parameters.supportVolume is volume and widget.ui.targetVolumesSelector.checkedNodes() == [volume]
    assert widget.ui.applyButton.enabled and widget.ui.applyButton.text == "Propagate"
    widget.ui.rangeComboBox.setCurrentIndex(list(ProtoSAM.RangeMode).index(ProtoSAM.RangeMode.All))
    assert parameters.rangeMode is ProtoSAM.RangeMode.All
    widget.ui.acceptModeComboBox.setCurrentIndex(list(ProtoSAM.AcceptMode).index(ProtoSAM.AcceptMode.Replace))

    widget.ui.applyButton.click()
    assert widget.jobs and widget.ui.applyButton.text == "Cancel" and not widget.ui.inputsCollapsibleButton.enabled
    progress = []

    def finished():
        progress.append((widget.ui.progressBar.value, widget.ui.progressBar.maximum, widget.ui.statusLabel.text))
        return not widget.jobs

    slicerApp.runEventLoopUntil(finished)
    assert any(text.startswith("Volume 1/1:") for _, _, text in progress)
    assert any(maximum == SHAPE[0] - 1 for _, maximum, _ in progress)  # every slice but the painted one
    assert widget.ui.statusLabel.text == "Preview ready: Accept or Discard."
    assert widget.ui.acceptButton.enabled and widget.ui.discardButton.enabled
    assert widget.ui.progressBar.isHidden() and not widget.pollTimer.isActive()
    (result,) = widget.results
    preview = mrml_io.segmentToArray(result.previewSegmentationNode, ids["liver"], volume)
    assert preview.any() and np.array_equal(preview[2], liver[2])
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["liver"], volume), liver)  # not yet written
    # Review: the volume and its scored slices, least confident first; a click on a slice row
    # puts the red view on that slice (its plane passes through that slice's centre).
    volumeTable, sliceTable = widget.ui.reviewVolumesTableWidget, widget.ui.reviewSlicesTableWidget
    assert volumeTable.rowCount == 1 and volumeTable.item(0, 0).text() == "ct"
    assert float(volumeTable.item(0, 1).text()) == pytest.approx(result.volumeConfidence, abs=0.005)
    scores = [float(sliceTable.item(row, 3).text()) for row in range(sliceTable.rowCount)]
    assert scores and scores == sorted(scores) and all(0 <= score <= 1 for score in scores)
    assert [sliceTable.horizontalHeaderItem(c).text() for c in range(4)] == ["Volume", "Segment", "Slice", "Confidence"]
    assert {sliceTable.item(row, 1).text() for row in range(sliceTable.rowCount)} == {"liver"}
    ijkToWorld = mrml_io.ijkToWorldMatrix(volume)
    red = scene.GetNodeByID("vtkMRMLSliceNodeRed")
    for row in (sliceTable.rowCount - 1, 0):
        sliceTable.cellClicked.emit(row, 1)
        point = ProtoSAMLogicModule.sliceViewGeometry(red)[1]
        assert (np.linalg.inv(ijkToWorld) @ np.append(point, 1.0))[2] == pytest.approx(
            int(sliceTable.item(row, 2).text()), abs=1e-6)

    widget.ui.acceptButton.click()  # "Replace segments of the same name": the painted segment is overwritten
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["liver"], volume), preview)
    assert not scene.IsNodePresent(result.previewSegmentationNode) and widget.results == []
    assert widget.ui.undoAcceptButton.enabled and "Undo accept" in widget.ui.statusLabel.text
    widget.ui.undoAcceptButton.click()
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["liver"], volume), liver)
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["other"], volume), other)
    assert not widget.ui.undoAcceptButton.enabled

    # Current-slice support and a From-To range, into a new segment; then Discard.
    widget.ui.supportSliceComboBox.setCurrentIndex(1)
    widget.ui.rangeComboBox.setCurrentIndex(list(ProtoSAM.RangeMode).index(ProtoSAM.RangeMode.FromTo))
    assert not widget.ui.firstSliceSpinBox.isHidden()  # (the panel itself is not shown offscreen)
    widget.ui.lastSliceSpinBox.setValue(3)
    sliceNode = scene.GetNodeByID("vtkMRMLSliceNodeRed")
    centre = ijkToRasFrom(LPS, (0.9, 0.9, 2.0), (4.0, 2.0, -3.0)) @ np.array([10.0, 10.0, 2.0, 1.0])
    sliceNode.JumpSliceByOffsetting(*centre[:3])
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    (result,) = widget.results
    assert result.supportSlices == {ids["liver"]: [2]} and result.processedSlices[ids["liver"]] == [0, 1, 3]
    widget.ui.discardButton.click()
    assert not scene.IsNodePresent(result.previewSegmentationNode) and widget.ui.statusLabel.text == "Results discarded."

    widget.exit()
    widget.cleanup()


def test_cancel_writes_nothing(scene, slicerApp):
    volume, segmentation, ids, liver, other = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    selectInputs(widget, segmentation, [ids["liver"]])
    segmentations = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    widget.ui.applyButton.click()
    widget.ui.applyButton.click()  # now "Cancel"
    assert widget.ui.statusLabel.text == "Cancelling..."
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    assert widget.results == [] and widget.ui.statusLabel.text.startswith("Cancelled by the user")
    assert widget.ui.applyButton.text == "Propagate"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations
    assert np.array_equal(mrml_io.segmentToArray(segmentation, ids["liver"], volume), liver)
    widget.cleanup()


def test_failed_run_is_reported_and_leaves_nothing(scene, slicerApp, tmp_path, caplog):
    volume, segmentation, ids, liver, other = buildCase(scene)
    import qt

    broken = tmp_path / "broken_sam.pth"
    broken.write_bytes(b"not a checkpoint")
    qt.QSettings().setValue("ProtoSAM/SAMCheckpoint", str(broken))
    ProtoSAM, module, widget = openModule()
    selectInputs(widget, segmentation, [ids["liver"]])
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    assert widget.results == [] and "ProtoSAM failed" in caplog.text  # errorDisplay, logged in testing mode
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    widget.cleanup()


def test_settings_weights_scene_close_and_quit(scene, slicerApp, monkeypatch):
    volume, segmentation, ids, liver, other = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    import qt

    # The Models section refreshes the weights status when opened (custom checkpoints: ready).
    widget.ui.modelsCollapsibleButton.collapsed = True
    widget.ui.modelsCollapsibleButton.collapsed = False
    assert "custom" in widget.ui.weightsStatusLabel.text.lower() or widget.ui.weightsStatusLabel.text
    # "Download weights": the user declines the confirmation, then accepts it (every file is
    # present, so nothing is fetched and the job finishes through the poll).
    widget.ui.downloadWeightsButton.click()
    assert widget.downloadJob is None
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: True)
    widget.ui.downloadWeightsButton.click()
    assert widget.downloadJob is not None and widget.ui.applyButton.text == "Cancel"
    slicerApp.runEventLoopUntil(lambda: widget.downloadJob is None)
    assert not widget.pollTimer.isActive()
    # A model choice is saved to the user's settings.
    widget.ui.presetComboBox.setCurrentIndex(widget.ui.presetComboBox.findData("paper"))
    assert qt.QSettings().value("ProtoSAM/Preset") == "paper"
    assert qt.QSettings().value("ProtoSAM/Device") == "cpu"
    # Closing the scene drops results and rebinds a fresh parameter node.
    selectInputs(widget, segmentation, [ids["liver"]])
    scene.Clear(False)
    assert widget._parameterNode is not None and widget._parameterNode.supportSegmentation is None
    # Quitting Slicer stops the device workers.
    from ProtoSAMSlicerLib import worker_client

    worker_client.workerForDevice("cpu")
    slicerApp.emit("aboutToQuit()")
    assert worker_client._processWorkers == {}
    widget.cleanup()


def test_self_test_runs_end_to_end_or_reports_missing_dependencies(scene, slicerApp, monkeypatch):
    import ProtoSAM

    test = ProtoSAM.ProtoSAMTest()
    test.runTest()
    assert test.messages == ["Propagating with tiny models", "Test passed"]
    # Without the Python packages (as on Slicer's build machines) it says so and passes.
    import importlib.metadata

    from ProtoSAMSlicerLib import dependencies

    real = importlib.metadata.version

    def version(name):
        if dependencies.normalizeName(name) == "segment-anything":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    test = ProtoSAM.ProtoSAMTest()
    try:
        test.runTest()
    except unittest.SkipTest as skip:  # shows as an error in Slicer's "Reload and Test"
        pytest.fail(f"the self-test skipped instead of reporting: {skip}")
    assert len(test.messages) == 1 and "dependencies not installed" in test.messages[0]
    assert "segment-anything==1.0" in test.messages[0]
    # The module's runTest (the "Reload and Test" entry point) finds and runs the test case.
    monkeypatch.setattr(importlib.metadata, "version", real)
    module = ProtoSAM.ProtoSAM(types.SimpleNamespace())
    slicer.selfTests["ProtoSAM"](msec=0)
    assert module.moduleName == "ProtoSAM"


def test_effect_module_registers_the_effect(scene, slicerApp):
    import SegmentEditorProtoSAM

    module = SegmentEditorProtoSAM.SegmentEditorProtoSAM(types.SimpleNamespace())
    assert module.parent.hidden and module.parent.acknowledgementText  # Slicer's generic test wants it
    slicerApp.emit("startupCompleted()")
    factory = standins.qSlicerSegmentEditorEffectFactory.instance()
    assert [effect.name for effect in factory.registeredEffects()] == ["ProtoSAM"]
    SegmentEditorProtoSAM.SegmentEditorProtoSAMTest().runTest()


def test_missing_dependencies_ask_once_and_start_nothing(scene, slicerApp, monkeypatch, caplog):
    """First run without segment-anything: one confirmation listing it; declined, nothing starts."""
    volume, segmentation, ids, liver, other = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    selectInputs(widget, segmentation, [ids["liver"]])
    import importlib.metadata

    from ProtoSAMSlicerLib import dependencies

    real = importlib.metadata.version

    def version(name):
        if dependencies.normalizeName(name) == "segment-anything":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: asked.append(text) or False)
    widget.ui.applyButton.click()
    assert len(asked) == 1 and "segment-anything==1.0" in asked[0]
    assert widget.jobs == [] and widget.logic is None
    widget.updateWeightsStatus()
    assert widget.ui.weightsStatusLabel.text.startswith("Python packages not installed yet")
    widget.cleanup()
