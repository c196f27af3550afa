"""The review queue follows the corrections of a preview (docs/cohorts.md, "After corrections"):
real MRML (slicer-core), real tiny random-weight models, the real worker process and the
in-process (deprecated thread worker) session.

A run hands its slice evidence to the preview's correction session; the session's replies
rescore the preview's slices; a corrected slice is user-confirmed (score 1) and leaves the
Review list; the volume's score is the engine's (protosam.confidence) for the preview as it
stands."""

import warnings

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

from ProtoSAMSlicerLib import effect_session, review
from ProtoSAMSlicerLib.effect_session import EffectSession
from ProtoSAMSlicerLib.logic import ProtoSAMLogic, correctionOrientation
from ProtoSAMSlicerLib.worker_client import WorkerSession
from protosam.confidence import evidence_from_array, slice_scores, structure_score
from slicer_mrml_helpers import addSegmentation, addVolume, ijkToRasFrom
from test_slicer_module_update import PAINTED, REPAINTED, buildCase, image, painted, previewOf, repaintSlice, run

# K runs from head to feet: the engine's canonical order (and the session's) is the stored
# order reversed, so every slice index and score crosses that flip on its way to the Review list.
FLIPPED = ijkToRasFrom(np.diag([-1.0, -1.0, -1.0]), (0.9, 0.9, 2.0), (4.0, 2.0, 9.0))
AXIAL = FLIPPED[:3, 2] / np.linalg.norm(FLIPPED[:3, 2])


def queue(result):
    return [(row.segmentId, row.sliceIndex) for row in review.sliceRows([result])]


def engineScores(result, segmentId):
    """What protosam.confidence gives for the preview as it stands (axial: slices along K, the
    preview's KJI axis 0), from the run's evidence, with the confirmed slices painted."""
    return slice_scores(previewOf(result, segmentId), evidence_from_array(result.sliceEvidence[segmentId]),
                        result.confirmedSlices.get(segmentId, []))


def clickAndRescore(scene, tinyOptions, kind):
    """Propagate the liver with the Segment Editor effect's session on a ``kind`` logic, click on
    the least confident slice; returns (result, scores of the run, that slice)."""
    if kind == "thread":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            logic = ProtoSAMLogic(workerKind="thread")
    else:
        logic = ProtoSAMLogic()
    target = addVolume(scene, image(5), FLIPPED, "target")
    segmentation, ids = addSegmentation(scene, target, painted())
    session = EffectSession(logic, lambda: None, lambda labelmap, segmentId: None)
    liver = ids["liver"]
    session.start(target, segmentation, liver, sliceNormal_World=AXIAL,
                  slicePoint_World=(FLIPPED @ np.array([8.0, 10.0, PAINTED, 1.0]))[:3], options=tinyOptions,
                  waitForCompletion=True)
    assert session.state == effect_session.PREVIEW
    result = session.result
    count = target.GetImageData().GetDimensions()[2]
    assert correctionOrientation(result).canonical_slice(0, count) == count - 1  # the flip this test is about
    assert result.sliceEvidence[liver].shape == (count, 3)
    # The painted slice is the user's: it scores 1 and is not in the queue.
    assert result.confirmedSlices == {liver: [PAINTED]} and result.sliceConfidence[liver][PAINTED] == 1
    before = queue(result)
    assert before and (liver, PAINTED) not in before
    runScores = result.sliceConfidence[liver].copy()
    np.testing.assert_allclose(runScores, engineScores(result, liver), atol=1e-6)
    worst = before[0][1]
    point = (FLIPPED @ np.array([8.0, 10.0, worst, 1.0]))[:3]
    assert session.addClick(point, AXIAL, positive=True) == worst
    assert isinstance(session.corrections, WorkerSession) == (kind == "process")
    return session, result, runScores, worst


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_click_confirms_its_slice_and_rescores_the_volume(scene, tinyOptions, kind):
    session, result, runScores, worst = clickAndRescore(scene, tinyOptions, kind)
    liver = result.segmentIds[0]
    assert result.confirmedSlices[liver] == sorted([PAINTED, worst])
    assert (liver, worst) not in queue(result) and result.sliceConfidence[liver][worst] == 1
    # Every slice as the engine scores the preview now: the clicked one confirmed, its
    # neighbours against its new mask, the others from the run's evidence (handed to the session).
    expected = engineScores(result, liver)
    np.testing.assert_allclose(result.sliceConfidence[liver], expected, atol=1e-6)
    far = [k for k in range(len(runScores)) if abs(k - worst) > 1 and np.isfinite(runScores[k])]
    np.testing.assert_allclose(result.sliceConfidence[liver][far], runScores[far], atol=1e-6)
    score = structure_score(expected, result.confirmedSlices[liver])
    assert result.segmentConfidence[liver] == pytest.approx(score, abs=1e-6)
    assert result.volumeConfidence == pytest.approx(score, abs=1e-6)
    assert result.volumeConfidence != pytest.approx(structure_score(runScores, [PAINTED]), abs=1e-6)

    # Undo gives the slice back its propagated mask and score: back in the queue.
    session.undoCorrection()
    assert result.confirmedSlices[liver] == [PAINTED] and (liver, worst) in queue(result)
    np.testing.assert_allclose(result.sliceConfidence[liver], runScores, atol=1e-6)
    session.cancel()


def test_update_preview_rescores_and_confirms_the_repainted_slice(scene, tinyOptions):
    target, support, segmentation, ids = buildCase(scene)
    logic = ProtoSAMLogic()
    result = run(logic, target, support, segmentation, ids, tinyOptions)
    liver, spleen = ids["liver"], ids["spleen"]
    assert result.confirmedSlices == {liver: [PAINTED], spleen: [PAINTED]}
    assert (liver, REPAINTED) in queue(result)
    spleenScores = result.sliceConfidence[spleen].copy()
    repaintSlice(scene, result, liver)
    logic.updatePreviews([result])
    assert isinstance(result.corrections, WorkerSession)
    assert result.confirmedSlices == {liver: [PAINTED, REPAINTED], spleen: [PAINTED]}
    assert (liver, REPAINTED) not in queue(result) and result.sliceConfidence[liver][REPAINTED] == 1
    # The update's scores are the session's, in the preview's slice order; the spleen (not
    # updated) keeps the run's; the volume is its least confident segment.
    scores = result.corrections.confidence()
    count = len(result.sliceConfidence[liver])
    canonicalOrder = [correctionOrientation(result).canonical_slice(k, count) for k in range(count)]
    np.testing.assert_allclose(result.sliceConfidence[liver], scores["slice_confidence"][liver][canonicalOrder],
                               atol=1e-6)
    np.testing.assert_allclose(result.sliceConfidence[spleen], spleenScores, atol=1e-6)
    assert result.segmentConfidence[liver] == pytest.approx(
        structure_score(result.sliceConfidence[liver], [PAINTED, REPAINTED]), abs=1e-6)
    assert result.volumeConfidence == pytest.approx(min(result.segmentConfidence.values()))
    assert result.volumeConfidence == pytest.approx(scores["volume_confidence"])
    logic.discard(result)
