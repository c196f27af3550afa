"""Tests of protosam.models.dinov2: equivalence with the official DINOv2 code, checkpoint handling, inputs.

Equivalence tests write random (non-degenerate) weights in Meta's file format with
``save_random_checkpoint``, load them with ``load_dinov2`` and, independently, into the official
reference (see dinov2_reference.py), and compare patch features: max |diff| <= 1e-4.
The ViT-S/14 cases take a few seconds each on 2 CPU cores; everything else uses the tiny models.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from required_modules import DINOV2_REFERENCE, require_module

from protosam.errors import CheckpointError, InputError
from protosam.models.dinov2 import (
    DINOV2_ARCHITECTURES,
    DinoV2Architecture,
    DinoV2Encoder,
    build_dinov2,
    identify_dinov2_architecture,
    load_dinov2,
)
from protosam.testing import save_random_checkpoint

TOLERANCE = 1e-4  # max abs difference allowed against the official implementation
OFFICIAL = [name for name, arch in DINOV2_ARCHITECTURES.items() if not arch.test_only]
TINY = ["dinov2_tiny14", "dinov2_tiny14_reg4"]


@pytest.fixture(scope="module")
def reference():
    require_module("dinov2", DINOV2_REFERENCE)
    import dinov2_reference

    return dinov2_reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name, seed=0) -> path of a random-weight official-format file (written once)."""
    folder = tmp_path_factory.mktemp("dinov2_checkpoints")

    @functools.lru_cache(maxsize=None)
    def make(name: str, seed: int = 0):
        return save_random_checkpoint(name, folder / f"{name}_seed{seed}_pretrain.pth", seed=seed)

    return make


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """loaded(name) -> our encoder and the file's state dict (cached per module)."""

    @functools.lru_cache(maxsize=None)
    def load(name: str):
        path = checkpoint(name)
        return load_dinov2(name, path), torch.load(path, map_location="cpu", weights_only=True)

    return load


@pytest.fixture(scope="module")
def vits_features(loaded):
    """vits_features(name, size) -> (images 1 x 3 x size x size, our features), computed once."""

    @functools.lru_cache(maxsize=None)
    def compute(name: str, size: int):
        x = images(1, (size, size))
        with torch.no_grad():
            return x, loaded(name)[0].patch_features(x)

    return compute


def images(batch: int, hw, seed: int = 1) -> torch.Tensor:
    """z-scored-like random images, B x 3 x H x W float32 (the reference feeds z-scored slices)."""
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def official_features(reference, name, state_dict, x):
    model = reference.build_snapshot_model(DINOV2_ARCHITECTURES[name])
    model.load_state_dict(state_dict, strict=True)
    return reference.snapshot_patch_features(model, x)


# ---------------------------------------------------------------- equivalence with the official code

