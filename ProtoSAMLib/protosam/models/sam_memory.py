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
  encoder's time), and they stay in cache. For the same reason each layer reuses one
  attention-map buffer for all its chunks, and the qkv projection and the MLP run a band of
  tokens at a time into reused buffers (their 45-50 MB outputs had been mapped afresh in every
  block): ViT-B at 1024 px, 2 CPU cores, separate processes: 5.3 s and 660,000 page faults
  per embedding before, 4.6-4.8 s and 145,000 after, the same bits on that CPU.

The operations per query row are exactly segment-anything's, in the same order (rows of
``q @ k^T``, the two relative-position terms added one after the other, softmax over the row,
``@ v``). The embedding is the same up to how the BLAS blocks the smaller matrix products:
bit-identical on AMD EPYC, differing in the last bits (1.7e-6 on values up to 3) with MKL's
AVX-512 kernels on Intel Xeon; a test holds it to 64 float32 epsilons.

Under autocast (bf16, fp16) no float32 agreement is kept, and the attention keeps its
relative-position terms and softmax in float32 around products in the autocast type, in the
same bounded chunks. On CUDA that is PyTorch's fused ``scaled_dot_product_attention`` (scores in
float32 too), the
relative-position terms as its mask (see :func:`_fused_attention_in_chunks`; it replaced
explicit steps that stored the scores in bf16: ViT-B at 1024 px, 2 CPU cores, bf16: 1.96 ->
1.52 s per embedding, root-mean-square error 0.0128 -> 0.0123 on an embedding of
root-mean-square 1). On a CPU it is two bf16 products per chunk with the float32 steps between
them (:func:`_low_precision_products_in_chunks`), faster there than the fused kernel: ViT-B at
1024 px, AMD EPYC, 2 cores, bf16: 4.2-4.8 -> 3.65-3.76 s per embedding. Its scores are rounded
to bf16 once, as segment-anything's own attention rounds them under autocast: with random
weights the embedding's error against float32 is the same (relative root-mean-square 0.0078);
with peaked attention (the q and k weights times 3) 0.0166, as segment-anything's own encoder
under autocast, where the fused kernel gave 0.0144.

The token grid also runs in row-major (``[B, H, W, C]`` contiguous) memory: segment-anything's
patch embedding returns the convolution's output permuted, so every block's residual stream
kept the channels 4,096 floats apart; each residual add then gathered one operand across
strides and each layer norm copied its input first (ViT-B at 1024 px, 2 CPU cores: 11.5 ms per
residual add in the encoder against 0.7 ms contiguous). Only the memory layout changes, not a
value: the same embedding bit for bit, 10 % less time in float32 (4.3 -> 3.9 s per embedding)
and 20 % under bf16 autocast (2.4 -> 1.9 s).

