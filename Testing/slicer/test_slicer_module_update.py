"""Update of the ProtoSAM module's preview after the user repainted slices of it, and progress for
a click on a slice without a cached SAM embedding: real MRML (slicer-core), the real Segment
Editor logic for the repainting, real tiny random-weight models, the real worker process.

Equalities with a fresh engine Session are exact: the session that updates the preview and the
fresh one run ``propagation._propagate`` on the same canonical arrays with the same supports
(the same code, the same library, the same machine and thread count, as
test_slicer_worker_process checks for whole runs), so the float operations are identical.
"""

import dataclasses
import time

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

import slicer
from ProtoSAMSlicerLib import effect_session, mrml_io
from ProtoSAMSlicerLib.effect_session import EffectSession
from ProtoSAMSlicerLib.logic import ProtoSAMLogic, correctionOrientation
from ProtoSAMSlicerLib.worker_client import WorkerSession, workerForDevice
from protosam.serving import protocol
from protosam.errors import CancelledError, InputError
from protosam.serving.worker_process import Engines
from protosam.session import Session
from slicer_mrml_helpers import addSegmentation, addVolume, ijkToRasFrom, segmentEditor
from test_slicer_module_widget import openModule

SHAPE = (6, 20, 22)  # K, J, I: axial slices along K
LPS = np.diag([-1.0, -1.0, 1.0])
IJK_TO_RAS = ijkToRasFrom(LPS, (0.9, 0.9, 2.0), (4.0, 2.0, -3.0))
AXIAL = IJK_TO_RAS[:3, 2] / np.linalg.norm(IJK_TO_RAS[:3, 2])
PAINTED, REPAINTED = 2, 4


def image(seed):
    rng = np.random.default_rng(seed)
    array = rng.normal(0, 20, SHAPE).astype(np.float32)
    array[1:5, 5:15, 4:12] += 400  # "liver"
    array[0:6, 3:9, 15:20] += 250  # "spleen"
    return array


def painted():
    liver = np.zeros(SHAPE, np.uint8)
    liver[PAINTED, 5:15, 4:12] = 1
    spleen = np.zeros(SHAPE, np.uint8)
    spleen[PAINTED, 3:9, 15:20] = 1
    return {"liver": liver, "spleen": spleen}


def buildCase(scene, crossVolume=False):
    """Target volume, support segmentation (liver + spleen painted on slice PAINTED) and the
    support volume: the target itself, or another patient's scan when ``crossVolume``."""
    target = addVolume(scene, image(5), IJK_TO_RAS, "target")
    support = addVolume(scene, image(9), IJK_TO_RAS, "support") if crossVolume else target
    segmentation, ids = addSegmentation(scene, support, painted())
    return target, support, segmentation, ids


def run(logic, target, support, segmentation, ids, options):
    return logic.process(target, segmentation, [ids["liver"], ids["spleen"]], supportVolumeNode=support,
                         sliceNormal_World=AXIAL, options=options)


def previewOf(result, segmentId):
    return mrml_io.segmentToArray(result.previewSegmentationNode, segmentId, result.targetVolumeNode)


