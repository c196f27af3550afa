"""The engine's own kernels against the reference's (``Engine.reference_kernels()``), on fixed
inputs, where a difference could hide: DINOv2 features, SAM image embeddings and SAM's
upsampled mask logits, with stated error bounds; and identical masks on a tiny test volume.

Random-weight SAM marks most of a slice, so equal masks alone prove little; the bounds are
checked on the values themselves.

Bounds. Our encoder kernels run the reference's operations per output element in the same
order and change only how the BLAS blocks smaller matrix products (one attention head, a band
of query rows): each element is then a different rounding of the same sums. Our SAM decoder
computes the same function with its sums in another order (transposed convolutions as matrix
products, attention folded through its projections, see protosam.models.sam_decoder), again a
different rounding of the same sums, a few float32 epsilons of the magnitudes summed.
``ROUNDING`` = 64 float32 epsilons (7.6e-6) of the largest magnitude of the compared tensor
bounds the absolute error of every element; this is the bound the head-chunked attention test
in test_sam.py uses. Bit equality is not required, as a BLAS may round blocked products
differently on another CPU (MKL's AVX-512 kernels gave last-bit differences on one Intel Xeon
for SAM ViT-B). Measured here (Intel Xeon, 2 cores): encoders, tiny models, every error 0;
decoder, tiny SAM 5 epsilons of the largest logit, SAM ViT-B (random weights) 2.3-2.5.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protosam import Engine, segment_volume
from protosam.models.sam import upsample_mask_logits
from protosam.prompts import ComponentPrompt

ROUNDING = 64 * torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models, preset="paper", device="cpu")


def _images(engine, count=2):
    generator = torch.Generator().manual_seed(7)
    size = engine.input_size
    smooth = F.interpolate(torch.rand(count, 1, 12, 12, generator=generator), size=(size, size), mode="bilinear")
    return (smooth + 0.1 * torch.rand(count, 1, size, size, generator=generator)).expand(-1, 3, -1, -1)


def _within(ours: torch.Tensor, reference: torch.Tensor, what: str) -> dict:
    scale = reference.abs().max().item()
    absolute = (ours - reference).abs().max().item()
    relative = absolute / scale
    assert absolute <= ROUNDING * scale, f"{what}: max abs error {absolute:.3g} > {ROUNDING * scale:.3g}"
    return {"max_abs": absolute, "max_rel_to_largest": relative}


def _mask_logits(engine, embedding, prompt):
    """The chosen mask's upsampled logits as the engine decodes one prompt set (shared image
    terms, one resize), and as segment-anything does (MaskDecoder, postprocess_masks)."""
    sam, refiner = engine.refiner.sam, engine.refiner
    points = (torch.as_tensor(prompt.points[None], dtype=torch.float), torch.as_tensor(prompt.point_labels[None]))
    box = torch.as_tensor(prompt.box[None], dtype=torch.float)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=points, boxes=box, masks=None)
        ours, _ = refiner.shared_decoder.decode(embedding, sparse, multimask_output=True)
        reference, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=True)
        return upsample_mask_logits(ours[:, :1]), sam.postprocess_masks(reference[:, :1], (1024, 1024), (1024, 1024))


def test_embeddings_and_mask_logits_match_the_reference_kernels(engine):
    images = _images(engine)
    prompt = ComponentPrompt(np.array([300.0, 280.0, 700.0, 760.0]), np.array([[500.0, 520.0]]), np.array([1]),
                             (slice(0, 1), slice(0, 1)), np.ones((1, 1), bool), 1.0)
    ours = {"dinov2": engine.encode(images), "sam": torch.cat([engine.sam_embedding(image) for image in images])}
    with engine.reference_kernels():
        reference = {"dinov2": engine.encode(images),
                     "sam": torch.cat([engine.sam_embedding(image) for image in images])}
    errors = {name: _within(ours[name], reference[name], name) for name in ours}
    for k in range(len(images)):
        # Our decoding of our embedding against segment-anything's decoding of the reference's.
        our_logits, _ = _mask_logits(engine, ours["sam"][k:k + 1], prompt)
        _, reference_logits = _mask_logits(engine, reference["sam"][k:k + 1], prompt)
        errors[f"mask logits {k}"] = _within(our_logits, reference_logits, "mask logits")
        # On the same embedding: our decoder's sums in another order (matrix products instead
        # of transposed convolutions, attention folded through its projections).
        same_ours, same_reference = _mask_logits(engine, reference["sam"][k:k + 1], prompt)
        errors[f"decoder alone {k}"] = _within(same_ours, same_reference, "decoder alone")
    print(errors)


def test_tiny_volume_masks_are_identical_with_the_reference_kernels(engine):
    images = _images(engine, count=4)[:, 0].numpy()
    support = np.zeros(images.shape, np.uint8)
    support[1] = images[1] > np.quantile(images[1], 0.7)
    sam = engine.refiner.sam
    stock_calls = []
    stock_forward = sam.mask_decoder.forward
    sam.mask_decoder.forward = lambda *a, **k: stock_calls.append(1) or stock_forward(*a, **k)
    try:
        ours = segment_volume(engine, images, None, {"s": support}, support_slices={"s": [1]}, modality="none")
        assert not stock_calls  # our decoder ...
        with engine.reference_kernels():
            reference = segment_volume(engine, images, None, {"s": support}, support_slices={"s": [1]},
                                       modality="none")
        assert stock_calls  # ... against segment-anything's
    finally:
        del sam.mask_decoder.forward
    assert ours.masks["s"].any()
    np.testing.assert_array_equal(ours.masks["s"], reference.masks["s"])
