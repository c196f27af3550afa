"""Correction sessions (protosam.session) with the real tiny random-weight models.

Equalities between a session's update and a fresh ``segment_volume`` run are exact: both run
``propagation._propagate`` on the same prototypes (same features from the same encoder on the
same CPU, batch 1) in the same slice order, so the float operations are identical; the cache
only hands back the very tensors the encoder produced.
"""
from dataclasses import replace

import numpy as np
import pytest

from protosam import PRESETS, Engine, InputError, segment_volume
from protosam.session import Session, _to_sam_frame

SLICES, SIZE = 10, 48


def _volume(seed=0, two_parts=False):
    """A disc through the middle slices; ``two_parts`` adds a small second disc (a structure
    in two pieces: two prompt sets per slice)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(0, 0.05, (SLICES, SIZE, SIZE)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    for k in range(1, SLICES - 1):
        radius = 10 - abs(k - 5) * 0.7
        truth[k] = (yy - 22) ** 2 + (xx - 26) ** 2 <= radius**2
        if two_parts:
            truth[k] |= (yy - 40) ** 2 + (xx - 8) ** 2 <= 16
    volume += 2.0 * truth
    return volume, truth


# Every slice processed (random models lose the structure at once otherwise), so the tests
# see corrections and updates on the whole volume.
WHOLE_VOLUME = replace(PRESETS["default"], auto_extent=False)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models, preset=WHOLE_VOLUME, device="cpu")


def _count_encodings(engine, monkeypatch):
    counts = {"dinov2": 0, "sam": 0}
    encode, embed = engine.encode, engine.sam_embedding

    def counting_encode(images):
        counts["dinov2"] += images.shape[0]
        return encode(images)

    def counting_embed(image):
        counts["sam"] += 1
        return embed(image)

    monkeypatch.setattr(engine, "encode", counting_encode)
    monkeypatch.setattr(engine, "sam_embedding", counting_embed)
    return counts


def _painted(truth, slices):
    painted = np.zeros_like(truth)
    for k in slices:
        painted[k] = truth[k]
    return painted


def test_start_gives_segment_volume_masks(engine):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    masks = session.start({"organ": truth}, support_slices={"organ": [5]})
    fresh = segment_volume(engine, volume, None, {"organ": truth}, support_slices={"organ": [5]}, modality="none")
    np.testing.assert_array_equal(masks["organ"], fresh.masks["organ"])
    assert session.fixed_slices("organ") == [5]


def test_a_click_changes_only_its_slice_until_update(engine, monkeypatch):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    before = session.start({"organ": truth}, support_slices={"organ": [5]})["organ"].copy()
    counts = _count_encodings(engine, monkeypatch)
    # A positive click far from every coarse box: a prompt set of its own.
    changed = session.correct("organ", 2, [[40, 40]], [1])
    after = session.mask("organ")
    assert counts == {"dinov2": 0, "sam": 0}, "the slice's SAM embedding was cached by the run"
    np.testing.assert_array_equal(after[2], changed)
    assert not np.array_equal(changed, before[2]), "the click must change its slice"
    others = [k for k in range(SLICES) if k != 2]
    np.testing.assert_array_equal(after[others], before[others])
    assert session.clicks("organ", 2) == [(40.0, 40.0, 1)]
    assert session.fixed_slices("organ") == [2, 5]


def test_undo_and_clear_give_back_the_slice(engine):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    before = session.start({"organ": truth}, support_slices={"organ": [5]})["organ"].copy()
    first = session.correct("organ", 3, [[40, 40]], [1])
    session.correct("organ", 3, [[26, 22]], [0])
    np.testing.assert_array_equal(session.undo_click("organ", 3), first)
    assert session.clicks("organ", 3) == [(40.0, 40.0, 1)]
    np.testing.assert_array_equal(session.undo_click("organ", 3), before[3])
    assert session.fixed_slices("organ") == [5]
    session.correct("organ", 3, [[40, 40], [10, 10]], [1, 1])
    np.testing.assert_array_equal(session.clear_clicks("organ", 3), before[3])
    np.testing.assert_array_equal(session.mask("organ"), before)
    with pytest.raises(InputError, match="no click to undo"):
        session.undo_click("organ", 3)


@pytest.mark.parametrize("mode", ["nearest", "all"])
def test_update_after_adding_a_support_encodes_nothing_and_equals_a_fresh_run(engine, monkeypatch, mode):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none", support_mode=mode)
    session.start({"organ": truth}, support_slices={"organ": [5]})
    counts = _count_encodings(engine, monkeypatch)
    session.add_support("organ", 2, truth[2])
    updated = session.update("organ")
    assert counts == {"dinov2": 0, "sam": 0}, "every slice was encoded by the first run"
    fresh = segment_volume(
        engine, volume, None, {"organ": _painted(truth, [2, 5])}, support_slices={"organ": [2, 5]},
        support_mode=mode, modality="none",
    )
    np.testing.assert_array_equal(updated, fresh.masks["organ"])
    np.testing.assert_array_equal(updated[2], truth[2])


def test_eviction_under_a_small_budget_gives_the_same_masks(engine, monkeypatch):
    volume, truth = _volume()
    # "all": the added support changes every slice's prototypes, so every slice runs again.
    roomy = Session(engine, volume, modality="none", support_mode="all")
    roomy.start({"organ": truth}, support_slices={"organ": [5]})
    slice_bytes = roomy.cache.nbytes // SLICES
    small = Session(engine, volume, modality="none", cache_bytes=3 * slice_bytes, support_mode="all")
    small.start({"organ": truth}, support_slices={"organ": [5]})
    assert small.cache.nbytes <= 3 * slice_bytes
    for session in (roomy, small):
        session.add_support("organ", 8, truth[8])
    counts = _count_encodings(engine, monkeypatch)
    np.testing.assert_array_equal(small.update("organ"), roomy.update("organ"))
    assert counts["dinov2"] >= SLICES - 3, "the small session had to encode evicted slices again"


def _count_refined_slices(engine, monkeypatch):
    refined = []
    refine = engine.refine

    def counting_refine(*args, **kwargs):
        refined.append(1)
        return refine(*args, **kwargs)

    monkeypatch.setattr(engine, "refine", counting_refine)
    return refined


def test_update_runs_again_only_the_slices_whose_support_changed(engine, monkeypatch):
    """Nearest support: after adding slice 2 to support 5, only slices 0, 1 and 3 (nearer to 2)
    change prototypes; the others keep their outcome (same inputs, same bits) without being
    matched or decoded again, and the result still equals a fresh run's."""
    volume, truth = _volume(two_parts=True)
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [5]})
    prompts_before = {k: session.structures["organ"].prompts[k] for k in (4, 6, 9)}
    refined = _count_refined_slices(engine, monkeypatch)
    session.add_support("organ", 2, truth[2])
    updated = session.update("organ")
    assert len(refined) == 3, "slices 0, 1 and 3 only"
    fresh = segment_volume(engine, volume, None, {"organ": _painted(truth, [2, 5])},
                           support_slices={"organ": [2, 5]}, modality="none")
    np.testing.assert_array_equal(updated, fresh.masks["organ"])
    for k, prompts in prompts_before.items():
        assert session.structures["organ"].prompts[k] is prompts
    # Negatives on slice 8 only: that slice alone runs again; dropping them restores it.
    negatives = np.zeros(volume.shape, bool)
    negatives[8, 15:30, 20:35] = True
    session.set_negatives("organ", negatives)
    refined.clear()
    with_negatives = session.update("organ")
    assert len(refined) == 1
    assert not with_negatives[8][negatives[8]].any()
    session.set_negatives("organ", None)
    refined.clear()
    np.testing.assert_array_equal(session.update("organ"), updated)
    assert len(refined) == 1, "slice 8 again, with its earlier inputs"


