"""Whole-volume propagation: scheduling, auto extent, axes, sharing, cache, cancel, errors.

Most tests swap the two neural encoders for transparent stand-ins (features = local intensity;
SAM returns the coarse components it is prompted with) so that the expected masks are known;
ALPNet, prompts and the propagation logic under test are the real ones. The last test runs
the real tiny models end to end.
"""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protosam import CancelledError, Engine, InputError, segment_volume

SLICES, SIZE = 30, 64
PRESENT = range(8, 21)  # slices that contain the structure


def _volume(seed=0, present=PRESENT, shift=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(0, 0.05, (SLICES, SIZE, SIZE)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    for k in present:
        radius = 12 - abs(k - 14) * 0.6
        truth[k] = (yy - 30 - shift) ** 2 + (xx - 34) ** 2 <= radius**2
    volume += 2.0 * truth
    return volume, truth


class Spy:
    def __init__(self):
        self.encoded = 0
        self.sam_embeddings = 0


@pytest.fixture
def transparent_engine(tiny_models):
    """A real Engine whose encoders are replaced by intensity features and an identity SAM."""
    engine = Engine(tiny_models, preset="default", device="cpu")
    spy = Spy()

    def encode(images):
        spy.encoded += images.shape[0]
        intensity = F.adaptive_avg_pool2d(images[:, :1].float(), 32)
        return torch.cat([intensity, torch.ones_like(intensity)], dim=1)

    def embed(images, **_):
        spy.sam_embeddings += images.shape[0]
        return torch.zeros(images.shape[0], 1, 64, 64)

    def decode(embedding, prompts, **_):
        union = torch.from_numpy(np.any([p.full_mask((1024, 1024)) for p in prompts], axis=0))
        return union, [1.0] * len(prompts)

    engine.encode = encode
    engine.refiner.embed = embed
    engine.refiner.decode = decode
    engine.spy = spy
    return engine


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_auto_extent_follows_the_structure_and_stops_after_three_empty_slices(transparent_engine):
    volume, truth = _volume()
    result = segment_volume(transparent_engine, volume, None, {"disc": truth}, support_slices={"disc": 14}, modality="none")
    mask = result.masks["disc"]
    assert result.support_slices == {"disc": [14]}
    np.testing.assert_array_equal(mask[14], truth[14])  # the painted slice is kept as painted
    assert result.processed_slices["disc"] == list(range(5, 14)) + list(range(15, 24))
    assert mask[:5].sum() == 0 and mask[24:].sum() == 0
    for k in PRESENT:
        assert _dice(mask[k], truth[k]) > 0.8, k
    # SAM only ran on slices whose coarse mask was not empty.
    assert transparent_engine.spy.sam_embeddings == len(PRESENT) - 1


def test_without_auto_extent_every_slice_is_processed(transparent_engine):
    volume, truth = _volume()
    result = segment_volume(transparent_engine, volume, None, {"disc": truth}, support_slices={"disc": 14}, modality="none", auto_extent=False)
    assert result.processed_slices["disc"] == [k for k in range(SLICES) if k != 14]
    mask = result.masks["disc"]
    absent = [k for k in range(SLICES) if k not in PRESENT]
    assert mask[absent].sum() == 0
    for k in PRESENT:
        assert _dice(mask[k], truth[k]) > 0.8, k


def test_a_run_keeps_its_prompt_sets_without_their_component_pixels(transparent_engine, monkeypatch):
    # Click corrections need each kept set's box and points only; its component pixels (up to
    # 1 MiB per set in SAM's frame, thousands of sets per volume) are not held to the end.
    from protosam import propagation

    given, kept = [], {}
    decode = transparent_engine.refiner.decode

    def recording_decode(embedding, prompts, **options):
        given.extend(prompts)
        return decode(embedding, prompts, **options)

    def recording_propagate(engine, store, structures, *args, **kwargs):
        propagate(engine, store, structures, *args, **kwargs)
        kept.update((index, prompt) for s in structures for index, prompt in s.prompts.items())

    propagate = propagation._propagate
    monkeypatch.setattr(propagation, "_propagate", recording_propagate)
    transparent_engine.refiner.decode = recording_decode
    volume, truth = _volume()
    result = segment_volume(transparent_engine, volume, None, {"disc": truth}, support_slices={"disc": 14}, modality="none")
    flat = [prompt for index in sorted(kept) for prompt in kept[index]]
    assert len(flat) == len(given) > 0 and all(p.local_mask is not None for p in given)
    assert all(p.local_mask is None and p.window is None for p in flat)
    def described(prompts):  # slices run in walking order, kept by slice: compare as multisets
        return sorted((p.box.tobytes(), p.points.tobytes(), p.point_labels.tobytes()) for p in prompts)

    assert described(flat) == described(given)
    assert _dice(result.masks["disc"][PRESENT[1]], truth[PRESENT[1]]) > 0.8


def test_slice_range_limits_the_work(transparent_engine):
    volume, truth = _volume()
    result = segment_volume(transparent_engine, volume, None, {"disc": truth}, support_slices={"disc": 14}, slice_range=(12, 17), modality="none")
    assert result.processed_slices["disc"] == [12, 13, 15, 16, 17]
    assert result.masks["disc"][:12].sum() == 0 and result.masks["disc"][18:].sum() == 0
    for k in (12, 13, 15, 16, 17):
        assert _dice(result.masks["disc"][k], truth[k]) > 0.8, k


@pytest.mark.parametrize("axis", [1, 2])
def test_any_slicing_axis_gives_the_same_result_as_axis_zero(transparent_engine, axis):
    volume, truth = _volume()
    reference = segment_volume(transparent_engine, volume, None, {"d": truth}, support_slices={"d": 14}, modality="none")
    moved_volume, moved_truth = np.moveaxis(volume, 0, axis), np.moveaxis(truth, 0, axis)
    result = segment_volume(transparent_engine, moved_volume, None, {"d": moved_truth}, axis=axis, support_slices={"d": 14}, modality="none")
    assert result.masks["d"].shape == moved_volume.shape
    np.testing.assert_array_equal(np.moveaxis(result.masks["d"], axis, 0), reference.masks["d"])


def test_structures_share_each_slice_encoding(transparent_engine):
    volume, truth = _volume()
    second = np.zeros_like(truth)
    second[10:19, 20:40, 20:44] = truth[10:19, 20:40, 20:44]
    result = segment_volume(transparent_engine, volume, None, {"a": truth, "b": second}, support_slices={"a": 14, "b": 14}, modality="none", auto_extent=False)
    distinct = set(result.processed_slices["a"]) | set(result.processed_slices["b"])
    # One DINOv2 pass per query slice plus one for the shared support slice.
    assert transparent_engine.spy.encoded == len(distinct) + 1
    # Sharing changes no value: each structure's mask is the one it gets when run alone.
    for key, mask in (("a", truth), ("b", second)):
        alone = segment_volume(transparent_engine, volume, None, {key: mask}, support_slices={key: 14}, modality="none", auto_extent=False)
        np.testing.assert_array_equal(result.masks[key], alone.masks[key])
    assert _dice(result.masks["b"][10:19], second[10:19]) > 0.8


def test_embedding_cache_makes_a_rerun_skip_the_encoders(transparent_engine):
    from protosam.cache import EmbeddingCache

    engine = transparent_engine
    engine.cache = EmbeddingCache(64 * 2**20)
    volume, truth = _volume()
    first = segment_volume(engine, volume, None, {"d": truth}, support_slices={"d": 14}, modality="none")
    encoded, embedded = engine.spy.encoded, engine.spy.sam_embeddings
    again = segment_volume(engine, volume, None, {"d": truth}, support_slices={"d": 14}, modality="none")
    assert (engine.spy.encoded, engine.spy.sam_embeddings) == (encoded, embedded)
    np.testing.assert_array_equal(first.masks["d"], again.masks["d"])
    # A corrected support (another slice) reuses every cached slice as well.
    segment_volume(engine, volume, None, {"d": truth}, support_slices={"d": 13}, modality="none")
    assert engine.spy.encoded == encoded and engine.spy.sam_embeddings <= embedded + 1
    assert engine.cache.hits > 0 and engine.cache.nbytes <= engine.cache.max_bytes


def test_progress_is_monotonic_and_complete_and_cancel_stops_the_run(transparent_engine):
    volume, truth = _volume()
    calls = []
    segment_volume(transparent_engine, volume, None, {"d": truth}, support_slices={"d": 14}, modality="none", progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1] and len({t for _, t in calls}) == 1

    cancel = threading.Event()

    def progress(done, total):
        if done >= 3:
            cancel.set()

    with pytest.raises(CancelledError):
        segment_volume(transparent_engine, volume, None, {"d": truth}, support_slices={"d": 14}, modality="none", progress=progress, cancel=cancel)


def test_another_volume_starts_at_the_same_relative_position(transparent_engine):
    support_volume, support_truth = _volume(seed=1)
    query_volume, query_truth = _volume(seed=2, shift=4)
    result = segment_volume(transparent_engine, query_volume, support_volume, {"d": support_truth}, support_slices={"d": 14}, modality="none")
    mask = result.masks["d"]
    assert 14 in result.processed_slices["d"]
    assert _dice(mask[8:21], query_truth[8:21]) > 0.8
    assert mask[:5].sum() == 0 and mask[24:].sum() == 0


def _with_far_distractor(volume, index=26):
    """A disc as bright as the structure, far from it: a walk that reaches it keeps it."""
    volume = volume.copy()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume[index] += 2.0 * ((yy - 20) ** 2 + (xx - 40) ** 2 <= 9**2)
    return volume


def test_auto_extent_stops_when_the_structure_ends_at_the_seed_across_volumes(transparent_engine):
    """Across volumes the seed slice is processed like any other: finding the structure there
    counts, so the upward walk stops 3 slices after the seed where the structure ends."""
    support_volume, support_truth = _volume(seed=1)
    query_volume, query_truth = _volume(seed=2, present=range(8, 15))  # ends at the seed, 14
    query_volume = _with_far_distractor(query_volume)
    result = segment_volume(transparent_engine, query_volume, support_volume, {"d": support_truth}, support_slices={"d": 14}, modality="none")
    mask = result.masks["d"]
    # Down: found on 13..8, absent on 7, 6, 5; up: absent on 15, 16, 17.
    assert result.processed_slices["d"] == list(range(5, 18))
    assert mask[26].sum() == 0 and mask[15:].sum() == 0 and mask[:8].sum() == 0
    for k in range(8, 15):
        assert _dice(mask[k], query_truth[k]) > 0.8, k


def test_auto_extent_knows_the_painted_slice_even_outside_the_slice_range(transparent_engine):
    """Painted on slice 20 where the structure ends, range 21..29: the structure is known to
    be present at the seed, so the walk stops after 3 empty slices (not at the distractor)."""
    volume, truth = _volume()
    volume = _with_far_distractor(volume)
    result = segment_volume(transparent_engine, volume, None, {"d": truth}, support_slices={"d": 20}, slice_range=(21, 29), modality="none")
    assert result.processed_slices["d"] == [21, 22, 23]
    assert result.masks["d"].sum() == 0
    # The same from below: painted on 8 where it starts, range 0..7.
    result = segment_volume(transparent_engine, volume, None, {"d": truth}, support_slices={"d": 8}, slice_range=(0, 7), modality="none")
    assert result.processed_slices["d"] == [5, 6, 7]
    assert result.masks["d"].sum() == 0


def test_several_support_slices_are_all_kept_and_bound_the_fixed_part(transparent_engine):
    volume, truth = _volume()
    result = segment_volume(transparent_engine, volume, None, {"d": truth}, support_slices={"d": [10, 18]}, modality="none")
    np.testing.assert_array_equal(result.masks["d"][10], truth[10])
    np.testing.assert_array_equal(result.masks["d"][18], truth[18])
    assert set(range(11, 18)) <= set(result.processed_slices["d"])
    for k in PRESENT:
        assert _dice(result.masks["d"][k], truth[k]) > 0.8, k
    assert result.masks["d"][:5].sum() == 0 and result.masks["d"][24:].sum() == 0


def test_default_support_slice_is_the_largest_area(transparent_engine):
    volume, truth = _volume()
    result = segment_volume(transparent_engine, volume, None, {"d": truth}, modality="none")
    assert result.support_slices["d"] == [14]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(masks={"d": np.zeros((SLICES, SIZE, SIZE), np.uint8)}), "empty"),
        (dict(masks={"d": np.ones((SLICES, SIZE, 10), np.uint8)}), "shape"),
        (dict(support_slices={"d": 40}), "outside the volume"),
        (dict(support_slices={"d": 2}), "empty on support slice 2"),
        (dict(slice_range=(20, 10)), "Slice range"),
        (dict(volume=np.zeros((SIZE, SIZE), np.float32)), "stack of 2-D slices"),
        (dict(volume=np.full((SLICES, SIZE, SIZE), np.inf, np.float32)), "NaN or infinite"),
        (dict(masks={}), "at least one"),
    ],
)
def test_bad_volume_inputs_raise_clear_errors(transparent_engine, kwargs, message):
    volume, truth = _volume()
    with pytest.raises(InputError, match=message):
        segment_volume(
            transparent_engine, kwargs.get("volume", volume), None, kwargs.get("masks", {"d": truth}),
            support_slices=kwargs.get("support_slices"), slice_range=kwargs.get("slice_range"), modality="none",
        )


