"""The SAM 2 refiner against the official SAM2ImagePredictor, with the same random weights.

Weights are written in the official checkpoint format ({"model": state_dict}) by
protosam.testing and loaded both by our refiner and by the sam2 package's own
``build_sam2(config, ckpt_path)``: the reference is the package, end to end.
"""
import numpy as np
import pytest
import torch

from required_modules import require_module

SAM2_INSTALL = "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 (see .ci/run)"
require_module("sam2", SAM2_INSTALL)

from sam2.build_sam import build_sam2  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

from engine_helpers import benchmark_module  # noqa: E402
from protosam import catalogue  # noqa: E402
from protosam.errors import CheckpointError  # noqa: E402
from protosam.models.sam2_refiner import SAM2_ARCHITECTURES, Sam2Refiner, load_sam2  # noqa: E402
from protosam.prompts import ComponentPrompt  # noqa: E402
from protosam.testing import TINY_SAM2, save_random_sam2_checkpoint  # noqa: E402

# Batched decoding (several prompt sets per decoder call) differs from the predictor's one-set
# calls only in the order of float32 sums: far below the 1e-4 on logits of order 1-10.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's small kernels run faster on one thread (and suffer less from busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2") / "sam2_tiny.pt"
    save_random_sam2_checkpoint(TINY_SAM2, path, seed=5)
    return path


@pytest.fixture(scope="module")
def refiner(tiny_sam2):
    return Sam2Refiner(load_sam2(TINY_SAM2, tiny_sam2))


@pytest.fixture(scope="module")
def official(tiny_sam2):
    return _predictor(_official_model(tiny_sam2))


def _official_model(path, perturb=None):
    """The sam2 package's own model from the same file (optionally one decoder weight changed)."""
    architecture = SAM2_ARCHITECTURES[TINY_SAM2]
    model = build_sam2(architecture.config, str(path), device="cpu", hydra_overrides_extra=list(architecture.overrides))
    if perturb is not None:
        with torch.no_grad():
            model.state_dict()[perturb].view(-1)[0] += 1e-3
    return model


