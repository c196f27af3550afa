"""The ProtoSAM Segment Editor effect class (SegmentEditorProtoSAMLib/SegmentEditorEffect.py) driven
through its widgets, as the Segment Editor drives it.

The effect's C++ side (qSlicerSegmentEditorScriptedEffect) is a stand-in that, like Slicer's,
hands undo states, the default modifier labelmap and segment modification to the real
vtkSlicerSegmentEditorLogic of slicer-core, bound to a real vtkMRMLSegmentEditorNode.
"""


import numpy as np
import pytest


import slicer_app_standins as standins
from ProtoSAMSlicerLib import effect_session, mrml_io
from slicer_mrml_helpers import EFFECT_IJK_TO_RAS, EFFECT_LPS, EFFECT_SHAPE, addVolume, ijkToRasFrom

SHAPE, LPS, IJK_TO_RAS = EFFECT_SHAPE, EFFECT_LPS, EFFECT_IJK_TO_RAS


def read(e, name, volume=None):
    return mrml_io.segmentToArray(e["segmentation"], e["ids"][name], volume or e["volume"])


def propagate(e):
    effect = e["effect"]
    # The mouse moves over the Red view: the effect remembers the view the user works in.
    assert effect.processInteractionEvents(None, 0, standins.qMRMLSliceWidget(e["sliceNode"])) is False
    effect.ui.propagateButton.click()
    assert effect.session.state == effect_session.RUNNING
    assert not effect.ui.propagateButton.enabled and effect.ui.cancelButton.enabled
    return effect


def test_propagate_progress_preview_apply_undo(editor):
    e = editor
    effect = e["effect"]
    assert effect.scriptedEffect.name == "ProtoSAM" and effect.scriptedEffect.perSegment
    assert "Propagate" in effect.helpText() and not effect.icon().isNull()
    assert effect.ui.modelsLabel.text.startswith("Models: dinov2_tiny14 + sam_tiny")
    clone = effect.clone()
    assert clone.self().scriptedEffect is clone and clone.self() is not effect
    effect.ui.extentComboBox.setCurrentIndex(effect.ui.extentComboBox.findData("all"))
    propagate(e)
    assert effect.ui.statusLabel.text == "Propagating along the Red view..."
    values = []

    def inPreview():
        values.append((effect.ui.progressBar.value, effect.ui.progressBar.maximum))
        return effect.session.state == effect_session.PREVIEW

    e["app"].runEventLoopUntil(inPreview)
    # Determinate progress over every slice but the painted one (the last step arrives with the
    # "finished" event, after which the bar is hidden).
    assert {total for done, total in values if done} == {SHAPE[0] - 1} and max(values)[0] >= 1
    assert effect.ui.statusLabel.text == "Preview of 'liver' ready: Apply or Cancel."
    assert effect.ui.applyButton.enabled and not effect.pollTimer.isActive()
    preview = mrml_io.segmentToArray(effect.session.result.previewSegmentationNode, e["ids"]["liver"], e["volume"])
    assert np.array_equal(read(e, "liver"), e["liver"])

    effect.ui.applyButton.click()
    assert effect.ui.statusLabel.text == "Applied." and effect.session.state == effect_session.IDLE
    applied = read(e, "liver")
    assert np.array_equal(applied.astype(bool), preview.astype(bool) | e["liver"].astype(bool))
    assert e["editorLogic"].CanUndo()
    e["editorLogic"].Undo()  # Ctrl+Z in the Segment Editor: one step
    assert np.array_equal(read(e, "liver"), e["liver"]) and np.array_equal(read(e, "spleen"), e["spleen"])


def test_cancel_running_and_cancel_preview(editor):
    e = editor
    effect = propagate(e)
    effect.ui.cancelButton.click()
    assert effect.ui.statusLabel.text == "Cancelling..."
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.IDLE)
    assert effect.ui.statusLabel.text.startswith("Cancelled by the user")
    assert effect.ui.propagateButton.enabled and not effect.pollTimer.isActive()
    assert e["volume"].GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1

    propagate(e)
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    preview = effect.session.result.previewSegmentationNode
    effect.ui.cancelButton.click()
    assert effect.ui.statusLabel.text == "Discarded." and not e["volume"].GetScene().IsNodePresent(preview)
    assert np.array_equal(read(e, "liver"), e["liver"])
    assert not e["editorLogic"].CanUndo()