def repaint(scene, result, segmentId, add_Kji=None, erase_Kji=None):
    """Paint and erase in the preview with the Segment Editor's own logic (what Paint, Draw,
    Erase, Scissors... do): a modifier labelmap on the segmentation's geometry, Add / Remove."""
    editorNode, editorLogic = segmentEditor(scene, result.previewSegmentationNode, result.targetVolumeNode, segmentId,
                                            slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    for mask, mode in ((erase_Kji, editorLogic.ModificationModeRemove), (add_Kji, editorLogic.ModificationModeAdd)):
        if mask is None:
            continue
        labelmap = mrml_io.referenceGeometryImage(result.previewSegmentationNode, result.targetVolumeNode)
        mrml_io._imageArray(labelmap)[:] = mask.astype(np.uint8)
        labelmap.Modified()
        editorLogic.ModifySegmentByLabelmap(result.previewSegmentationNode, segmentId, labelmap, mode, True, False)


def repaintSlice(scene, result, segmentId):
    """Repaint slice REPAINTED of the liver: erase its upper half, paint a block beside it.
    Returns the slice as painted (KJI [J, I])."""
    before = previewOf(result, segmentId)
    erase = np.zeros(SHAPE, np.uint8)
    erase[REPAINTED, 0:10, :] = 1
    add = np.zeros(SHAPE, np.uint8)
    add[REPAINTED, 12:18, 2:9] = 1
    repaint(scene, result, segmentId, add_Kji=add, erase_Kji=erase)
    expected = np.where(erase[REPAINTED] != 0, 0, before[REPAINTED]) | add[REPAINTED]
    after = previewOf(result, segmentId)
    np.testing.assert_array_equal(after[REPAINTED], expected)
    np.testing.assert_array_equal(np.delete(after, REPAINTED, axis=0), np.delete(before, REPAINTED, axis=0))
    return expected


_engines = []


def localEngines() -> Engines:
    """This process's engines for the reference sessions (the engine API, run in-process)."""
    if not _engines:
        _engines.append(Engines())
    return _engines[0]


def freshSessionMask(result, options, segmentId, supportVolumeNode, supportMask_Kji, repainted):
    """What a fresh engine Session gives with the run's support (slice PAINTED of
    ``supportMask_Kji`` on ``supportVolumeNode``; None: no support but the repainted slices)
    plus the ``repainted`` slices (index -> KJI [J, I] mask) as supports, after an update."""
    orientation = correctionOrientation(result)
    volume = orientation.to_canonical(mrml_io.volumeToArray(result.targetVolumeNode))
    engine = localEngines().get(dataclasses.asdict(protocol.EngineSpec(
        models=dataclasses.asdict(options.models), preset=options.preset, device="cpu",
        cache_bytes=options.cacheBytes)))
    session = Session(engine, volume, axis=0, modality=options.modality, auto_extent=options.autoExtent)
    count = SHAPE[0]
    if supportVolumeNode is None:
        session.adopt(segmentId, np.zeros(volume.shape, np.uint8), [])
    else:
        support = None
        if supportVolumeNode is not result.targetVolumeNode:  # same geometry here: same orientation
            support = orientation.to_canonical(mrml_io.volumeToArray(supportVolumeNode))
        session.start({segmentId: orientation.to_canonical(supportMask_Kji)}, support_volume=support,
                      support_slices={segmentId: [orientation.canonical_slice(PAINTED, count)]})
    for k, mask in repainted.items():
        kji = np.zeros(SHAPE, np.uint8)
        kji[k] = mask
        canonical = orientation.canonical_slice(k, count)
        session.add_support(segmentId, canonical, orientation.to_canonical(kji)[canonical])
    return orientation.from_canonical(session.update(segmentId))


# ----------------------------------------------------------------------------- logic
@pytest.mark.parametrize("crossVolume", [False, True], ids=["same_volume", "support_from_another_volume"])
def test_update_keeps_repainted_slices_and_equals_a_fresh_session(scene, tinyOptions, crossVolume):
    target, support, segmentation, ids = buildCase(scene, crossVolume)
    logic = ProtoSAMLogic()
    idleCalls = []
    logic.idle = lambda: idleCalls.append(1)  # the GUI's slicer.app.processEvents
    result = run(logic, target, support, segmentation, ids, tinyOptions)
    liverId, spleenId = ids["liver"], ids["spleen"]
    spleenBefore = previewOf(result, spleenId)
    paintedSlice = repaintSlice(scene, result, liverId)
    assert logic.repaintedSlices(result) == {liverId: [REPAINTED]}

    progress = []
    changes = logic.updatePreviews([result], progressCallback=lambda done, total: progress.append((done, total)))
    assert changes == [{liverId: [REPAINTED]}]
    assert progress and progress[-1][0] == progress[-1][1] > 0
    liver = previewOf(result, liverId)
    np.testing.assert_array_equal(liver[REPAINTED], paintedSlice)  # never overwritten
    expected = freshSessionMask(result, tinyOptions, liverId, support, painted()["liver"], {REPAINTED: paintedSlice})
    np.testing.assert_array_equal(liver, expected)
    np.testing.assert_array_equal(previewOf(result, spleenId), spleenBefore)  # not repainted: not updated
    assert logic.repaintedSlices(result) == {}  # what the update wrote is the new reference
    assert isinstance(result.corrections, WorkerSession) and idleCalls, "Slicer must stay responsive"
    if crossVolume:
        # Without the other volume's support (the repainted slice alone) the result differs:
        # the equality above really tells that the external support was used.
        forgetful = freshSessionMask(result, tinyOptions, liverId, None, None, {REPAINTED: paintedSlice})
        assert not np.array_equal(forgetful, expected)

    # A second repaint (another slice) adds to the first: both stay as painted.
    second = np.zeros(SHAPE, np.uint8)
    second[1, 6:9, 5:8] = 1
    repaint(scene, result, liverId, add_Kji=second)
    secondSlice = previewOf(result, liverId)[1].copy()
    assert logic.repaintedSlices(result) == {liverId: [1]}
    logic.updatePreviews([result])
    liver = previewOf(result, liverId)
    np.testing.assert_array_equal(liver[REPAINTED], paintedSlice)
    np.testing.assert_array_equal(liver[1], secondSlice)
    np.testing.assert_array_equal(liver, freshSessionMask(result, tinyOptions, liverId, support, painted()["liver"],
                                                          {REPAINTED: paintedSlice, 1: secondSlice}))
    np.testing.assert_array_equal(mrml_io.segmentToArray(segmentation, liverId, support), painted()["liver"])
    logic.discard(result)
    assert result.corrections is None


def test_nothing_repainted_or_cancelled_changes_nothing(scene, tinyOptions):
    target, support, segmentation, ids = buildCase(scene)
    logic = ProtoSAMLogic()
    result = run(logic, target, support, segmentation, ids, tinyOptions)
    before = {k: previewOf(result, k) for k in result.segmentIds}
    with pytest.raises(InputError, match="No slice of the preview was repainted: repaint the wrong slices"):
        logic.updatePreviews([result])
    assert result.corrections is None  # nothing opened either
    paintedSlice = repaintSlice(scene, result, ids["liver"])
    repaintedPreview = previewOf(result, ids["liver"])
    cancel = [None]

    def cancelAtFirstProgress(done, total):  # the user presses Cancel while the update runs
        cancel[0].set()

    import threading

    cancel[0] = threading.Event()
    with pytest.raises(CancelledError, match="the preview is as it was"):
        logic.updatePreviews([result], progressCallback=cancelAtFirstProgress, cancelEvent=cancel[0])
    np.testing.assert_array_equal(previewOf(result, ids["liver"]), repaintedPreview)
    np.testing.assert_array_equal(previewOf(result, ids["spleen"]), before[ids["spleen"]])
    assert logic.repaintedSlices(result) == {ids["liver"]: [REPAINTED]}  # still to do
    logic.updatePreviews([result])  # and it still works afterwards
    np.testing.assert_array_equal(previewOf(result, ids["liver"])[REPAINTED], paintedSlice)
    # A segment deleted from the preview is said clearly.
    result.previewSegmentationNode.GetSegmentation().RemoveSegment(ids["spleen"])
    with pytest.raises(InputError, match="was deleted from the preview"):
        logic.updatePreviews([result])


def test_cancel_reaches_an_update_running_in_the_worker_process(scene, tinyOptions):
    target, support, segmentation, ids = buildCase(scene)
    logic = ProtoSAMLogic()
    result = run(logic, target, support, segmentation, ids, tinyOptions)
    repaintSlice(scene, result, ids["liver"])
    repaintedPreview = previewOf(result, ids["liver"])
    import threading

    cancel = threading.Event()
    logic.idle = cancel.set  # Cancel pressed while the GUI processes events during the wait
    started = time.monotonic()
    with pytest.raises(CancelledError) as caught:
        logic.updatePreviews([result], cancelEvent=cancel)
    # The worker stopped the update itself (its CancelledError is the cause), rather than the
    # logic discarding an update the worker finished.
    assert isinstance(caught.value.__cause__, CancelledError), f"the worker finished ({time.monotonic() - started:.2f} s)"
    np.testing.assert_array_equal(previewOf(result, ids["liver"]), repaintedPreview)
    health = workerForDevice("cpu").health()
    assert health.running_job is None  # the worker stopped the update and goes on


# ----------------------------------------------------------------------------- module widget
def test_module_update_preview_then_accept_and_undo_accept(scene, slicerApp):
    target, support, segmentation, ids = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    widget.ui.supportSegmentationSelector.setCurrentNode(segmentation)
    widget.ui.supportSegmentsTableView.setSelectedSegmentIDs([ids["liver"], ids["spleen"]])
    widget.ui.rangeComboBox.setCurrentIndex(list(ProtoSAM.RangeMode).index(ProtoSAM.RangeMode.All))
    assert not widget.ui.updatePreviewButton.enabled  # no preview yet
    toolTip = widget.ui.updatePreviewButton.toolTip
    assert "Repaint wrong slices of the preview in the Segment Editor" in toolTip and "examples" in toolTip
    widget.ui.applyButton.click()
    assert not widget.ui.updatePreviewButton.enabled  # not while running
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    assert widget.ui.updatePreviewButton.enabled
    (result,) = widget.results

    # Nothing repainted: the module says so (dialog and panel) and changes nothing.
    before = previewOf(result, ids["liver"])
    with pytest.raises(InputError):
        widget.onUpdatePreviewButton()
    assert widget.ui.statusLabel.text.startswith("No slice of the preview was repainted")
    np.testing.assert_array_equal(previewOf(result, ids["liver"]), before)
    assert widget.ui.updatePreviewButton.enabled and widget.ui.applyButton.text == "Propagate"

    # Cancel while the update runs: the Cancel button is pressed from the event loop.
    paintedSlice = repaintSlice(scene, result, ids["liver"])
    repaintedPreview = previewOf(result, ids["liver"])
    import qt

    seen = []

    def pressCancel():
        seen.append((widget.ui.applyButton.text, widget.ui.updatePreviewButton.enabled,
                     widget.ui.acceptButton.enabled, not widget.ui.progressBar.isHidden()))
        widget.ui.applyButton.click()

    qt.QTimer.singleShot(0, pressCancel)
    widget.ui.updatePreviewButton.click()
    assert seen == [("Cancel", False, False, True)]  # as for a run: Cancel, results locked, progress shown
    assert widget.ui.statusLabel.text == "Update cancelled; the preview is as it was."
    np.testing.assert_array_equal(previewOf(result, ids["liver"]), repaintedPreview)
    assert widget.ui.applyButton.text == "Propagate" and widget.ui.progressBar.isHidden()

    # Update: progress as for a run, then Accept writes the updated masks, Undo accept reverts.
    def reviewed():
        return [(row.segmentId, row.sliceIndex) for row in widget.reviewRows["slices"]]

    assert (ids["liver"], REPAINTED) in reviewed()
    widget.ui.progressBar.value = 0
    widget.ui.updatePreviewButton.click()
    assert widget.ui.statusLabel.text.startswith("Preview updated from 1 repainted slice(s)")
    # Rescored: the repainted slice is the user's now, out of the Review list (the table too).
    assert (ids["liver"], REPAINTED) not in reviewed()
    assert widget.ui.reviewSlicesTableWidget.rowCount == len(reviewed())
    assert widget.reviewRows["volumes"][0].score == pytest.approx(result.volumeConfidence)
    # The worker's progress reached the bar, to the last slice; the bar hides again afterwards.
    assert widget.ui.progressBar.value == widget.ui.progressBar.maximum > 1
    assert widget.ui.progressBar.isHidden()
    updated = {k: previewOf(result, k) for k in result.segmentIds}
    np.testing.assert_array_equal(updated[ids["liver"]][REPAINTED], paintedSlice)
    assert not np.array_equal(updated[ids["liver"]], repaintedPreview), "the update changed other slices"
    widget.ui.acceptButton.click()
    destination = segmentation  # the target is the support volume: new segments beside the painted ones
    assert result.corrections is None  # the session was closed with the preview
    written = {name: mrml_io.segmentToArray(destination, segmentId, target)
               for name, segmentId in zip(("liver", "spleen"), mrml_io.segmentIds(destination)[2:])}
    np.testing.assert_array_equal(written["liver"], updated[ids["liver"]])
    np.testing.assert_array_equal(written["spleen"], updated[ids["spleen"]])
    widget.ui.undoAcceptButton.click()
    assert mrml_io.segmentIds(destination) == [ids["liver"], ids["spleen"]]
    for name in ("liver", "spleen"):
        np.testing.assert_array_equal(mrml_io.segmentToArray(destination, ids[name], target), painted()[name])
    widget.cleanup()


# ----------------------------------------------------------------------------- click progress
def buildEffect(scene, logic):
    target, support, segmentation, ids = buildCase(scene)
    session = EffectSession(logic, lambda: None, lambda labelmap, segmentId: None)
    return target, segmentation, ids, session


def test_a_click_on_a_slice_without_embedding_reports_encoding(scene, tinyOptions):
    logic = ProtoSAMLogic()
    idleCalls = []
    logic.idle = lambda: idleCalls.append(1)
    target, segmentation, ids, session = buildEffect(scene, logic)
    session.start(target, segmentation, ids["liver"], sliceNormal_World=AXIAL,
                  slicePoint_World=(IJK_TO_RAS @ np.array([8.0, 10.0, PAINTED, 1.0]))[:3], options=tinyOptions,
                  waitForCompletion=True)
    assert session.state == effect_session.PREVIEW
    # Every embedding is evicted (as the scene-close release or a small budget does).
    workerForDevice("cpu").releaseCaches()

    def clickOn(k, ijk=(8.0, 10.0)):
        calls = []
        idleCalls.clear()
        point = (IJK_TO_RAS @ np.array([ijk[0], ijk[1], k, 1.0]))[:3]
        assert session.addClick(point, AXIAL, positive=True,
                                progressCallback=lambda done, total: calls.append((done, total))) == k
        return calls

    assert clickOn(4) == [(0, 1), (1, 1)]  # encoded on demand, with progress
    assert idleCalls, "Slicer must stay responsive while the worker encodes"
    assert clickOn(4, (9.0, 11.0)) == []  # cached now: one small request, no progress
    assert clickOn(1) == [(0, 1), (1, 1)]
    assert session.clicks(4) == [(8.0, 10.0, 1), (9.0, 11.0, 1)] and session.clicks(1) == [(8.0, 10.0, 1)]
    session.cancel()