@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg4"])
@pytest.mark.parametrize("size", [518, 672])
def test_vits14_matches_official_implementation(name, size, loaded, vits_features, reference):
    """ViT-S/14 (plain: the snapshot's own code; reg4: snapshot + registers) at 518 and 672 px."""
    state = loaded(name)[1]
    x, got = vits_features(name, size)
    assert got.shape == (1, 384, size // 14, size // 14) and got.dtype == torch.float32
    assert max_abs(got, official_features(reference, name, state, x)) <= TOLERANCE


@pytest.mark.parametrize("name", ["dinov2_tiny14", "dinov2_vits14"])
def test_explicit_attention_matches_the_official_code_up_to_summation_order(name, checkpoint, reference):
    """The paper preset's attention order reproduces the official features at 672 up to the
    rounding of the matrix products' summation order.

    Ours multiplies one head at a time, the official code all heads in one batched product: the
    same operations, but the BLAS may block the two shapes differently. On AMD EPYC they gave
    the same bits; MKL's AVX-512 kernels on Intel Xeon differ by 3.7e-6 (ViT-S/14, features up
    to ~5). The bound is 64 float32 epsilons of the largest feature: summation-order rounding,
    far below any difference in what is computed (the fused-attention path, another algorithm,
    is held only to TOLERANCE).
    """
    ours = load_dinov2(name, checkpoint(name))
    ours.set_fused_attention(False)
    x = images(1, (672, 672), seed=5)
    with torch.no_grad():
        got = ours.patch_features(x)
    state = torch.load(checkpoint(name), map_location="cpu", weights_only=True)
    expected = official_features(reference, name, state, x)
    rounding = 64 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    assert max_abs(got, expected) <= rounding


def test_explicit_attention_runs_in_one_workspace_with_the_same_results(checkpoint, monkeypatch):
    """In float32 the explicit attention reuses one attention-map buffer (softmax in place, each
    chunk's output written into the result): the allocating per-chunk form's operations on the
    same values, held to 64 float32 epsilons (the BLAS may block a batch of one item and of two
    differently); under autocast, whose casts skip ``out=`` calls, the allocating form runs."""
    from protosam.models.vit_blocks import Attention

    ours = load_dinov2("dinov2_vits14", checkpoint("dinov2_vits14"))  # 6 heads
    attention = next(m for m in ours.modules() if isinstance(m, Attention))
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 190, ours.embed_dim, generator=generator)
    head_dim = ours.embed_dim // attention.num_heads
    qkv = attention.qkv(tokens).reshape(2, 190, 3, attention.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    eps = torch.finfo(torch.float32).eps
    with torch.no_grad():
        for heads_per_chunk in (1, 4, 6):
            attention.heads_per_chunk = heads_per_chunk
            expected = attention._explicit_attention_by_chunks(qkv, head_dim)
            got = attention._explicit_attention_in_workspace(qkv, head_dim)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= 64 * eps * expected.abs().max(), heads_per_chunk

    def refuse(*args):
        raise AssertionError("this form must not run here")

    ours.set_fused_attention(False, heads_per_chunk=1)
    x = images(1, (112, 112), seed=2)
    with torch.no_grad():
        monkeypatch.setattr(Attention, "_explicit_attention_by_chunks", refuse)
        in_workspace = ours.patch_features(x)
        monkeypatch.undo()
        monkeypatch.setattr(Attention, "_explicit_attention_in_workspace", refuse)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours.patch_features(x).shape == in_workspace.shape
        ours.set_fused_attention(False, heads_per_chunk=None)  # the official all-heads layout
        allocating = ours.patch_features(x)
    assert (in_workspace - allocating).abs().max() <= 64 * eps * allocating.abs().max()


def test_explicit_attention_head_chunks_are_bit_identical(checkpoint):
    """One head at a time (the engine's default), two, or all at once: the same bits."""
    ours = load_dinov2("dinov2_vits14", checkpoint("dinov2_vits14"))  # 6 heads
    x = images(2, (252, 294), seed=9)
    outputs = []
    for heads_per_chunk in (None, 1, 4):
        ours.set_fused_attention(False, heads_per_chunk=heads_per_chunk)
        with torch.no_grad():
            outputs.append(ours.patch_features(x))
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    with pytest.raises(ValueError, match="heads_per_chunk"):
        ours.set_fused_attention(False, heads_per_chunk=0)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hw", [(518, 518), (672, 672), (252, 252), (518, 672), (196, 294), (14, 28)])
def test_tiny_matches_official_implementation(name, hw, loaded, reference):
    """Square and non-square grids, smaller and larger than 37, batch of 2."""
    ours, state = loaded(name)
    x = images(2, hw, seed=hw[0] + hw[1])
    with torch.no_grad():
        got = ours(x)
    assert got.shape == (2, 48, hw[0] // 14, hw[1] // 14)
    assert max_abs(got, official_features(reference, name, state, x)) <= TOLERANCE


def test_swiglu_ffn_matches_official_implementation(reference):
    """The ViT-g/14 FFN (fused SwiGLU, official hidden-size rule) on a tiny width, at 672 px."""
    arch = DinoV2Architecture("swiglu_test", 48, 2, 2, ffn_layer="swiglufused", test_only=True)
    official = reference.build_snapshot_model(arch)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in official.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if param.ndim > 1 else 0.3) + 0.1)
    ours = DinoV2Encoder(arch).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    assert ours.blocks[0].mlp.w3.in_features == 128 == arch.ffn_hidden_dim  # (int(192 * 2/3) + 7) // 8 * 8
    x = images(1, (672, 672))
    with torch.no_grad():
        got = ours(x)
    assert max_abs(got, reference.snapshot_patch_features(official, x)) <= TOLERANCE


