"""Our SAM refinement against the official SamPredictor, with the same tiny weights."""
import copy
from unittest import mock

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from protosam.errors import CheckpointError
from protosam.models.sam import SamRefiner, load_sam
from protosam.testing import save_random_sam_checkpoint
from protosam.prompts import ComponentPrompt


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    save_random_sam_checkpoint("sam_tiny", path, seed=3)
    return load_sam("sam_tiny", path), path


def _image(seed=0):
    generator = torch.Generator().manual_seed(seed)
    gray = torch.randn(1, 1, 64, 64, generator=generator)
    gray = torch.nn.functional.interpolate(gray, size=(1024, 1024), mode="bilinear", align_corners=False)
    return gray.expand(1, 3, -1, -1).clone() * 3.0 + 1.0  # [1, 3, 1024, 1024], any range


def _official_uint8(image):
    hwc = image[0].permute(1, 2, 0).numpy()
    return ((hwc - hwc.min()) / (hwc.max() - hwc.min()) * 255).astype(np.uint8)


def _prompt(box, points):
    points = np.asarray(points, dtype=np.float64)
    return ComponentPrompt(np.asarray(box, np.float64), points, np.ones(len(points), np.int64), (slice(0, 1), slice(0, 1)), np.ones((1, 1), bool), 1.0)


def test_embedding_equals_sam_predictor_features(tiny_sam):
    sam, _ = tiny_sam
    image = _image()
    predictor = SamPredictor(sam)
    predictor.set_image(_official_uint8(image))
    ours = SamRefiner(sam).embed(image)
    torch.testing.assert_close(ours, predictor.features, rtol=0, atol=1e-5)


# Batched decoding (several prompt sets in one MaskDecoder call) differs from SamPredictor's
# one-set calls only in the order of float32 sums inside batched matrix products and softmaxes.
# Each float32 operation rounds by at most 2**-24 relative; over the decoder's contractions
# (at most 256 terms, a few layers) that stays below 1e-4 of the values' scale, and the tiny
# model's logits and scores are below 1 (measured difference: 1.2e-7 for logits, 3e-8 for
# scores). 1e-5 is thus ~100x what rounding gives here and far below any real difference.
DECODE_TOLERANCE = 1e-5


def _predictor_outputs(predictor, prompts):
    """Per prompt set: SamPredictor's 3 low-res logit maps, 3 scores and 3 upsampled logit maps."""
    outputs = []
    for prompt in prompts:
        logits, scores, low_res = predictor.predict(
            point_coords=prompt.points, point_labels=prompt.point_labels, box=prompt.box,
            multimask_output=True, return_logits=True,
        )
        outputs.append((low_res, scores, logits))
    return outputs


def _decode_prompts():
    return [
        _prompt([100, 120, 400, 380], [[250, 260], [251.5, 249.25]]),
        _prompt([600, 600, 900, 800], [[700, 700], [750.0, 700.5]]),
    ]


@pytest.mark.parametrize("pick_best", [False, True])
def test_one_prompt_set_per_call_equals_sam_predictor_bit_for_bit(tiny_sam, pick_best):
    """batch_prompts=False: every set goes alone through the shared-terms decoder (MaskDecoder's
    bits, checked below) as SamPredictor does; choosing the mask before upsampling changes
    nothing as upsampling is per channel. So the union is SamPredictor's, bit for bit."""
    sam, _ = tiny_sam
    image = _image(seed=1)
    refiner = SamRefiner(sam)
    predictor = SamPredictor(sam)
    predictor.set_image(_official_uint8(image))
    prompts = _decode_prompts()
    expected = torch.zeros(1024, 1024, dtype=torch.bool)
    for _, scores, logits in _predictor_outputs(predictor, prompts):
        index = int(np.argmax(scores)) if pick_best else 0
        expected |= torch.from_numpy(logits[index] > sam.mask_threshold)
    union, scores = refiner.decode(refiner.embed(image), prompts, multimask_output=True, pick_best_score=pick_best, batch_prompts=False)
    assert union.shape == (1024, 1024) and union.dtype == torch.bool and len(scores) == 2
    assert expected.any() and torch.equal(union, expected), f"{int((union ^ expected).sum())} pixels differ"