Two more changes of where values are computed, not of what they are: the windowed blocks
project only the real tokens, not the windows' zero padding (whose keys and values are qkv's
bias: :func:`_windowed_block`), and the float32 qkv layouts of all blocks of one forward share
one buffer (:class:`_SharedQkvBuffer`). ViT-B at 1024 px, AMD EPYC, 2 threads, one process,
interleaved rounds: a windowed block 384 -> 366 ms in float32 and 203 -> 198 ms under bf16
autocast (medians of 12); per float32 embedding 150,000 -> 49,000 page faults and 196-225 ->
188-200 MB of peak above the resident memory (bf16: unchanged); the same embedding bit for bit
in both.
"""
from __future__ import annotations

import contextvars
import math
import types

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import get_rel_pos

__all__ = ["CHUNK_BYTES", "band_rows", "limit_global_attention_memory", "use_stock_global_attention"]

# Largest attention-map chunk: half of glibc's largest mmap threshold, so the heap keeps it.
CHUNK_BYTES = 16 * 2**20


class _SharedQkvBuffer:
    """The memory that the float32 qkv layouts of all blocks of one image-encoder forward share.

    Why: that layout is ViT-B's one temporary above glibc's largest mmap threshold (32 MiB):
    45 MB in a windowed block (4,900 tokens with the windows' padding), 38 MB in a global one.
    Allocated afresh in every block, it was mapped and zero-filled again for each of them (about
    100,000 of ViT-B's 150,000 page faults per float32 embedding, AMD EPYC); shared, it is
    mapped once per forward. Only where the memory comes from changes, not a value.
    """

    def __init__(self) -> None:
        self._memory = None

    def take(self, like: torch.Tensor, shape) -> torch.Tensor:
        """An uninitialised ``shape`` tensor of ``like``'s type and device, the same memory for
        every block while it fits."""
        numel = math.prod(shape)
        memory = self._memory
        if memory is None or memory.numel() < numel or memory.dtype != like.dtype or memory.device != like.device:
            self._memory = None  # let the old memory go before the larger one is allocated
            self._memory = memory = like.new_empty(numel)
        return memory[:numel].view(shape)


# The shared buffer of the image-encoder forward running in this thread (or task), None outside
# one: a context variable, so that two threads running one model never share it.
_SHARED_QKV: contextvars.ContextVar = contextvars.ContextVar("protosam_sam_shared_qkv", default=None)


def _qkv_layout(like: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised ``shape`` tensor like ``like`` for a block's float32 qkv layout: from the
    running forward's :class:`_SharedQkvBuffer` inside one, freshly allocated outside."""
    shared = _SHARED_QKV.get()
    return like.new_empty(shape) if shared is None else shared.take(like, shape)


def _autocast_enabled(tensor: torch.Tensor) -> bool:
    """Whether autocast is on for ``tensor``'s device type; False for a type autocast does not
    know (``meta``, where benchmarks/flop_budget.py counts the encoder's work), which
    ``torch.is_autocast_enabled`` refuses."""
    try:
        return torch.is_autocast_enabled(tensor.device.type)
    except RuntimeError:
        return False


def _attention_in_chunks(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` (x: ``[B, H, W, C]``) in bounded chunks."""
    batch, height, width, _ = x.shape
    q, k, v = _qkv_by_heads(self, x).unbind(0)
    attended = _attend_by_heads(self, q, k, v, height, width)
    attended = attended.view(batch, self.num_heads, height, width, -1)
    return self.proj(attended.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1))


def _attend_by_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The attention of ``[B * heads, height * width, head_dim]`` queries, keys and values (with
    segment-anything's relative positions over a ``height x width`` grid) in bounded chunks:
    ``[B * heads, tokens, head_dim]``, in the autocast type under autocast."""
    tokens = height * width
    rel_h_table = rel_w_table = None
    if self.use_rel_pos:
        rel_h_table = get_rel_pos(height, height, self.rel_pos_h)  # [H (query rows), H (key rows), C]
        rel_w_table = get_rel_pos(width, width, self.rel_pos_w)
    if _autocast_enabled(q):
        if q.device.type == "cpu":
            return _low_precision_products_in_chunks(self, q, k, v, height, width, rel_h_table, rel_w_table)
        return _fused_attention_in_chunks(self, q, k, v, height, width, rel_h_table, rel_w_table)
    bytes_per_query_row = width * tokens * q.element_size()
    rows_per_chunk = max(1, min(height, self.chunk_bytes // bytes_per_query_row))
    attended = torch.empty_like(q)
    # Windowed layers: their batch is the windows, so a chunk is several (window, head) pairs.
    step = getattr(self, "slices_per_chunk", self.heads_per_chunk)
    # One attention-map buffer for every chunk of the layer, the softmax in place, each chunk's
    # output written straight into ``attended``: the same operations on the same values (the same
    # bits), without a fresh map per chunk that the kernel maps and zero-fills again, nor the
    # softmax's and the product's own outputs (measured on 2 CPU cores, ViT-B, one process each
    # way: 5.9 -> 5.3 s per embedding). Autocast keeps the allocating form: its casts do not
    # apply to ``out=`` calls.
    in_workspace = not _autocast_enabled(q)
    if in_workspace:
        workspace = q.new_empty(min(step, q.shape[0]) * rows_per_chunk * width * tokens)
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
            scaled_queries = q_heads[:, queries] * self.scale
            if in_workspace:
                attn = workspace[:scaled_queries.shape[0] * scaled_queries.shape[1] * tokens]
                attn = attn.view(scaled_queries.shape[0], scaled_queries.shape[1], tokens)
                torch.bmm(scaled_queries, k[heads].transpose(-2, -1), out=attn)
            else:
                attn = scaled_queries @ k[heads].transpose(-2, -1)
            if self.use_rel_pos:
                grid = attn.view(-1, rows.stop - rows.start, width, height, width)
                # In place, one term after the other: the same sums as (attn + rel_h) + rel_w.
                grid.add_(rel_h[:, rows, :, :, None]).add_(rel_w[:, rows, :, None, :])
            if in_workspace:
                torch.softmax(attn, dim=-1, out=attn)
                torch.bmm(attn, v[heads], out=attended[heads, queries])
            else:
                attended[heads, queries] = attn.softmax(dim=-1) @ v[heads]
    return attended


def _fused_attention_in_chunks(self, q, k, v, height, width, rel_h_table, rel_w_table) -> torch.Tensor:
    """The attention under autocast (bf16/fp16): PyTorch's fused ``scaled_dot_product_attention``
    with the two relative-position terms as its additive mask, in chunks of (window, head) pairs
    and query rows whose mask stays within half of ``chunk_bytes``. Returns ``[B * heads, tokens,
    head_dim]`` in the autocast type.

    Why not the explicit steps as in float32: there the attention map itself was stored in
    bf16, so every score lost its low bits before the softmax, and the broadcast adds and the
    softmax over bf16 maps were slower than in float32 (ViT-B at 1024 px, 2 CPU cores: half of a
    bf16 embedding's time went to the four global layers' attention). The fused kernel keeps
    the scores and the softmax in float32 inside (online softmax, no stored map). Measured on one
    global layer's head (64 x 64 tokens): 24 -> 11 ms, root-mean-square error against float32
    3.1e-4 -> 1.5e-4. Float32 keeps the explicit steps (the reference's operations to the bit).
    """
    tokens = height * width
    attended = torch.empty_like(q)
    # Half the bytes: a mask of 16 query rows (8 MiB at 1024 px) ran faster than one of 32.
    rows_per_chunk = max(1, min(height, (self.chunk_bytes // 2) // (width * tokens * q.element_size())))
    step = getattr(self, "slices_per_chunk", self.heads_per_chunk)
    for first in range(0, q.shape[0], step):
        heads = slice(first, first + step)
        if rel_h_table is not None:
            grid_q = q[heads].reshape(-1, height, width, q.shape[-1])
            rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h_table)
            rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w_table)
        for first_row in range(0, height, rows_per_chunk):
            rows = slice(first_row, min(height, first_row + rows_per_chunk))
            queries = slice(rows.start * width, rows.stop * width)
            mask = None
            if rel_h_table is not None:
                # Written into a row-major buffer: the broadcast sum may otherwise take a layout
                # that a view cannot flatten.
                count = rows.stop - rows.start
                mask = q.new_empty(rel_h.shape[0], count, width, height, width)
                torch.add(rel_h[:, rows, :, :, None], rel_w[:, rows, :, None, :], out=mask)
                mask = mask.view(rel_h.shape[0], count * width, tokens)
            attended[heads, queries] = torch.nn.functional.scaled_dot_product_attention(
                q[heads, queries], k[heads], v[heads], attn_mask=mask, scale=self.scale)
    return attended


def _low_precision_products_in_chunks(self, q, k, v, height, width, rel_h_table, rel_w_table) -> torch.Tensor:
    """The attention under autocast on a CPU: both matrix products in the autocast type (bf16),
    the scores' scaling, the relative-position terms and the softmax in float32. Returns
    ``[B * heads, tokens, head_dim]`` in the autocast type.

    Why not the fused kernel there: PyTorch's CPU ``scaled_dot_product_attention`` ran SAM's
    global layers at about 70 GFLOP/s on the AMD EPYC (2 cores, AVX512-BF16), where bf16 matrix
    products of the same shapes reach 370-410; and its mask, the two relative-position terms
    summed, had to be written out in bf16 for every chunk. Here each chunk's scores come from one
    bf16 product of the scaled queries (float32 accumulation, one rounding to bf16), are widened
    into a float32 buffer, get the height term and then the width term there (both terms
    computed and kept in float32), go through the softmax there, and are rounded once to bf16
    for the product with the values. Measured on that CPU, one process,
    the two forms one after the other: a global layer's attention (12 heads, 64 x 64 tokens)
    0.40 -> 0.28 s, a windowed layer's (300 window-head pairs) 52 -> 31 ms; root-mean-square
    error against float32 3.6e-4 -> 3.2e-4 (global) and 1.05e-3 -> 1.00e-3 (windowed) with
    scores of standard deviation 1, as the float32 terms make up for the rounded scores; with
    peaked scores (standard deviation 3-12) the rounding of the scores shows: 1.6-1.7 times the
    fused kernel's error (the module's notes give the whole embedding's). CUDA keeps the fused
    kernel (flash attention).
    """
    tokens = height * width
    attended = torch.empty_like(q)
    # Per score: bf16 (product, then probabilities) + float32 (scaled scores, softmax) = 6 bytes;
    # a float32 block of 8 MiB (8 query rows of a global layer at 1024 px, 54 windowed pairs)
    # ran fastest of 1-16 rows and 25-300 pairs.
    scores_per_chunk = max(1, (self.chunk_bytes // 2) // 4)
    step = max(1, min(getattr(self, "slices_per_chunk", self.heads_per_chunk), scores_per_chunk // (tokens * tokens)))
    rows_per_chunk = max(1, min(height, scores_per_chunk // (step * width * tokens)))
    products = q.new_empty(step * rows_per_chunk * width * tokens)
    scores = products.new_empty(products.shape, dtype=torch.float32)
    for first in range(0, q.shape[0], step):
        heads = slice(first, min(q.shape[0], first + step))
        count_heads = heads.stop - heads.start
        # q, k and v are strided views into the qkv projection's output (and k is used
        # transposed): given as they are, every row band's product copied them again (ViT-B at
        # 1024 px: 0.2 s per bf16 embedding); copied once per chunk here. The queries are
        # scaled before the product, as segment-anything scales them (ViT-B and ViT-L have 64
        # channels a head: their scale 1/8 is a power of two, the same bits as scaling the scores).
        queries_all = q[heads].contiguous()
        scaled_queries = queries_all * self.scale
        keys_t = k[heads].transpose(-2, -1).contiguous()
        values = v[heads].contiguous()
        if rel_h_table is not None:
            # The terms in float32 (the bf16 einsum would round each to 8 bits first).
            with torch.autocast(q.device.type, enabled=False):
                grid_q = queries_all.view(-1, height, width, q.shape[-1]).float()
                rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h_table.float())
                rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w_table.float())
        for first_row in range(0, height, rows_per_chunk):
            rows = slice(first_row, min(height, first_row + rows_per_chunk))
            queries = slice(rows.start * width, rows.stop * width)
            count = rows.stop - rows.start
            product = products[:count_heads * count * width * tokens].view(count_heads, count * width, tokens)
            score = scores[:product.numel()].view(product.shape)
            torch.bmm(scaled_queries[:, queries], keys_t, out=product)
            # The scores widened to float32 in place, then + rel_h, then + rel_w (the stock
            # order of the sums), each term added in place: one pass fewer than adding the
            # bf16 scores to a term, which widened them into a temporary first (ViT-B at 1024 px,
            # these steps for one chunk of 8 query rows: 0.57 -> 0.30 ms, AMD EPYC, 2 threads).
            score.copy_(product)
            if rel_h_table is not None:
                grid = score.view(count_heads, count, width, height, width)
                grid.add_(rel_h[:, rows, :, :, None]).add_(rel_w[:, rows, :, None, :])
            torch.softmax(score, dim=-1, out=score)
            product.copy_(score)
            torch.bmm(product, values, out=attended[heads, queries])
    return attended


def band_rows(count: int, most: int) -> int:
    """Rows per band of a row-banded matrix product: at most ``most`` (at least 1), and a whole
    multiple of 512 where that fits. Why 512: with MKL on 2 threads, bands of whole multiples of
    512 rows gave the same bits as the one product over all rows; other heights changed the
    last bits (e.g. 1,365 rows: 4e-7 on outputs up to ~5)."""
    rows = max(1, min(count, most))
    return rows - rows % 512 if rows >= 512 and rows < count else rows


def _qkv_by_heads(self, x: torch.Tensor) -> torch.Tensor:
    """``self.qkv(x)`` laid out ``[3, batch * heads, tokens, head_dim]`` (segment-anything's
    reshape and permute), computed a band of tokens at a time into that layout: one large
    output instead of the product's and the permuted copy's (ViT-B windowed layers: 45 MB each,
    mapped and zero-filled afresh per layer). The same products row by row."""
    batch, height, width, channels = x.shape
    tokens = height * width
    heads = self.num_heads
    if _autocast_enabled(x) or self.qkv.bias is None:
        qkv = self.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.reshape(3, batch * heads, tokens, -1)
    flat = x.reshape(batch * tokens, channels)
    width_out = self.qkv.out_features
    laid_out = _qkv_layout(flat, (3, batch, heads, tokens, width_out // (3 * heads)))
    rows_per_band = band_rows(batch * tokens, self.chunk_bytes // (width_out * flat.element_size()))
    band_buffer = flat.new_empty(rows_per_band, width_out)
    for first in range(0, batch * tokens, rows_per_band):
        rows = slice(first, min(batch * tokens, first + rows_per_band))
        band = band_buffer[:rows.stop - rows.start]
        torch.addmm(self.qkv.bias, flat[rows], self.qkv.weight.t(), out=band)
        band = band.view(band.shape[0], 3, heads, -1)
        # A band may span two items of the batch (windows): copy each item's part.
        for item in range(rows.start // tokens, (rows.stop - 1) // tokens + 1):
            start, stop = max(rows.start, item * tokens), min(rows.stop, (item + 1) * tokens)
            laid_out[:, item, :, start - item * tokens:stop - item * tokens] = (
                band[start - rows.start:stop - rows.start].permute(1, 2, 0, 3))
    return laid_out.view(3, batch * heads, tokens, -1)


def _mlp_in_chunks(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``MLPBlock.forward`` (``lin2(GELU(lin1(x)))``) a band of tokens at a time.

    Why: for ViT-B at 1024 px the hidden activations are 4,096 x 3,072 floats (50 MB), above
    glibc's largest mmap threshold, so the product's and the GELU's outputs were mapped and
    zero-filled afresh in every block (measured: two thirds of an embedding's page faults). Here
    one hidden buffer of at most ``chunk_bytes`` serves every band, the GELU runs in place and
    each band's output goes straight into the result: the same products row by row, the same
    bits on the CPUs measured (a test holds them to 64 float32 epsilons of the stock block).
    """
    lin1, lin2 = self.lin1, self.lin2
    if (_autocast_enabled(x) or lin1.bias is None or lin2.bias is None
            or type(self.act) is not torch.nn.GELU or self.act.approximate != "none"):
        return lin2(self.act(lin1(x)))
    tokens = x.reshape(-1, x.shape[-1])
    count = tokens.shape[0]
    rows_per_chunk = band_rows(count, self.chunk_bytes // (lin1.out_features * tokens.element_size()))
    hidden = tokens.new_empty(rows_per_chunk, lin1.out_features)
    out = tokens.new_empty(count, lin2.out_features)
    for first in range(0, count, rows_per_chunk):
        rows = slice(first, min(count, first + rows_per_chunk))
        band = hidden[:rows.stop - rows.start]
        torch.addmm(lin1.bias, tokens[rows], lin1.weight.t(), out=band)
        torch.ops.aten.gelu_(band)
        torch.addmm(lin2.bias, band, lin2.weight.t(), out=out[rows])
    return out.view(*x.shape[:-1], lin2.out_features)


def _windowed_block(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Block.forward`` for a windowed block, without the work on the
    windows' padding that nothing reads.

    There the normalised tokens are padded with zeros to whole windows (a 64 x 64 grid to 70 x
    70 in 14 x 14 windows: 4,900 tokens for 4,096), and the qkv projection and the output
    projection run on all of them; the padded tokens' outputs are then cropped away. Only their
    keys and values are read (by the edge windows' queries), and those are the projection of
    zeros: exactly qkv's bias. Here both projections run on the real tokens only (19 % fewer
    rows, ViT-B: about 30 of 972 GFLOP per embedding), the padded positions of the windows get
    the bias, and the padding and cropping copies go: the same values for every real token, up
    to how the BLAS blocks a product's rows (bit for bit on the AMD EPYC, see the module's notes).
    """
    shortcut = x
    x = _window_attention_on_real_tokens(self.attn, self.norm1(x), self.window_size)
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


def _window_attention_on_real_tokens(self, x: torch.Tensor, window: int) -> torch.Tensor:
    """``window_unpartition(attn(window_partition(x)))`` for ``x`` ``[B, H, W, C]`` (see
    :func:`_windowed_block`)."""
    batch, height, width, channels = x.shape
    window_rows, window_cols = -(-height // window), -(-width // window)
    heads = self.num_heads
    head_dim = channels // heads
    layout = (3, batch, window_rows, window_cols, heads, window, window, head_dim)
    in_bands = not (_autocast_enabled(x) or self.qkv.bias is None)
    if in_bands:
        laid_out = _qkv_layout(x, layout)
    else:
        # Under autocast the projection's type is autocast's choice; its output and this
        # layout stay below glibc's mmap threshold (ViT-B in bf16: 19 and 23 MB).
        qkv = self.qkv(x)
        laid_out = qkv.new_empty(layout)
    # [B, window row, window column, row in window, column in window, 3, heads, head_dim]
    as_windows = laid_out.permute(1, 2, 3, 5, 6, 0, 4, 7)
    padding = 0.0 if self.qkv.bias is None else self.qkv.bias.to(laid_out.dtype).view(3, heads, head_dim)
    if height % window:
        as_windows[:, -1, :, height % window:] = padding
    if width % window:
        as_windows[:, :, -1, :, width % window:] = padding
    if in_bands:
        # A band of whole image rows at a time (ViT-B: 24 rows, 1,536 tokens, a multiple of 512
        # as ``band_rows`` keeps them) into one reused band buffer, then into the windows.
        width_out = self.qkv.out_features
        most = band_rows(height * width, self.chunk_bytes // (width_out * x.element_size()))
        rows_per_band = max(1, most // width)
        band_buffer = x.new_empty(rows_per_band * width, width_out)
        for item in range(batch):
            tokens = x[item].reshape(height * width, channels)
            for first_row in range(0, height, rows_per_band):
                last_row = min(height, first_row + rows_per_band)
                band = band_buffer[:(last_row - first_row) * width]
                torch.addmm(self.qkv.bias, tokens[first_row * width:last_row * width], self.qkv.weight.t(), out=band)
                _copy_between_grid_and_windows(band.view(1, last_row - first_row, width, 3, heads, head_dim),
                                               as_windows[item:item + 1], window, into_windows=True, first_row=first_row)
    else:
        _copy_between_grid_and_windows(qkv.view(batch, height, width, 3, heads, head_dim), as_windows, window,
                                       into_windows=True)
    q, k, v = laid_out.view(3, batch * window_rows * window_cols * heads, window * window, head_dim).unbind(0)
    attended = _attend_by_heads(self, q, k, v, window, window)
    by_windows = attended.view(batch, window_rows, window_cols, heads, window, window, head_dim).permute(0, 1, 2, 4, 5, 3, 6)
    by_tokens = attended.new_empty(batch, height, width, heads, head_dim)
    _copy_between_grid_and_windows(by_tokens, by_windows, window, into_windows=False)
    return self.proj(by_tokens.view(batch, height, width, channels))


def _window_runs(start: int, stop: int, window: int):
    """The grid positions ``start <= i < stop`` (along one axis) by windows: ``(window index
    slice, slice of the positions counted from start, windows, span, offset in the window)``,
    whole windows together."""
    runs, position = [], start
    while position < stop:
        index, offset = divmod(position, window)
        if offset == 0 and stop - position >= window:
            count = (stop - position) // window
            runs.append((slice(index, index + count), slice(position - start, position - start + count * window),
                         count, window, 0))
            position += count * window
        else:
            end = min(stop, (index + 1) * window)
            runs.append((slice(index, index + 1), slice(position - start, end - start), 1, end - position, offset))
            position = end
    return runs


def _copy_between_grid_and_windows(grid: torch.Tensor, windows: torch.Tensor, window: int, *, into_windows: bool,
                                   first_row: int = 0) -> None:
    """Copy the real tokens between ``grid`` ``[B, rows, W, ...]`` (the image rows from
    ``first_row`` on) and ``windows`` ``[B, window rows, window columns, window, window, ...]``
    (a view whose last windows may hold padding): whole windows and cut ones, a few strided
    copies."""
    batch, rows, width = grid.shape[:3]
    rest = grid.shape[3:]
    for window_rows, grid_rows, row_count, row_span, row_offset in _window_runs(first_row, first_row + rows, window):
        for window_cols, grid_cols, col_count, col_span, col_offset in _window_runs(0, width, window):
            grid_part = grid[:, grid_rows, grid_cols].view(batch, row_count, row_span, col_count, col_span, *rest)
            window_part = windows[:, window_rows, window_cols, row_offset:row_offset + row_span,
                                  col_offset:col_offset + col_span].transpose(2, 3)
            if into_windows:
                window_part.copy_(grid_part)
            else:
                grid_part.copy_(window_part)


def _encoder_sharing_qkv_buffer(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``ImageEncoderViT.forward`` with one :class:`_SharedQkvBuffer` for all
    its blocks."""
    token = _SHARED_QKV.set(_SharedQkvBuffer())
    try:
        return type(self).forward(self, x)
    finally:
        _SHARED_QKV.reset(token)


def _patch_tokens_row_major(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``PatchEmbed.forward`` (``proj(x).permute(0, 2, 3, 1)``) with the
    ``[B, H, W, C]`` tokens copied into row-major memory once, so the whole residual stream
    after it is contiguous (the permuted view made every block's elementwise work strided)."""
    return self.proj(x).permute(0, 2, 3, 1).contiguous()


def _neck_from_channels_first(self, x: torch.Tensor) -> torch.Tensor:
    """The neck's first convolution on a contiguous ``[B, C, H, W]`` input: with row-major tokens
    ``x.permute(0, 3, 1, 2)`` arrives channels-last, which may pick another convolution kernel
    (other rounding); this gives the convolution the layout the stock encoder gives it."""
    return torch.nn.Conv2d.forward(self, x.contiguous())


def limit_global_attention_memory(sam: Sam, heads_per_chunk: int = 1, chunk_bytes: int = CHUNK_BYTES) -> Sam:
    """Make ``sam``'s global-attention layers work in chunks of at most ``heads_per_chunk``
    heads and about ``chunk_bytes`` of attention map (at least one query row), its windowed
    layers in (window, head) chunks of the same bound, every block's qkv projection and MLP
    in bands of tokens whose outputs stay within ``chunk_bytes`` (in place), the qkv layouts of
    all blocks of one forward in one buffer, and the token grid in row-major memory (the same
    values, see the module's notes)."""
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
        if block.window_size:
            block.forward = types.MethodType(_windowed_block, block)
        block.mlp.chunk_bytes = chunk_bytes
        block.mlp.forward = types.MethodType(_mlp_in_chunks, block.mlp)
    encoder = sam.image_encoder
    encoder.forward = types.MethodType(_encoder_sharing_qkv_buffer, encoder)
    encoder.patch_embed.forward = types.MethodType(_patch_tokens_row_major, encoder.patch_embed)
    first_neck_layer = encoder.neck[0]
    if type(first_neck_layer) is torch.nn.Conv2d:
        first_neck_layer.forward = types.MethodType(_neck_from_channels_first, first_neck_layer)
    return sam


def use_stock_global_attention(sam: Sam) -> Sam:
    """Undo :func:`limit_global_attention_memory`: segment-anything's own all-heads attention,
    qkv projection and MLP, and its permuted token layout."""
    sam.image_encoder.__dict__.pop("forward", None)
    sam.image_encoder.patch_embed.__dict__.pop("forward", None)
    sam.image_encoder.neck[0].__dict__.pop("forward", None)
    for block in sam.image_encoder.blocks:
        block.__dict__.pop("forward", None)
        block.attn.__dict__.pop("forward", None)
        block.attn.__dict__.pop("heads_per_chunk", None)
        block.attn.__dict__.pop("chunk_bytes", None)
        block.attn.__dict__.pop("slices_per_chunk", None)
        block.mlp.__dict__.pop("forward", None)
        block.mlp.__dict__.pop("chunk_bytes", None)
    return sam