@pytest.mark.parametrize("name", OFFICIAL)
def test_parameter_layout_equals_official(name, reference):
    """Every official architecture has exactly the official tensor names and shapes (mask_token included)."""
    arch = DINOV2_ARCHITECTURES[name]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in DinoV2Encoder(arch).state_dict().items()}
    official = {k: tuple(v.shape) for k, v in reference.build_snapshot_model(arch, meta=True).state_dict().items()}
    assert ours == official
    assert ours["mask_token"] == (1, arch.embed_dim)
    assert ours["pos_embed"] == (1, 1 + 37 * 37, arch.embed_dim)
    assert ("register_tokens" in ours) == name.endswith("_reg4")
    if name.startswith("dinov2_vitg14"):
        assert ours["blocks.0.mlp.w12.weight"] == (2 * 4096, 1536) and ours["blocks.39.mlp.w3.weight"] == (1536, 4096)


def test_registry_values():
    expected = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
    for short, (dim, depth, heads) in expected.items():
        for suffix, registers in (("", 0), ("_reg4", 4)):
            arch = DINOV2_ARCHITECTURES[f"dinov2_{short}{suffix}"]
            assert (arch.embed_dim, arch.depth, arch.num_heads, arch.num_register_tokens) == (dim, depth, heads, registers)
            assert arch.ffn_layer == ("swiglufused" if short == "vitg14" else "mlp")
            # hub settings: plain models offset 0.1 / no antialias; *_reg models offset 0 / antialias
            assert (arch.interpolate_offset, arch.interpolate_antialias) == ((0.0, True) if registers else (0.1, False))
            assert arch.checkpoint_filename == f"dinov2_{short}{suffix}_pretrain.pth"
    assert all(DINOV2_ARCHITECTURES[n].test_only and DINOV2_ARCHITECTURES[n].checkpoint_filename is None for n in TINY)
    with pytest.raises(TypeError):
        DINOV2_ARCHITECTURES["dinov2_vits14"] = None  # read-only mapping
    with pytest.raises(dataclasses.FrozenInstanceError):
        DINOV2_ARCHITECTURES["dinov2_vits14"].depth = 3


# ---------------------------------------------------------------- the comparison can fail

def test_resampling_variants_and_weights_change_the_features(loaded):
    """The random weights are not degenerate: a wrong resampling rule or a 0.1 % change of one
    layer-scale gamma moves the features far beyond the tolerance."""
    ours, state = loaded("dinov2_tiny14")
    x = images(1, (672, 672))
    with torch.no_grad():
        baseline = ours(x)
        for change in ({"interpolate_offset": 0.0}, {"interpolate_antialias": True}):
            variant = DinoV2Encoder(dataclasses.replace(ours.architecture, **change)).eval()
            variant.load_state_dict(state)
            assert max_abs(variant(x), baseline) > 100 * TOLERANCE, change
        tweaked = dict(state)
        tweaked["blocks.1.ls1.gamma"] = state["blocks.1.ls1.gamma"] * 1.001
        variant = DinoV2Encoder(ours.architecture).eval()
        variant.load_state_dict(tweaked)
        assert max_abs(variant(x), baseline) > 10 * TOLERANCE


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg4"])
def test_timm_agrees_except_plain_models_resampling(name, loaded, vits_features, reference):
    """Informative, at 672 px: timm (third-party) equals us for register models, whose official
    resampling is timm's (bicubic to size, antialias), and differs for plain models."""
    require_module("timm", "pip install 'timm>=1.0' (in ProtoSAMLib[test])")
    arch, state = loaded(name)[0].architecture, loaded(name)[1]
    x, ours = vits_features(name, 672)
    diff = max_abs(ours, reference.timm_patch_features(arch, state, x))
    if arch.num_register_tokens:
        assert diff <= TOLERANCE
    else:
        assert diff > 100 * TOLERANCE  # official: scale factor (48 + 0.1) / 37, no antialias