def _predictor(model):
    predictor = SAM2ImagePredictor(model)
    # The predictor's feature sizes are written for 1024 px; MedSAM2's repository derives them
    # from the model's image size (hires_size // 2**k), as our refiner does.
    size = model.image_size
    predictor._bb_feat_sizes = [(size // 4 // 2 ** k,) * 2 for k in range(3)]
    return predictor


def _image(seed=0):
    generator = torch.Generator().manual_seed(seed)
    gray = torch.randn(1, 1, 32, 32, generator=generator)
    gray = torch.nn.functional.interpolate(gray, size=(1024, 1024), mode="bilinear", align_corners=False)
    return gray.expand(1, 3, -1, -1).clone() * 3.0 + 1.0  # [1, 3, 1024, 1024], any range


def _prompt(box, points, labels=None):
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labels = np.ones(len(points), np.int64) if labels is None else np.asarray(labels, np.int64)
    box = None if box is None else np.asarray(box, np.float64)
    return ComponentPrompt(box, points, labels, (slice(0, 1), slice(0, 1)), np.ones((1, 1), bool), 1.0)


def _prompts():
    # Two sets of the same shape (box + 2 points: one decoder call) and a click-only set.
    return [
        _prompt([100, 120, 400, 380], [[250, 260], [251.5, 249.25]], [1, 0]),
        _prompt([600, 600, 900, 800], [[700, 700], [750.0, 700.5]]),
        _prompt(None, [[512, 300]]),
    ]


def _official_logits(predictor, prompt, multimask):
    logits, scores, _ = predictor.predict(
        point_coords=prompt.points if len(prompt.points) else None,
        point_labels=prompt.point_labels if len(prompt.points) else None,
        box=prompt.box, multimask_output=multimask, return_logits=True)
    return torch.as_tensor(logits), torch.as_tensor(scores)


def _compare(refiner, predictor, image, multimask):
    picture = refiner.to_uint8(image)[0].permute(1, 2, 0).numpy()  # the 8-bit picture both get
    predictor.set_image(picture)
    embedding = refiner.embed(image)
    prompts = _prompts()
    differences, same_choice = [], []
    groups = refiner._groups(prompts, batch_prompts=True)
    assert sorted(len(g) for g in groups) == [1, 2]  # the batched path is exercised
    for indices in groups:
        logits, scores, choice = refiner.decode_logits(embedding, [prompts[i] for i in indices],
                                                       multimask_output=multimask, pick_best_score=True)
        for row, index in enumerate(indices):
            official, official_scores = _official_logits(predictor, prompts[index], multimask)
            official_choice = int(official_scores.argmax())
            same_choice.append(official_choice == int(choice[row]))
            differences.append(float((logits[row] - official[official_choice]).abs().max()))
            assert scores[row] == pytest.approx(float(official_scores[official_choice]), abs=LOGIT_TOLERANCE)
    return max(differences), all(same_choice)


def test_features_equal_the_predictors(refiner, official):
    predictor = official
    image = _image(1)
    predictor.set_image(refiner.to_uint8(image)[0].permute(1, 2, 0).numpy())
    embed, high_res = refiner.unpack(refiner.embed(image))
    torch.testing.assert_close(embed, predictor._features["image_embed"], rtol=0, atol=1e-5)
    for ours, theirs in zip(high_res, predictor._features["high_res_feats"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert refiner.embed(image).numel() * 4 == catalogue.refiner_cache_bytes_per_slice(TINY_SAM2)


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_decoding_equals_sam2_image_predictor(refiner, official, multimask):
    difference, same_choice = _compare(refiner, official, _image(2), multimask)
    assert same_choice
    assert difference <= LOGIT_TOLERANCE


def test_the_parity_check_sees_one_decoder_weight_changed_by_a_thousandth(tiny_sam2, refiner):
    """The same comparison against a predictor whose mask decoder has one weight + 1e-3."""
    weight = "sam_mask_decoder.output_upscaling.3.weight"  # the second upscaling convolution
    predictor = _predictor(_official_model(tiny_sam2, perturb=weight))
    difference, _ = _compare(refiner, predictor, _image(2), multimask=True)
    assert difference > LOGIT_TOLERANCE, difference


def test_union_masks_and_probability(refiner):
    embedding = refiner.embed(_image(3))
    prompts = _prompts()
    union, scores, each = refiner.decode(embedding, prompts, multimask_output=True, pick_best_score=True,
                                         batch_prompts=True, return_masks=True)
    assert union.shape == (1024, 1024) and each.shape == (3, 1024, 1024)
    assert torch.equal(union, each.any(dim=0)) and all(s is not None for s in scores)
    alone, _ = refiner.decode(embedding, prompts, multimask_output=True, pick_best_score=True, batch_prompts=False)
    assert (alone ^ union).float().mean() < 1e-3  # the same masks up to rounding at the boundary
    union_p, _, probability, _ = refiner.decode_with_probability(embedding, prompts, multimask_output=True,
                                                                 pick_best_score=True, keep_each=False)
    assert torch.equal(union_p, probability > 0.5)


def test_box_only_refiner_ignores_points(refiner, monkeypatch):
    monkeypatch.setattr(refiner, "medsam", True)
    embedding = refiner.embed(_image(4))
    with_points = refiner.decode(embedding, [_prompt([100, 100, 500, 500], [[300, 300]])],
                                 multimask_output=True, pick_best_score=True, batch_prompts=True)[0]
    box_alone = refiner.decode(embedding, [_prompt([100, 100, 500, 500], [[0, 0]], [0])],
                               multimask_output=True, pick_best_score=True, batch_prompts=True)[0]
    assert torch.equal(with_points, box_alone)


def test_constant_image_gives_no_nan(refiner):
    assert torch.isfinite(refiner.embed(torch.full((1, 3, 1024, 1024), 7.0))).all()


def test_checkpoint_errors_are_clear(tmp_path, tiny_sam2):
    with pytest.raises(CheckpointError, match="not found"):
        load_sam2(TINY_SAM2, tmp_path / "missing.pt")
    # A SAM (v1) checkpoint is not a SAM 2 one: the message says which architecture it does not fit.
    from protosam.testing import save_random_sam_checkpoint

    save_random_sam_checkpoint(catalogue.TINY_SAM, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="does not fit architecture"):
        load_sam2(TINY_SAM2, tmp_path / "sam.pth")


def test_refiner_benchmark_measures_both_phases_for_sam2():
    """benchmarks/refiner_benchmark.py's measurement on the tiny SAM 2 (one slice, two prompt sets)."""
    refiner_benchmark = benchmark_module("refiner_benchmark")
    threads = torch.get_num_threads()
    try:
        figures = refiner_benchmark.run_one(TINY_SAM2, slices=1, structures=2, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert figures["embed_seconds"] > 0 and figures["decode_seconds"] > 0 and figures["peak_rss_mib"] > 0
    assert figures["cache_bytes_per_slice"] == catalogue.refiner_cache_bytes_per_slice(TINY_SAM2)


def test_refiner_benchmark_bf16_encodes_under_bf16_autocast(monkeypatch):
    """--precision bf16 hands the encoder the engine's bf16 autocast (decoding stays float32)."""
    from protosam.models.sam2_refiner import Sam2Refiner

    refiner_benchmark = benchmark_module("refiner_benchmark")
    seen, original = [], Sam2Refiner.embed

    def embed(self, images, *, autocast_dtype=None):
        seen.append(autocast_dtype)
        return original(self, images, autocast_dtype=autocast_dtype)

    monkeypatch.setattr(Sam2Refiner, "embed", embed)
    threads = torch.get_num_threads()
    try:
        figures = refiner_benchmark.run_one(TINY_SAM2, slices=2, structures=1, threads=1, precision="bf16")
        fp32 = refiner_benchmark.run_one(TINY_SAM2, slices=1, structures=1, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert seen == [torch.bfloat16, torch.bfloat16, None]
    assert figures["precision"] == "bf16" and fp32["precision"] == "fp32"
