"""Engine behaviour under awkward inputs and faults: a correct result or a clear error."""
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_helpers import blob_slice
from protosam import PRESETS, Engine, InputError, ProtoSAMError, segment_volume
from protosam.io import read_volume
from protosam.preprocessing import normalize_volume
from protosam.validation import as_float_slices


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models, preset="default", device="cpu")


def test_out_of_memory_halves_the_batch_and_keeps_the_result(tiny_models, monkeypatch):
    engine = Engine(tiny_models, preset="default", device="cpu", batch_size=4)
    images = engine.to_model_input(np.stack([blob_slice(64, seed=s)[0] for s in range(4)]))
    expected = engine.encode(images)
    real = engine._encode_batch
    calls = []

    def flaky(batch):
        calls.append(batch.shape[0])
        if batch.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch)

    monkeypatch.setattr(engine, "_encode_batch", flaky)
    torch.testing.assert_close(engine.encode(images), expected)
    assert engine.batch_size == 1 and calls[:2] == [4, 2] and calls[2:] == [1, 1, 1, 1]


def test_out_of_memory_in_segment_slices_still_fills_every_slice(tiny_models, monkeypatch):
    """Batch 4, out of memory for any batch > 1, 8 queries: every slice gets its result
    (the window after the retry starts right after the last one) and progress reaches 8/8."""
    support, mask = blob_slice(64, seed=0)
    queries = np.stack([blob_slice(64, center=(30 + s, 34 - s), radius=9 + s % 3, seed=s + 1)[0] for s in range(8)])
    one_at_a_time = Engine(tiny_models, preset="default", device="cpu", batch_size=1)
    expected = one_at_a_time.segment_slices(support, mask, queries)

    engine = Engine(tiny_models, preset="default", device="cpu", batch_size=4)
    real = engine._encode_batch

    def flaky(batch):
        if batch.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch)

    monkeypatch.setattr(engine, "_encode_batch", flaky)
    seen = []
    result = engine.segment_slices(support, mask, queries, progress=lambda done, total: seen.append((done, total)))
    assert engine.batch_size == 1
    assert seen == [(k, 8) for k in range(1, 9)]
    assert all(result.coarse_prob[k].max() > 0 for k in range(8)), "a slice was left without a result"
    # Every encoding ran one slice at a time in both runs (same bits); only ALPNet scored a
    # stack of 4 feature maps at once for the first window, where per-sample float sums may
    # be ordered differently: 1e-5 is far above float32 rounding of a softmax output.
    np.testing.assert_allclose(result.coarse_prob, expected.coarse_prob, rtol=0, atol=1e-5)
    undecided = np.abs(expected.coarse_prob - 0.5) < 1e-5
    np.testing.assert_array_equal(result.coarse_mask[~undecided], expected.coarse_mask[~undecided])
    assert expected.mask.any()
    # SAM's mask can only change where a rounding difference moved a prompt: here none did.
    assert [[p.box.tolist() for p in ps] for ps in result.prompts] == [[p.box.tolist() for p in ps] for ps in expected.prompts]
    np.testing.assert_array_equal(result.mask, expected.mask)


class OnSimulatedGpu(torch.Tensor):
    """A CPU tensor that behaves, for the calls ``Engine.encode`` makes, like one on a CUDA
    device: ``.to("cuda")`` keeps it there, ``.to("cpu")`` gives a plain CPU tensor, and
    ``torch.cat`` of it with CPU tensors fails as it does across real devices."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat and len({isinstance(t, cls) for t in args[0]}) > 1:
            raise RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu (simulated)")
        if func is torch.Tensor.to:
            target = args[1] if len(args) > 1 else kwargs.get("device")
            if isinstance(target, (str, torch.device)):
                with torch._C.DisableTorchFunctionSubclass():
                    plain = args[0].clone()
                return plain.as_subclass(cls) if torch.device(target).type == "cuda" else plain
        return super().__torch_function__(func, types, args, kwargs)


def test_cuda_out_of_memory_fallback_to_the_cpu_inside_one_encode_call(tiny_models, monkeypatch):
    """Batch 2 on a (simulated) GPU: the first batch succeeds there, then out of memory at 2
    and at 1 slice: the engine moves to the CPU and returns all 4 slices' features on it."""
    # fp32: the "GPU" batch must not ask for CUDA autocast (bf16), which needs a real GPU.
    engine = Engine(tiny_models, preset=replace(PRESETS["default"], precision="fp32"), device="cpu", batch_size=2)
    plain_images = engine.to_model_input(np.stack([blob_slice(64, seed=s)[0] for s in range(4)]))
    real = engine._encode_batch
    # The same encoder calls as the run below makes: [0, 1] together, then 2 and 3 alone.
    expected = torch.cat([real(plain_images[0:2]), real(plain_images[2:3]), real(plain_images[3:4])])

    calls = []

    def gpu_then_out_of_memory(batch):
        on_gpu = isinstance(batch, OnSimulatedGpu)
        calls.append((batch.shape[0], on_gpu))
        if not on_gpu:
            return real(batch)
        if len(calls) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch.to("cpu")).as_subclass(OnSimulatedGpu)

    monkeypatch.setattr(engine, "_encode_batch", gpu_then_out_of_memory)
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    features = engine.encode(plain_images.as_subclass(OnSimulatedGpu))
    assert calls == [(2, True), (2, True), (1, True), (1, False), (1, False)]
    assert engine.device == torch.device("cpu") and engine.batch_size == 1
    assert type(features) is torch.Tensor  # every output on the CPU, none left on the "GPU"
    assert torch.equal(features, expected)


