"""Building blocks of the DINOv2 vision transformer, with the official parameter names.

Every module here is named so that its ``state_dict`` keys are exactly those of Meta's
DINOv2 checkpoint files (``patch_embed.proj``, ``attn.qkv``, ``ls1.gamma``, ``mlp.fc1`` or
``mlp.w12`` ...). The maths follows the official model; attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention` (a fused kernel computing the same
softmax(q k^T / sqrt(d)) v as the official code, within float rounding).

Token tensors are ``B x N x C`` float (batch, tokens, channels) throughout.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: LayerNorm epsilon of every DINOv2 norm layer.
LAYER_NORM_EPS = 1e-6


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """Hidden width of the official fused SwiGLU FFN given the plain MLP width.

    The official rule: two thirds of ``mlp_hidden_dim``, rounded up to a multiple of 8
    (ViT-g/14: 4 x 1536 = 6144 -> 4096).
    """
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: images ``B x 3 x H x W`` -> tokens ``B x (H/p * W/p) x C``.

    Tokens are in row-major order of the patch grid (row index = H direction).
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patch_map = self.proj(images)  # B x C x H/p x W/p
        return patch_map.flatten(2).transpose(1, 2)


# Bytes of one band of attention scores in :func:`_products_in_low_precision`.
SCORE_BAND_BYTES = 2 * 2**20


def _products_in_low_precision(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               band_bytes: int = SCORE_BAND_BYTES) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for ``B x heads x N x d`` tensors in a reduced type (bf16),
    one head and a band of query rows at a time: both products in that type (float32
    accumulation, one rounding of each score), the softmax in place over the band (reduced in
    float32 inside), each band's output written into the result. Returns ``B x heads x N x d``.

    Why: PyTorch's fused CPU kernel ran DINOv2 ViT-B's attention at 672 px (2,305 tokens) at
    113 ms per layer on the AMD EPYC (2 cores, AVX512-BF16), where bf16 matrix products of those
    shapes reach 370-410 GFLOP/s: 66 ms here (one process, interleaved rounds). The scores are
    rounded to bf16 before the softmax, as the official model's explicit attention rounds them
    under autocast; the fused kernel kept them in float32 (root-mean-square error of the output
    against float32 1.5e-4 here, 7.8e-5 fused).
    """
    batch, heads, count, head_dim = queries.shape
    scale = head_dim ** -0.5
    attended = queries.new_empty(batch, heads, count, head_dim)
    rows = max(1, min(count, band_bytes // (count * queries.element_size())))
    score_buffer = queries.new_empty(rows * count)
    for item in range(batch):
        for head in range(heads):
            # Contiguous copies of this head's strided views, once: a product given the views
            # copied them again for every band.
            scaled_queries = queries[item, head] * scale
            keys_t = keys[item, head].transpose(0, 1).contiguous()
            head_values = values[item, head].contiguous()
            for first in range(0, count, rows):
                band = slice(first, min(count, first + rows))
                scores = score_buffer[:(band.stop - band.start) * count].view(-1, count)
                torch.mm(scaled_queries[band], keys_t, out=scores)
                torch.softmax(scores, dim=-1, out=scores)
                torch.mm(scores, head_values, out=attended[item, head, band])
    return attended


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (official names ``qkv``, ``proj``).

    ``fused`` (default) runs PyTorch's fused scaled-dot-product kernel; ``fused = False`` runs
    the official code's explicit ``softmax((q * scale) @ k^T) @ v`` in the same operation
    order, for agreement with the published reference to the last bits (bit-identical on AMD
    EPYC; a few 1e-6 with MKL's AVX-512 kernels on Intel Xeon, where the BLAS blocks the
    products differently).

    The explicit form works ``heads_per_chunk`` heads at a time (default 1; ``None`` = all heads
    at once, as the official code does). Each head's products and softmax are the same
    operations either way, so the output is bit-identical; one head's attention map at 672 px
    is 21 MB instead of 255 MB for ViT-B, which stays in cache and under glibc's mmap threshold
    (measured: 6.5 s -> 5.1 s per ViT-B slice on 2 CPU cores).

    Under autocast on a CPU the fast form is :func:`_products_in_low_precision` instead of the
    fused kernel (faster there, see its notes).
    """

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.fused = True
        self.heads_per_chunk: Optional[int] = 1
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, dim = tokens.shape
        head_dim = dim // self.num_heads
        # qkv: B x N x (3 * heads * head_dim) -> 3 x B x heads x N x head_dim
        qkv = self.qkv(tokens).reshape(batch, num_tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        if self.fused and tokens.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            attended = _products_in_low_precision(qkv[0], qkv[1], qkv[2])
        elif self.fused:
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # default scale 1/sqrt(head_dim)
        elif self.heads_per_chunk is None or torch.is_autocast_enabled(tokens.device.type):
            attended = self._explicit_attention_by_chunks(qkv, head_dim)
        else:
            attended = self._explicit_attention_in_workspace(qkv, head_dim)
        return self.proj(attended.transpose(1, 2).reshape(batch, num_tokens, dim))

    def _explicit_attention_by_chunks(self, qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
        """The official explicit attention, ``heads_per_chunk`` heads at a time (``None``: all),
        each chunk's attention map and output freshly allocated. Autocast runs here: its casts
        (e.g. softmax in float32) do not apply to ``out=`` calls."""
        step = self.heads_per_chunk or self.num_heads
        chunks = []
        for first in range(0, self.num_heads, step):
            q, k, v = (t[:, first:first + step] for t in qkv)
            weights = (q * head_dim**-0.5) @ k.transpose(-2, -1)
            chunks.append(weights.softmax(dim=-1) @ v)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

    def _explicit_attention_in_workspace(self, qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
        """The same operations as :meth:`_explicit_attention_by_chunks`, with one attention-map
        buffer reused by every chunk, the softmax in place and each chunk's output written
        straight into the result (bit-identical on the Intel Xeon measured, ViT-B at 672 px with
        1, 2 and 4 heads per chunk; a BLAS may block one item's product and a batch's
        differently, so the tests hold it to 64 float32 epsilons).

        Why: a freshly allocated map (ViT-B at 672 px: 21 MB per head) is mapped and zero-filled
        again by the kernel every time, and the softmax's and the concatenation's outputs once
        more; on 2 CPU cores that page-fault work took as long as the products themselves
        (measured: 190 -> 100 ms per layer's attention, ViT-B at 672 px).
        """
        queries, keys, values = qkv  # each B x heads x N x head_dim
        batch, heads, num_tokens, _ = queries.shape
        step = min(self.heads_per_chunk, heads)
        workspace = queries.new_empty(step * num_tokens * num_tokens)
        attended = queries.new_empty(batch, heads, num_tokens, head_dim)
        for item in range(batch):
            for first in range(0, heads, step):
                chunk = slice(first, min(heads, first + step))
                count = chunk.stop - chunk.start
                weights = workspace[:count * num_tokens * num_tokens].view(count, num_tokens, num_tokens)
                torch.bmm(queries[item, chunk] * head_dim**-0.5, keys[item, chunk].transpose(-2, -1), out=weights)
                torch.softmax(weights, dim=-1, out=weights)
                torch.bmm(weights, values[item, chunk], out=attended[item, chunk])
        return attended


class Mlp(nn.Module):
    """Two-layer GELU (exact erf form) feed-forward network: ``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(tokens)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward network of ViT-g/14: ``w12`` (both gates packed) -> silu(x1) * x2 -> ``w3``.

    ``hidden_dim`` is the already-rounded SwiGLU width (see :func:`swiglu_hidden_dim`).
    ``w12`` holds the silu branch in its first ``hidden_dim`` output rows, the linear branch
    in the second, as in the official checkpoints.
    """

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(tokens).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch (parameter ``gamma``, shape ``C``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale:

    ``x = x + ls1(attn(norm1(x)))``; ``x = x + ls2(mlp(norm2(x)))``.
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_layer: str, mlp_hidden_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim=dim, hidden_dim=mlp_hidden_dim)
        elif ffn_layer == "swiglufused":
            self.mlp = SwiGLUFFN(dim=dim, hidden_dim=swiglu_hidden_dim(mlp_hidden_dim))
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected 'mlp' or 'swiglufused'")
        self.ls2 = LayerScale(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.ls1(self.attn(self.norm1(tokens)))
        return tokens + self.ls2(self.mlp(self.norm2(tokens)))


def interpolate_patch_pos_embed(
    patch_pos_embed: torch.Tensor,
    grid_hw: Tuple[int, int],
    *,
    offset: float,
    antialias: bool,
) -> torch.Tensor:
    """Resample the trained patch position embeddings to another patch grid, as the official model does.

    Args:
        patch_pos_embed: ``1 x (M*M) x C`` trained embeddings of an ``M x M`` grid (no class token).
        grid_hw: target patch grid (rows, columns).
        offset: the official ``interpolate_offset``. Non-zero: bicubic with
            ``scale_factor = ((rows + offset) / M, (cols + offset) / M)`` -- the scale factor also
            sets the sampling positions, so the offset changes the values, not only the size.
            Zero: bicubic to ``size = grid_hw``.
        antialias: the official ``interpolate_antialias`` (passed to ``F.interpolate``).

    Returns:
        ``1 x (rows*cols) x C`` float32, row-major. The input is returned unchanged when
        ``grid_hw == (M, M)`` (the official shortcut).
    """
    num_patches, dim = patch_pos_embed.shape[1], patch_pos_embed.shape[2]
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"position embedding holds {num_patches} patches, not a square grid")
    rows, cols = grid_hw
    if (rows, cols) == (side, side):
        return patch_pos_embed
    grid = patch_pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        resized = F.interpolate(
            grid,
            scale_factor=(float(rows + offset) / side, float(cols + offset) / side),
            mode="bicubic",
            antialias=antialias,
        )
    else:
        resized = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=antialias)
    if tuple(resized.shape[-2:]) != (rows, cols):
        raise RuntimeError(
            f"position-embedding interpolation gave a {tuple(resized.shape[-2:])} grid instead of {(rows, cols)}"
        )
    return resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