def test_hand_corrected_slices_survive_update(engine):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [5]})
    clicked = session.correct("organ", 7, [[40, 40]], [1])
    painted = np.zeros((SIZE, SIZE), np.uint8)
    painted[10:20, 10:20] = 1
    session.add_support("organ", 1, painted)
    updated = session.update("organ")
    np.testing.assert_array_equal(updated[7], clicked)
    np.testing.assert_array_equal(updated[1], painted)
    np.testing.assert_array_equal(updated[5], truth[5])
    # A second update (now from the cache only) keeps them too.
    np.testing.assert_array_equal(session.update("organ"), updated)


def test_a_fixed_slice_that_cannot_teach_is_kept_but_not_used_as_an_example(engine):
    """A slice fixed with a mask that covers the whole slice (no background to learn from) or
    is empty stays exactly as fixed; the update runs from the other supports instead of failing."""
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [5]})
    everything = np.ones((SIZE, SIZE), np.uint8)
    session.add_support("organ", 7, everything)
    session.add_support("organ", 2, np.zeros((SIZE, SIZE), np.uint8))
    updated = session.update("organ")
    np.testing.assert_array_equal(updated[7], everything)
    np.testing.assert_array_equal(updated[2], 0)
    np.testing.assert_array_equal(updated[5], truth[5])
    # Only slice 5 taught: the rest equals a run from slice 5 alone, with 2 and 7 as fixed.
    fresh = segment_volume(engine, volume, None, {"organ": truth}, support_slices={"organ": [5]}, modality="none")
    others = [k for k in range(SLICES) if k not in (2, 5, 7)]
    np.testing.assert_array_equal(updated[others], fresh.masks["organ"][others])
    # With no usable example left, the message says why.
    lonely = Session(engine, volume, modality="none")
    lonely.start({"organ": truth}, support_slices={"organ": [5]})
    lonely.add_support("organ", 5, everything)
    with pytest.raises(InputError, match="slice 5: The support mask covers the whole slice"):
        lonely.update("organ")


