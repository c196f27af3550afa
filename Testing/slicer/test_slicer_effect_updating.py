"""#21 item 5: the effect's effect_session.UPDATING state, and the worker's busy reply.

While *Update volume* runs in the worker, the wait processes GUI events: Apply, Undo click,
Clear slice, Update and clicks must do nothing, and Cancel stops the update with the preview
left as it was. In the worker, a session request that would wait for the running update is
answered at once with a busy reply, so cancel and health requests are never stuck behind it.
"""

import dataclasses
import socket
import threading

import numpy as np
import pytest

from ProtoSAMSlicerLib import effect_session, mrml_io
from protosam.errors import InputError
from test_slicer_effect_class import clickAt, propagate, read


def test_each_control_pressed_mid_update_then_cancel_keeps_the_preview(editor):  # noqa: F811
    e = editor
    effect = propagate(e)
    processEvents = effect.session.logic.idle
    hooks = []

    def idle():  # what Slicer's event loop runs while the effect waits on the worker
        if hooks:
            hooks.pop(0)()
        processEvents()

    effect.session.logic.idle = idle  # before the first click opens the correction session
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    assert clickAt(e, (15, 3, 4)) is True
    session = effect.session
    previewNode = session.result.previewSegmentationNode
    before = mrml_io.segmentToArray(previewNode, e["ids"]["liver"], e["volume"])
    seen = {}

    def midUpdate():
        ui = effect.ui
        seen["state"] = session.state
        seen["enabled"] = {name: getattr(ui, name).enabled for name in (
            "propagateButton", "applyButton", "cancelButton", "undoCorrectionButton", "clearSliceButton",
            "updateVolumeButton")}
        seen["progressShown"] = not ui.progressBar.isHidden()
        for name in ("applyButton", "undoCorrectionButton", "clearSliceButton", "updateVolumeButton", "propagateButton"):
            getattr(ui, name).click()  # disabled: Qt does not emit clicked()
        # The slots themselves refuse too (e.g. a keyboard shortcut): nothing closes the session.
        for slot in (effect.onApply, effect.onUndoCorrection, effect.onClearSlice, effect.onUpdateVolume):
            with pytest.raises(InputError, match="updating the preview"):
                slot()
        seen["press"] = clickAt(e, (6, 6, 4))  # consumed, ignored
        seen["clicks"] = list(session.clicks(4))
        seen["stateAfterPresses"] = session.state
        ui.cancelButton.click()
        seen["status"] = ui.statusLabel.text

    hooks.append(midUpdate)
    effect.ui.updateVolumeButton.click()
    assert seen["state"] == effect_session.UPDATING
    assert seen["enabled"] == {"propagateButton": False, "applyButton": False, "cancelButton": True,
                               "undoCorrectionButton": False, "clearSliceButton": False, "updateVolumeButton": False}
    assert seen["progressShown"] and seen["press"] is True
    assert seen["clicks"] == [(15.0, 3.0, 1)] and seen["stateAfterPresses"] == effect_session.UPDATING
    assert seen["status"] == "Cancelling the update..."
    # Cancelled: back to the preview as it was before the update; the session is still usable.
    assert session.state == effect_session.PREVIEW and session.result.previewSegmentationNode is previewNode
    assert effect.ui.statusLabel.text == "Update cancelled; the preview is as it was."
    assert np.array_equal(mrml_io.segmentToArray(previewNode, e["ids"]["liver"], e["volume"]), before)
    assert effect.ui.applyButton.enabled and effect.ui.updateVolumeButton.enabled and effect.ui.undoCorrectionButton.enabled
    assert effect.ui.progressBar.isHidden()
    assert np.array_equal(read(e, "liver"), e["liver"]) and not e["editorLogic"].CanUndo()
    effect.ui.updateVolumeButton.click()  # not cancelled this time
    assert effect.ui.statusLabel.text.startswith("Preview updated")
    updated = mrml_io.segmentToArray(previewNode, e["ids"]["liver"], e["volume"])
    effect.ui.applyButton.click()
    assert np.array_equal(read(e, "liver").astype(bool), updated.astype(bool) | e["liver"].astype(bool))