# ---------------------------------------------------------------- checkpoints

def test_random_checkpoint_is_an_official_format_file(checkpoint, tmp_path, reference):
    path = checkpoint("dinov2_tiny14")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert type(state) is dict and all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())
    official_keys = list(reference.build_snapshot_model(DINOV2_ARCHITECTURES["dinov2_tiny14"], meta=True).state_dict())
    assert list(state) == official_keys  # same keys in the same order as the official model
    again = torch.load(save_random_checkpoint("dinov2_tiny14", tmp_path / "a.pth", seed=0), weights_only=True)
    other = torch.load(save_random_checkpoint("dinov2_tiny14", tmp_path / "b.pth", seed=1), weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    assert not list(tmp_path.glob("*.partial"))
    gammas = torch.cat([state[k] for k in state if k.endswith(".gamma")])
    assert gammas.std() > 0.1 and (gammas - 1).abs().min() > 0  # layer scale is not the trivial 1.0


def test_load_dinov2_returns_frozen_encoder(checkpoint):
    model = load_dinov2("dinov2_tiny14_reg4", checkpoint("dinov2_tiny14_reg4"))
    assert isinstance(model, DinoV2Encoder) and not model.training
    assert model.architecture is DINOV2_ARCHITECTURES["dinov2_tiny14_reg4"]
    assert (model.patch_size, model.embed_dim) == (14, 48)
    assert all(not p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(ValueError, match="Invalid device"):
        load_dinov2("dinov2_tiny14_reg4", checkpoint("dinov2_tiny14_reg4"), device="gpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_dinov2("dinov2_tiny14_reg4", checkpoint("dinov2_tiny14_reg4"), device="cuda")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_dinov2("dinov2_tiny14", tmp_path / "dinov2_tiny14_pretrain.pth")


def test_truncated_file(checkpoint, tmp_path):
    data = checkpoint("dinov2_tiny14").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dinov2("dinov2_tiny14", path)


def test_wrong_architecture_names_both(checkpoint):
    with pytest.raises(CheckpointError) as info:
        load_dinov2("dinov2_vits14", checkpoint("dinov2_vitb14"))
    assert "'dinov2_vits14'" in str(info.value) and "'dinov2_vitb14'" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_dinov2("dinov2_tiny14", checkpoint("dinov2_tiny14_reg4"))
    assert "'dinov2_tiny14'" in str(info.value) and "'dinov2_tiny14_reg4'" in str(info.value)
    assert "register_tokens" in str(info.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("mask_token"), "missing.*'mask_token'"),
        (lambda s: s.update({"head.weight": torch.zeros(10, 48)}), "unexpected.*'head.weight'"),
        (lambda s: s.update({"norm.weight": torch.zeros(50)}), "other shapes.*'norm.weight'"),
        (lambda s: s["blocks.0.attn.proj.weight"].__setitem__((0, 0), float("nan")), "not finite"),
        (lambda s: s.update({"norm.bias": torch.zeros(48, dtype=torch.int64)}), "not finite floating-point"),
    ],
    ids=["missing-mask_token", "extra-key", "wrong-shape", "nan", "integer"],
)
def test_damaged_state_dict(edit, message, checkpoint, tmp_path):
    state = torch.load(checkpoint("dinov2_tiny14"), weights_only=True)
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message):
        load_dinov2("dinov2_tiny14", path)


def test_identify_architecture(checkpoint):
    for name in TINY:
        assert identify_dinov2_architecture(torch.load(checkpoint(name), weights_only=True)) == name
    assert identify_dinov2_architecture({"image_encoder.pos_embed": torch.zeros(1)}) is None


def test_unknown_names_list_valid_ones(checkpoint):
    for call in (lambda: build_dinov2("dinov2_vitx14"), lambda: load_dinov2("vitl", checkpoint("dinov2_tiny14"))):
        with pytest.raises(ValueError, match="dinov2_vitl14_reg4"):
            call()


# ---------------------------------------------------------------- inputs, dtypes, devices