def test_support_from_another_volume_plus_corrections(engine, monkeypatch):
    volume, truth = _volume()
    other, other_truth = _volume(seed=1)
    session = Session(engine, volume, modality="none")
    first = session.start({"organ": other_truth}, support_volume=other, support_slices={"organ": [5]})["organ"]
    fresh = segment_volume(engine, volume, other, {"organ": other_truth}, support_slices={"organ": [5]}, modality="none")
    np.testing.assert_array_equal(first, fresh.masks["organ"])
    assert session.fixed_slices("organ") == []
    session.add_support("organ", 3, truth[3])
    counts = _count_encodings(engine, monkeypatch)
    updated = session.update("organ")
    # The other volume's support slice is encoded again (only the query's encodings are kept).
    assert counts == {"dinov2": 1, "sam": 0}
    np.testing.assert_array_equal(updated[3], truth[3])


def test_caches_are_dropped_when_volume_models_or_preset_change(engine, tiny_models):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [5]})
    assert len(session.cache) > 0
    same_models = Engine(tiny_models, preset=WHOLE_VOLUME, device="cpu")
    assert session.rebind(engine=same_models) is False and len(session.cache) > 0
    assert session.rebind(volume=volume.copy()) is False and len(session.cache) > 0
    other_preset = Engine(tiny_models, preset=replace(WHOLE_VOLUME, name="other", pick_best_score=False), device="cpu")
    assert session.rebind(engine=other_preset) is True and len(session.cache) == 0

    session.start({"organ": truth}, support_slices={"organ": [5]})
    bigger_input = Engine(replace(tiny_models, input_size=140), preset=replace(WHOLE_VOLUME, name="other", pick_best_score=False), device="cpu")
    assert session.rebind(engine=bigger_input) is True and len(session.cache) == 0

    session.start({"organ": truth}, support_slices={"organ": [5]})
    assert session.rebind(volume=volume + 1.0) is True and len(session.cache) == 0
    with pytest.raises(InputError, match="propagate it first"):
        session.update("organ")


def test_click_frame_and_bad_clicks(engine):
    # Pixel centres line up: the first and last voxel centres map to SAM's first and last pixels.
    assert _to_sam_frame(0, 0, (4, 8)) == (1024 / 16 - 0.5, 1024 / 8 - 0.5)
    assert _to_sam_frame(7, 3, (4, 8)) == (1024 - 1024 / 16 - 0.5, 1024 - 1024 / 8 - 0.5)
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [5]})
    with pytest.raises(InputError, match="outside slice"):
        session.correct("organ", 2, [[SIZE, 3]], [1])
    with pytest.raises(InputError, match="outside the volume"):
        session.correct("organ", SLICES, [[3, 3]], [1])
    with pytest.raises(InputError, match="one label"):
        session.correct("organ", 2, [[3, 3], [4, 4]], [1])
    with pytest.raises(InputError, match="Unknown support mode"):
        Session(engine, volume, support_mode="closest")