def test_deactivation_mid_run_returns_to_idle(editor):
    """Defect: deactivating the effect during a run stopped its poll timer, and only a poll delivers
    the run's "finished" event: the effect stayed "running" (Propagate disabled, Cancel dead)."""
    e = editor
    effect = propagate(e)
    effect.deactivate()  # another effect, segment or module
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.IDLE, timeout=120)
    assert "deactivated" in effect.ui.statusLabel.text and effect.ui.propagateButton.enabled
    assert e["volume"].GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert np.array_equal(read(e, "liver"), e["liver"])


def test_deactivation_keeps_the_preview(editor):
    """Like Slicer's own preview effects: look elsewhere, come back, Apply."""
    e = editor
    effect = propagate(e)
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    preview = effect.session.result.previewSegmentationNode
    effect.deactivate()
    assert e["volume"].GetScene().IsNodePresent(preview) and effect.session.state == effect_session.PREVIEW
    effect.activate()
    assert effect.ui.applyButton.enabled
    effect.ui.applyButton.click()
    assert read(e, "liver").sum() > e["liver"].sum()


def test_result_lands_on_another_reference_geometry(editor):
    """Defect: the modifier labelmap was on the source volume's grid; with the segmentation on
    another geometry and an editable intensity range, Slicer wrote nothing."""
    e = editor
    scene = e["volume"].GetScene()
    fineShape = tuple(2 * n for n in SHAPE)
    fine = addVolume(scene, np.zeros(fineShape, np.float32),
                     ijkToRasFrom(LPS, (0.4, 0.4, 1.25), (7.0 + 0.2, 3.0 + 0.2, -2.0 - 0.625)), "fine")
    e["segmentation"].SetReferenceImageGeometryParameterFromVolumeNode(fine)
    e["editorNode"].SetSourceVolumeIntensityMask(True)
    e["editorNode"].SetSourceVolumeIntensityMaskRange(-1e6, 1e6)  # everything editable
    effect = propagate(e)
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    preview = mrml_io.segmentToArray(effect.session.result.previewSegmentationNode, e["ids"]["liver"], e["volume"])
    effect.ui.applyButton.click()
    expected = preview.astype(bool) | e["liver"].astype(bool)
    assert expected.sum() > e["liver"].sum()
    assert np.array_equal(read(e, "liver", fine).astype(bool), expected.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_failed_run_and_refused_start_are_reported(editor, tmp_path, caplog):
    e = editor
    effect = e["effect"]
    emptyId = e["segmentation"].GetSegmentation().AddEmptySegment("empty", "empty")
    e["editorNode"].SetSelectedSegmentID(emptyId)
    effect.lastSliceNode = None  # the Red view is used by default
    with pytest.raises(Exception, match="empty"):
        effect.onPropagate()  # the button slot; tryWithErrorDisplay re-raises after showing the error
    assert effect.session.state == effect_session.IDLE and effect.ui.propagateButton.enabled
    import qt

    broken = tmp_path / "broken_sam.pth"
    broken.write_bytes(b"not a checkpoint")
    qt.QSettings().setValue("ProtoSAM/SAMCheckpoint", str(broken))
    e["editorNode"].SetSelectedSegmentID(e["ids"]["liver"])
    propagate(e)
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.IDLE)
    assert "ProtoSAM failed" in caplog.text and effect.session.lastError is not None
    assert str(effect.session.lastError) == effect.ui.statusLabel.text


def clickAt(e, ijk, button="left", shift=False):
    """A mouse press in the Red view over voxel ``ijk``: the view is moved onto that voxel's
    slice and the press is sent at the pixel whose RAS is the voxel's centre."""
    import vtk

    ras = (IJK_TO_RAS @ np.append(np.asarray(ijk, float), 1.0))[:3]
    sliceNode = e["sliceNode"]
    sliceNode.JumpSliceByOffsetting(*ras)
    matrix = sliceNode.GetXYToRAS()
    xyToRas = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y, z, _ = np.linalg.inv(xyToRas) @ np.append(ras, 1.0)
    assert abs(z) < 1e-6
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetEventInformation(int(round(x)), int(round(y)), 0, 1 if shift else 0)
    # The pixel grid is coarser than nothing: the press lands on the pixel nearest the centre.
    eventId = vtk.vtkCommand.LeftButtonPressEvent if button == "left" else vtk.vtkCommand.RightButtonPressEvent
    return e["effect"].processInteractionEvents(interactor, eventId, standins.qMRMLSliceWidget(sliceNode))


