"""Segment Anything (SAM / MedSAM) construction, loading and prompt-based refinement.

Frames: SAM works on a 1024 x 1024 image. Images given here are ``[3, 1024, 1024]`` float
tensors; prompts are :class:`protosam.prompts.ComponentPrompt` with ``(x, y)`` points and XYXY
boxes in that 1024 frame; masks come back as ``[1024, 1024]`` bool tensors.

The refinement reproduces ``SamPredictor`` step by step (uint8 image -> SAM's pixel
normalisation -> image encoder; prompt encoder + mask decoder; upsampled logits > 0), but
keeps the image embedding so a slice is encoded once and shared by every structure.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from .. import catalogue
from ..weights.checkpoints import check_state_dict_matches, load_state_dict
from ..prompts import ComponentPrompt
from .sam_decoder import SharedImageDecoder
from .sam_memory import limit_global_attention_memory

logger = logging.getLogger(__name__)

__all__ = ["SamArchitecture", "SAM_ARCHITECTURES", "build_sam", "load_sam", "SamRefiner", "SAM_IMAGE_SIZE",
           "upsample_mask_logits"]

SAM_IMAGE_SIZE = 1024
MAX_PROMPTS_PER_CALL = 16
_SAM_PATCH = 16
# SAM's pixel normalisation (segment-anything's build_sam values).
_PIXEL_MEAN = (123.675, 116.28, 103.53)
_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArchitecture:
    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: Tuple[int, ...]
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    # MedSAM: fine-tuned SAM ViT-B that takes a [0, 1] image, a box only, and one mask.
    medsam: bool = False
    test_only: bool = False


SAM_ARCHITECTURES: Dict[str, SamArchitecture] = {
    a.name: a
    for a in (
        SamArchitecture(catalogue.SAM_VIT_B, 768, 12, 12, (2, 5, 8, 11)),
        SamArchitecture(catalogue.SAM_VIT_L, 1024, 24, 16, (5, 11, 17, 23)),
        SamArchitecture(catalogue.SAM_VIT_H, 1280, 32, 16, (7, 15, 23, 31)),
        SamArchitecture(catalogue.MEDSAM_VIT_B, 768, 12, 12, (2, 5, 8, 11), medsam=True),
        # Tiny random-weight model for tests and CI only: same code path, same file format.
        SamArchitecture(
            catalogue.TINY_SAM, 32, 2, 2, (1,), prompt_embed_dim=32, decoder_mlp_dim=64,
            decoder_num_heads=2, iou_head_hidden_dim=32, mask_in_chans=4, test_only=True,
        ),
        SamArchitecture(
            catalogue.TINY_MEDSAM, 32, 2, 2, (1,), prompt_embed_dim=32, decoder_mlp_dim=64,
            decoder_num_heads=2, iou_head_hidden_dim=32, mask_in_chans=4, medsam=True, test_only=True,
        ),
    )
}


def _architecture(name: str) -> SamArchitecture:
    try:
        return SAM_ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"Unknown SAM model '{name}'; choose one of {', '.join(SAM_ARCHITECTURES)}") from None


def build_sam(name: str) -> Sam:
    """Build a randomly initialised SAM of the named architecture (eval mode, CPU)."""
    arch = _architecture(name)
    embedding_hw = SAM_IMAGE_SIZE // _SAM_PATCH
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=SAM_IMAGE_SIZE,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=_SAM_PATCH,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=14,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(embedding_hw, embedding_hw),
            input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(_PIXEL_MEAN),
        pixel_std=list(_PIXEL_STD),
    )
    return sam.eval()


def load_sam(name: str, checkpoint_path, device: str = "cpu") -> Sam:
    """Build the named SAM and load an official-format checkpoint (strict, weights only)."""
    state_dict = load_state_dict(checkpoint_path)
    # Built on the meta device and given the file's tensors (assign): no random initialisation
    # and no second copy of the weights, which glibc's heap kept mapped after the copy (peak and
    # resident memory one model higher).
    with torch.device("meta"):
        sam = build_sam(name)
    check_state_dict_matches(sam, state_dict, model_name=name, path=checkpoint_path)
    parameters = dict(sam.state_dict())
    sam.load_state_dict({key: value.to(parameters[key].dtype).contiguous() for key, value in state_dict.items()},
                        strict=True, assign=True)
    # SAM's pixel statistics are not saved in the file (non-persistent buffers).
    for buffer_name, values in (("pixel_mean", _PIXEL_MEAN), ("pixel_std", _PIXEL_STD)):
        sam.register_buffer(buffer_name, torch.tensor(values).view(-1, 1, 1), False)
    sam.requires_grad_(False)
    return limit_global_attention_memory(sam).to(device).eval()


class SamRefiner:
    """Encodes query images once and decodes masks for any number of prompt sets.

    Args:
        sam: a loaded SAM (or MedSAM) model on its device.
        medsam: MedSAM conventions (``[0, 1]`` input, box-only prompts, one mask, sigmoid > 0.5).
    """

    def __init__(self, sam: Sam, *, medsam: bool = False):
        self.sam = sam
        self.medsam = medsam
        self.shared_decoder = SharedImageDecoder(sam)

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    def prepare_images(self, images_1024: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 1024, 1024]`` float (any range) -> SAM encoder input ``[B, 3, 1024, 1024]``.

        SAM: per-image min-max to [0, 255], truncated to uint8 (as SamPredictor receives an
        8-bit picture), then SAM's own pixel normalisation. MedSAM: per-image min-max to [0, 1].
        """
        flat = images_1024.flatten(1)
        low = flat.min(dim=1).values[:, None, None, None]
        high = flat.max(dim=1).values[:, None, None, None]
        span = high - low
        if self.medsam:
            return (images_1024 - low) / span.clamp_min(1e-8)
        # A constant image gives 0/0 in the reference; treat it as all-zero instead of NaN.
        scaled = torch.where(span > 0, (images_1024 - low) / torch.where(span > 0, span, 1.0) * 255, 0.0)
        as_uint8 = scaled.to(torch.uint8)
        return torch.stack([self.sam.preprocess(img.to(self.device)) for img in as_uint8])

    @torch.inference_mode()
    def embed(self, images_1024: torch.Tensor, *, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Image embeddings ``[B, C, 64, 64]`` float32 for ``[B, 3, 1024, 1024]`` images."""
        prepared = self.prepare_images(images_1024.to(self.device, torch.float32))
        with torch.autocast(self.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return self.sam.image_encoder(prepared).float()

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        prompts: Sequence[ComponentPrompt],
        *,
        multimask_output: bool,
        pick_best_score: bool,
        batch_prompts: bool,
        return_masks: bool = False,
    ) -> Tuple[torch.Tensor, list]:
        """Union of the masks SAM gives for each prompt set, at 1024 x 1024.

        Args:
            embedding: ``[1, C, 64, 64]`` from :meth:`embed`.
            multimask_output: ask for 3 masks per prompt set (SAM) instead of one.
            pick_best_score: with 3 masks, keep the one SAM scores highest (otherwise index 0,
                as the published reference does).
            batch_prompts: decode prompt sets with the same point count in one call.
            return_masks: also return each prompt set's own mask (click corrections keep them,
                so a click decodes only the set it changes).
        Returns:
            ``([1024, 1024]`` bool union, list of per-prompt scores)``, and with ``return_masks``
            a third item: ``[P, 1024, 1024]`` bool, one mask per prompt set in ``prompts`` order.
        """
        union = torch.zeros(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE, dtype=torch.bool, device=self.device)
        scores: list = [None] * len(prompts)
        each = torch.zeros(len(prompts), SAM_IMAGE_SIZE, SAM_IMAGE_SIZE, dtype=torch.bool, device=self.device) \
            if return_masks else None
        if not prompts:
            return (union, scores, each) if return_masks else (union, scores)
        groups: Dict[int, list] = {}
        for index, prompt in enumerate(prompts):
            # A click-only prompt set (no box, see protosam.session) is decoded on its own.
            key = 0 if self.medsam else (len(prompt.points), prompt.box is None)
            groups.setdefault(key if batch_prompts else index, []).append(index)
        # The decoder repeats the image embedding per prompt set: bound the batch for memory.
        batches = [g[i:i + MAX_PROMPTS_PER_CALL] for g in groups.values() for i in range(0, len(g), MAX_PROMPTS_PER_CALL)]
        for indices in batches:
            masks, group_scores = self._decode_group(embedding, [prompts[i] for i in indices], multimask_output, pick_best_score)
            union |= masks.any(dim=0)
            if each is not None:
                each[indices] = masks
            for i, s in zip(indices, group_scores):
                scores[i] = s
        return (union, scores, each) if return_masks else (union, scores)

    def _decode_group(self, embedding, prompts, multimask_output, pick_best_score):
        if prompts[0].box is None:
            boxes = None
        else:
            boxes = torch.as_tensor(np.stack([p.box for p in prompts]), dtype=torch.float, device=self.device)
        if self.medsam:
            points = None
            multimask_output = False
        else:
            coords = torch.as_tensor(np.stack([p.points for p in prompts]), dtype=torch.float, device=self.device)
            labels = torch.as_tensor(np.stack([p.point_labels for p in prompts]), dtype=torch.int, device=self.device)
            points = (coords, labels)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        if len(prompts) == 1:
            # One prompt set per call (the reference's way): share the image-only terms
            # across the calls on this embedding; the decoder below's function, its sums
            # ordered for a CPU (equal up to float32 rounding, see sam_decoder).
            # Only the mask kept below is upscaled (its choice needs the scores alone).
            low_res, iou = self.shared_decoder.decode(embedding, sparse, multimask_output=multimask_output,
                                                      pick_best_score=pick_best_score)
        else:
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        # Choose each prompt set's mask before upsampling: interpolation is per channel, so this
        # gives SamPredictor's result at a third of the upsampling work.
        choice = iou.argmax(dim=1) if pick_best_score else torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        rows = torch.arange(len(prompts), device=self.device)
        chosen = low_res[rows, choice][:, None]
        if self.medsam:
            prob = torch.sigmoid(chosen)
            masks = F.interpolate(prob, size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear", align_corners=False) > 0.5
        else:
            masks = upsample_mask_logits(chosen) > self.sam.mask_threshold
        return masks[:, 0], iou[rows, choice].tolist()


def upsample_mask_logits(low_res: torch.Tensor) -> torch.Tensor:
    """``Sam.postprocess_masks(low_res, (1024, 1024), (1024, 1024))`` with one resize instead of two.

    There the second step crops nothing and resizes 1024 -> 1024 bilinearly: every output pixel
    then sits exactly on its source pixel (source coordinate ``(i + 0.5) * 1 - 0.5 = i``), with
    weights exactly 1 and 0, so it returns its input bit for bit (finite logits) after a full
    pass over 4 MiB per mask. Skipping it gives the same bits; a test checks it against
    segment-anything's own ``postprocess_masks``.
    """
    return F.interpolate(low_res, size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear", align_corners=False)