def test_medsam_refuses_clicks_with_a_clear_message(engine, monkeypatch):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [5]})
    monkeypatch.setattr(engine.refiner, "medsam", True)
    with pytest.raises(InputError, match="MedSAM takes boxes only"):
        session.correct("organ", 2, [[3, 3]], [1])
    session.add_support("organ", 2, truth[2])  # painting still works


def test_adopted_result_clicks_redecode_only_the_clicked_component(engine, monkeypatch):
    """A result propagated elsewhere (the Slicer worker) is adopted: a click joins the box of
    the mask component under it; the other component keeps its pixels; the painted slice is
    fixed; the slice's embedding is encoded on demand (one SAM encoding, no DINOv2)."""
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    adopted = np.zeros_like(truth)
    adopted[4, 5:12, 5:12] = 1  # component A
    adopted[4, 30:40, 30:40] = 1  # component B
    adopted[5] = truth[5]
    session.adopt("organ", adopted, fixed_slices=[5])
    counts = _count_encodings(engine, monkeypatch)
    changed = session.correct("organ", 4, [[35, 35]], [0])  # negative click inside B's box
    assert counts == {"dinov2": 0, "sam": 1}
    np.testing.assert_array_equal(changed[5:12, 5:12], 1)  # A untouched
    np.testing.assert_array_equal(session.mask("organ")[[k for k in range(SLICES) if k != 4]],
                                  adopted[[k for k in range(SLICES) if k != 4]])
    assert session.fixed_slices("organ") == [4, 5]
    np.testing.assert_array_equal(session.clear_clicks("organ", 4), adopted[4])
    counts["sam"] = 0
    session.correct("organ", 4, [[35, 35]], [0])
    assert counts == {"dinov2": 0, "sam": 0}, "the embedding encoded on demand is cached"


def _decode_all_sets(engine, session, index, prompts):
    """The slice's mask when every prompt set is decoded (one call per set, as propagation
    does on a CPU) and their union is resized: what a click gave before sets were kept."""
    import torch
    import torch.nn.functional as F

    embedding = session.store.sam_embedding(index)
    with torch.inference_mode():
        union, _ = engine.refiner.decode(embedding, prompts, multimask_output=engine.preset.effective_multimask,
                                         pick_best_score=engine.preset.pick_best_score, batch_prompts=False)
        size = (engine.input_size, engine.input_size)
        at_input = F.interpolate(union[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    return engine.to_slice_size(at_input, volume_hw(session))


def volume_hw(session):
    return session.volume.shape[1:]


def _count_decodes(engine, monkeypatch):
    calls = []
    decode = engine.refiner.decode

    def counting_decode(embedding, prompts, **kwargs):
        calls.append(len(prompts))
        return decode(embedding, prompts, **kwargs)

    monkeypatch.setattr(engine.refiner, "decode", counting_decode)
    return calls


def _slice_with_sets(session, minimum=2):
    prompts = session.structures["organ"].prompts
    return next(k for k in sorted(prompts) if len(prompts[k]) >= minimum and all(p.box is not None for p in prompts[k]))


def _click_inside(prompt, hw):
    """A voxel (x, y) of the slice whose SAM-frame position lies inside the set's box."""
    height, width = hw
    for y in range(height):
        for x in range(width):
            sx, sy = _to_sam_frame(x, y, hw)
            if prompt.box[0] <= sx <= prompt.box[2] and prompt.box[1] <= sy <= prompt.box[3]:
                return x, y
    raise AssertionError("no voxel centre inside the box")


def test_a_click_decodes_only_the_prompt_set_it_joins(engine, monkeypatch):
    """SAM decodes only the set the click joined; the other sets keep the masks the run gave
    them. The slice equals decoding every set and resizing the union (exact: the same per-set
    decoder calls, and nearest resizing commutes with the union)."""
    from protosam.session import _Click, _with_clicks

    volume, truth = _volume(two_parts=True)
    session = Session(engine, volume, modality="none")
    before = session.start({"organ": truth}, support_slices={"organ": [5]})["organ"].copy()
    index = _slice_with_sets(session)
    hw = volume_hw(session)
    base = list(session.structures["organ"].prompts[index])
    x, y = _click_inside(base[-1], hw)
    calls = _count_decodes(engine, monkeypatch)
    changed = session.correct("organ", index, [[x, y]], [0])
    assert calls == [1], f"one set decoded once, not {calls} (the slice has {len(base)} sets)"
    expected = _decode_all_sets(engine, session, index, _with_clicks(base, [_Click(x, y, False)], hw))
    np.testing.assert_array_equal(changed, expected)
    calls.clear()
    session.correct("organ", index, [[x, y]], [0])  # a second click joins the same set
    assert calls == [1]
    calls.clear()
    np.testing.assert_array_equal(session.undo_click("organ", index), expected)
    assert calls == [], "the set with the first click alone was decoded before: undo decodes nothing"
    np.testing.assert_array_equal(session.undo_click("organ", index), before[index])


def test_clicks_after_an_update_join_the_same_prompt_sets(engine):
    """A clicked slice is fixed, so an update does not re-propagate it; a later click on it
    must still join the sets the first clicks joined (not the boxes of the mask's components)."""
    from protosam.session import _Click, _with_clicks

    volume, truth = _volume(two_parts=True)
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [5]})
    index = _slice_with_sets(session)
    hw = volume_hw(session)
    base = list(session.structures["organ"].prompts[index])
    x0, y0 = _click_inside(base[0], hw)
    session.correct("organ", index, [[x0, y0]], [1])
    other = 7 if index != 7 else 3
    session.add_support("organ", other, truth[other])
    session.update("organ")
    x1, y1 = _click_inside(base[-1], hw)
    changed = session.correct("organ", index, [[x1, y1]], [0])
    clicks = [_Click(x0, y0, True), _Click(x1, y1, False)]
    np.testing.assert_array_equal(changed, _decode_all_sets(engine, session, index, _with_clicks(base, clicks, hw)))


