"""Error dialogs with testing off (``slicer.app.testingEnabled()`` False, as for a user).

In Slicer a modal dialog runs a nested event loop in which Qt keeps firing QTimers, so the
module's and the effect's poll timers go on delivering job events while an error is shown: a
second error arriving then would open a dialog on top of the first, and an error shown from a
job's "finished" callback holds up the rest of a batch until the user closes it. The stand-in
user (slicer_app_standins.ModalDialogs) reads each dialog for ``readSeconds`` before clicking OK
and records how many were open at once.
"""

import pytest

import slicer
from ProtoSAMSlicerLib import effect_session
from slicer_mrml_helpers import addVolume, ijkToRasFrom
from test_slicer_effect_class import propagate
from test_slicer_module_widget import LPS, buildCase, openModule, selectInputs


@pytest.fixture
def brokenSamCheckpoint(slicerApp, tmp_path):
    """Every run fails in the worker (the SAM checkpoint cannot be loaded)."""
    import qt

    broken = tmp_path / "broken_sam.pth"
    broken.write_bytes(b"not a checkpoint")
    qt.QSettings().setValue("ProtoSAM/SAMCheckpoint", str(broken))
    return broken


def errorDialogs(dialogs):
    return [d for d in dialogs.shown if "ProtoSAM failed" in d["text"]]


def test_batch_failures_are_shown_once_in_one_dialog(scene, slicerApp, modalDialogs, brokenSamCheckpoint):
    """Three volumes, every run fails: one dialog at the end, naming each volume, with the poll
    timer stopped; the batch is not held up by a dialog waiting for the user."""
    import qt

    volume, segmentation, ids, liver, other = buildCase(scene)
    image = slicer.util.arrayFromVolume(volume).copy()
    extra = [addVolume(scene, image, ijkToRasFrom(LPS, (0.9, 0.9, 2.0), (4.0, 2.0, -3.0)), name)
             for name in ("ct follow-up", "ct late")]
    ProtoSAM, module, widget = openModule()
    selectInputs(widget, segmentation, [ids["liver"]])
    for node in extra:
        widget.ui.targetVolumesSelector.setCheckState(node, qt.Qt.Checked)
    assert len(widget.ui.targetVolumesSelector.checkedNodes()) == 3
    whileShown = []
    modalDialogs.closeWhen = lambda: whileShown.append(
        (widget.pollTimer.isActive(), [job.finished for job in widget.jobs])) or True

    widget.ui.applyButton.click()
    assert widget.jobs
    slicerApp.runEventLoopUntil(lambda: not widget.jobs and modalDialogs.open == 0, timeout=180)

    assert modalDialogs.maxOpen == 1
    shown = errorDialogs(modalDialogs)
    assert len(shown) == 1, [d["text"] for d in shown]
    # Each failed volume is named; the same error for all of them is said once.
    assert "- ct, ct follow-up, ct late: Cannot read checkpoint" in shown[0]["text"]
    assert shown[0]["text"].count("Cannot read checkpoint") == 1
    assert shown[0]["text"].startswith("ProtoSAM failed on 3 of 3 volumes.")
    assert shown[0]["title"] == "ProtoSAM"
    # When the user read it, every run had ended and nothing polled any more.
    assert whileShown and not any(active for active, _ in whileShown)
    assert widget.results == [] and not widget.pollTimer.isActive()
    assert "3 of 3" in widget.ui.statusLabel.text
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    widget.cleanup()


def test_one_failed_volume_is_shown_with_its_error(scene, slicerApp, modalDialogs, brokenSamCheckpoint):
    volume, segmentation, ids, liver, other = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    selectInputs(widget, segmentation, [ids["liver"]])
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs and modalDialogs.open == 0, timeout=120)
    (shown,) = modalDialogs.shown
    assert shown["text"].startswith("ProtoSAM failed: ") and modalDialogs.maxOpen == 1
    widget.cleanup()


def test_effect_failure_is_shown_once_with_its_timer_stopped(editor, modalDialogs, brokenSamCheckpoint):
    e = editor
    whileShown = []
    modalDialogs.closeWhen = lambda: whileShown.append(e["effect"].pollTimer.isActive()) or True
    effect = propagate(e)
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.IDLE and modalDialogs.open == 0,
                               timeout=120)
    (shown,) = modalDialogs.shown
    assert shown["text"].startswith("ProtoSAM failed: ") and modalDialogs.maxOpen == 1
    assert whileShown and not any(whileShown)
    assert effect.ui.propagateButton.enabled


def test_effect_failure_while_another_dialog_is_open_waits_for_it(editor, modalDialogs, brokenSamCheckpoint):
    """A dialog is open (another ProtoSAM error, or anything modal) while the effect's run is
    polled: the effect's timer keeps firing inside that dialog's loop; its error must not open a
    second dialog on top, and is shown once, after the first one is closed."""
    import qt

    e = editor
    effect = propagate(e)
    qt.QTimer.singleShot(0, lambda: slicer.util.errorDisplay("Another message", windowTitle="Other"))
    modalDialogs.closeWhen = lambda: effect.session.state == effect_session.IDLE

    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.IDLE and modalDialogs.open == 0
                               and len(modalDialogs.shown) >= 2, timeout=120)
    assert modalDialogs.maxOpen == 1, [(d["title"], d["openAtOnce"]) for d in modalDialogs.shown]
    assert [d["title"] for d in modalDialogs.shown] == ["Other", "ProtoSAM"]
    assert len(errorDialogs(modalDialogs)) == 1
    assert effect.ui.propagateButton.enabled


def test_failure_message_names_each_volume_and_says_what_is_ready(slicerApp):
    import ProtoSAM

    text = ProtoSAM.batchFailureMessage([("liver CT", ValueError("no memory")), ("MR T1", ValueError("oblique")),
                                         ("MR T2", ValueError("oblique"))], 4, previewsReady=True)
    assert text.splitlines() == [
        "ProtoSAM failed on 3 of 4 volumes. The previews of the other volumes are ready: Accept or Discard.", "",
        "- liver CT: no memory", "- MR T1, MR T2: oblique"]
    assert ProtoSAM.batchFailureMessage([("ct", ValueError("x"))], 1, False) == "ProtoSAM failed: x"