@pytest.mark.parametrize("pick_best", [False, True])
def test_batched_decoding_equals_sam_predictor_up_to_rounding(tiny_sam, pick_best):
    """batch_prompts=True: logits and scores within DECODE_TOLERANCE of SamPredictor's; the chosen
    mask is SamPredictor's unless its two best scores are that close; the union differs only at
    pixels whose logit is within the tolerance of the threshold."""
    sam, _ = tiny_sam
    image = _image(seed=1)
    refiner = SamRefiner(sam)
    embedding = refiner.embed(image)
    predictor = SamPredictor(sam)
    predictor.set_image(_official_uint8(image))
    prompts = _decode_prompts()
    reference = _predictor_outputs(predictor, prompts)

    # The decoder call decode() makes for a group of sets with the same point count.
    with torch.inference_mode():
        points = (
            torch.as_tensor(np.stack([p.points for p in prompts]), dtype=torch.float),
            torch.as_tensor(np.stack([p.point_labels for p in prompts]), dtype=torch.int),
        )
        boxes = torch.as_tensor(np.stack([p.box for p in prompts]), dtype=torch.float)
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )
    for k, (ref_low_res, ref_scores, _) in enumerate(reference):
        np.testing.assert_allclose(low_res[k].numpy(), ref_low_res, rtol=0, atol=DECODE_TOLERANCE)
        np.testing.assert_allclose(iou[k].numpy(), ref_scores, rtol=0, atol=DECODE_TOLERANCE)

    union, scores = refiner.decode(embedding, prompts, multimask_output=True, pick_best_score=pick_best, batch_prompts=True)
    assert union.shape == (1024, 1024) and union.dtype == torch.bool and len(scores) == 2
    expected = torch.zeros(1024, 1024, dtype=torch.bool)
    undecided = torch.zeros(1024, 1024, dtype=torch.bool)
    for (_, ref_scores, logits), score in zip(reference, scores):
        if pick_best:
            best = int(np.argmax(ref_scores))
            # Masks SamPredictor could have chosen under a rounding difference of the scores.
            candidates = [i for i in range(3) if ref_scores[i] >= ref_scores[best] - DECODE_TOLERANCE]
            assert score == pytest.approx(ref_scores[best], abs=DECODE_TOLERANCE)
        else:
            best, candidates = 0, [0]
            assert score == pytest.approx(ref_scores[0], abs=DECODE_TOLERANCE)
        expected |= torch.from_numpy(logits[best] > sam.mask_threshold)
        for i in candidates:
            undecided |= torch.from_numpy(np.abs(logits[i] - sam.mask_threshold) <= DECODE_TOLERANCE)
            undecided |= torch.from_numpy((logits[i] > sam.mask_threshold) != (logits[best] > sam.mask_threshold))
    differing = union ^ expected
    assert expected.any()
    assert not (differing & ~undecided).any(), f"{int((differing & ~undecided).sum())} decided pixels differ"
    assert int(differing.sum()) <= int(undecided.sum())


def test_single_mask_output_matches_predictor(tiny_sam):
    sam, _ = tiny_sam
    image = _image(seed=2)
    refiner = SamRefiner(sam)
    predictor = SamPredictor(sam)
    predictor.set_image(_official_uint8(image))
    prompt = _prompt([200, 220, 500, 480], [[300, 300], [350.0, 350.0]])
    logits, _, _ = predictor.predict(point_coords=prompt.points, point_labels=prompt.point_labels, box=prompt.box,
                                     multimask_output=False, return_logits=True)
    union, _ = refiner.decode(refiner.embed(image), [prompt], multimask_output=False, pick_best_score=False, batch_prompts=False)
    expected = torch.from_numpy(logits[0] > sam.mask_threshold)
    # Our decoder sums in another order (protosam.models.sam_decoder), so a pixel whose logit is
    # within rounding of the threshold may fall either way: on an AMD EPYC one pixel of logit
    # 7.8e-9 did (the largest is 0.15). Every other pixel must agree.
    undecided = torch.from_numpy(np.abs(logits[0] - sam.mask_threshold) <= DECODE_TOLERANCE)
    assert expected.any() and not expected.all()
    assert int(undecided.sum()) < 0.001 * undecided.numel()  # the exemption stays a handful of pixels
    differing = union ^ expected
    assert not (differing & ~undecided).any(), f"{int((differing & ~undecided).sum())} decided pixels differ"


def test_constant_image_does_not_produce_nan(tiny_sam):
    sam, _ = tiny_sam
    embedding = SamRefiner(sam).embed(torch.zeros(1, 3, 1024, 1024))
    assert torch.isfinite(embedding).all()


def test_medsam_mode_uses_boxes_only_and_unit_range_input(tiny_sam):
    sam, _ = tiny_sam
    refiner = SamRefiner(sam, medsam=True)
    prepared = refiner.prepare_images(_image())
    assert prepared.min().item() == pytest.approx(0.0) and prepared.max().item() == pytest.approx(1.0)
    embedding = refiner.embed(_image())
    a, _ = refiner.decode(embedding, [_prompt([100, 100, 500, 500], [[300, 300], [310, 310]])], multimask_output=True, pick_best_score=True, batch_prompts=True)
    b, _ = refiner.decode(embedding, [_prompt([100, 100, 500, 500], [[120, 900], [900, 120]])], multimask_output=True, pick_best_score=True, batch_prompts=True)
    assert torch.equal(a, b)


