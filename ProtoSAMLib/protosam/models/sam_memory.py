"""Bounded memory for SAM's global-attention layers, with unchanged arithmetic.

segment-anything computes each global-attention layer of the image encoder for all heads at
once: for ViT-B at 1024 px that is a 12 x 4096 x 4096 float32 attention map (805 MB), held
two or three times over (relative-position sum, softmax). Processing a few heads at a time
performs exactly the same operations per head, so the embedding is bit-identical, while the
peak memory of those layers drops by ``num_heads / heads_per_chunk``.
"""
from __future__ import annotations

import types

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

__all__ = ["limit_global_attention_memory", "use_stock_global_attention"]


def _attention_in_head_chunks(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` (x: ``[B, H, W, C]``), a few heads at a time."""
    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * self.num_heads, height * width, -1).unbind(0)
    outputs = []
    for start in range(0, q.shape[0], self.heads_per_chunk):
        chunk = slice(start, start + self.heads_per_chunk)
        attn = (q[chunk] * self.scale) @ k[chunk].transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q[chunk], self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
        outputs.append(attn.softmax(dim=-1) @ v[chunk])
    attended = torch.cat(outputs).view(batch, self.num_heads, height, width, -1)
    return self.proj(attended.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1))


def limit_global_attention_memory(sam: Sam, heads_per_chunk: int = 3) -> Sam:
    """Make ``sam``'s global-attention layers work ``heads_per_chunk`` heads at a time (in place)."""
    if heads_per_chunk < 1:
        raise ValueError("heads_per_chunk must be >= 1")
    for block in sam.image_encoder.blocks:
        if block.window_size == 0:  # windowed layers only see 14 x 14 tokens: nothing to gain
            block.attn.heads_per_chunk = heads_per_chunk
            block.attn.forward = types.MethodType(_attention_in_head_chunks, block.attn)
    return sam


def use_stock_global_attention(sam: Sam) -> Sam:
    """Undo :func:`limit_global_attention_memory`: segment-anything's own all-heads attention."""
    for block in sam.image_encoder.blocks:
        block.attn.__dict__.pop("forward", None)
        block.attn.__dict__.pop("heads_per_chunk", None)
    return sam
