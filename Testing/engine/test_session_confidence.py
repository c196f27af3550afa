"""Review scores of a correction session (protosam.session.Session.confidence) after each kind of
correction, as docs/cohorts.md documents them: a corrected (fixed) slice scores 1 and leaves the
structure's mean and the review queue, its two neighbours are scored again from the new mask,
other slices keep their scores, an undo gives the scores back, an update rescores every slice;
and the scores travel in the worker's (and so the server's) session replies.

With the tiny random-weight models the masks are arbitrary; the mechanics tested here do not
depend on the weights."""
import threading
from dataclasses import replace

import numpy as np
import pytest

from protosam import PRESETS, Engine, segment_volume
from protosam.confidence import combine, least_confident, neighbour_agreement, slice_scores, structure_score
from protosam.session import Session

SLICES, SIZE = 9, 48
WHOLE_VOLUME = replace(PRESETS["default"], auto_extent=False)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models, preset=WHOLE_VOLUME, device="cpu")


def _volume():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(0, 0.05, (SLICES, SIZE, SIZE)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    for k in range(1, SLICES - 1):
        truth[k] = (yy - 22) ** 2 + (xx - 26) ** 2 <= (10 - abs(k - 4)) ** 2
    return volume + 2.0 * truth, truth


def _scores(session):
    return session.confidence()["slice_confidence"]["organ"]


def _full(session):
    """Every slice scored again from the session's state (what incremental rescoring must equal)."""
    state = session.structures["organ"]
    return slice_scores(state.output, state.evidence, state.fixed)


def _check_rescored(session, before, index):
    """The documented effect of a correction of slice ``index`` on the scores."""
    state = session.structures["organ"]
    after = _scores(session)
    np.testing.assert_array_equal(after, _full(session))  # incremental == from scratch
    assert index in session.fixed_slices("organ") and after[index] == 1.0  # user-confirmed
    for neighbour in (index - 1, index + 1):  # scored again: their neighbour agreement saw the new mask
        if np.isfinite(after[neighbour]) and neighbour not in state.fixed and state.output[neighbour].any():
            evidence = state.evidence[neighbour]
            assert after[neighbour] == pytest.approx(combine({
                "iou": evidence.iou, "margin": evidence.margin, "agreement": evidence.agreement,
                "neighbours": neighbour_agreement(state.output, neighbour)}), abs=1e-6)
    far = [k for k in range(SLICES) if abs(k - index) > 1]
    np.testing.assert_array_equal(after[far], before[far])  # nothing else moved (the extent did not)
    confidence = session.confidence()
    assert confidence["structure_confidence"]["organ"] == structure_score(after, state.fixed)
    assert index not in [item.slice for item in least_confident(confidence["slice_confidence"],
                                                                painted={"organ": state.fixed})]
    return after


def test_start_scores_equal_segment_volume_and_each_correction_rescores_its_slice(engine, one_thread):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [4]})
    result = segment_volume(engine, volume, None, {"organ": truth}, axis=0, modality="none",
                            support_slices={"organ": [4]})
    start = session.confidence()
    np.testing.assert_array_equal(start["slice_confidence"]["organ"], result.slice_confidence["organ"])
    assert start["structure_confidence"] == result.structure_confidence
    assert start["volume_confidence"] == result.volume_confidence
    scores = start["slice_confidence"]["organ"]
    assert np.isfinite(scores[1:SLICES - 1]).all() and (scores[[2, 3, 5, 6]] < 1).all()

    corrections = [  # the repaint first: it cannot be undone
        ("repaint", 7, lambda: session.add_support("organ", 7, truth[7])),
        ("click", 2, lambda: session.correct("organ", 2, [[26, 22]], [1])),
        ("box", 3, lambda: session.box("organ", 3, (16, 12, 36, 32))),
        ("scribble", 5, lambda: session.scribble("organ", 5, [[20, 22], [32, 22]], True, radius=1)),
        ("lasso", 6, lambda: session.lasso("organ", 6, [[2, 2], [12, 2], [12, 12]], True)),
    ]
    history = [scores]
    for kind, index, correct in corrections:
        before = _scores(session)
        correct()
        history.append(_check_rescored(session, before, index))
        assert kind == "repaint" or session.corrections("organ", index) == [kind]

    # Undo gives each slice back its propagated mask and score (and the neighbours theirs).
    for kind, index, _ in reversed(corrections[1:]):
        session.undo("organ", index)
        assert index not in session.fixed_slices("organ")
        history.pop()
        np.testing.assert_array_equal(_scores(session), history[-1])

    # An update rescores every slice from the evidence of its new run.
    evidence = session.structures["organ"].evidence
    session.update("organ")
    assert session.structures["organ"].evidence is not evidence
    np.testing.assert_array_equal(_scores(session), _full(session))
    assert session.confidence()["volume_confidence"] == structure_score(_full(session), session.fixed_slices("organ"))

    # A change at an end of the extent may move it: every slice is scored again.
    end = int(np.flatnonzero(np.isfinite(_scores(session)))[-1])
    session.lasso("organ", end, [[0, 0], [SIZE - 1, 0], [SIZE - 1, SIZE - 1], [0, SIZE - 1]], False)  # erased
    after = _scores(session)
    assert np.isnan(after[end]) and np.isfinite(after[end - 1])  # the extent ends one slice earlier
    np.testing.assert_array_equal(after, _full(session))