def test_checkpoint_errors_are_clear(tmp_path, tiny_sam):
    _, good = tiny_sam
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_sam("sam_tiny", truncated)
    with pytest.raises(CheckpointError, match="does not fit architecture 'vit_b'"):
        load_sam("vit_b", good)
    with pytest.raises(CheckpointError, match="not found"):
        load_sam("sam_tiny", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="Unknown SAM model"):
        load_sam("vit_x", good)


def test_head_chunked_global_attention_gives_the_same_embedding_up_to_rounding(tmp_path):
    from protosam.models.sam import build_sam
    from protosam.models.sam_memory import limit_global_attention_memory

    path = tmp_path / "sam.pth"
    save_random_sam_checkpoint("sam_tiny", path, seed=5)
    assert any(hasattr(b.attn, "heads_per_chunk") for b in load_sam("sam_tiny", path).image_encoder.blocks)
    plain, chunked = build_sam("sam_tiny"), build_sam("sam_tiny")
    plain.load_state_dict(torch.load(path, weights_only=True))
    chunked.load_state_dict(torch.load(path, weights_only=True))
    image = _image(seed=4)
    expected = SamRefiner(plain).embed(image)
    # The tiny model has 2 heads and a 64 x 64 token grid (1 MiB of attention map per query
    # row): one head and 16 rows, one row, 3 rows (a shorter last band), both heads at once.
    # The same operations per query row in the same order; only the BLAS's blocking of the
    # smaller products may differ: bit-identical on AMD EPYC, last-bit differences with MKL's
    # AVX-512 kernels on Intel Xeon. Held to 64 float32 epsilons of the largest value.
    rounding = 64 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    for heads, chunk_bytes in ((1, 16 * 2**20), (1, 1), (1, 3 * 2**20), (2, 2**30)):
        limit_global_attention_memory(chunked, heads, chunk_bytes)
        difference = (SamRefiner(chunked).embed(image) - expected).abs().max().item()
        assert difference <= rounding, (heads, chunk_bytes, difference)
    with pytest.raises(ValueError):
        limit_global_attention_memory(plain, 0)
    with pytest.raises(ValueError):
        limit_global_attention_memory(plain, 1, 0)


def test_banded_qkv_and_mlp_equal_segment_anything_layers_up_to_rounding(tmp_path):
    """The engine's SAM computes each encoder block's qkv projection and MLP a band of tokens at a
    time into reused buffers (``sam_memory._qkv_by_heads``, ``_mlp_in_chunks``): the same products
    row by row as segment-anything's layers, held to 64 float32 epsilons (bands may make the BLAS
    block the rows differently), including bands that span two windows, a one-row band and a
    shorter last band; under autocast the stock layers run; ``use_stock_global_attention`` puts
    segment-anything's MLP back."""
    from protosam.models.sam import build_sam
    from protosam.models.sam_memory import (_mlp_in_chunks, _qkv_by_heads, limit_global_attention_memory,
                                            use_stock_global_attention)

    path = tmp_path / "sam.pth"
    save_random_sam_checkpoint("sam_tiny", path, seed=6)
    loaded = load_sam("sam_tiny", path)
    assert all("forward" in b.mlp.__dict__ for b in loaded.image_encoder.blocks)
    sam = build_sam("sam_tiny")
    sam.load_state_dict(torch.load(path, weights_only=True))
    block = next(b for b in sam.image_encoder.blocks if b.window_size)
    attn, mlp = block.attn, block.mlp
    heads = attn.num_heads
    generator = torch.Generator().manual_seed(8)
    windows = torch.randn(3, 14, 14, block.norm1.normalized_shape[0], generator=generator)  # 3 windows x 196 tokens
    eps = torch.finfo(torch.float32).eps
    with torch.inference_mode():
        stock_qkv = attn.qkv(windows).reshape(3, 196, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, 3 * heads, 196, -1)
        stock_mlp = mlp.lin2(mlp.act(mlp.lin1(windows)))
        row_bytes = {"qkv": attn.qkv.out_features * 4, "mlp": mlp.lin1.out_features * 4}
        # all 588 rows at once; 520 -> bands of 512 (the first spans all three windows) and 76; 100; 1
        for rows in (600, 520, 100, 1):
            attn.chunk_bytes = rows * row_bytes["qkv"]
            banded = _qkv_by_heads(attn, windows)
            assert banded.shape == stock_qkv.shape and banded.is_contiguous()
            assert (banded - stock_qkv).abs().max() <= 64 * eps * stock_qkv.abs().max(), rows
            mlp.chunk_bytes = rows * row_bytes["mlp"]
            banded = _mlp_in_chunks(mlp, windows)
            assert banded.shape == stock_mlp.shape
            assert (banded - stock_mlp).abs().max() <= 64 * eps * stock_mlp.abs().max(), rows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(_qkv_by_heads(attn, windows),
                               attn.qkv(windows).reshape(3, 196, 3, heads, -1).permute(2, 0, 3, 1, 4)
                               .reshape(3, 3 * heads, 196, -1))
            assert torch.equal(_mlp_in_chunks(mlp, windows), mlp.lin2(mlp.act(mlp.lin1(windows))))
    limit_global_attention_memory(sam)
    assert all("forward" in b.mlp.__dict__ and b.mlp.chunk_bytes for b in sam.image_encoder.blocks)
    use_stock_global_attention(sam)
    assert not any({"forward", "chunk_bytes"} & set(b.mlp.__dict__) for b in sam.image_encoder.blocks)