def test_out_of_memory_at_one_slice_on_the_cpu_is_a_clear_error(engine, monkeypatch):
    def always(batch):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(engine, "_encode_batch", always)
    with pytest.raises(ProtoSAMError, match="Out of memory.*smaller models"):
        engine.encode(engine.to_model_input(blob_slice(64)[0][None]))


def _slice_level_masks(engine, query, support, support_mask, support_slice, indices, modality):
    """What segment_volume must give on ``indices``: the slice-level engine on the same
    preprocessed slices with the one support slice (same steps, one slice per call: the
    same bits by construction)."""
    query = normalize_volume(as_float_slices(query, "query", 3), modality)
    support = normalize_volume(as_float_slices(support, "support", 3), modality)
    return {
        k: engine.segment_slices(support[support_slice], support_mask[support_slice], query[k:k + 1]).mask[0]
        for k in indices
    }


def _assert_is_slice_level_result(engine, result, query, support, support_mask, support_slice, modality, painted=()):
    mask = result.masks["d"]
    processed = result.processed_slices["d"]
    assert processed, "nothing was processed"
    expected = _slice_level_masks(engine, query, support, support_mask, support_slice, processed, modality)
    for k in range(mask.shape[0]):
        if k in painted:
            np.testing.assert_array_equal(mask[k], support_mask[k])
        elif k in expected:
            np.testing.assert_array_equal(mask[k], expected[k], err_msg=f"slice {k}")
        else:
            assert not mask[k].any(), f"slice {k} was not processed but is not empty"


def test_single_slice_volumes(engine):
    image, mask = blob_slice(64)
    same = segment_volume(engine, image[None], None, {"d": mask[None]}, modality="mri")
    np.testing.assert_array_equal(same.masks["d"][0], mask)
    assert same.processed_slices["d"] == []
    other = segment_volume(engine, image[None] + 0.1, image[None], {"d": mask[None]}, modality="mri")
    assert other.processed_slices["d"] == [0] and other.masks["d"].shape == (1, 64, 64)
    _assert_is_slice_level_result(engine, other, image[None] + 0.1, image[None], mask[None], 0, "mri")


def test_support_and_target_of_different_sizes(engine):
    support, mask = blob_slice(64)
    target = np.stack([blob_slice(90, center=(40, 50), radius=14, seed=s)[0] for s in range(3)])
    support_volume, support_masks = np.stack([support] * 3), np.stack([mask] * 3)
    result = segment_volume(engine, target, support_volume, {"d": support_masks}, support_slices={"d": 1}, modality="mri")
    assert result.masks["d"].shape == target.shape
    _assert_is_slice_level_result(engine, result, target, support_volume, support_masks, 1, "mri")


def test_integer_and_extreme_intensity_volumes(engine):
    image, mask = blob_slice(64)
    ct = (np.stack([image] * 4) * 400 - 1000).astype(np.int16)  # HU-like integers
    masks = np.stack([mask] * 4)
    result = segment_volume(engine, ct, None, {"d": masks}, modality="auto", support_slices={"d": 2})
    assert result.masks["d"].dtype == np.uint8
    # Integers are read as the same values in float32 (exact below 2**24): the same result.
    as_float = segment_volume(engine, ct.astype(np.float32), None, {"d": masks}, modality="auto", support_slices={"d": 2})
    np.testing.assert_array_equal(result.masks["d"], as_float.masks["d"])
    assert result.processed_slices == as_float.processed_slices
    # "auto" took these for CT (integers below -500 HU): clipped to [-125, 275], z-scored.
    _assert_is_slice_level_result(engine, result, ct, ct, masks, 2, "ct", painted=(2,))
    huge = np.stack([image] * 2).astype(np.float64) * 1e30
    normalized = normalize_volume(as_float_slices(huge, "v", 3), "mri")
    assert np.isfinite(normalized).all() and abs(float(normalized.mean())) < 1e-3
    with pytest.raises(InputError, match="float32 range"):
        as_float_slices(np.full((2, 4, 4), 1e300), "volume", 3)
    with pytest.raises(InputError, match="same intensity everywhere"):
        normalize_volume(np.zeros((2, 4, 4), np.float32), "mri")


def test_constant_support_slice_gives_the_slice_level_result(engine):
    """A support slice of one intensity (all-zero features contrast): prototypes still form
    (no NaN) and every processed slice gets the slice-level engine's mask."""
    image, mask = blob_slice(64)
    volume = np.stack([image, np.zeros_like(image), image])
    masks = np.stack([mask] * 3)
    result = segment_volume(engine, volume, None, {"d": masks}, support_slices={"d": 1}, modality="none")
    assert result.masks["d"].shape == volume.shape
    _assert_is_slice_level_result(engine, result, volume, volume, masks, 1, "none", painted=(1,))


def test_rgb_volumes_are_refused_with_advice(tmp_path):
    rgb = sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="RGB or vector"):
        read_volume(tmp_path / "rgb.nrrd")


@pytest.mark.parametrize("modality", ["ct", "mri", "none", "auto"])
def test_normalisation_keeps_float32_and_never_modifies_the_input(modality):
    volume = (np.random.default_rng(0).normal(0, 300, (3, 8, 8)) - 500).astype(np.float32)
    before = volume.copy()
    out = normalize_volume(volume, modality)
    assert out.dtype == np.float32 and out.shape == volume.shape
    np.testing.assert_array_equal(volume, before)
    if modality != "none":
        assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-3
