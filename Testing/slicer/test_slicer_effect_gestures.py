"""The effect's correction tools (#25): Box, Scribble and Lasso dragged in a slice view, the
correction undo stack, "other segments as not this" and box-only refiners, on real MRML through
the real worker process with the tiny models.

Drags go through the effect class as the Segment Editor delivers them (press, moves, release
of a vtkRenderWindowInteractor in the Red view) or, for the geometry under parent transforms,
through the Qt-free EffectSession with World points. The Red view is zoomed in (0.1 mm pixels)
so that a press lands within a tenth of a voxel of the point aimed at; the drawn gestures stay
a few tenths of a voxel inside the voxels they mean, so the expected voxels are exact.
"""

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

import slicer_app_standins as standins
import vtk
from ProtoSAMSlicerLib import effect_session, geometry, mrml_io
from ProtoSAMSlicerLib.effect_session import EffectSession
from ProtoSAMSlicerLib.logic import ProtoSAMLogic
from protosam.errors import InputError
from slicer_mrml_helpers import EFFECT_IJK_TO_RAS, EFFECT_SHAPE, homogeneous, rotationMatrix

SHAPE, IJK_TO_RAS = EFFECT_SHAPE, EFFECT_IJK_TO_RAS


def previewOf(effectOrSession, segmentId, volume):
    session = getattr(effectOrSession, "session", effectOrSession)
    return mrml_io.segmentToArray(session.result.previewSegmentationNode, segmentId, volume)


def read(e, name):
    return mrml_io.segmentToArray(e["segmentation"], e["ids"][name], e["volume"])


def zoomIn(sliceNode):
    """0.1 mm pixels: a pixel is an eighth of a voxel (0.8 mm) or less."""
    sliceNode.SetDimensions(512, 512, 1)
    sliceNode.SetFieldOfView(51.2, 51.2, 1.0)


def pixelOf(sliceNode, ras):
    matrix = sliceNode.GetXYToRAS()
    xyToRas = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y, z, _ = np.linalg.inv(xyToRas) @ np.append(ras, 1.0)
    assert abs(z) < 1e-6, "the point is not on the slice shown"
    return int(round(x)), int(round(y))


def drag(e, k, ijPoints, button="left", shift=False, whileDrawing=None):
    """Press at the first (i, j) of slice k of the Red view, move through the others, release at
    the last. ``whileDrawing(widget)`` runs before the release. Returns what each event returned."""
    sliceNode = e["sliceNode"]
    sliceNode.JumpSliceByOffsetting(*(IJK_TO_RAS @ np.array([9.0, 8.0, float(k), 1.0]))[:3])
    widget = standins.qMRMLSliceWidget(sliceNode)
    effect = e["effect"]
    interactor = vtk.vtkRenderWindowInteractor()
    pixels = [pixelOf(sliceNode, (IJK_TO_RAS @ np.array([i, j, float(k), 1.0]))[:3]) for i, j in ijPoints]
    press, release = ((vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent) if button == "left"
                      else (vtk.vtkCommand.RightButtonPressEvent, vtk.vtkCommand.RightButtonReleaseEvent))
    returned = []
    for n, (x, y) in enumerate(pixels):
        interactor.SetEventInformation(x, y, 0, 1 if shift else 0)
        eventId = press if n == 0 else vtk.vtkCommand.MouseMoveEvent
        returned.append(effect.processInteractionEvents(interactor, eventId, widget))
    if whileDrawing is not None:
        whileDrawing(widget)
    returned.append(effect.processInteractionEvents(interactor, release, widget))
    return returned


def square(i0, j0, i1, j1, margin=0.3):
    """A lasso just outside voxel centres i0..i1, j0..j1 (inside their voxels)."""
    return [(i0 - margin, j0 - margin), (i1 + margin, j0 - margin), (i1 + margin, j1 + margin),
            (i0 - margin, j1 + margin)]


def propagated(e):
    effect = e["effect"]
    assert effect.processInteractionEvents(None, 0, standins.qMRMLSliceWidget(e["sliceNode"])) is False
    effect.ui.propagateButton.click()
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    zoomIn(e["sliceNode"])
    return effect