@pytest.mark.parametrize("kernel", ["cpu_low_precision_products", "fused"])
def test_attention_under_autocast_keeps_relative_positions_within_bf16_rounding(monkeypatch, kernel):
    """Under bf16 autocast the engine's SAM attention runs, on a CPU, both matrix products in
    bf16 with the scaling, the relative-position terms and the softmax in float32
    (``sam_memory._low_precision_products_in_chunks``: PyTorch's fused kernel was slower there),
    and elsewhere (CUDA) PyTorch's fused ``scaled_dot_product_attention`` with the two terms as
    its additive mask (run here on the CPU in its place, to test it too); both in chunks of query
    rows and (window, head) pairs. Against segment-anything's attention in float32 each stays
    within bf16 rounding (4 bf16 epsilons of the largest value; measured with the tiny model on
    the AMD EPYC: 0.65-0.86 for the CPU products, 1.1-1.5 for the fused kernel). The
    relative-position tables are made large, so leaving a term out (or misplacing it) fails:
    measured 20-36 times the bound for the fused kernel's mask; 22-23 times for the CPU
    products with the width term left out or added along the key rows. (No comparison with
    segment-anything's bf16 error here: where both are set by the same output rounding, another
    CPU's bf16 kernels may tip either way.)"""
    from segment_anything.modeling.image_encoder import Attention as StockAttention

    from protosam.models import sam_memory
    from protosam.models.sam import build_sam
    from protosam.models.sam_memory import limit_global_attention_memory

    sam = build_sam("sam_tiny").eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in sam.named_parameters():
            if "rel_pos" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    fused_calls, softmax_calls = [], []
    fused = torch.nn.functional.scaled_dot_product_attention
    softmax = torch.softmax

    def counting_fused(*args, **kwargs):
        fused_calls.append(kwargs["attn_mask"].shape)
        return fused(*args, **kwargs)

    def counting_softmax(*args, **kwargs):
        softmax_calls.append(args[0].shape)
        return softmax(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_fused)
    monkeypatch.setattr(torch, "softmax", counting_softmax)
    if kernel == "fused":
        monkeypatch.setattr(sam_memory, "_low_precision_products_in_chunks", sam_memory._fused_attention_in_chunks)
    calls = fused_calls if kernel == "fused" else softmax_calls
    eps = torch.finfo(torch.bfloat16).eps
    windowed = next(b for b in sam.image_encoder.blocks if b.window_size)
    global_block = next(b for b in sam.image_encoder.blocks if not b.window_size)
    for block, shape in ((windowed, (3, 14, 14)), (global_block, (1, 64, 64))):
        x = torch.randn(*shape, block.norm1.normalized_shape[0], generator=generator)
        with torch.inference_mode():
            reference = StockAttention.forward(block.attn, x)
            bound = 4 * eps * reference.abs().max()
            # the default bound (16 MiB: all rows at once here), then one query row per chunk
            for chunk_bytes in (16 * 2**20, 1):
                limit_global_attention_memory(sam, chunk_bytes=chunk_bytes)
                fused_calls.clear()
                softmax_calls.clear()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    ours = block.attn(x)
                assert ours.dtype == torch.bfloat16 and calls, (shape, chunk_bytes)
                if kernel != "fused":
                    assert not fused_calls and all(len(s) == 3 for s in softmax_calls)
                error = (ours.float() - reference).abs().max()
                assert error <= bound, (shape, chunk_bytes, error, bound)
        # the last round: one (window, head) pair or one head, and one query row, per call
        assert len(calls) == shape[0] * block.attn.num_heads * shape[1], (shape, len(calls))