def test_clicks_correct_the_preview_then_undo_clear_update_apply(editor):
    import vtk

    e = editor
    effect = propagate(e)
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    assert not effect.ui.undoCorrectionButton.enabled and effect.ui.updateVolumeButton.enabled
    # Mouse moves are not consumed; presses are, while the preview is shown.
    moved = effect.processInteractionEvents(vtk.vtkRenderWindowInteractor(), vtk.vtkCommand.MouseMoveEvent,
                                            standins.qMRMLSliceWidget(e["sliceNode"]))
    assert moved is False
    assert clickAt(e, (15, 3, 4)) is True
    assert clickAt(e, (6, 6, 4), shift=True) is True
    assert clickAt(e, (9, 9, 1), button="right") is True
    session = effect.session
    clicked = {k: session.clicks(k) for k in (1, 4)}
    # Slice k; (x, y) = (i, j) of the voxel (the pixel nearest the voxel centre is in the voxel).
    assert clicked == {4: [(15.0, 3.0, 1), (6.0, 6.0, 0)], 1: [(9.0, 9.0, 0)]}
    assert effect.ui.undoCorrectionButton.enabled and effect.ui.clearSliceButton.enabled
    assert session.clickMarkups.GetNumberOfControlPoints() == 3
    effect.ui.undoCorrectionButton.click()
    assert session.clicks(1) == [] and session.clickMarkups.GetNumberOfControlPoints() == 2
    effect.ui.clearSliceButton.click()  # the Red view shows slice 1 (the last press): nothing left there
    assert session.clicks(4) == [(15.0, 3.0, 1), (6.0, 6.0, 0)]
    e["sliceNode"].JumpSliceByOffsetting(*(IJK_TO_RAS @ np.array([9.0, 8.0, 4.0, 1.0]))[:3])
    effect.ui.clearSliceButton.click()
    assert session.clicks(4) == [] and not effect.ui.undoCorrectionButton.enabled
    assert clickAt(e, (15, 3, 4)) is True
    corrected = mrml_io.segmentToArray(session.result.previewSegmentationNode, e["ids"]["liver"], e["volume"])[4]
    effect.ui.progressBar.value = 0
    effect.ui.updateVolumeButton.click()
    # The worker's progress reached the bar, to the last slice; the bar hides again afterwards.
    assert effect.ui.progressBar.value == effect.ui.progressBar.maximum > 0
    assert not effect.ui.progressBar.visible
    preview = mrml_io.segmentToArray(session.result.previewSegmentationNode, e["ids"]["liver"], e["volume"])
    assert np.array_equal(preview[4], corrected)
    assert effect.ui.statusLabel.text.startswith("Preview updated")
    assert np.array_equal(read(e, "liver"), e["liver"])
    effect.ui.applyButton.click()
    assert np.array_equal(read(e, "liver").astype(bool), preview.astype(bool) | e["liver"].astype(bool))
    e["editorLogic"].Undo()  # one step back to before Apply
    assert np.array_equal(read(e, "liver"), e["liver"]) and np.array_equal(read(e, "spleen"), e["spleen"])
    # No preview any more: presses pass through to the other handlers.
    assert clickAt(e, (15, 3, 4)) is False