def test_lasso_scribble_box_undo_oblique_then_apply_is_one_undo_step(editor):
    e = editor
    liverId, volume = e["ids"]["liver"], e["volume"]
    effect = propagated(e)
    session = effect.session
    assert effect.tool() == effect_session.CLICK and effect.ui.clickToolButton.checked
    states = [previewOf(effect, liverId, volume)]

    # Lasso (left: adds): the enclosed voxels of slice 4 and nothing else change.
    effect.ui.lassoToolButton.click()
    assert effect.tool() == effect_session.LASSO and not effect.ui.clickToolButton.checked  # exclusive
    drawn = {}

    def lookAtTheDrawing(widget):
        gesture = effect.gesture
        drawn["inRenderer"] = widget.sliceView().renderer.HasViewProp(gesture.actor)
        drawn["points"] = gesture.polyData.GetNumberOfPoints()
        drawn["lines"] = gesture.polyData.GetNumberOfLines()

    assert all(drag(e, 4, square(1, 1, 4, 3), whileDrawing=lookAtTheDrawing))
    assert drawn == {"inRenderer": True, "points": 4, "lines": 4}  # the contour, closed while drawn
    assert effect.gesture is None  # the drawing is gone once sent
    after = previewOf(effect, liverId, volume)
    expected = states[-1].copy()
    expected[4, 1:4, 1:5] = 1
    np.testing.assert_array_equal(after, expected)
    assert effect.ui.statusLabel.text.startswith("Slice 4 corrected by the lasso")
    states.append(after)

    # Negative lasso (right button): removes the enclosed voxels, on the slice already fixed.
    assert all(drag(e, 4, square(2, 1, 3, 2), button="right"))
    expected = states[-1].copy()
    expected[4, 1:3, 2:4] = 0
    np.testing.assert_array_equal(previewOf(effect, liverId, volume), expected)
    states.append(expected)

    # Scribble with the Remove button: the voxels it covers leave the structure; SAM re-decodes
    # slice 3 round its points, and no other slice changes.
    effect.ui.scribbleToolButton.click()
    effect.ui.removeModeButton.click()
    scribbleRow = 6
    assert all(drag(e, 3, [(5, scribbleRow), (8, scribbleRow), (11, scribbleRow)], whileDrawing=lookAtTheDrawing))
    assert drawn["lines"] == 2  # an open line
    after = previewOf(effect, liverId, volume)
    assert not after[3, scribbleRow, 5:12].any()
    others = [k for k in range(SHAPE[0]) if k != 3]
    np.testing.assert_array_equal(after[others], states[-1][others])
    states.append(after)
    effect.ui.removeModeButton.click()

    # Box: slice 1 is decoded from the box alone; the right button does not draw one.
    effect.ui.boxToolButton.click()
    assert drag(e, 1, [(4, 3), (9, 8), (12, 11)], button="right") == [False, False, False, False]
    assert all(drag(e, 1, [(4, 3), (9, 8), (12, 11)], whileDrawing=lookAtTheDrawing))
    assert drawn["points"] == 4 and drawn["lines"] == 4  # the rectangle
    after = previewOf(effect, liverId, volume)
    others = [k for k in range(SHAPE[0]) if k != 1]
    np.testing.assert_array_equal(after[others], states[-1][others])
    states.append(after)
    assert session.correctionKinds() == [(4, "lasso"), (4, "lasso"), (3, "scribble"), (1, "box")]

    # Oblique view: refused with the clicks' message, nothing changes.
    sliceNode = e["sliceNode"]
    saved = vtk.vtkMatrix4x4()
    saved.DeepCopy(sliceNode.GetSliceToRAS())
    sliceNode.SetSliceToRASByNTP(0.0, 0.3, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    sliceNode.UpdateMatrices()
    effect.ui.lassoToolButton.click()
    widget = standins.qMRMLSliceWidget(sliceNode)
    interactor = vtk.vtkRenderWindowInteractor()
    for x, y, eventId in ((200, 200, vtk.vtkCommand.LeftButtonPressEvent), (260, 200, vtk.vtkCommand.MouseMoveEvent),
                          (260, 260, vtk.vtkCommand.MouseMoveEvent), (200, 260, vtk.vtkCommand.LeftButtonReleaseEvent)):
        interactor.SetEventInformation(x, y, 0, 0)
        assert effect.processInteractionEvents(interactor, eventId, widget) is True
    with pytest.raises(geometry.ObliqueSliceError) as oblique:
        geometry.sliceAxisFromNormal([0.0, 0.3, 1.0], mrml_io.ijkToWorldMatrix(volume))
    assert effect.ui.statusLabel.text == str(oblique.value)
    np.testing.assert_array_equal(previewOf(effect, liverId, volume), states[-1])
    assert len(session.correctionKinds()) == 4
    sliceNode.GetSliceToRAS().DeepCopy(saved)
    sliceNode.UpdateMatrices()

    # Undo correction: one gesture at a time, newest first, each slice exactly as before it.
    for expected in reversed(states[:-1]):
        assert effect.ui.undoCorrectionButton.enabled
        effect.ui.undoCorrectionButton.click()
        np.testing.assert_array_equal(previewOf(effect, liverId, volume), expected)
    assert not effect.ui.undoCorrectionButton.enabled and session.correctionKinds() == []

    # Gestures again, then Apply: one Slicer undo step back to before it.
    effect.ui.lassoToolButton.click()
    assert all(drag(e, 4, square(1, 1, 4, 3)))
    corrected = previewOf(effect, liverId, volume)
    assert np.array_equal(read(e, "liver"), e["liver"])  # nothing written before Apply
    effect.ui.applyButton.click()
    assert np.array_equal(read(e, "liver").astype(bool), corrected.astype(bool) | e["liver"].astype(bool))
    e["editorLogic"].Undo()
    assert np.array_equal(read(e, "liver"), e["liver"]) and np.array_equal(read(e, "spleen"), e["spleen"])
    assert not e["editorLogic"].CanUndo()


@pytest.fixture
def transformedSession(scene, editedVolume):
    """EffectSession on the effect tests' volume under a rotating, translating parent transform."""
    parent = homogeneous(rotationMatrix((0, 1, 0), 20) @ rotationMatrix((0, 0, 1), 90), (5.0, -3.0, 1.0))
    built = editedVolume(kidney=True, parentTransform=parent)
    editorLogic = built["editorLogic"]
    session = EffectSession(ProtoSAMLogic(), editorLogic.SaveStateForUndo, lambda labelmap, segmentId: None)
    ijkToWorld = mrml_io.ijkToWorldMatrix(built["volume"])
    np.testing.assert_allclose(ijkToWorld, parent @ IJK_TO_RAS)
    return dict(built, session=session, ijkToWorld=ijkToWorld)


def world(ijkToWorld, i, j, k):
    return (ijkToWorld @ np.array([i, j, k, 1.0]))[:3]


def test_gestures_under_a_parent_transform_and_other_segments_as_not_this(transformedSession, tinyOptions):
    """World points go through the parent transform to the right voxels; the other visible
    segments are negatives at Propagate and at Update volume; a hidden one is not."""
    e = transformedSession
    session, ijkToWorld, liverId, volume = e["session"], e["ijkToWorld"], e["ids"]["liver"], e["volume"]
    others = (e["arrays"]["spleen"] | e["arrays"]["kidney"]).astype(bool)
    normal = ijkToWorld[:3, 2]
    session.start(volume, e["segmentation"], liverId, sliceNormal_World=normal,
                  slicePoint_World=world(ijkToWorld, 9, 8, 2), options=tinyOptions, waitForCompletion=True)
    withNotThis = previewOf(session, liverId, volume)
    unfixed = [k for k in range(SHAPE[0]) if k != 2]  # the painted slice keeps its mask
    assert withNotThis.any() and not (withNotThis[unfixed] & others[unfixed]).any()
    session.cancel()
    session.otherSegmentsAsNegatives = False
    session.start(volume, e["segmentation"], liverId, sliceNormal_World=normal,
                  slicePoint_World=world(ijkToWorld, 9, 8, 2), options=tinyOptions, waitForCompletion=True)
    without = previewOf(session, liverId, volume)
    assert (without[unfixed] & others[unfixed]).any(), "the check above would be empty"
    before = without

    # Lasso through the transform: voxels i 2..5, j 1..2 of slice 0 are added, exactly.
    polygon = [world(ijkToWorld, i, j, 0.1) for i, j in square(2, 1, 5, 2)]
    assert session.addLasso(polygon, normal, positive=True) == 0
    expected = before.copy()
    expected[0, 1:3, 2:6] = 1
    np.testing.assert_array_equal(previewOf(session, liverId, volume), expected)
    # A scribble through the transform, dragged past the volume's edge (those points are left out).
    row = 5
    path = [world(ijkToWorld, i, row, 5.2) for i in (3.0, 9.0, 17.0, 25.0)]
    assert session.addScribble(path, normal, positive=True) == 5
    scribbled = previewOf(session, liverId, volume)
    assert scribbled[5, row, 3:18].all()
    np.testing.assert_array_equal(scribbled[:5], expected[:5])
    # A box dragged past the edge ends at the edge; clicks outside it are dropped with their markers.
    session.addClick(world(ijkToWorld, 15, 3, 1), normal, positive=True)
    session.addClick(world(ijkToWorld, 2, 14, 1), normal, positive=False)
    assert session.addBox(world(ijkToWorld, 10, -4, 1), world(ijkToWorld, 30, 7, 1), normal) == 1
    assert session.clicks(1) == [(15.0, 3.0, 1)] and session.clickMarkups.GetNumberOfControlPoints() == 1
    session.undoCorrection()  # the box: both clicks and markers are back
    assert session.clicks(1) == [(15.0, 3.0, 1), (2.0, 14.0, 0)]
    assert session.clickMarkups.GetNumberOfControlPoints() == 2
    with pytest.raises(InputError, match="box is outside the volume"):
        session.addBox(world(ijkToWorld, 30, 20, 1), world(ijkToWorld, 40, 30, 1), normal)
    with pytest.raises(InputError, match="along the axis the preview was propagated on"):
        session.addLasso(polygon, ijkToWorld[:3, 0], positive=True)

    # Update volume with "not this" on again: the other visible segments leave the result...
    session.otherSegmentsAsNegatives = True
    session.updateVolume()
    updated = previewOf(session, liverId, volume)
    corrected = sorted({k for k, _ in session.correctionKinds()} | {2})
    free = [k for k in range(SHAPE[0]) if k not in corrected]
    assert free and not (updated[free] & others[free]).any()
    np.testing.assert_array_equal(updated[0], expected[0])  # corrected slices are kept as corrected
    # ...but not a hidden one.
    display = e["segmentation"].GetDisplayNode()
    display.SetSegmentVisibility(e["ids"]["kidney"], False)
    assert np.array_equal(session.otherSegmentsMask().astype(bool), e["arrays"]["spleen"].astype(bool))


def test_box_only_refiner_refuses_clicks_and_scribbles_and_takes_boxes_and_lassos(editor, tmp_path):
    """MedSAM takes boxes only: a click or a scribble is refused with the engine's message,
    shown in the panel, with the preview and the segments untouched; boxes and lassos work."""
    import qt
    from protosam.testing import TINY_MEDSAM, write_tiny_medsam

    settings = qt.QSettings()
    settings.setValue("ProtoSAM/SAM", TINY_MEDSAM)
    settings.setValue("ProtoSAM/SAMCheckpoint", str(write_tiny_medsam(tmp_path)))
    settings.sync()
    e = editor
    liverId, volume = e["ids"]["liver"], e["volume"]
    effect = propagated(e)
    assert effect.session.options.models.sam == TINY_MEDSAM
    before = previewOf(effect, liverId, volume)
    e["sliceNode"].JumpSliceByOffsetting(*(IJK_TO_RAS @ np.array([9.0, 8.0, 4.0, 1.0]))[:3])
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetEventInformation(*pixelOf(e["sliceNode"], (IJK_TO_RAS @ np.array([9.0, 8.0, 4.0, 1.0]))[:3]), 0, 0)
    assert effect.processInteractionEvents(interactor, vtk.vtkCommand.LeftButtonPressEvent,
                                           standins.qMRMLSliceWidget(e["sliceNode"])) is True
    assert effect.ui.statusLabel.text.startswith("MedSAM takes boxes only, so clicks cannot correct")
    effect.ui.scribbleToolButton.click()
    assert all(drag(e, 4, [(5, 6), (11, 6)]))
    assert effect.ui.statusLabel.text.startswith("MedSAM takes boxes only, so scribbles cannot correct")
    np.testing.assert_array_equal(previewOf(effect, liverId, volume), before)
    assert effect.session.correctionKinds() == [] and not effect.ui.undoCorrectionButton.enabled
    effect.ui.boxToolButton.click()
    assert all(drag(e, 4, [(4, 3), (12, 11)]))
    effect.ui.lassoToolButton.click()
    assert all(drag(e, 3, square(1, 1, 3, 2)))
    assert effect.session.correctionKinds() == [(4, "box"), (3, "lasso")]
    assert previewOf(effect, liverId, volume)[3, 1:3, 1:4].all()
    # Esc while dragging drops the gesture: its drawing goes, nothing is sent.
    corrected = previewOf(effect, liverId, volume)
    dropped = {}

    def pressEscape(widget):
        dropped["actor"] = effect.gesture.actor
        escape = vtk.vtkRenderWindowInteractor()
        escape.SetKeySym("Escape")
        assert effect.processInteractionEvents(escape, vtk.vtkCommand.KeyPressEvent, widget) is True
        dropped["drawn"] = widget.sliceView().renderer.HasViewProp(dropped["actor"])

    assert drag(e, 3, square(5, 5, 8, 8), whileDrawing=pressEscape)[-1] is False  # the release passes through
    assert dropped["drawn"] == 0 and effect.gesture is None and effect.ui.statusLabel.text == "Drawing cancelled."
    assert len(effect.session.correctionKinds()) == 2
    np.testing.assert_array_equal(previewOf(effect, liverId, volume), corrected)
    effect.ui.cancelButton.click()
    assert np.array_equal(read(e, "liver"), e["liver"]) and np.array_equal(read(e, "spleen"), e["spleen"])


def test_the_deprecated_thread_worker_session_takes_gestures_with_encoding_progress(tinyModels):
    """LocalSession (ProtoSAMLogic(workerKind="thread")) gives box and scribble the progress
    argument WorkerSession takes: (0, 1) and (1, 1) when the slice is encoded first."""
    from dataclasses import replace

    from protosam import PRESETS, Engine
    from protosam.session import Session
    from ProtoSAMSlicerLib.logic import LocalSession

    volume = np.random.default_rng(0).normal(0, 0.05, (2, 24, 24)).astype(np.float32)
    volume[:, 8:16, 8:16] += 2.0
    truth = np.zeros(volume.shape, np.uint8)
    truth[:, 8:16, 8:16] = 1
    engine = Engine(tinyModels, preset=replace(PRESETS["default"], auto_extent=False), device="cpu")
    session = LocalSession(Session(engine, volume, modality="none"))
    session.adopt("organ", truth, [0])  # a preview made elsewhere: no slice is encoded yet
    seen = []
    assert not session.has_sam_embedding(1)
    session.box("organ", 1, (6, 6, 17, 17), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 1), (1, 1)]
    seen.clear()
    session.scribble("organ", 1, [(9, 9), (14, 9)], True, progress=lambda done, total: seen.append((done, total)))
    assert seen == []  # encoded for the box, kept in the session's cache
    assert session.corrections("organ", 1) == ["box", "scribble"]