def test_cpu_attention_under_autocast_without_relative_positions():
    """A segment-anything attention layer without relative positions (``use_rel_pos=False``)
    takes the CPU products' other branch (no terms added to the scores): within the same
    bf16 bound of its float32 attention, for all rows at once and one query row per chunk."""
    from segment_anything.modeling.image_encoder import Attention as StockAttention

    from protosam.models.sam import build_sam
    from protosam.models.sam_memory import limit_global_attention_memory

    sam = build_sam("sam_tiny").eval()
    block = next(b for b in sam.image_encoder.blocks if not b.window_size)
    block.attn.use_rel_pos = False
    x = torch.randn(1, 64, 64, block.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = StockAttention.forward(block.attn, x)
        for chunk_bytes in (16 * 2**20, 1):
            limit_global_attention_memory(sam, chunk_bytes=chunk_bytes)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours = block.attn(x)
            assert ours.dtype == torch.bfloat16
            bound = 4 * torch.finfo(torch.bfloat16).eps * reference.abs().max()
            assert (ours.float() - reference).abs().max() <= bound, chunk_bytes


def test_encoder_tokens_run_row_major_with_the_same_embedding(tmp_path):
    """The engine's SAM keeps the encoder's token grid in row-major memory (segment-anything's
    patch embedding hands on a permuted view, which made every block's residual adds strided:
    10-20 % of an embedding on a CPU). Only the layout changes, so the embedding is the one the
    permuted layout gives bit for bit, in float32 and under bf16 autocast: every operation sees
    the same values (elementwise ops and layer norms per element or per row, the products' inputs
    already contiguous, the neck's convolution given the stock layout)."""
    from protosam.models.sam_memory import use_stock_global_attention

    path = tmp_path / "sam.pth"
    save_random_sam_checkpoint("sam_tiny", path, seed=7)
    sam = load_sam("sam_tiny", path)
    encoder, refiner, image = sam.image_encoder, SamRefiner(sam), _image(seed=9)
    with torch.inference_mode():
        assert encoder.patch_embed(refiner.prepare_images(image)).is_contiguous()
    row_major = {dtype: refiner.embed(image, autocast_dtype=dtype) for dtype in (None, torch.bfloat16)}
    encoder.patch_embed.__dict__.pop("forward")
    encoder.neck[0].__dict__.pop("forward")
    with torch.inference_mode():
        assert not encoder.patch_embed(refiner.prepare_images(image)).is_contiguous()
    for dtype, expected in row_major.items():
        assert torch.equal(refiner.embed(image, autocast_dtype=dtype), expected), dtype
    reloaded = load_sam("sam_tiny", path)
    use_stock_global_attention(reloaded)
    assert "forward" not in reloaded.image_encoder.patch_embed.__dict__
    assert "forward" not in reloaded.image_encoder.neck[0].__dict__


def test_windowed_blocks_project_only_the_real_tokens_with_the_stock_values(tmp_path):
    """segment-anything pads a windowed block's tokens to whole windows (the tiny model's 64 x 64
    grid to 70 x 70 in 14 x 14 windows) and projects qkv and the output for all 4,900; the engine
    projects the 4,096 real tokens only (in float32 in bands of image rows, copied into the
    windows band by band) and gives the padded keys and values qkv's bias, what the stock
    projection of the zero padding gives. The block's output is that of segment-anything's
    ``Block.forward`` (padding, partition, crop) around the same attention layer: bit for bit
    where the BLAS rounds each row the same whatever the row count (AMD EPYC), held
    to 64 float32 epsilons (bf16: to its own rounding) elsewhere. A large bias makes padding
    that is not the bias fail by far (the edge windows' queries read those keys)."""
    from segment_anything.modeling.image_encoder import Block
    from protosam.models import sam_memory

    path = tmp_path / "sam.pth"
    save_random_sam_checkpoint("sam_tiny", path, seed=11)
    sam = load_sam("sam_tiny", path)
    block = next(b for b in sam.image_encoder.blocks if b.window_size)
    assert "forward" in block.__dict__
    assert not any("forward" in b.__dict__ for b in sam.image_encoder.blocks if not b.window_size)
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        block.attn.qkv.bias.copy_(3 * torch.randn(block.attn.qkv.bias.shape, generator=generator))
    x = torch.randn(1, 64, 64, block.norm1.normalized_shape[0], generator=generator)
    eps = torch.finfo(torch.float32).eps
    qkv_weight = block.attn.qkv.weight
    row_bytes = block.attn.qkv.out_features * 4
    # float32 runs the projection in bands of whole image rows: 16 rows (1,280 tokens' bytes,
    # rounded down to 1,024 tokens), 3 rows (bands that cut windows at every offset), 1 row;
    # bf16 in one call.
    for dtype, relative, band_tokens in ((None, 64 * eps, 1280), (None, 64 * eps, 192), (None, 64 * eps, 64),
                                         (torch.bfloat16, 2.0 ** -7, None)):
        block.attn.chunk_bytes = (band_tokens or 4096) * row_bytes
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            stock = Block.forward(block, x)
            rows = []
            hook = block.attn.proj.register_forward_hook(lambda module, args, out: rows.append(("proj", args[0].shape[:-1].numel())))
            real_addmm = torch.addmm

            def addmm(bias, mat1, mat2, **kwargs):
                if mat2.data_ptr() == qkv_weight.data_ptr():
                    rows.append(("qkv", mat1.shape[0]))
                return real_addmm(bias, mat1, mat2, **kwargs)

            qkv_hook = block.attn.qkv.register_forward_hook(lambda module, args, out: rows.append(("qkv", args[0].shape[:-1].numel())))
            try:
                with mock.patch.object(torch, "addmm", addmm):
                    ours = block(x)
            finally:
                hook.remove()
                qkv_hook.remove()
        assert ours.dtype == stock.dtype and ours.shape == stock.shape == x.shape
        assert sum(n for name, n in rows if name == "qkv") == 64 * 64, (dtype, rows)
        assert sum(n for name, n in rows if name == "proj") == 64 * 64, (dtype, rows)
        if band_tokens:
            assert max(n for name, n in rows if name == "qkv") == {1280: 1024}.get(band_tokens, band_tokens), rows
        assert (ours.float() - stock.float()).abs().max() <= relative * stock.float().abs().max(), (dtype, band_tokens)
    sam_memory.use_stock_global_attention(sam)
    assert not any("forward" in b.__dict__ for b in sam.image_encoder.blocks)


def test_encoder_blocks_hand_on_one_qkv_buffer_per_forward(tmp_path):
    """A float32 block's qkv layout (ViT-B: 38-45 MB, above glibc's mmap threshold) comes from
    one buffer that all blocks of an encoder forward share, mapped once instead of once a block;
    it goes with the forward, and another thread running meanwhile never sees it (a context
    variable). The embedding is the one of blocks with their own buffers, bit for bit (the same
    operations on the same values; only the memory differs)."""
    import threading
    from protosam.models import sam_memory

    path = tmp_path / "sam.pth"
    save_random_sam_checkpoint("sam_tiny", path, seed=13)
    sam = load_sam("sam_tiny", path)
    refiner, image = SamRefiner(sam), _image(seed=14)
    taken, seen_elsewhere = [], []
    real_take = sam_memory._SharedQkvBuffer.take

    def take(self, like, shape):
        layout = real_take(self, like, shape)
        taken.append(layout.untyped_storage().data_ptr())
        return layout

    def look_from_another_thread(module, args):
        thread = threading.Thread(target=lambda: seen_elsewhere.append(sam_memory._SHARED_QKV.get()))
        thread.start()
        thread.join()
        seen_elsewhere.append(sam_memory._SHARED_QKV.get())

    hook = sam.image_encoder.blocks[-1].register_forward_pre_hook(look_from_another_thread)
    with mock.patch.object(sam_memory._SharedQkvBuffer, "take", take):
        shared = refiner.embed(image)
    hook.remove()
    assert len(taken) == len(sam.image_encoder.blocks) and len(set(taken)) == 1, taken
    assert seen_elsewhere[0] is None and isinstance(seen_elsewhere[1], sam_memory._SharedQkvBuffer)
    assert sam_memory._SHARED_QKV.get() is None
    sam.image_encoder.__dict__.pop("forward")
    taken.clear()
    with mock.patch.object(sam_memory._SharedQkvBuffer, "take", take):
        assert torch.equal(refiner.embed(image), shared)
    assert not taken


def _assert_shared_decoder_matches_stock(sam, shared, embedding, points, labels, box, multimask):
    """Our decoder against segment-anything's MaskDecoder (StockMaskDecoder) on one prompt set.

    The shared decoder computes the same function with its sums in another order (transposed
    convolutions as matrix products, attention folded through its projections): equal up to
    float32 rounding, bounded at 64 epsilons of the largest value (measured on an Intel Xeon:
    5 with the tiny model, 2.3-2.5 with SAM ViT-B). Returns the sparse prompt embedding."""
    from protosam.models.sam_decoder import StockMaskDecoder

    with torch.inference_mode():
        sparse, _ = sam.prompt_encoder(points=(points, labels), boxes=box, masks=None)
    expected = StockMaskDecoder(sam).decode(embedding, sparse, multimask_output=multimask)
    got = shared.decode(embedding, sparse, multimask_output=multimask)
    # Only the mask a caller keeps: the first, or the highest-scored (by our own scores).
    for pick_best in (False, True):
        index = int(got[1][0].argmax()) if pick_best else 0
        picked = shared.decode(embedding, sparse, multimask_output=multimask, pick_best_score=pick_best)
        assert torch.equal(picked[1], got[1][:, index:index + 1])
        got += (picked[0],)
        expected += (expected[0][:, index:index + 1],)
    for ours, stock in zip(got, expected):
        assert ours.shape == stock.shape
        bound = 64 * torch.finfo(torch.float32).eps * max(float(stock.abs().max()), 1.0)
        assert float((ours - stock).abs().max()) <= bound
    return sparse


def _random_box_and_points(rng, corner_high, sides):
    """A random XYXY box ``[1, 4]`` (corner in ``[0, corner_high)``, sides in ``sides``) and two
    random points ``[1, 2, 2]`` in SAM's 1024 frame."""
    x0, y0 = rng.uniform(0, corner_high, 2)
    box = torch.tensor([[x0, y0, x0 + rng.uniform(*sides), y0 + rng.uniform(*sides)]], dtype=torch.float)
    return box, torch.tensor(rng.uniform(0, 1023, (1, 2, 2)), dtype=torch.float)


@pytest.mark.parametrize("multimask", [True, False])
def test_shared_image_decoder_equals_the_mask_decoder(tiny_sam, multimask):
    """One prompt set per call with the image-only terms shared: the stock decoder's logits
    and scores (up to float32 rounding), for several prompt sets on the same embedding and on a
    new one; all masks, or only the first or the best-scored one."""
    from protosam.models.sam_decoder import SharedImageDecoder

    sam = tiny_sam[0]
    shared = SharedImageDecoder(sam)
    rng = np.random.default_rng(3)
    for seed in (1, 2):
        embedding = SamRefiner(sam).embed(_image(seed=seed))
        for _ in range(4):
            box, points = _random_box_and_points(rng, 800, (20, 200))
            labels = torch.tensor([[1, int(rng.integers(0, 2))]], dtype=torch.int)
            sparse = _assert_shared_decoder_matches_stock(sam, shared, embedding, points, labels, box, multimask)
        assert shared._terms.embedding is embedding  # terms were shared, then renewed
    with pytest.raises(ValueError, match="one prompt set"):
        shared.decode(embedding, torch.cat([sparse, sparse]), multimask_output=True)


def test_shared_image_decoder_equals_the_mask_decoder_at_vit_b_size():
    """The same check with SAM ViT-B's decoder (256 channels, 8 heads, random weights), where
    the reordered sums are longest, for point-and-box prompt sets with 1 and 3 masks."""
    from protosam.models.sam import build_sam
    from protosam.models.sam_decoder import SharedImageDecoder

    torch.manual_seed(0)
    sam = build_sam("vit_b")
    shared = SharedImageDecoder(sam)
    generator = torch.Generator().manual_seed(1)
    embedding = 0.5 * torch.randn(1, 256, 64, 64, generator=generator)
    box = torch.tensor([[100.0, 150.0, 700.0, 800.0]])
    for multimask in (True, False):
        for _ in range(2):
            points = torch.rand(1, 3, 2, generator=generator) * 1000
            _assert_shared_decoder_matches_stock(sam, shared, embedding, points, torch.tensor([[1, 1, 0]]), box,
                                                 multimask)


def test_bf16_shared_decoder_stays_within_the_stated_bound_of_float32(tiny_sam):
    """``SharedImageDecoder(sam, dtype=torch.bfloat16)`` (a bf16 run's decoder on a CPU) decodes
    with a bfloat16 copy of SAM's mask decoder and leaves SAM's own decoder in float32; its
    logits and scores come back as float32, within the bound docs/performance.md states for bf16
    (max error 5% of the largest float32 magnitude) and with masks of Dice >= 0.99 against the
    float32 decoder's, and not equal to them (bfloat16 really ran: the error is above float32's
    own rounding, 64 epsilons)."""
    from protosam.models.sam import upsample_mask_logits
    from protosam.models.sam_decoder import SharedImageDecoder

    sam = tiny_sam[0]
    low = SharedImageDecoder(sam, dtype=torch.bfloat16)
    full = SharedImageDecoder(sam)
    assert {p.dtype for p in low.mask_decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in sam.mask_decoder.parameters()} == {torch.float32}
    assert full.mask_decoder is sam.mask_decoder
    rng = np.random.default_rng(5)
    errors, overlap, total = [], 0, 0
    for seed in (1, 2):
        embedding = SamRefiner(sam).embed(_image(seed=seed))
        for _ in range(3):
            box, points = _random_box_and_points(rng, 700, (100, 300))
            with torch.inference_mode():
                sparse, _ = sam.prompt_encoder(points=(points, torch.tensor([[1, 0]])), boxes=box, masks=None)
            expected, expected_scores = full.decode(embedding, sparse, multimask_output=True)
            got, scores = low.decode(embedding, sparse, multimask_output=True)
            assert got.dtype == scores.dtype == torch.float32 and got.shape == expected.shape
            logits, reference = upsample_mask_logits(got), upsample_mask_logits(expected)
            errors.append(float((logits - reference).abs().max() / reference.abs().max()))
            errors.append(float((scores - expected_scores).abs().max() / expected_scores.abs().max()))
            overlap += int(((logits > 0) & (reference > 0)).sum())
            total += int((logits > 0).sum() + (reference > 0).sum())
    assert max(errors) <= 0.05, errors
    assert max(errors) > 64 * torch.finfo(torch.float32).eps, errors
    assert 2 * overlap / total >= 0.99


@pytest.mark.parametrize("band_tokens", [None, 1, 100, 512, 4096, 10_000])
def test_upscaling_in_bands_of_tokens_equals_the_stock_upscaling(tiny_sam, band_tokens):
    """The decoder's output upscaling runs the image tokens through its steps a band at a time
    (the last band shorter where the band does not divide the 4,096 tokens; None: the band its
    byte bound gives): segment-anything's ``hyper_in @ output_upscaling(image)`` up to float32
    rounding, every pixel in its place."""
    from protosam.models.sam_decoder import _upscaled_masks

    decoder = tiny_sam[0].mask_decoder
    generator = torch.Generator().manual_seed(band_tokens or 0)
    channels = decoder.transformer_dim
    image = torch.randn(1, channels, 64, 64, generator=generator)
    hyper_in = torch.randn(3, channels // 8, generator=generator)
    with torch.inference_mode():
        upscaled = decoder.output_upscaling(image)  # [1, C / 8, 256, 256]
        expected = (hyper_in @ upscaled.flatten(2)[0]).view(3, 256, 256)
        got = _upscaled_masks(decoder.output_upscaling, image[0].flatten(1).T.contiguous(), hyper_in, 64, 64,
                              band_tokens=band_tokens)
    assert got.shape == expected.shape
    bound = 64 * torch.finfo(torch.float32).eps * max(float(expected.abs().max()), 1.0)
    assert float((got - expected).abs().max()) <= bound


def test_upscaling_bands_of_vit_b_size_by_bytes():
    """The band of the output upscaling is set in bytes: at SAM ViT-B's decoder size float32
    keeps its 512 tokens a band (the bits measured and tested against the stock decoder),
    bfloat16 takes twice as many tokens (the same bytes), with the same values as bands of 512
    up to bfloat16 rounding."""
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    from protosam.models import sam_decoder

    generator = torch.Generator().manual_seed(3)
    decoder = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)).eval()
    tokens = torch.randn(4096, 256, generator=generator)
    hyper_in = torch.randn(1, 32, generator=generator)
    calls = []
    real_mm = torch.mm

    def counting_mm(a, b, **kwargs):
        calls.append(a.shape[0])
        return real_mm(a, b, **kwargs)

    with torch.inference_mode():
        by_bytes = sam_decoder._upscaled_masks(decoder.output_upscaling, tokens, hyper_in, 64, 64)
        by_512 = sam_decoder._upscaled_masks(decoder.output_upscaling, tokens, hyper_in, 64, 64, band_tokens=512)
        assert torch.equal(by_bytes, by_512)
        low = copy.deepcopy(decoder).to(torch.bfloat16)
        with mock.patch.object(torch, "mm", counting_mm):
            in_bf16 = sam_decoder._upscaled_masks(low.output_upscaling, tokens.bfloat16(), hyper_in.bfloat16(), 64, 64)
        reference = sam_decoder._upscaled_masks(low.output_upscaling, tokens.bfloat16(), hyper_in.bfloat16(), 64, 64,
                                                band_tokens=512)
    assert calls[0] == 1024  # the first product of the first band: 1,024 tokens
    assert len(calls) == 3 * 4  # three products per band, four bands
    scale = float(by_512.abs().max())
    assert float((in_bf16.float() - reference.float()).abs().max()) <= 0.02 * scale