def test_a_click_on_a_slice_without_embedding_shows_encoding_progress(editor):
    """The worker process encodes an evicted slice for a click: the effect shows its progress bar
    and "Encoding slice k for the click..." while Slicer keeps processing events; a click on a
    cached slice is one small request that shows nothing of the kind."""
    from ProtoSAMSlicerLib.worker_client import workerForDevice

    e = editor
    effect = propagate(e)
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    workerForDevice("cpu").releaseCaches()  # every embedding evicted (as a scene close does)
    seen = []
    processEvents = effect.session.logic.idle

    def idle():  # what the user sees while the effect waits for the worker
        seen.append((effect.ui.statusLabel.text, not effect.ui.progressBar.isHidden(),
                     effect.ui.applyButton.enabled, effect.ui.cancelButton.enabled))
        processEvents()

    effect.session.logic.idle = idle
    addClick = effect.session.addClick

    def addClickSeeingEachStep(*args, progressCallback, **kwargs):
        # What the user sees right after each progress step, whether or not the worker's reply
        # comes before the next idle call (that timing differs from machine to machine).
        def step(done, total):
            progressCallback(done, total)
            seen.append((effect.ui.statusLabel.text, not effect.ui.progressBar.isHidden(),
                         effect.ui.applyButton.enabled, effect.ui.cancelButton.enabled))
        return addClick(*args, progressCallback=step, **kwargs)

    effect.session.addClick = addClickSeeingEachStep
    assert clickAt(e, (9, 9, 4)) is True
    effect.session.addClick = addClick
    encoding = [entry for entry in seen if entry[0] == "Encoding slice 4 for the click..."]
    assert encoding and all(shown for _, shown, _, _ in encoding)
    assert seen[-1][:2] == ("Correcting slice 4...", False)  # encoded; the decode is still to come
    assert all(not apply and not cancel for _, _, apply, cancel in seen)  # nothing else may run meanwhile
    assert effect.ui.statusLabel.text.startswith("Slice 4 corrected (1 click(s))")
    assert effect.ui.progressBar.isHidden() and effect.ui.applyButton.enabled
    seen.clear()
    assert clickAt(e, (10, 9, 4)) is True  # cached now
    assert not any(text.startswith("Encoding") for text, _, _, _ in seen)
    assert effect.ui.statusLabel.text.startswith("Slice 4 corrected (2 click(s))")
    # A press while a click is still encoding is consumed and ignored.
    effect.clickRunning = True
    assert clickAt(e, (9, 9, 3)) is True and effect.session.clicks(3) == []
    effect.clickRunning = False


def test_apply_and_corrections_refused_after_the_editor_switched_segmentation(editor):
    """#21 item 6: a preview survives deactivation; after the user selected another segmentation
    in the Segment Editor, Apply wrote the preview's segment ID into that one (or nothing).
    Apply and corrections are refused naming both segmentations; the preview is kept."""
    from protosam.errors import InputError

    e = editor
    scene = e["volume"].GetScene()
    effect = propagate(e)
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    preview = effect.session.result.previewSegmentationNode
    effect.deactivate()
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other segmentation")
    other.CreateDefaultDisplayNodes()
    other.SetReferenceImageGeometryParameterFromVolumeNode(e["volume"])
    otherId = other.GetSegmentation().AddEmptySegment(e["ids"]["liver"], "liver")
    assert otherId == e["ids"]["liver"]  # the same segment ID: Apply would have written there
    e["editorNode"].SetAndObserveSegmentationNode(other)
    effect.activate()
    refused = "made for segmentation 'segmentation'.*now edits 'other segmentation'"
    with pytest.raises(InputError, match=refused):
        effect.onApply()  # the button's slot; tryWithErrorDisplay shows the error, then re-raises
    with pytest.raises(InputError, match=refused):
        effect.session.addClick((IJK_TO_RAS @ np.array([9.0, 8.0, 4.0, 1.0]))[:3], IJK_TO_RAS[:3, 2])
    with pytest.raises(InputError, match=refused):
        effect.session.updateVolume()
    assert effect.session.state == effect_session.PREVIEW and scene.IsNodePresent(preview)
    assert not mrml_io.segmentToArray(other, otherId, e["volume"]).any()
    assert np.array_equal(read(e, "liver"), e["liver"]) and not e["editorLogic"].CanUndo()
    e["editorNode"].SetAndObserveSegmentationNode(e["segmentation"])  # back: Apply works
    effect.ui.applyButton.click()
    assert read(e, "liver").sum() > e["liver"].sum() and not mrml_io.segmentToArray(other, otherId, e["volume"]).any()