def test_a_session_adopting_a_run_starts_from_its_scores_and_rescores_from_its_evidence(engine, one_thread):
    """Slicer's path: a run, then a session adopting its masks. With the run's slice evidence the
    session's scores are the run's and corrections rescore from it; without, the slices are
    scored by their neighbours alone (until an update)."""
    from protosam import InputError
    from protosam.serving import protocol

    volume, truth = _volume()
    result = segment_volume(engine, volume, None, {"organ": truth}, axis=0, modality="none",
                            support_slices={"organ": [4]})
    wire = protocol.decode(protocol.encode(protocol.JobResult(id="r", value={"e": result.slice_evidence})))
    evidence = wire.value["e"]["organ"]
    session = Session(engine, volume, modality="none", cache_bytes=None)
    session.adopt("organ", result.masks["organ"], [4], evidence=evidence)
    adopted = session.confidence()
    np.testing.assert_array_equal(adopted["slice_confidence"]["organ"], result.slice_confidence["organ"])
    assert adopted["structure_confidence"] == result.structure_confidence
    before = _scores(session)
    session.lasso("organ", 3, [[2, 2], [12, 2], [12, 12]], True)
    _check_rescored(session, before, 3)

    blind = Session(engine, volume, modality="none", cache_bytes=None)
    blind.adopt("organ", result.masks["organ"], [4])
    state = blind.structures["organ"]
    assert state.evidence == {}
    np.testing.assert_array_equal(_scores(blind), slice_scores(state.output, {}, [4]))
    assert not np.array_equal(_scores(blind), result.slice_confidence["organ"])
    with pytest.raises(InputError, match="one row per slice"):
        blind.adopt("other", result.masks["organ"], [4], evidence=evidence[:3])


def test_session_replies_of_the_worker_carry_the_rescored_scores(one_thread, tiny_models):
    """The worker's session handler (the server's too) answers each correction with the
    structure's scores as it left them, through the wire format; a session adopting a job's
    result with the job's slice evidence starts from the job's scores."""
    from protosam.serving import protocol
    from protosam.serving.worker_process import Engines, WorkerSessions, run_job

    from engine_helpers import segment_volume_request

    volume, truth = _volume()
    engines = Engines()
    sessions = WorkerSessions(engines)

    def wire(value):
        return protocol.decode(protocol.encode(protocol.JobResult(id="r", value=value))).value

    def ask(message, job=False):
        message = protocol.decode(protocol.encode(message))
        value = (sessions.job(message, lambda done, total: None, threading.Event()) if job
                 else sessions.small_request(message))
        return wire(value)

    request = segment_volume_request(tiny_models, volume, truth)
    request.kwargs.update(modality="none", support_slices={"1": [4]})
    plain = wire(run_job(engines, protocol.decode(protocol.encode(request)), lambda done, total: None,
                         threading.Event()))
    assert "slice_evidence" not in plain  # only when asked: older clients rebuild the fields they know
    request.kwargs.update(return_evidence=True)
    ran = wire(run_job(engines, protocol.decode(protocol.encode(request)), lambda done, total: None, threading.Event()))
    opened = ask(protocol.SessionOpen(
        id="o", session_id="s", engine=request.engine, volume=protocol.Image(volume),
        structures={"1": protocol.Image(ran["masks"]["1"])},
        options={"axis": 0, "modality": "none", "adopt": True, "fixed_slices": {"1": [4]},
                 "slice_evidence": ran["slice_evidence"]}), job=True)
    np.testing.assert_array_equal(opened["slice_confidence"]["1"], ran["slice_confidence"]["1"])
    assert opened["volume_confidence"] == ran["volume_confidence"] is not None
    local = sessions.get("s")
    before = opened["slice_confidence"]["1"]
    assert before[2] < 1
    lasso = ask(protocol.SessionLasso(id="l", session_id="s", structure="1", axis=0, slice_index=2,
                                      points=[[2, 2], [12, 2], [12, 12]], positive=True))
    assert lasso["slice_confidence"]["1"][2] == 1.0
    np.testing.assert_array_equal(lasso["slice_confidence"]["1"], local.confidence()["slice_confidence"]["1"])
    assert lasso["structure_confidence"]["1"] == local.confidence()["structure_confidence"]["1"]
    assert lasso["volume_confidence"] == local.confidence()["volume_confidence"]
    undone = ask(protocol.SessionUndo(id="u", session_id="s", structure="1", axis=0, slice_index=2))
    np.testing.assert_array_equal(undone["slice_confidence"]["1"], before)
    updated = ask(protocol.SessionUpdate(id="p", session_id="s", structure="1"), job=True)
    np.testing.assert_array_equal(updated["slice_confidence"]["1"], local.confidence()["slice_confidence"]["1"])
    assert np.isfinite(updated["slice_confidence"]["1"]).any()
    sessions.close("s")