def test_long_volumes_only_cost_the_structure_s_extent(transparent_engine):
    rng = np.random.default_rng(3)
    volume = rng.normal(0, 0.05, (1200, 48, 48)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    truth[600:610, 14:34, 14:34] = 1
    volume += 2.0 * truth
    result = segment_volume(transparent_engine, volume, None, {"d": truth}, support_slices={"d": 605}, modality="mri")
    assert result.processed_slices["d"] == list(range(597, 605)) + list(range(606, 613))
    assert transparent_engine.spy.encoded <= 16
    assert result.masks["d"][:590].sum() == 0 and result.masks["d"][620:].sum() == 0


def _count_encoded_slices(engine, volume):
    """Count, per slice of ``volume``, the images the real DINOv2 and SAM image encoders see."""
    from collections import Counter

    references = engine.to_model_input(volume)
    counts = {"dinov2": Counter(), "sam": Counter()}
    model_images = {"dinov2": 0, "sam": 0}

    def which(image):
        return int(torch.stack([(image - r).abs().max() for r in references]).argmin())

    encode, sam_embedding = engine.encode, engine.sam_embedding
    patch_features, sam_encoder = engine.encoder.patch_features, engine.refiner.sam.image_encoder.forward

    def counting_encode(images):
        counts["dinov2"].update(which(image) for image in images)
        return encode(images)

    def counting_sam_embedding(image):
        counts["sam"][which(image)] += 1
        return sam_embedding(image)

    def counting_patch_features(images):
        model_images["dinov2"] += images.shape[0]
        return patch_features(images)

    def counting_sam_encoder(images):
        model_images["sam"] += images.shape[0]
        return sam_encoder(images)

    engine.encode, engine.sam_embedding = counting_encode, counting_sam_embedding
    engine.encoder.patch_features = counting_patch_features
    engine.refiner.sam.image_encoder.forward = counting_sam_encoder
    return counts, model_images


def test_overlapping_walks_of_several_structures_encode_each_slice_once(tiny_models, monkeypatch):
    """3 structures painted on slices 1, 4, 7 of a 9-slice volume: the up walks of the lower
    ones and the down walks of the upper ones cross slices 2-6. Each slice still goes once
    through DINOv2 and at most once through SAM (real tiny encoders, counted); without room to
    keep them (bound 0) those slices are encoded again, with the same masks."""
    from dataclasses import replace

    from protosam import PRESETS
    from protosam import propagation

    volume, truth = _volume()
    volume, truth = volume[8:17], truth[8:17]  # the structure is on every slice
    seeds = {"a": 1, "b": 4, "c": 7}
    # Walks that do not stop, so the crossing is certain whatever the random models find.
    preset = replace(PRESETS["default"], stop_after_empty=len(volume))
    default_bound = propagation.KEEP_FOR_LATER_PHASES_BYTES
    runs = {}
    for bound in (default_bound, 0):
        monkeypatch.setattr(propagation, "KEEP_FOR_LATER_PHASES_BYTES", bound)
        engine = Engine(tiny_models, preset=preset, device="cpu")
        counts, model_images = _count_encoded_slices(engine, volume)
        result = segment_volume(engine, volume, None, {k: truth for k in seeds}, support_slices=seeds, modality="none")
        runs[bound] = result, counts, model_images
    result, counts, model_images = runs[default_bound]
    assert set(range(2, 7)) <= set(result.processed_slices["a"]) & set(result.processed_slices["c"])
    assert sorted(counts["dinov2"]) == list(range(9)) and set(counts["dinov2"].values()) == {1}
    assert counts["sam"] and set(counts["sam"].values()) == {1}
    assert model_images == {"dinov2": 9, "sam": sum(counts["sam"].values())}

    unbounded, counts_0, model_images_0 = runs[0]
    assert {k for k, n in counts_0["dinov2"].items() if n > 1} == set(range(2, 7))
    assert model_images_0["dinov2"] == 9 + 5
    # Every encoder call ran one slice in both runs (batch 1 on a CPU): the same bits.
    for key in seeds:
        np.testing.assert_array_equal(result.masks[key], unbounded.masks[key])


def test_real_tiny_models_end_to_end(tiny_models):
    """Real tiny encoders: every processed slice carries exactly the slice-level engine's mask
    for the same preprocessed slice and support (same steps, one slice per call on a CPU, so
    the same bits); slices not processed stay empty; the painted slice is kept."""
    from protosam.preprocessing import normalize_volume

    engine = Engine(tiny_models, preset="default", device="cpu")
    volume, truth = _volume()
    volume, truth = volume[6:16], truth[6:16]
    result = segment_volume(engine, volume, None, {"d": truth}, modality="mri")
    mask = result.masks["d"]
    assert mask.shape == (10, SIZE, SIZE) and mask.dtype == np.uint8
    assert result.support_slices["d"] == [8]
    np.testing.assert_array_equal(mask[8], truth[8])
    processed = result.processed_slices["d"]
    assert processed and 8 not in processed
    normalized = normalize_volume(volume, "mri")
    expected = engine.segment_slices(normalized[8], truth[8], normalized[processed])
    for position, k in enumerate(processed):
        np.testing.assert_array_equal(mask[k], expected.mask[position], err_msg=f"slice {k}")
    for k in set(range(10)) - set(processed) - {8}:
        assert not mask[k].any(), k