def test_deactivation_mid_update_cancels_it(editor):  # noqa: F811
    e = editor
    effect = propagate(e)
    processEvents = effect.session.logic.idle
    hooks = []
    effect.session.logic.idle = lambda: (hooks.pop(0)() if hooks else None, processEvents())
    e["app"].runEventLoopUntil(lambda: effect.session.state == effect_session.PREVIEW)
    assert clickAt(e, (15, 3, 4)) is True
    before = mrml_io.segmentToArray(effect.session.result.previewSegmentationNode, e["ids"]["liver"], e["volume"])
    hooks.append(effect.deactivate)
    effect.ui.updateVolumeButton.click()
    assert effect.session.state == effect_session.PREVIEW
    assert np.array_equal(mrml_io.segmentToArray(effect.session.result.previewSegmentationNode, e["ids"]["liver"],
                                                 e["volume"]), before)


# --------------------------------------------------------------------------- worker process
def _receive(peer, tmp_path):
    from protosam.serving import protocol
    from protosam.serving.worker_process import _Channel

    channel = _Channel(peer, tmp_path)
    while True:
        message = protocol.decode(channel.receive(), file_dir=tmp_path)
        if not isinstance(message, protocol.LogRecord):
            return message


def test_worker_answers_session_requests_busy_while_an_update_holds_the_session(tinyModels, tmp_path):
    """The worker's reader thread answers a click, an undo, a clear or a close of a session whose
    update runs (the update holds the session's lock, as protosam.session.Session.update does)
    with an immediate busy error; health is answered meanwhile, and the click works afterwards.
    Before, the reader thread waited on Session.exclusive(wait=True) and every later request
    (cancel, health) waited behind it."""
    from protosam.serving import protocol
    from protosam.serving.worker_process import WorkerService, _Channel

    ours, peer = socket.socketpair()
    service = WorkerService(_Channel(ours, tmp_path))
    volume = np.random.default_rng(0).normal(size=(4, 24, 24)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    truth[:, 8:16, 8:16] = 1
    spec = {"models": dataclasses.asdict(tinyModels), "preset": "default", "device": "cpu", "cache_bytes": 64 << 20}
    service.sessions.job(protocol.SessionOpen(
        id="o", session_id="s", engine=spec, volume=protocol.Image(volume), structures={"organ": truth},
        options={"axis": 0, "modality": "none", "adopt": True, "fixed_slices": {"organ": [2]}}),
        lambda done, total: None, threading.Event())
    session = service.sessions.get("s")
    # A first click encodes slice 2 (a click on a slice without SAM embedding is a queued job,
    # not a reader-thread request); later clicks there are answered on the reader thread.
    click = protocol.SessionCorrect(id="c0", session_id="s", structure="organ", axis=0, slice_index=2,
                                    points=[[12, 12]], labels=[1])
    service.sessions.small_request(click)
    assert not service.sessions.needs_encoding(click)
    held, release = threading.Event(), threading.Event()

    def update():  # what the job thread does during an update: it holds the session
        with service.sessions._using("s"), session.exclusive():
            held.set()
            release.wait(60)

    updater = threading.Thread(target=update)
    updater.start()
    assert held.wait(10)
    try:
        requests = [
            protocol.SessionCorrect(id="c", session_id="s", structure="organ", axis=0, slice_index=2,
                                    points=[[10, 10]], labels=[1]),
            protocol.SessionUndoClick(id="u", session_id="s", structure="organ", axis=0, slice_index=2),
            protocol.SessionClearClicks(id="x", session_id="s", structure="organ", axis=0, slice_index=2),
            protocol.SessionClose(id="z", session_id="s"),
            protocol.HealthRequest(id="h"),
        ]
        for message in requests:
            reader = threading.Thread(target=service.handle, args=(message,), daemon=True)
            reader.start()
            reader.join(10)
            assert not reader.is_alive(), f"the reader thread waits for the update on '{message.TYPE}'"
            reply = _receive(peer, tmp_path)
            assert reply.id == message.id
            if isinstance(message, protocol.HealthRequest):
                assert isinstance(reply, protocol.Health)
            else:
                assert isinstance(reply, protocol.ErrorReply) and "updating the volume" in reply.message, reply
    finally:
        release.set()
        updater.join(10)
    assert "s" in service.sessions  # the busy close closed nothing
    service.handle(requests[0])
    reply = _receive(peer, tmp_path)
    assert isinstance(reply, protocol.JobResult) and reply.value["slice_index"] == 2
    service.handle(requests[3])
    assert _receive(peer, tmp_path).value == {"closed": True}
    ours.close()
    peer.close()
