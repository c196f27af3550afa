"""SAM's mask decoder for many single prompt sets on one image, sharing the image-side work.

The published reference decodes each connected component separately (batch 1). segment-
anything's decoder then recomputes, for every prompt set, terms that depend only on the image:
the image embedding plus the "no mask" embedding, the positional encoding of the 64 x 64 grid,
and in its first two-way layer the image tokens plus their positional encoding and three
projections of those (keys and values of the token-to-image attention, queries of the
image-to-token attention): about a fifth of each call on a CPU.

:class:`SharedImageDecoder` computes those terms once per image embedding, with the same
operations on the same tensors as segment-anything (so the same bits), and runs everything
that depends on the prompts exactly as segment-anything does: the first layer's prompt-side
steps in segment-anything's order, the remaining layers and the output heads through the
decoder's own modules. Only batch-1 calls without a mask prompt share terms (the reference's
case); a test checks masks and scores against ``MaskDecoder`` (equal up to float32 rounding,
which another CPU's matrix kernels may order differently; bit-equal on the machines measured).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention

__all__ = ["SharedImageDecoder"]


@dataclass
class _ImageTerms:
    """Prompt-independent decoder inputs for one ``[1, C, h, w]`` image embedding."""

    embedding: torch.Tensor  # the embedding these terms belong to (identity check)
    keys: torch.Tensor  # [1, hw, C] image tokens (embedding + no-mask embedding)
    key_pe: torch.Tensor  # [1, hw, C] their positional encoding
    first_t2i_keys: torch.Tensor  # layer 0, token-to-image: k_proj(keys + pe)
    first_t2i_values: torch.Tensor  # layer 0, token-to-image: v_proj(keys)
    first_i2t_queries: torch.Tensor  # layer 0, image-to-token: q_proj(keys + pe)


def _attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` from already projected q, k, v (same steps)."""
    q = attention._separate_heads(q, attention.num_heads)
    k = attention._separate_heads(k, attention.num_heads)
    v = attention._separate_heads(v, attention.num_heads)
    _, _, _, c_per_head = q.shape
    weights = q @ k.permute(0, 1, 3, 2)
    weights = weights / math.sqrt(c_per_head)
    weights = torch.softmax(weights, dim=-1)
    return attention.out_proj(attention._recombine_heads(weights @ v))


class SharedImageDecoder:
    """Batch-1 SAM decoding that computes the image-only terms once per embedding."""

    def __init__(self, sam: Sam):
        self.sam = sam
        self._terms: Optional[_ImageTerms] = None

    def _image_terms(self, embedding: torch.Tensor) -> _ImageTerms:
        if self._terms is not None and self._terms.embedding is embedding:
            return self._terms
        decoder, prompt_encoder = self.sam.mask_decoder, self.sam.prompt_encoder
        image_pe = prompt_encoder.get_dense_pe()
        # The "no mask" dense embedding, as the prompt encoder builds it for masks=None.
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            1, -1, prompt_encoder.image_embedding_size[0], prompt_encoder.image_embedding_size[1]
        )
        src = torch.repeat_interleave(embedding, 1, dim=0) + dense
        pos_src = torch.repeat_interleave(image_pe, 1, dim=0)
        # Row-major copies, made once per embedding: segment-anything keeps these as permuted
        # views, so every prompt set paid copies of them (and of the sums and products that
        # inherit their layout) inside each layer: ~10% of a decoder call on a CPU. Same
        # values; elementwise results do not depend on the layout, and the products give the
        # same bits here (checked at full size with 1 and 2 threads). Not by construction: a
        # product may get a transposed operand in one layout and not the other, so a test
        # bounds the difference to MaskDecoder at float32 rounding instead of asserting bits.
        keys = src.flatten(2).permute(0, 2, 1).contiguous()
        key_pe = pos_src.flatten(2).permute(0, 2, 1).contiguous()
        first = decoder.transformer.layers[0]
        keys_with_pe = keys + key_pe
        self._terms = _ImageTerms(
            embedding=embedding,
            keys=keys,
            key_pe=key_pe,
            first_t2i_keys=first.cross_attn_token_to_image.k_proj(keys_with_pe),
            first_t2i_values=first.cross_attn_token_to_image.v_proj(keys),
            first_i2t_queries=first.cross_attn_image_to_token.q_proj(keys_with_pe),
        )
        return self._terms

    @torch.inference_mode()
    def decode(
        self, embedding: torch.Tensor, sparse: torch.Tensor, *, multimask_output: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``MaskDecoder(...)`` for one prompt set without a mask prompt.

        Args:
            embedding: ``[1, C, h, w]`` image embedding (reuse the same tensor object across
                calls to share its terms).
            sparse: ``[1, N, C]`` sparse prompt embeddings from the prompt encoder.
        Returns:
            ``(low_res_masks [1, M, 4h, 4w], iou_predictions [1, M])`` as ``MaskDecoder``.
        """
        if embedding.shape[0] != 1 or sparse.shape[0] != 1:
            raise ValueError("SharedImageDecoder decodes one prompt set on one image at a time")
        decoder = self.sam.mask_decoder
        transformer = decoder.transformer
        terms = self._image_terms(embedding)

        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(1, -1, -1)
        point_embedding = torch.cat((output_tokens, sparse), dim=1)

        # First two-way layer (segment-anything's TwoWayAttentionBlock, skip_first_layer_pe).
        first = transformer.layers[0]
        queries = first.self_attn(q=point_embedding, k=point_embedding, v=point_embedding)
        queries = first.norm1(queries)
        q = queries + point_embedding
        t2i = first.cross_attn_token_to_image
        attn_out = _attend(t2i, t2i.q_proj(q), terms.first_t2i_keys, terms.first_t2i_values)
        queries = queries + attn_out
        queries = first.norm2(queries)
        queries = queries + first.mlp(queries)
        queries = first.norm3(queries)
        q = queries + point_embedding
        i2t = first.cross_attn_image_to_token
        attn_out = _attend(i2t, terms.first_i2t_queries, i2t.k_proj(q), i2t.v_proj(queries))
        keys = terms.keys + attn_out
        keys = first.norm4(keys)

        for layer in transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=terms.key_pe)
        q = queries + point_embedding
        k = keys + terms.key_pe
        queries = queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys)
        hs = transformer.norm_final_attn(queries)

        # Output heads (MaskDecoder.predict_masks after its transformer call).
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:(1 + decoder.num_mask_tokens), :]
        height, width = embedding.shape[-2:]
        src = keys.transpose(1, 2).view(1, keys.shape[-1], height, width)
        upscaled = decoder.output_upscaling(src)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = decoder.iou_prediction_head(iou_token_out)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen, :, :], iou_pred[:, chosen]