def test_one_resize_gives_postprocess_masks_bits(tiny_sam):
    """SamRefiner skips postprocess_masks' second, 1024 -> 1024 resize: its weights are exactly
    1 and 0, so the logits (hence every thresholded mask) keep their bits."""
    from protosam.models.sam import upsample_mask_logits

    generator = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 30.0, 1e4):
        logits = torch.randn(3, 1, 256, 256, generator=generator) * scale
        expected = tiny_sam[0].postprocess_masks(logits, (1024, 1024), (1024, 1024))
        assert torch.equal(upsample_mask_logits(logits), expected)


def test_loading_assigns_the_checkpoint_tensors_without_a_random_model(tiny_sam):
    """load_sam builds SAM on the meta device and takes the file's tensors: the same values as
    segment-anything's build-then-copy, every tensor real and on the CPU, the pixel statistics
    (not saved in the file) set."""
    from protosam.models.sam import build_sam

    sam, path = tiny_sam
    reference = build_sam("sam_tiny")
    reference.load_state_dict(torch.load(path, weights_only=True))
    loaded = dict(sam.state_dict(keep_vars=True))
    for name, expected in reference.state_dict(keep_vars=True).items():
        assert loaded[name].device.type == "cpu" and torch.equal(loaded[name], expected), name
        assert not loaded[name].requires_grad
    for name in ("pixel_mean", "pixel_std"):
        assert torch.equal(getattr(sam, name), getattr(reference, name))
