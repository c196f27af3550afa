"""Bounded memory for SAM's attention layers, with unchanged arithmetic.

segment-anything computes each global-attention layer of the image encoder for all heads at
once: for ViT-B at 1024 px that is a 12 x 4096 x 4096 float32 attention map (805 MB), held
two or three times over (relative-position sum, softmax). Here each layer works one head and
a band of query rows at a time, so every temporary stays at or under ``CHUNK_BYTES``:

- memory: those layers' peak drops from gigabytes to a few tens of megabytes; the windowed
  layers work the same way, several (window, head) pairs at a time (their all-at-once maps
  were the largest temporaries left: ~0.24 GB above the resident memory, the peak of a run);
- speed: blocks of that size stay below glibc's mmap threshold (at most 32 MiB), so the
  allocator reuses the same pages instead of mapping and zero-filling fresh ones for every
  chunk of every layer (measured on 2 CPU cores: that kernel work was a third of the
  encoder's time), and they stay in cache.

The operations per query row are exactly segment-anything's, in the same order (rows of
``q @ k^T``, the two relative-position terms added one after the other, softmax over the row,
``@ v``). The embedding is the same up to how the BLAS blocks the smaller matrix products:
bit-identical on AMD EPYC, differing in the last bits (1.7e-6 on values up to 3) with MKL's
AVX-512 kernels on Intel Xeon; a test holds it to 64 float32 epsilons.
"""
from __future__ import annotations

import types

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import get_rel_pos

__all__ = ["CHUNK_BYTES", "limit_global_attention_memory", "use_stock_global_attention"]

# Largest attention-map chunk: half of glibc's largest mmap threshold, so the heap keeps it.
CHUNK_BYTES = 16 * 2**20


def _attention_in_chunks(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` (x: ``[B, H, W, C]``) in bounded chunks."""
    batch, height, width, _ = x.shape
    tokens = height * width
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
    if self.use_rel_pos:
        rel_h_table = get_rel_pos(height, height, self.rel_pos_h)  # [H (query rows), H (key rows), C]
        rel_w_table = get_rel_pos(width, width, self.rel_pos_w)
    bytes_per_query_row = width * tokens * q.element_size()
    rows_per_chunk = max(1, min(height, self.chunk_bytes // bytes_per_query_row))
    attended = torch.empty_like(q)
    # Windowed layers: their batch is the windows, so a chunk is several (window, head) pairs.
    step = getattr(self, "slices_per_chunk", self.heads_per_chunk)
    for first_head in range(0, q.shape[0], step):
        heads = slice(first_head, first_head + step)
        q_heads = q[heads]
        if self.use_rel_pos:
            grid_q = q_heads.reshape(-1, height, width, q.shape[-1])
            rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h_table)
            rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w_table)
        for first_row in range(0, height, rows_per_chunk):
            rows = slice(first_row, min(height, first_row + rows_per_chunk))
            queries = slice(rows.start * width, rows.stop * width)
            attn = (q_heads[:, queries] * self.scale) @ k[heads].transpose(-2, -1)
            if self.use_rel_pos:
                grid = attn.view(-1, rows.stop - rows.start, width, height, width)
                # In place, one term after the other: the same sums as (attn + rel_h) + rel_w.
                grid.add_(rel_h[:, rows, :, :, None]).add_(rel_w[:, rows, :, None, :])
            attended[heads, queries] = attn.softmax(dim=-1) @ v[heads]
    attended = attended.view(batch, self.num_heads, height, width, -1)
    return self.proj(attended.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1))


def limit_global_attention_memory(sam: Sam, heads_per_chunk: int = 1, chunk_bytes: int = CHUNK_BYTES) -> Sam:
    """Make ``sam``'s global-attention layers work in chunks of at most ``heads_per_chunk``
    heads and about ``chunk_bytes`` of attention map (at least one query row) (in place)."""
    if heads_per_chunk < 1:
        raise ValueError("heads_per_chunk must be >= 1")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    for block in sam.image_encoder.blocks:
        block.attn.heads_per_chunk = heads_per_chunk
        block.attn.chunk_bytes = chunk_bytes
        if block.window_size:
            # A windowed layer attends within 14 x 14 windows, all windows and heads at once
            # (ViT-B at 1024 px: 25 windows x 12 heads, a 46 MB map held three times over, the
            # largest temporaries of a whole propagation): as many (window, head) pairs per chunk
            # as fit ``chunk_bytes``.
            window_tokens = block.window_size ** 2
            block.attn.slices_per_chunk = max(1, chunk_bytes // (window_tokens * window_tokens * 4))
        block.attn.forward = types.MethodType(_attention_in_chunks, block.attn)
    return sam


def use_stock_global_attention(sam: Sam) -> Sam:
    """Undo :func:`limit_global_attention_memory`: segment-anything's own all-heads attention."""
    for block in sam.image_encoder.blocks:
        block.attn.__dict__.pop("forward", None)
        block.attn.__dict__.pop("heads_per_chunk", None)
        block.attn.__dict__.pop("chunk_bytes", None)
        block.attn.__dict__.pop("slices_per_chunk", None)
    return sam