@pytest.mark.parametrize(
    "bad",
    [torch.zeros(1, 3, 500, 518), torch.zeros(1, 3, 518, 20), torch.zeros(1, 3, 7, 14), torch.zeros(3, 518, 518),
     torch.zeros(1, 1, 518, 518), torch.zeros(1, 3, 518, 518, dtype=torch.uint8)],
    ids=["height-500", "width-20", "height-7", "3d", "one-channel", "uint8"],
)
def test_bad_images_raise_value_error(bad):
    model = build_dinov2("dinov2_tiny14")
    with pytest.raises(ValueError) as info:
        model.patch_features(bad)
    assert isinstance(info.value, InputError)
    if bad.ndim == 4 and bad.shape[1] == 3 and bad.is_floating_point():
        assert "multiple of 14" in str(info.value)


def test_build_dinov2_random_model():
    model = build_dinov2("dinov2_tiny14_reg4")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        out = model(images(1, (224, 280)))
    assert out.shape == (1, 48, 16, 20) and torch.isfinite(out).all()


def test_bf16_autocast_on_cpu(loaded):
    ours, _ = loaded("dinov2_tiny14_reg4")
    x = images(1, (280, 280))
    with torch.no_grad():
        exact = ours(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x)
    assert torch.isfinite(low).all() and low.dtype == torch.float32  # final LayerNorm runs in float32
    cosine = torch.nn.functional.cosine_similarity(low.float(), exact, dim=1)
    assert cosine.min() > 0.98


@pytest.mark.parametrize("band_bytes", [None, 1, 3000])
def test_attention_under_autocast_on_a_cpu_runs_bf16_products_within_bf16_rounding(monkeypatch, band_bytes):
    """Under bf16 autocast on a CPU the fast attention form is two bf16 products with the softmax
    between them (``vit_blocks._products_in_low_precision``), not PyTorch's fused kernel (slower
    there): for a batch of two, in bands of query rows (the default 2 MiB: all 300 rows here;
    one row; 5 rows, the last band shorter), within 4 bf16 epsilons of the largest value of the
    float32 attention (scores of standard deviation 1 here; measured 0.95, the fused kernel
    0.93; with peaked scores, standard deviation 2-9, the rounded scores give 2-3.7 epsilons
    where the fused kernel gives 1.2-2.5, as the official explicit attention under autocast
    does). The heads' outputs are in their places: swapping two heads' queries fails (measured
    33 times the bound)."""
    from protosam.models import vit_blocks

    attention = vit_blocks.Attention(dim=96, num_heads=3).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    tokens = torch.randn(2, 300, 96, generator=generator)
    calls = {"ours": 0, "fused": 0}
    ours, fused = vit_blocks._products_in_low_precision, torch.nn.functional.scaled_dot_product_attention

    def counting_ours(q, k, v):
        calls["ours"] += 1
        return ours(q, k, v) if band_bytes is None else ours(q, k, v, band_bytes)

    def counting_fused(*args, **kwargs):
        calls["fused"] += 1
        return fused(*args, **kwargs)

    monkeypatch.setattr(vit_blocks, "_products_in_low_precision", counting_ours)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_fused)
    with torch.inference_mode():
        attention.fused = False
        attention.heads_per_chunk = None
        reference = attention(tokens)  # float32, the official explicit form
        attention.fused = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attention(tokens)
    assert calls == {"ours": 1, "fused": 0} and got.dtype == torch.bfloat16
    bound = 4 * torch.finfo(torch.bfloat16).eps * reference.abs().max()
    assert (got.float() - reference).abs().max() <= bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_and_bf16(loaded):
    cpu_model, state = loaded("dinov2_vits14")
    gpu_model = DinoV2Encoder(cpu_model.architecture).eval()
    gpu_model.load_state_dict(state)
    gpu_model.cuda()
    x = images(2, (672, 672))
    with torch.no_grad():
        expected = cpu_model(x)
        got = gpu_model(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu_model(x.cuda())
    assert got.device.type == "cuda"
    assert max_abs(got.cpu(), expected) <= 5e-3  # cuDNN may use TF32 for the patch convolution
    assert torch.nn.functional.cosine_similarity(low.float().cpu(), expected, dim=1).min() > 0.98
