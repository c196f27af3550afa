"""Exclusive structures and "other segments as not this" (protosam.propagation, engine,
prompts, session) with the tiny random-weight models: the mechanics, which hold whatever the
weights (no voxel in two structures, the tie rule, removed voxels, untouched slices)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from protosam import PRESETS, Engine, segment_volume
from protosam.prompts import ComponentPrompt, add_negative_points
from protosam.propagation import _Structure, resolve_exclusive
from protosam.session import Session

SLICES, SIZE = 6, 40
WHOLE_VOLUME = replace(PRESETS["default"], auto_extent=False)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models, preset=WHOLE_VOLUME, device="cpu")


def _volume():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(0, 0.05, (SLICES, SIZE, SIZE)).astype(np.float32)
    one = np.zeros(volume.shape, np.uint8)
    two = np.zeros(volume.shape, np.uint8)
    for k in range(SLICES):
        one[k] = (yy - 15) ** 2 + (xx - 15) ** 2 <= 36
        two[k] = (yy - 24) ** 2 + (xx - 26) ** 2 <= 49
    volume += 2.0 * one + 1.0 * two
    return volume, _only(one, 3), _only(two, 3)


def _only(mask, k):
    painted = np.zeros_like(mask)
    painted[k] = mask[k]
    return painted


def _structure(key, output, probabilities=None, copied=()):
    return _Structure(key, [], [0], {k: output[k] for k in copied}, {}, output.copy(), [],
                      probabilities=probabilities)


def test_resolve_exclusive_takes_the_most_probable_and_the_first_on_ties():
    mask = np.zeros((2, 4, 4), np.uint8)
    mask[:, 1:3, 1:3] = 1
    p_first = np.full((2, 2), 0.7, np.float32)
    p_second = np.array([[0.9, 0.7], [0.6, 0.7]], np.float32)
    first = _structure("a", mask, {0: (slice(1, 3), slice(1, 3), p_first), 1: (slice(1, 3), slice(1, 3), p_first)})
    second = _structure("b", mask, {0: (slice(1, 3), slice(1, 3), p_second)}, copied=[1])
    resolve_exclusive([first, second])
    assert not (first.output & second.output).any()
    # Slice 0: b wins where it is more probable (0.9), ties (0.7) go to a, a wins over 0.6.
    np.testing.assert_array_equal(second.output[0, 1:3, 1:3], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(first.output[0, 1:3, 1:3], [[0, 1], [1, 1]])
    # Slice 1: b's painted slice counts as probability 1.
    assert second.output[1].sum() == 4 and not first.output[1].any()
    assert first.probabilities is None and second.probabilities is None


def test_decoding_with_probability_gives_the_same_mask(engine):
    volume, one, _ = _volume()
    from protosam.propagation import _SliceStore

    store = _SliceStore(engine, volume)
    embedding = store.sam_embedding(2)
    prompts = [ComponentPrompt(np.array([100.0, 120.0, 500.0, 600.0]), np.array([[300.0, 300.0]]),
                               np.array([1]), None, None, 0.0),
               ComponentPrompt(np.array([600.0, 600.0, 900.0, 1000.0]), np.array([[700.0, 800.0], [650.0, 610.0]]),
                               np.array([1, 0]), None, None, 0.0)]
    union, scores = engine.refiner.decode(embedding, prompts, multimask_output=engine.preset.effective_multimask,
                                          pick_best_score=engine.preset.pick_best_score, batch_prompts=False)
    mine, my_scores, probability, _ = engine._decode_with_probability(embedding, prompts, False)
    assert torch.equal(union, mine)
    assert my_scores == pytest.approx(scores)
    assert bool((probability[union] >= 0.5).all()) and bool((probability[~union] <= 0.5).all())


def test_exclusive_identical_structures_go_to_the_first(engine):
    volume, one, _ = _volume()
    plain = segment_volume(engine, volume, None, {"a": one}, modality="none").masks["a"]
    result = segment_volume(engine, volume, None, {"a": one, "b": one.copy()}, modality="none", exclusive=True)
    np.testing.assert_array_equal(result.masks["a"], plain)
    assert not result.masks["b"].any()


def test_exclusive_leaves_no_voxel_in_two_structures(engine):
    volume, one, two = _volume()
    shared = {"a": one, "b": two}
    plain = segment_volume(engine, volume, None, shared, modality="none")
    result = segment_volume(engine, volume, None, shared, modality="none", exclusive=True)
    a, b = result.masks["a"], result.masks["b"]
    assert not (a & b).any()
    # Only overlapping voxels change: each keeps its voxels that the other did not claim.
    for mine, theirs, key in ((a, b, "a"), (b, a, "b")):
        assert not (mine & ~plain.masks[key]).any()
        alone = plain.masks[key] & ~plain.masks["b" if key == "a" else "a"]
        np.testing.assert_array_equal(mine[alone > 0], 1)
    # The painted support slices are kept as painted (a listed first keeps the painted overlap).
    np.testing.assert_array_equal(a[3], one[3])


def test_add_negative_points_rule():
    negatives = np.zeros((64, 64), bool)
    negatives[10:20, 10:30] = True  # inside the box, the deepest voxel in the middle
    negatives[40:44, 50:54] = True  # outside the box
    box = np.array([0.0, 0.0, 511.0, 511.0])  # voxels 0..31 of 64 at 1024
    prompt = ComponentPrompt(box, np.array([[100.0, 100.0]]), np.array([1]), None, None, 0.0)
    (out,) = add_negative_points([prompt], negatives)
    assert out.point_labels.tolist() == [1, 0]
    x, y = out.points[1]
    col, row = (x + 0.5) * 64 / 1024 - 0.5, (y + 0.5) * 64 / 1024 - 0.5
    assert 10 <= col < 30 and 14 <= row <= 15
    boxless = ComponentPrompt(None, np.zeros((1, 2)), np.array([1]), None, None, 0.0)
    assert add_negative_points([boxless], negatives)[0] is boxless


def test_negatives_remove_their_voxels_and_change_no_other_slice(engine):
    volume, one, _ = _volume()
    plain = segment_volume(engine, volume, None, {"a": one}, modality="none").masks["a"]
    negatives = np.zeros(volume.shape, bool)
    negatives[1, 5:30, 5:30] = True
    result = segment_volume(engine, volume, None, {"a": one}, modality="none", negatives={"a": negatives})
    mask = result.masks["a"]
    assert not mask[negatives].any()
    others = [k for k in range(SLICES) if k != 1]
    np.testing.assert_array_equal(mask[others], plain[others])


def test_session_negatives_apply_at_update(engine):
    volume, one, _ = _volume()
    session = Session(engine, volume, modality="none")
    start = session.start({"a": one})["a"].copy()
    negatives = np.zeros(volume.shape, bool)
    negatives[:, 10:25, 10:25] = True
    session.set_negatives("a", negatives)
    updated = session.update("a")
    assert not updated[[k for k in range(SLICES) if k != 3]][:, 10:25, 10:25].any()
    np.testing.assert_array_equal(updated[3], one[3]), "the painted support keeps what was painted"
    session.set_negatives("a", None)
    np.testing.assert_array_equal(session.update("a"), start)



def test_exclusive_session_starts_as_segment_volume(engine, one_thread):
    volume, one, two = _volume()
    shared = {"a": one, "b": two}
    run = segment_volume(engine, volume, None, shared, modality="none", exclusive=True)
    started = Session(engine, volume, modality="none", exclusive=True).start(shared)
    for key in shared:
        np.testing.assert_array_equal(started[key], run.masks[key])


def test_exclusive_session_updates_and_corrections_leave_no_voxel_in_two(engine, one_thread):
    volume, one, _ = _volume()
    session = Session(engine, volume, modality="none", exclusive=True)
    session.start({"a": one, "b": one.copy()})  # identical: everything goes to a (listed first)
    assert session.mask("a").any() and not session.mask("b").any()
    # The session keeps each structure's own mask: without the rule b is a again.
    session.exclusive_structures = False
    np.testing.assert_array_equal(session.mask("b"), session.mask("a"))
    session.exclusive_structures = True
    # A corrected slice of b is fixed (probability 1): b takes its voxels there, and only there.
    lasso = [(8, 8), (22, 8), (22, 22), (8, 22)]
    b_slice = session.lasso("b", 1, lasso, True)
    masks = session.masks()
    assert not (masks["a"] & masks["b"]).any()
    np.testing.assert_array_equal(b_slice, masks["b"][1])
    assert b_slice[10:20, 10:20].all() and not masks["a"][1][b_slice > 0].any()
    assert not masks["b"][[0, 2, 4, 5]].any()
    # A lasso of a on the same slice: a tie at probability 1 goes to a, listed first.
    a_slice = session.lasso("a", 1, lasso, True)
    assert a_slice[10:20, 10:20].all() and not session.mask("b")[1][10:20, 10:20].any()
    # Undo gives b its voxels back; an update keeps the rule.
    session.undo("a", 1)
    assert session.mask("b")[1][10:20, 10:20].all()
    updated = session.update("b")
    masks = session.masks()
    np.testing.assert_array_equal(updated, masks["b"])
    assert not (masks["a"] & masks["b"]).any()
