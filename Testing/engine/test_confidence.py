"""Confidence of results (protosam.confidence): each component moves the score as documented,
which slices are scored, the ranking, and the scores a real propagation returns.

Calibration (does a low score predict a low Dice?) needs the pretrained weights; these tests
check the mechanics only.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protosam import Engine, segment_volume
from protosam.confidence import (WEIGHTS, SliceEvidence, combine, least_confident, slice_evidence, slice_scores,
                                 structure_score, volume_score)
from protosam.serving import protocol

SURE = SliceEvidence(iou=0.9, margin=0.8, agreement=0.9)


def disc(size=32, radius=8, center=(16, 16)):
    yy, xx = np.mgrid[:size, :size]
    return ((yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2).astype(np.uint8)


def stack(*slices):
    return np.stack(slices).astype(np.uint8)


# ----------------------------------------------------------------------------- the formula
def test_weights_sum_to_one_and_the_score_is_their_weighted_mean():
    assert math.isclose(sum(WEIGHTS.values()), 1.0)
    components = {"iou": 0.9, "agreement": 0.5, "margin": 0.3, "neighbours": 0.1}
    assert math.isclose(combine(components), 0.35 * 0.9 + 0.25 * 0.5 + 0.2 * 0.3 + 0.2 * 0.1, rel_tol=1e-6)
    assert combine({name: 1.0 for name in WEIGHTS}) == 1.0 and combine({name: 0.0 for name in WEIGHTS}) == 0.0
    # A missing predicted IoU renormalises the other weights: still in [0, 1].
    assert combine({"iou": None, "agreement": 1.0, "margin": 1.0, "neighbours": 1.0}) == 1.0


@pytest.mark.parametrize("component", sorted(WEIGHTS))
def test_each_component_alone_raises_the_score_by_its_weight(component):
    low = {name: 0.5 for name in WEIGHTS}
    high = dict(low, **{component: 1.0})
    assert math.isclose(combine(high) - combine(low), WEIGHTS[component] * 0.5, rel_tol=1e-6)


def test_slice_evidence_iou_is_the_mean_predicted_iou_clipped():
    logits = torch.stack([torch.zeros(32, 32), torch.from_numpy(disc() * 6.0 - 3.0).float()])
    mask = torch.from_numpy(disc()).bool()
    assert slice_evidence(logits, mask, [0.6, 0.8]).iou == pytest.approx(0.7)
    assert slice_evidence(logits, mask, [1.3]).iou == 1.0
    assert slice_evidence(logits, mask, []).iou is None


def test_slice_evidence_margin_grows_with_the_prototype_score_gap_inside_the_result():
    mask = torch.from_numpy(disc()).bool()
    margins = []
    for gap in (0.5, 2.0, 8.0):
        logits = torch.stack([torch.zeros(32, 32), torch.from_numpy(disc() * 2 * gap - gap).float()])
        evidence = slice_evidence(logits, mask, [0.9])
        assert evidence.agreement == 1.0  # only the margin changes
        margins.append(evidence.margin)
    assert margins == sorted(margins) and margins[0] == pytest.approx(math.tanh(0.25), rel=1e-5)
    assert margins[-1] > 0.99
    # Background prototypes winning inside the result: no margin (clipped at 0).
    against = torch.stack([torch.ones(32, 32) * 3, torch.zeros(32, 32)])
    assert slice_evidence(against, mask, [0.9]).margin == 0.0


def test_slice_evidence_agreement_is_the_dice_of_coarse_and_refined_masks():
    logits = torch.stack([torch.zeros(32, 32), torch.from_numpy(disc() * 6.0 - 3.0).float()])
    same = torch.from_numpy(disc()).bool()
    shifted = torch.from_numpy(disc(center=(16, 22))).bool()
    assert slice_evidence(logits, same, [0.9]).agreement == 1.0
    expected = 2 * (disc() & disc(center=(16, 22))).sum() / (2 * disc().sum())
    assert slice_evidence(logits, shifted, [0.9]).agreement == pytest.approx(expected)
    # numpy arrays give the same numbers as tensors (up to float32 rounding)
    from_numpy, from_torch = slice_evidence(logits.numpy(), shifted.numpy(), [0.9]), slice_evidence(logits, shifted, [0.9])
    assert from_numpy.agreement == from_torch.agreement and from_numpy.margin == pytest.approx(from_torch.margin)


def test_neighbour_consistency_lowers_a_slice_unlike_both_neighbours():
    regular = stack(disc(), disc(), disc(), disc())
    odd = regular.copy()
    odd[1] = disc(radius=4, center=(6, 6))
    evidence = {i: SURE for i in range(4)}
    consistent, inconsistent = slice_scores(regular, evidence), slice_scores(odd, evidence)
    drop = WEIGHTS["neighbours"] * (1.0 - 0.0)  # Dice with both neighbours 1 -> 0
    assert inconsistent[1] == pytest.approx(consistent[1] - drop, abs=1e-6)
    # The other slices keep a consistent neighbour, so their score does not change.
    assert inconsistent[3] == consistent[3]


@pytest.mark.parametrize("component", ["iou", "margin", "agreement"])
def test_a_lower_model_component_ranks_its_slice_first(component):
    masks = stack(disc(), disc(), disc())
    evidence = {i: SURE for i in range(3)}
    evidence[2] = dataclasses.replace(SURE, **{component: 0.2})
    scores = slice_scores(masks, evidence)
    assert scores[0] == scores[1] > scores[2]
    assert scores[1] - scores[2] == pytest.approx(WEIGHTS[component] * (getattr(SURE, component) - 0.2), abs=1e-6)
    assert [item.slice for item in least_confident({"liver": scores})] == [2, 0, 1]


def test_which_slices_are_scored_extent_holes_and_painted():
    empty = np.zeros((32, 32), np.uint8)
    masks = stack(empty, disc(), empty, disc(), disc(), empty)
    evidence = {i: SURE for i in range(6)}
    scores = slice_scores(masks, evidence, painted=[4])
    assert np.isnan(scores[0]) and np.isnan(scores[5])  # outside the extent 1..4: no score
    assert scores[2] == 0.0  # a hole inside the extent is reviewed first
    assert scores[4] == 1.0  # the user's own slice
    assert 0 < scores[1] < 1 and 0 < scores[3] < 1
    assert scores.dtype == np.float32
    # The structure's confidence leaves the painted slice out; the volume's is the lowest.
    assert structure_score(scores, painted=[4]) == pytest.approx(np.mean(scores[[1, 2, 3]]))
    assert structure_score(slice_scores(stack(empty, empty), {})) == 0.0  # nothing found
    assert structure_score(slice_scores(stack(disc(), empty), {}, painted=[0]), painted=[0]) == 1.0
    assert volume_score({"a": 0.8, "b": 0.3}) == 0.3


def test_least_confident_orders_and_limits():
    queue = least_confident({"b": np.array([0.5, np.nan, 0.2], np.float32), "a": np.array([0.5, 0.9], np.float32)},
                            count=3, volume="case1")
    assert [(item.structure, item.slice) for item in queue] == [("b", 2), ("a", 0), ("b", 0)]  # ties by name
    assert all(item.volume == "case1" for item in queue)
    assert least_confident({"a": np.array([0.1, 0.2])}, painted={"a": [0]})[0].slice == 1


# ----------------------------------------------------------------------------- in a real run
SLICES, SIZE = 9, 48


def _volume():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(0, 0.05, (SLICES, SIZE, SIZE)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    for k in range(2, 7):
        truth[k] = (yy - 24) ** 2 + (xx - 24) ** 2 <= (9 - abs(k - 4)) ** 2
    return volume + 2.0 * truth, truth


@pytest.fixture
def scripted_engine(tiny_models, monkeypatch):
    """A real Engine whose encoders see intensity and whose SAM gives back the prompted
    components with a predicted IoU the test chooses per slice (``engine.iou_for``): the SAM
    embedding of slice k is filled with k, so the decoder knows which slice it decodes."""
    from protosam import propagation

    engine = Engine(tiny_models, preset="default", device="cpu")
    engine.iou_for = {}

    def encode(images):
        intensity = F.adaptive_avg_pool2d(images[:, :1].float(), 32)
        return torch.cat([intensity, torch.ones_like(intensity)], dim=1)

    def decode(embedding, prompts, **_):
        union = torch.from_numpy(np.any([p.full_mask((1024, 1024)) for p in prompts], axis=0))
        return union, [engine.iou_for.get(int(embedding.flatten()[0]), 0.9)] * len(prompts)

    monkeypatch.setattr(propagation._SliceStore, "sam_embedding", lambda self, index: torch.full((1, 1, 4, 4), index))
    engine.encode = encode
    engine.refiner.decode = decode
    return engine


def test_a_run_returns_scores_that_follow_the_refiner_iou(scripted_engine):
    engine = scripted_engine
    volume, truth = _volume()
    engine.iou_for = {3: 0.1}
    result = segment_volume(engine, volume, None, {"s": truth}, axis=0, support_slices={"s": 4})
    scores = result.slice_confidence["s"]
    found = np.flatnonzero(result.masks["s"].reshape(SLICES, -1).any(axis=1))
    assert scores.shape == (SLICES,) and scores.dtype == np.float32
    assert np.all(np.isfinite(scores[found[0]:found[-1] + 1]))
    assert np.all(np.isnan(np.delete(scores, range(found[0], found[-1] + 1))))  # no score outside the extent
    assert scores[4] == 1.0  # painted
    assert least_confident(result.slice_confidence)[0].slice == 3  # the slice SAM doubted
    assert result.structure_confidence["s"] == pytest.approx(structure_score(scores, [4]))
    assert result.volume_confidence == result.structure_confidence["s"]
    engine.iou_for = {}
    trusting = segment_volume(engine, volume, None, {"s": truth}, axis=0, support_slices={"s": 4})
    np.testing.assert_array_equal(trusting.masks["s"], result.masks["s"])
    assert trusting.slice_confidence["s"][3] - scores[3] == pytest.approx(WEIGHTS["iou"] * 0.8, abs=1e-6)


def test_scores_follow_the_stored_slice_order_with_geometry_and_travel_as_arrays(scripted_engine):
    engine = scripted_engine
    volume, truth = _volume()
    volume[7] += 2.0 * truth[6]  # the structure is asymmetric along k: a flip must show
    truth[7] = truth[6]
    flipped_k = np.diag([1.0, 1.0, -1.0, 1.0])  # k runs from superior to inferior
    oriented = segment_volume(engine, volume, None, {"s": truth}, query_ijk_to_ras=flipped_k, plane="axial",
                              support_slices={"s": 4})
    assert oriented.axis == 0
    scores = oriented.slice_confidence["s"]
    present = np.flatnonzero(oriented.masks["s"].reshape(SLICES, -1).any(axis=1))
    assert present[0] == 2 and present[-1] >= 7
    # Scored exactly over the stored extent (the canonical one runs the other way), painted slice 4 at 1.
    assert np.array_equal(np.flatnonzero(np.isfinite(scores)), np.arange(present[0], present[-1] + 1))
    assert scores[4] == 1.0 and (scores[present] < 1).sum() == len(present) - 1
    # Through the wire format the worker and the server use: NaN (no score) survives.
    value = {"slice_confidence": oriented.slice_confidence, "structure_confidence": oriented.structure_confidence,
             "volume_confidence": oriented.volume_confidence}
    back = protocol.decode(protocol.encode(protocol.JobResult(id="x", value=value))).value
    np.testing.assert_array_equal(back["slice_confidence"]["s"], oriented.slice_confidence["s"])
    assert back["volume_confidence"] == oriented.volume_confidence
