"""The example bank in Slicer (ProtoSAMSlicerLib/bank.py, the module's "Example bank" section and
the effect's "Propagate from bank") on real MRML (slicer-core), with the real worker process and
tiny random-weight models.

The loop: volume A painted on one slice -> propagate -> a slice repainted and sent with Update
preview, another repainted before Accept -> Accept -> the three slices into the bank -> volume B
propagated from the bank alone, equal to a run given the same three slices of A explicitly.
"""

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


def test_the_loop_a_painted_corrected_banked_then_b_from_the_bank_alone(scene, tinyOptions, tinyModels, tmp_path):
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
        # No air in this volume: MRI by the modality guess.
        assert example.slice_count == A_SHAPE[0] and example.modality == "mri"
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

    # Its preview can be updated: the correction session keeps the bank's examples, as a
    # protosam.Session started from them and given the same repainted slice does.
    repainted = repaint(fromBank, liver, 4, slice(5, 13), slice(6, 15))
    logic.updatePreviews([fromBank])
    assert fromBank.correctedSlices == {liver: [4]}
    updated = mrml_io.segmentToArray(fromBank.previewSegmentationNode, liver, b)
    np.testing.assert_array_equal(updated, referenceUpdate(b, examples[liver], 4, repainted, tinyModels))
    for result in (fromBank, explicit):
        logic.discard(result)
    logic.cleanup()


def test_undo_accept_can_take_the_examples_it_added_back_out_of_the_bank(scene, tinyOptions, tmp_path):
    """Undo accept restores the segments and, when the user agrees, removes from the bank the
    examples added after that Accept: those still there (one was removed meanwhile), never
    another Accept's. A bank folder that went missing is said, after the segments came back,
    and a retry removes only what is left."""
    from ProtoSAMSlicerLib import results

    folder = tmp_path / "liver-bank"
    logic = ProtoSAMLogic()
    a, segmentation, liver = volumeA(scene)
    before = mrml_io.segmentToArray(segmentation, liver, a).copy()
    earlier = ExampleBank(folder).add("liver", np.zeros((20, 22), np.float32), np.ones((20, 22), bool),
                                      slice_index=0, slice_count=7, volume_hash="another-volume", plane="axial")
    result = logic.process(a, segmentation, [liver], sliceNormal_World=AXIAL_NORMAL, options=tinyOptions)
    repaint(result, liver, 1, slice(6, 14), slice(7, 16))
    addition = logic.bankAddition(result)
    undo = results.AcceptUndo()
    logic.accept(result, mode="replace", undo=undo)
    assert not segmentUnchanged(segmentation, liver, a, before)
    added = logic.addToBank(folder, [addition], undo=undo)
    assert len(added) == 2 and undo.bankExamples == {str(folder): [example.id for example in added]}
    question = bank.undoQuestion(undo)
    assert f"added 2 painted and corrected slice(s) to the example bank {folder}" in question
    assert bank.undoQuestion(results.AcceptUndo()) is None
    ExampleBank(folder).remove([added[0].id])  # removed meanwhile (protosam examples remove)

    logic.undoAccept(undo)  # the segments alone: the examples wait for the user's answer
    assert segmentUnchanged(segmentation, liver, a, before)
    assert {e.id for e in ExampleBank(folder).list()} == {earlier.id, added[1].id}
    assert logic.removeAcceptedExamples(undo) == 1
    assert [e.id for e in ExampleBank(folder).list()] == [earlier.id] and not undo.bankExamples
    assert logic.removeAcceptedExamples(undo) == 0

    missing = str(tmp_path / "gone")
    partly = results.AcceptUndo(bankExamples={str(folder): [earlier.id], missing: ["x"]})
    with pytest.raises(InputError, match="does not exist"):
        logic.removeAcceptedExamples(partly)
    assert ExampleBank(folder).list() == [] and list(partly.bankExamples) == [missing]  # left for a retry
    logic.cleanup()


