"""SAM's mask decoder for many single prompt sets on one image, sharing the image-side work and
running the image-sized products as a few large matrix products.

The published reference decodes each connected component separately (batch 1), thousands of
prompt sets per volume. segment-anything's decoder spends most of such a call on a CPU in work
that is large only because of the 64 x 64 image tokens, done through small or badly shaped
kernels:

- the output upscaling: two stride-2, 2 x 2 transposed convolutions (and SAM's hand-written
  ``LayerNorm2d``) on the image grid, about half of a ViT-B call;
- the attention between the few prompt tokens and the 4,096 image tokens: projections of all
  image tokens, per-head copies of them, and softmaxes over rows of a few entries;
- terms that depend only on the image, recomputed for every prompt set.

:class:`SharedImageDecoder` computes the image-only terms once per embedding, and evaluates the
rest as the same mathematical function with the work ordered for a CPU:

- a stride-2 transposed convolution with a 2 x 2 kernel touches each output pixel from exactly
  one input pixel, so it is one matrix product of the token-major image tokens with the kernel
  laid out as ``[C_in, 2 * 2 * C_out]``; ``LayerNorm2d`` is a layer norm over the channels of
  each pixel; the pixels are put back in image order only for the final masks;
- an attention whose keys (or queries) are the T prompt tokens is folded through its linear
  maps: the scores of all heads come from one product with the image tokens (``[N, C] x
  [C, heads * T]``), and the values times the output projection from another, instead of
  projecting all N image tokens per head. ``softmax`` ignores a constant added to a row of
  scores, so the key bias, which adds one, is left out there.

The function is the same; the float32 rounding is not, because sums are taken in another order
(and the rows of a softmax sum to 1 only up to rounding, where the value bias is added once).
A test bounds the difference to segment-anything's ``MaskDecoder`` on fixed inputs, and
another requires identical masks on tiny-model test volumes; the reference flow of the
benchmarks keeps segment-anything's own decoder (``SamPredictor``).
Only batch-1 calls without a mask prompt take this path (the reference's case).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import Attention

from .sam_memory import band_rows

__all__ = ["SharedImageDecoder", "StockMaskDecoder"]


@dataclass
class _ImageTerms:
    """Prompt-independent decoder inputs for one ``[1, C, h, w]`` image embedding (token-major
    ``[h * w, C]`` matrices)."""

    embedding: torch.Tensor  # the embedding these terms belong to (identity check)
    keys: torch.Tensor  # image tokens (embedding + no-mask embedding)
    key_pe: torch.Tensor  # their positional encoding
    # Layer 0's projections of the image tokens, laid out by head (c = internal // heads):
    first_t2i_keys: torch.Tensor  # token-to-image: k_proj(keys + pe)   [heads, c, hw]
    first_t2i_values: torch.Tensor  # token-to-image: v_proj(keys)      [heads, hw, c]
    first_i2t_queries: torch.Tensor  # image-to-token: q_proj(keys + pe) [heads, c, hw]


def _heads(attention: Attention) -> Tuple[int, int]:
    """(number of heads, channels per head) of a segment-anything ``Attention``."""
    return attention.num_heads, attention.internal_dim // attention.num_heads


def _by_heads(attention: Attention, projected: torch.Tensor) -> torch.Tensor:
    """Projected image tokens ``[N, heads * c]`` -> ``[heads, N, c]`` (contiguous): each head's
    channels as one matrix, for products per head."""
    heads, channels = _heads(attention)
    return projected.view(-1, heads, channels).transpose(0, 1).contiguous()


def _tokens_attend_image(attention: Attention, tokens: torch.Tensor, image_keys: torch.Tensor,
                         image_values: torch.Tensor) -> torch.Tensor:
    """``attention(q=tokens, k=image_keys, v=image_values)`` for ``[T, C]`` tokens and ``[N, C]``
    image tokens, without projecting the image tokens: head h's scores are
    ``q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + q_h . b_k,h``, the last term the same for
    all of a row's N scores (left out: softmax ignores it), and its output
    ``P_h (X W_v,h^T + b_v,h) = (P_h X) W_v,h^T + b_v,h`` (a row of ``P_h`` sums to 1).
    Returns ``[T, C]``."""
    heads, channels = _heads(attention)
    count = tokens.shape[0]
    queries = attention.q_proj(tokens).view(count, heads, channels).transpose(0, 1)  # [H, T, c]
    key_weight = attention.k_proj.weight.view(heads, channels, -1)  # [H, c, C]
    folded = torch.bmm(queries, key_weight).reshape(heads * count, -1) / math.sqrt(channels)
    weights = torch.softmax(folded @ image_keys.T, dim=-1)  # [H * T, N]
    mixed = (weights @ image_values).view(heads, count, -1)  # [H, T, C]
    value_weight = attention.v_proj.weight.view(heads, channels, -1)
    out = torch.baddbmm(attention.v_proj.bias.view(heads, 1, channels), mixed, value_weight.transpose(1, 2))
    return attention.out_proj(out.transpose(0, 1).reshape(count, heads * channels))


def _tokens_attend_projected_image(attention: Attention, tokens: torch.Tensor, image_keys: torch.Tensor,
                                   image_values: torch.Tensor) -> torch.Tensor:
    """As :func:`_tokens_attend_image` where the image tokens' key and value projections are
    already computed by head (layer 0's image terms: keys ``[H, c, N]``, values ``[H, N, c]``),
    each head's scores and output one product of its own channels."""
    heads, channels = _heads(attention)
    count = tokens.shape[0]
    queries = attention.q_proj(tokens).view(count, heads, channels).transpose(0, 1)  # [H, T, c]
    weights = torch.softmax(torch.bmm(queries / math.sqrt(channels), image_keys), dim=-1)  # [H, T, N]
    out = torch.bmm(weights, image_values)  # [H, T, c]
    return attention.out_proj(out.transpose(0, 1).reshape(count, heads * channels))


def _image_attends_tokens(attention: Attention, image_scores: torch.Tensor, tokens_values: torch.Tensor,
                          token_count: int) -> torch.Tensor:
    """The image-to-token attention's output ``[N, C]`` from its scores, laid out ``[H * T, N]``:
    softmax over each head's T tokens (a reduction across rows, which the CPU kernel runs along
    the N-long rows; a softmax over rows of T entries took 15 times longer), then ``out_proj``
    folded into the values (``sum_h P_h V_h W_o,h^T + b_o``, one product with ``[H * T, C]``)."""
    heads, channels = _heads(attention)
    weights = torch.softmax(image_scores.view(heads, token_count, -1), dim=1).view(heads * token_count, -1)
    values = attention.v_proj(tokens_values).view(token_count, heads, channels).transpose(0, 1)  # [H, T, c]
    out_weight = attention.out_proj.weight.view(-1, heads, channels).permute(1, 2, 0)  # [H, c, C]
    folded = torch.bmm(values, out_weight).reshape(heads * token_count, -1)
    return torch.addmm(attention.out_proj.bias, weights.T, folded)


def _image_token_scores(attention: Attention, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Scores ``[H * T, N]`` of ``attention(q=image, k=tokens, ...)``: ``(W_q,h x + b_q,h) . k_h``
    = ``x . (W_q,h^T k_h) + b_q,h . k_h``, without projecting the N image tokens."""
    heads, channels = _heads(attention)
    count = tokens.shape[0]
    keys = attention.k_proj(tokens).view(count, heads, channels).transpose(0, 1)  # [H, T, c]
    query_weight = attention.q_proj.weight.view(heads, channels, -1)  # [H, c, C]
    folded = torch.bmm(keys, query_weight).reshape(heads * count, -1) / math.sqrt(channels)
    constant = (keys * attention.q_proj.bias.view(heads, 1, channels)).sum(-1).reshape(-1, 1) / math.sqrt(channels)
    return torch.addmm(constant, folded, image.T)


class SharedImageDecoder:
    """Batch-1 SAM decoding that computes the image-only terms once per embedding.

    ``dtype``: the type the decoder computes in (default float32, ``sam``'s own decoder). With
    ``torch.bfloat16`` it decodes with a bfloat16 copy of ``sam``'s mask decoder: the image-only
    terms are computed in float32 and rounded once, every per-prompt-set product, softmax and
    layer norm then takes and gives bfloat16 (the softmaxes and layer norms reduce in float32
    inside), and the logits and scores come back as float32. Why: on a CPU the decoder's
    products are small and its image-sized steps stream megabytes through memory; in bfloat16
    a prompt set takes about two thirds of the time (ViT-B, AMD EPYC with AVX512-BF16, 2
    threads, interleaved rounds in one process: 20.8 -> 13.8 ms), at bfloat16's error (see
    docs/performance.md for the measured errors and the bounds they are held to).
    """

    def __init__(self, sam: Sam, dtype: torch.dtype = torch.float32):
        self.sam = sam
        self.dtype = dtype
        # The decoder whose weights the per-prompt-set steps use.
        self.mask_decoder = sam.mask_decoder if dtype == torch.float32 else copy.deepcopy(sam.mask_decoder).to(dtype)
        self._terms: Optional[_ImageTerms] = None

    def _image_terms(self, embedding: torch.Tensor) -> _ImageTerms:
        if self._terms is not None and self._terms.embedding is embedding:
            return self._terms
        terms = self._image_terms_float32(embedding)
        if self.dtype != torch.float32:
            terms = dataclasses.replace(terms, **{
                field.name: getattr(terms, field.name).to(self.dtype)
                for field in dataclasses.fields(terms) if field.name != "embedding"})
        self._terms = terms
        return terms

    def _image_terms_float32(self, embedding: torch.Tensor) -> _ImageTerms:
        """The image-only terms with ``sam``'s own (float32) decoder."""
        decoder, prompt_encoder = self.sam.mask_decoder, self.sam.prompt_encoder
        # The "no mask" dense embedding, as the prompt encoder builds it for masks=None.
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        keys = (embedding + dense)[0].flatten(1).T.contiguous()  # [hw, C]
        key_pe = prompt_encoder.get_dense_pe()[0].flatten(1).T.contiguous()
        first = decoder.transformer.layers[0]
        keys_with_pe = keys + key_pe
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        return _ImageTerms(
            embedding=embedding,
            keys=keys,
            key_pe=key_pe,
            first_t2i_keys=_by_heads(t2i, t2i.k_proj(keys_with_pe)).transpose(1, 2).contiguous(),
            first_t2i_values=_by_heads(t2i, t2i.v_proj(keys)),
            first_i2t_queries=_by_heads(i2t, i2t.q_proj(keys_with_pe)).transpose(1, 2).contiguous(),
        )

    @torch.inference_mode()
    def decode(
        self, embedding: torch.Tensor, sparse: torch.Tensor, *, multimask_output: bool,
        pick_best_score: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``MaskDecoder(...)`` for one prompt set without a mask prompt.

        Args:
            embedding: ``[1, C, h, w]`` image embedding (reuse the same tensor object across
                calls to share its terms).
            sparse: ``[1, N, C]`` sparse prompt embeddings from the prompt encoder.
            pick_best_score: None: every mask, as ``MaskDecoder``; False: only the first of
                them, True: only the one with the highest predicted IoU (the scores come before
                the masks, so the others are never upscaled).
        Returns:
            ``(low_res_masks [1, M, 4h, 4w], iou_predictions [1, M])`` as ``MaskDecoder``
            (M = 1 with ``pick_best_score``).
        """
        if embedding.shape[0] != 1 or sparse.shape[0] != 1:
            raise ValueError("SharedImageDecoder decodes one prompt set on one image at a time")
        decoder = self.mask_decoder
        transformer = decoder.transformer
        terms = self._image_terms(embedding)

        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        token_pe = torch.cat((output_tokens, sparse[0].to(self.dtype)), dim=0)  # [T, C]: the prompt tokens' "pe"
        count = token_pe.shape[0]

        # TwoWayAttentionBlock's steps, layer by layer (the first skips the tokens' pe in its
        # self-attention and uses the precomputed image projections).
        queries, keys = token_pe, terms.keys
        for number, layer in enumerate(transformer.layers):
            if number == 0:
                queries = layer.norm1(layer.self_attn(q=queries[None], k=queries[None], v=queries[None])[0])
                attn_out = _tokens_attend_projected_image(
                    layer.cross_attn_token_to_image, queries + token_pe, terms.first_t2i_keys, terms.first_t2i_values)
            else:
                q = queries + token_pe
                queries = layer.norm1(queries + layer.self_attn(q=q[None], k=q[None], v=queries[None])[0])
                keys_with_pe = keys + terms.key_pe
                attn_out = _tokens_attend_image(layer.cross_attn_token_to_image, queries + token_pe, keys_with_pe, keys)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))
            i2t = layer.cross_attn_image_to_token
            q = queries + token_pe
            if number == 0:
                heads, channels = _heads(i2t)
                token_keys = i2t.k_proj(q).view(count, heads, channels).transpose(0, 1) / math.sqrt(channels)
                scores = torch.bmm(token_keys, terms.first_i2t_queries).view(heads * count, -1)
            else:
                scores = _image_token_scores(i2t, keys_with_pe, q)
            keys = layer.norm4(keys + _image_attends_tokens(i2t, scores, queries, count))
        attn_out = _tokens_attend_image(transformer.final_attn_token_to_image, queries + token_pe,
                                        keys + terms.key_pe, keys)
        hs = transformer.norm_final_attn(queries + attn_out)

        # Output heads (MaskDecoder.predict_masks after its transformer call).
        mask_tokens_out = hs[1:(1 + decoder.num_mask_tokens)]
        iou_pred = decoder.iou_prediction_head(hs[0])[None]
        chosen = list(range(1, decoder.num_mask_tokens)) if multimask_output else [0]
        if pick_best_score is not None:
            best = int(iou_pred[0, chosen].argmax()) if pick_best_score else 0
            chosen = chosen[best:best + 1]
        hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[i]) for i in chosen])
        height, width = embedding.shape[-2:]
        masks = _upscaled_masks(decoder.output_upscaling, keys, hyper_in, height, width)
        return masks[None].float(), iou_pred[:, chosen].float()


# Bytes of one band's intermediates in the output upscaling: they then stay in the cores' caches
# between the steps instead of streaming 4 + 8 MB (ViT-B, float32) through memory for each of
# them. ViT-B has 256 + 512 values per token: 512 tokens a band in float32 (as measured fastest
# there), 1,024 in bfloat16 (4.5 against 5.1 ms per upscaling with 512, AMD EPYC, 2 threads,
# interleaved rounds in one process).
UPSCALING_BAND_BYTES = 3 * 2**19


def _upscaled_masks(upscaling: torch.nn.Sequential, tokens: torch.Tensor, hyper_in: torch.Tensor,
                    height: int, width: int, band_tokens: Optional[int] = None) -> torch.Tensor:
    """``hyper_in @ output_upscaling(image)`` as ``[M, 4h, 4w]`` from token-major ``[h * w, C]``
    image tokens, each stride-2 2 x 2 transposed convolution as one matrix product.

    A pixel's rows stay in the order (row, column, then each level's 2 x 2 offset) until the
    final ``[M]`` values per pixel are put back in image order. Every step acts on each image
    token's own rows, so the tokens go through all steps ``band_tokens`` at a time (None: as
    many as keep the intermediates within :data:`UPSCALING_BAND_BYTES`, rounded as
    :func:`~protosam.models.sam_memory.band_rows` rounds bands). Only the ``M`` masks of
    ``hyper_in`` are formed (callers that keep one mask pass one row)."""
    first, norm, first_activation, second, second_activation = upscaling
    if not (isinstance(norm, LayerNorm2d) and all(
            isinstance(conv, torch.nn.ConvTranspose2d) and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
            for conv in (first, second))):
        raise TypeError("SharedImageDecoder expects segment-anything's output upscaling "
                        "(2 x 2 stride-2 transposed convolutions, LayerNorm2d)")
    # weight [C_in, C_out, 2, 2] -> [C_in, (dy, dx, C_out)]: each input pixel's 4 outputs.
    weights = [conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, 4 * conv.out_channels)
               for conv in (first, second)]
    biases = [conv.bias.repeat(4) for conv in (first, second)]
    count = tokens.shape[0]
    if band_tokens is None:
        values_per_token = weights[0].shape[1] + 4 * weights[1].shape[1]
        band_tokens = band_rows(count, UPSCALING_BAND_BYTES // (values_per_token * tokens.element_size()))
    band_tokens = max(1, min(count, band_tokens))
    # One buffer per step, reused by every band; the last is the band's rows of the result.
    first_out = tokens.new_empty(band_tokens, weights[0].shape[1])
    second_out = tokens.new_empty(4 * band_tokens, weights[1].shape[1])
    per_pixel = tokens.new_empty(16 * count, hyper_in.shape[0])  # rows (y, x, dy1, dx1, dy2, dx2)
    for start in range(0, count, band_tokens):
        rows = min(band_tokens, count - start)
        # The bias added in place after the product: addmm first copies the broadcast bias
        # into its output, a fifth of this step's time at ViT-B size.
        x = torch.mm(tokens[start:start + rows], weights[0], out=first_out[:rows])
        x += biases[0]
        x = F.layer_norm(x.view(-1, first.out_channels), (first.out_channels,), norm.weight, norm.bias, norm.eps)
        x = _activation_in_place(first_activation, x)
        y = torch.mm(x, weights[1], out=second_out[:4 * rows])
        y += biases[1]
        y = _activation_in_place(second_activation, y.view(-1, second.out_channels))
        torch.mm(y, hyper_in.T, out=per_pixel[16 * start:16 * (start + rows)])
    masks = per_pixel.view(height, width, 2, 2, 2, 2, -1).permute(6, 0, 2, 4, 1, 3, 5)
    return masks.reshape(-1, 4 * height, 4 * width)


def _activation_in_place(activation: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's GELU (exact), in place on this step's own output; other activations
    as modules."""
    if type(activation) is torch.nn.GELU and activation.approximate == "none":
        return torch.ops.aten.gelu_(x)
    return activation(x)


class StockMaskDecoder:
    """segment-anything's own ``MaskDecoder`` behind :class:`SharedImageDecoder`'s ``decode``: the
    reference's kernels (``Engine.reference_kernels()``), to measure and test ours against."""

    def __init__(self, sam: Sam):
        self.sam = sam

    @torch.inference_mode()
    def decode(
        self, embedding: torch.Tensor, sparse: torch.Tensor, *, multimask_output: bool,
        pick_best_score: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`SharedImageDecoder.decode` (``pick_best_score`` selects after decoding all)."""
        prompt_encoder = self.sam.prompt_encoder
        # The "no mask" dense embedding, as the prompt encoder builds it for masks=None.
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *embedding.shape[-2:])
        masks, scores = self.sam.mask_decoder(
            image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask_output,
        )
        if pick_best_score is None:
            return masks, scores
        index = int(scores[0].argmax()) if pick_best_score else 0
        return masks[:, index:index + 1], scores[:, index:index + 1]