def test_adopted_result_keeps_its_support_from_another_volume(engine):
    """A result propagated elsewhere from another volume's support (the Slicer module's
    cross-patient run) is adopted with that support: an update after a repainted slice gives
    exactly what a session started with the same supports gives; without it, something else."""
    volume, truth = _volume()
    other, other_truth = _volume(seed=1)
    started = Session(engine, volume, modality="none")
    first = started.start({"organ": other_truth}, support_volume=other, support_slices={"organ": [5]})["organ"]
    started.add_support("organ", 2, truth[2])
    expected = started.update("organ")

    adopted = Session(engine, volume, modality="none")
    adopted.adopt("organ", first, [], support_volume=other, support_mask=other_truth, support_slices=[5])
    adopted.add_support("organ", 2, truth[2])
    np.testing.assert_array_equal(adopted.update("organ"), expected)

    forgetful = Session(engine, volume, modality="none")  # what adopt did before: no external support
    forgetful.adopt("organ", first, [])
    forgetful.add_support("organ", 2, truth[2])
    assert not np.array_equal(forgetful.update("organ"), expected)
    # The support volume equal to this one is not "another volume": its slices are fixed ones.
    same = Session(engine, volume, modality="none")
    same.adopt("organ", first, [5], support_volume=volume, support_mask=truth, support_slices=[5])
    assert same.structures["organ"].external is None
    with pytest.raises(InputError, match="outside the support volume or empty"):
        same.adopt("organ", first, [], support_volume=other, support_mask=other_truth, support_slices=[0])


def test_has_sam_embedding_tells_which_clicks_need_an_encoding(engine):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.adopt("organ", truth, fixed_slices=[5])
    assert not session.has_sam_embedding(4)
    session.correct("organ", 4, [[26, 22]], [1])
    assert session.has_sam_embedding(4) and not session.has_sam_embedding(3)
    session.cache.clear()  # evicted
    assert not session.has_sam_embedding(4)


def test_counting_a_sessions_bytes_never_waits_for_an_operation_in_progress(engine):
    """The server counts ``Session.array_bytes`` under its scheduler lock; an update holds the
    session's lock for its whole run. Counting must not wait for it (it would stall every user's
    requests for that long)."""
    import threading

    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [5]})
    idle = session.array_bytes()
    assert idle > volume.nbytes + truth.nbytes  # the volume, the output and the rest of the state
    holding, release = threading.Event(), threading.Event()

    def an_update_in_progress():
        with session.exclusive():
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=an_update_in_progress)
    holder.start()
    holding.wait(10)
    counted = []
    counter = threading.Thread(target=lambda: counted.append(session.array_bytes()))
    counter.start()
    counter.join(10)
    waited = counter.is_alive()
    release.set()
    holder.join(10)
    counter.join(10)
    assert not waited and counted == [idle]