def referenceUpdate(volume, examples, k, repainted, tinyModels):
    """In this process: a Session on ``volume`` started from the bank's ``examples`` alone, slice
    ``k`` repainted, updated (what the worker's correction session must give)."""
    from dataclasses import replace

    from protosam import PRESETS, Engine
    from protosam.session import Session

    engine = Engine(tinyModels, preset=replace(PRESETS["default"], auto_extent=False), device="cpu")
    orientation = _orientation(volume)
    count = mrml_io.volumeShapeKji(volume)[0]
    session = Session(engine, orientation.to_canonical(mrml_io.volumeToArray(volume)), axis=0)
    session.start({}, examples={"liver": examples})
    canonical = orientation.canonical_slice(k, count)
    stored = np.zeros(mrml_io.volumeShapeKji(volume), np.uint8)
    stored[k] = repainted
    session.add_support("liver", canonical, orientation.to_canonical(stored)[canonical])
    return orientation.from_canonical(session.update("liver"))


def _orientation(volume):
    from protosam.orientation import canonical_orientation

    return canonical_orientation(mrml_io.ijkToWorldMatrix(volume), "axial")


def _storedSlice(volume, canonicalIndex):
    return _orientation(volume).stored_slice(canonicalIndex, mrml_io.volumeShapeKji(volume)[0])


def _canonicalSlice(volume, array_Kji, k):
    orientation = _orientation(volume)
    return orientation.to_canonical(array_Kji)[orientation.canonical_slice(k, array_Kji.shape[0])]


# --------------------------------------------------------------------------- bad input
def test_a_missing_folder_or_unreadable_index_is_said_and_changes_nothing(scene, tmp_path):
    a, segmentation, liver = volumeA(scene)
    before = mrml_io.segmentToArray(segmentation, liver, a)
    logic = ProtoSAMLogic()
    missing = tmp_path / "no-such-bank"
    with pytest.raises(InputError, match="does not exist: choose the folder of your bank"):
        bank.examplesForSegments(missing, segmentation, [liver], "axial")
    with pytest.raises(InputError, match="does not exist"):
        bank.bankRows(missing)
    with pytest.raises(InputError, match="Choose the example bank folder first"):
        bank.examplesForSegments("", segmentation, [liver], "axial")
    broken = tmp_path / "broken-bank"
    broken.mkdir()
    (broken / "index.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(InputError, match="index .* cannot be read"):
        bank.bankRows(broken)
    with pytest.raises(InputError, match="cannot be read"):
        bank.examplesForSegments(broken, segmentation, [liver], "axial")
    other = tmp_path / "papers"
    other.mkdir()
    (other / "notes.txt").write_text("not a bank")
    with pytest.raises(InputError, match="is not an example bank"):
        bank.bankRows(other)
    # Adding refuses the broken bank too, and leaves its index as it was.
    with pytest.raises(InputError, match="cannot be read"):
        bank.addToBank(broken, [bank.BankAddition("A", "axial", "ct", 7, [dict(structure="liver")], {liver: [3]},
                                                  {liver: "liver"}, np.zeros((7, 4, 4), np.float32))])
    assert (broken / "index.json").read_text(encoding="utf-8") == "{ not json"
    # A bank without the structure (or without it in this plane) says what to do.
    good = tmp_path / "good"
    ExampleBank(good).add("spleen", np.ones((4, 4), np.float32), np.ones((4, 4), bool), slice_index=0,
                          slice_count=3, volume_hash="x", plane="coronal")
    with pytest.raises(InputError, match="has no examples of 'liver' \\(it holds spleen\\).*paint this structure"):
        bank.examplesForSegments(good, segmentation, [liver], "axial")
    segmentation.GetSegmentation().GetSegment(liver).SetName("spleen")
    with pytest.raises(InputError, match="no axial examples of 'spleen' \\(it has coronal ones\\)"):
        bank.examplesForSegments(good, segmentation, [liver], "axial")
    # The bank alone with no examples for a segment is refused before anything runs.
    with pytest.raises(InputError, match="No example-bank supports"):
        logic.process(a, segmentation, [liver], examples={}, paintedSupports=False)
    assert segmentUnchanged(segmentation, liver, a, before)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # no preview made
    assert not logic.activeJobs


def test_the_effect_refuses_a_bank_without_the_segments_name_and_keeps_the_segment(editor, tmp_path):
    from ProtoSAMSlicerLib import effect_session

    e = editor
    session = effect_session.EffectSession(ProtoSAMLogic(), lambda: None, lambda labelmap, segmentId: None)
    before = mrml_io.segmentToArray(e["segmentation"], e["ids"]["spleen"], e["volume"])
    with pytest.raises(InputError, match="does not exist"):
        session.start(e["volume"], e["segmentation"], e["ids"]["spleen"], e["sliceNode"],
                      bankFolder=str(tmp_path / "missing"))
    folder = _bankOfTheEditedLiver(e, tmp_path / "bank")
    with pytest.raises(InputError, match="has no examples of 'spleen' \\(it holds liver\\)"):
        session.start(e["volume"], e["segmentation"], e["ids"]["spleen"], e["sliceNode"], bankFolder=str(folder))
    assert session.state == effect_session.IDLE and session.job is None
    assert np.array_equal(mrml_io.segmentToArray(e["segmentation"], e["ids"]["spleen"], e["volume"]), before)


def _bankOfTheEditedLiver(e, folder):
    """A bank holding the effect tests' painted liver slice (slice 2), as the engine normalises it."""
    from protosam.orientation import canonical_orientation
    from protosam.preprocessing import normalize_volume

    volume = e["volume"]
    orientation = canonical_orientation(mrml_io.ijkToWorldMatrix(volume), "axial")
    image = normalize_volume(orientation.to_canonical(mrml_io.volumeToArray(volume)), "auto")
    mask = orientation.to_canonical(e["liver"])
    k = orientation.canonical_slice(2, e["liver"].shape[0])
    ExampleBank(folder).add_slices("liver", image, mask, [k], plane="axial", modality="mri")
    return folder


# --------------------------------------------------------------------------- effect
def test_the_effect_propagates_the_selected_segment_from_the_bank_by_name(editor, tmp_path):
    import qt

    import slicer_app_standins as standins
    from ProtoSAMSlicerLib import effect_session

    e = editor
    effect = e["effect"]
    folder = _bankOfTheEditedLiver(e, tmp_path / "bank")
    qt.QSettings().setValue("ProtoSAM/ExampleBank", str(folder))
    # A segment named "liver" with nothing painted: its name finds the bank's examples.
    segmentation, volume = e["segmentation"], e["volume"]
    segmentation.GetSegmentation().RemoveSegment(e["ids"]["liver"])
    newLiver = segmentation.GetSegmentation().AddEmptySegment("", "liver")
    e["editorNode"].SetSelectedSegmentID(newLiver)
    assert effect.ui.propagateFromBankButton.enabled
    effect.processInteractionEvents(None, 0, standins.qMRMLSliceWidget(e["sliceNode"]))
    effect.ui.propagateFromBankButton.click()
    assert effect.ui.statusLabel.text == "Propagating from the example bank along the Red view..."
    e["app"].runEventLoopUntil(lambda: effect.session.state != effect_session.RUNNING)
    assert effect.session.state == effect_session.PREVIEW, effect.ui.statusLabel.text
    result = effect.session.result
    assert not result.paintedSupports and len(result.examples[newLiver]) == 1
    preview = mrml_io.segmentToArray(result.previewSegmentationNode, newLiver, volume)
    assert preview.any() and not mrml_io.segmentToArray(segmentation, newLiver, volume).any()
    effect.ui.applyButton.click()
    assert np.array_equal(mrml_io.segmentToArray(segmentation, newLiver, volume).astype(bool), preview.astype(bool))


# --------------------------------------------------------------------------- module
def test_module_bank_view_add_prompt_declined_then_accepted_and_a_volume_from_the_bank(
        scene, slicerApp, modalDialogs, tmp_path):
    """The module's Example bank section (real Qt, dialogs answered by the stand-in user with
    testing off): the folder in the settings, the table, Accept asking to add the painted and
    corrected slices (Cancel: nothing added; OK: added), and B propagated from the bank alone."""
    import qt

    from test_slicer_module_widget import openModule, selectInputs

    a, segmentation, liver = volumeA(scene)
    b = volumeB(scene)
    ProtoSAM, module, widget = openModule()
    folder = tmp_path / "bank"
    folder.mkdir()
    widget.ui.bankFolderPathLineEdit.currentPath = str(folder)
    assert qt.QSettings().value("ProtoSAM/ExampleBank") == str(folder)
    assert widget.ui.bankTableWidget.rowCount == 0 and "empty" in widget.ui.bankStatusLabel.text
    selectInputs(widget, segmentation, [liver])

    def propagateAndRepaint(k):
        widget.ui.applyButton.click()
        slicerApp.runEventLoopUntil(lambda: not widget.jobs)
        (result,) = widget.results
        repaint(result, liver, k, slice(6, 14), slice(7, 16))  # the user repaints a slice of the preview

    def acceptAnswering(answer):
        modalDialogs.answer = answer
        asked = len(modalDialogs.shown)
        qt.QTimer.singleShot(0, widget.ui.acceptButton.click)  # from the event loop, as a click in Slicer
        slicerApp.runEventLoopUntil(lambda: not widget.results and len(modalDialogs.shown) > asked
                                    and modalDialogs.open == 0)
        return modalDialogs.shown[-1]

    propagateAndRepaint(1)
    declined = acceptAnswering(qt.QMessageBox.Cancel)
    assert declined["title"] == "ProtoSAM example bank"
    assert "Add the 2 painted and corrected slice(s)" in declined["text"]
    assert "- A: liver: slices 1, 3" in declined["text"]
    assert list(folder.iterdir()) == [] and "nothing was added" in widget.ui.statusLabel.text
    assert widget.ui.undoAcceptButton.enabled  # the Accept itself went through

    propagateAndRepaint(5)
    accepted = acceptAnswering(qt.QMessageBox.Ok)
    assert "- A: liver: slices 3, 5" in accepted["text"]
    assert ExampleBank(folder).structures() == {"liver": 2} and "2 example(s) added" in widget.ui.statusLabel.text

    # Undo accept asks whether the 2 examples go too; OK: they do, and the segment is as before.
    asked = len(modalDialogs.shown)
    modalDialogs.answer = qt.QMessageBox.Ok
    qt.QTimer.singleShot(0, widget.ui.undoAcceptButton.click)
    slicerApp.runEventLoopUntil(lambda: len(modalDialogs.shown) > asked and modalDialogs.open == 0
                                and widget.acceptUndo is None)
    assert "added 2 painted and corrected slice(s) to the example bank" in modalDialogs.shown[-1]["text"]
    assert ExampleBank(folder).structures() == {} and widget.ui.bankTableWidget.rowCount == 0
    assert "2 example(s) it added were removed from the bank" in widget.ui.statusLabel.text
    assert not widget.ui.undoAcceptButton.enabled
    propagateAndRepaint(5)  # and accepted again, into the bank again
    acceptAnswering(qt.QMessageBox.Ok)
    assert ExampleBank(folder).structures() == {"liver": 2}
    table = widget.ui.bankTableWidget
    assert table.rowCount == 1 and [table.item(0, c).text() for c in range(3)] == ["liver", "2", "axial"]
    assert [table.horizontalHeaderItem(c).text() for c in range(3)] == ["Structure", "Examples", "Planes"]

    # B from the bank alone: "Supports: Example bank", B checked, nothing painted on B.
    widget.ui.supportsComboBox.setCurrentIndex(widget.ui.supportsComboBox.findData(bank.SUPPORTS_BANK))
    assert qt.QSettings().value("ProtoSAM/Supports") == bank.SUPPORTS_BANK
    widget.ui.targetVolumesSelector.setCheckState(a, qt.Qt.Unchecked)
    widget.ui.targetVolumesSelector.setCheckState(b, qt.Qt.Checked)
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    (fromBank,) = widget.results
    assert fromBank.targetVolumeNode is b and not fromBank.paintedSupports and len(fromBank.examples[liver]) == 2
    assert mrml_io.segmentToArray(fromBank.previewSegmentationNode, liver, b).any()
    assert modalDialogs.maxOpen == 1 and len(modalDialogs.shown) == 4  # no error on the way
    # Accepting B's preview with nothing painted or repainted on B offers nothing.
    qt.QTimer.singleShot(0, widget.ui.acceptButton.click)
    slicerApp.runEventLoopUntil(lambda: not widget.results)
    assert len(modalDialogs.shown) == 4 and ExampleBank(folder).structures() == {"liver": 2}

    # A bank folder that went missing: the section says so, and Propagate from it shows the error
    # and starts nothing.
    widget.ui.bankFolderPathLineEdit.currentPath = str(tmp_path / "gone")
    assert "does not exist" in widget.ui.bankStatusLabel.text and widget.ui.bankTableWidget.rowCount == 0
    segments = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    qt.QTimer.singleShot(0, widget.ui.applyButton.click)
    slicerApp.runEventLoopUntil(lambda: len(modalDialogs.shown) == 5 and modalDialogs.open == 0)
    assert "does not exist" in modalDialogs.shown[-1]["text"] and not widget.jobs
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segments
    widget.cleanup()


def test_the_bank_view_and_reading_examples_import_no_torch(tmp_path):
    """Slicer's process reads the bank (its index for the view, its arrays for a run) without
    torch: protosam.examples and ProtoSAMSlicerLib.bank stay light."""
    import pathlib
    import subprocess
    import sys

    from test_slicer_dependencies import TORCH_BLOCKER

    folder = tmp_path / "bank"
    code = TORCH_BLOCKER + f"""
import numpy as np
from protosam.examples import ExampleBank
from ProtoSAMSlicerLib import bank
ExampleBank({str(folder)!r}).add("liver", np.ones((4, 4), np.float32), np.ones((4, 4), bool), slice_index=1,
                                 slice_count=3, volume_hash="x", plane="axial")
rows = bank.bankRows({str(folder)!r})
assert [(r.structure, r.count, r.planes) for r in rows] == [("liver", 1, "axial")], rows
image, mask = bank.openBank({str(folder)!r}).arrays(bank.openBank({str(folder)!r}).list()[0])
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'segment_anything'))
print('heavy:', heavy)
sys.exit(1 if heavy else 0)
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_painted_slices_and_the_bank_together(scene, tmp_path):
    """"Supports: both": a segment's painted slices and its bank examples go together; a segment
    the bank does not hold uses its painting; one painted nowhere and not in the bank is refused."""
    from ProtoSAMSlicerLib.logic import ProcessOptions, engineKwargs

    folder = tmp_path / "bank"
    ExampleBank(folder).add("liver", np.ones((20, 22), np.float32), np.ones((20, 22), bool), slice_index=2,
                            slice_count=7, volume_hash="x", plane="axial")
    b = volumeB(scene)
    painted = np.zeros(B_SHAPE, np.uint8)
    painted[4, 6:12, 7:14] = 1
    segmentation, ids = addSegmentation(scene, b, {"liver": np.zeros(B_SHAPE, np.uint8), "spleen": painted,
                                                   "kidney": np.zeros(B_SHAPE, np.uint8)})
    liver, spleen, kidney = ids["liver"], ids["spleen"], ids["kidney"]
    examples = bank.examplesForSegments(folder, segmentation, [liver, spleen], "axial", required=False)
    assert list(examples) == [liver] and examples[liver][0]["slice_index"] == 2
    logic = ProtoSAMLogic()
    prepared = logic.prepare(b, segmentation, [liver, spleen], examples=examples)
    assert list(prepared.masks) == [spleen] and prepared.segmentIds == [spleen, liver]
    kwargs = engineKwargs(prepared, ProcessOptions())
    assert list(kwargs["support_masks"]) == [spleen] and list(kwargs["examples"]) == [liver]
    # Painted and in the bank: both.
    mrml_io.writeSegmentFromArray(painted, segmentation, liver, b)
    prepared = logic.prepare(b, segmentation, [liver], examples=examples)
    assert list(prepared.masks) == [liver] and list(prepared.examples) == [liver]
    with pytest.raises(InputError, match="'kidney' is empty"):
        logic.prepare(b, segmentation, [kidney, liver], examples=examples)
