"""SAM 2.1 and MedSAM2 as refiners, run by the official ``sam2`` package (no re-implementation).

The model is built by ``sam2.build_sam.build_sam2`` from the package's own hydra configuration
(``configs/sam2.1/*.yaml``), with the same post-processing settings ``SAM2ImagePredictor``
gets from it, and the checkpoint is the official file format (``{"model": state_dict}``).

Frames: as for SAM (:mod:`protosam.models.sam`), images come in as ``[B, 3, 1024, 1024]`` float
tensors, prompts are :class:`protosam.prompts.ComponentPrompt` in that 1024 frame, and masks
come back at 1024 x 1024. The refiner treats that 1024 frame as the "original image" of
``SAM2ImagePredictor``: the model sees it resized to its own image size (1024 for SAM 2.1, 512
for MedSAM2), prompt coordinates are scaled by ``image_size / 1024`` and mask logits are
upsampled back to 1024, exactly as the predictor does for a 1024 x 1024 picture.

Each step reproduces ``SAM2ImagePredictor`` (``set_image``: uint8 picture -> ``SAM2Transforms``
-> ``forward_image`` -> ``_prepare_backbone_features`` -> ``+ no_mem_embed``; ``_predict``: box
corners (labels 2, 3) before the points -> prompt encoder -> mask decoder with the two
high-resolution feature levels -> bilinear upsampling -> logits > 0), but keeps a slice's
features so it is encoded once and decoded for many prompt sets, several per decoder call.

The features of one slice (image embedding plus the two high-resolution levels) are packed into
one float32 row, so the engine's encoder cache and sessions hold them like a SAM embedding;
:func:`protosam.catalogue.refiner_cache_bytes_per_slice` gives its size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import catalogue
from ..errors import ProtoSAMError
from ..prompts import ComponentPrompt
from ..weights.checkpoints import check_state_dict_matches

logger = logging.getLogger(__name__)

__all__ = ["Sam2Architecture", "SAM2_ARCHITECTURES", "build_sam2_model", "load_sam2", "Sam2Refiner",
           "SAM2_PACKAGE_HINT", "MEDSAM2_CONFIG_SOURCE"]

#: The refiner frame (prompts and masks), shared with SAM.
FRAME = 1024
MAX_PROMPTS_PER_CALL = 16

#: How to install what the SAM 2 refiners need (also in README.md and docs/refiners.md).
SAM2_PACKAGE_HINT = (
    "The SAM 2 refiners need the official 'sam2' package (1.1.0) and its dependencies: "
    "pip install 'protosam[sam2]' && SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0"
)

#: Where MedSAM2's 512 px configuration comes from (the sam2 package has no such file).
MEDSAM2_CONFIG_SOURCE = (
    "bowang-lab/MedSAM2, sam2/configs/sam2.1_hiera_t512.yaml (commit 332f30d420f1d1b08e2a79b3ae6a602458808383, "
    "2025-07-11): the sam2 package's configs/sam2.1/sam2.1_hiera_t.yaml with image_size 512 and the memory "
    "attention's RoPE feature sizes 32 x 32; used by its medsam2_infer_3D_CT.py with MedSAM2_latest.pt"
)


@dataclass(frozen=True)
class Sam2Architecture:
    """One SAM 2 refiner: the sam2 package's hydra ``config`` plus ``overrides`` (hydra syntax)."""

    name: str
    config: str
    overrides: Tuple[str, ...] = ()
    source: str = ""
    test_only: bool = False

    @property
    def box_only(self) -> bool:
        return catalogue.BY_NAME[self.name].box_only


_SAM2_1 = "configs/sam2.1/sam2.1_hiera_{}.yaml"
_PACKAGE_SOURCE = "sam2 1.1.0 package configuration (identical to facebookresearch/sam2 at 2b90b9f)"

#: MedSAM2 = SAM 2.1 Hiera-T at 512 px (values from MEDSAM2_CONFIG_SOURCE).
MEDSAM2_IMAGE_SIZE = 512
MEDSAM2_OVERRIDES = (
    f"++model.image_size={MEDSAM2_IMAGE_SIZE}",
    "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
)

#: The tiny test-only SAM 2: the package's Hiera-T configuration shrunk (8-channel Hiera with
#: stages 1-2-1-1, 32-channel neck, decoder and memory encoder input, one memory-attention layer)
#: at 256 px. Random
#: weights (protosam.testing), for tests and CI only; the code path is the published models'.
TINY_SAM2_IMAGE_SIZE = 256
TINY_SAM2_OVERRIDES = (
    f"++model.image_size={TINY_SAM2_IMAGE_SIZE}",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,2,1,1]",
    "++model.image_encoder.trunk.global_att_blocks=[2]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
)

SAM2_ARCHITECTURES: Dict[str, Sam2Architecture] = {
    a.name: a
    for a in (
        Sam2Architecture(catalogue.SAM2_1_HIERA_TINY, _SAM2_1.format("t"), source=_PACKAGE_SOURCE),
        Sam2Architecture(catalogue.SAM2_1_HIERA_SMALL, _SAM2_1.format("s"), source=_PACKAGE_SOURCE),
        Sam2Architecture(catalogue.SAM2_1_HIERA_BASE_PLUS, _SAM2_1.format("b+"), source=_PACKAGE_SOURCE),
        Sam2Architecture(catalogue.SAM2_1_HIERA_LARGE, _SAM2_1.format("l"), source=_PACKAGE_SOURCE),
        Sam2Architecture(catalogue.MEDSAM2, _SAM2_1.format("t"), MEDSAM2_OVERRIDES, source=MEDSAM2_CONFIG_SOURCE),
        Sam2Architecture(catalogue.TINY_SAM2, _SAM2_1.format("t"), TINY_SAM2_OVERRIDES,
                         source="test-only shrink of " + _PACKAGE_SOURCE, test_only=True),
    )
}


def _architecture(name: str) -> Sam2Architecture:
    try:
        return SAM2_ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"Unknown SAM 2 model '{name}'; choose one of {', '.join(SAM2_ARCHITECTURES)}") from None


def _import_sam2():
    try:
        from sam2.build_sam import build_sam2  # noqa: F401  (initialises the package's hydra configs)
    except ImportError as error:
        raise ProtoSAMError(f"{SAM2_PACKAGE_HINT} ({error})") from error
    return build_sam2


def build_sam2_model(name: str, *, video: bool = False) -> torch.nn.Module:
    """A randomly initialised SAM 2 of the named architecture (eval mode, CPU), built by the
    sam2 package from its configuration as ``SAM2ImagePredictor`` (or, with ``video``,
    ``build_sam2_video_predictor``) builds it."""
    arch = _architecture(name)
    build_sam2 = _import_sam2()
    if video:
        from sam2.build_sam import build_sam2_video_predictor as build
    else:
        build = build_sam2
    return build(arch.config, None, device="cpu", hydra_overrides_extra=list(arch.overrides)).eval()


def _read_official_checkpoint(path) -> Dict[str, torch.Tensor]:
    """The state dict of an official SAM 2 file: ``torch.save({"model": state_dict})``."""
    from ..weights.checkpoints import load_state_dict

    # load_state_dict unwraps {"model": ...}; a plain state dict is accepted too (fine-tuned files).
    return load_state_dict(path)


def load_sam2(name: str, checkpoint_path, device: str = "cpu", *, video: bool = False) -> torch.nn.Module:
    """Build the named SAM 2 and load its checkpoint (strict, weights only)."""
    model = build_sam2_model(name, video=video)
    state_dict = _read_official_checkpoint(checkpoint_path)
    check_state_dict_matches(model, state_dict, model_name=name, path=checkpoint_path)
    model.load_state_dict(state_dict, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


class Sam2Refiner:
    """Encodes query images once and decodes masks for any number of prompt sets (SAM 2).

    The same interface as :class:`protosam.models.sam.SamRefiner`: ``prepare_images``,
    ``embed``, ``decode``; ``medsam`` is true for a box-only refiner (MedSAM2), which gets no
    points and one mask per box.
    """

    def __init__(self, model: torch.nn.Module, *, box_only: bool = False):
        from sam2.utils.transforms import SAM2Transforms

        self.model = model
        self.medsam = box_only
        self.image_size = int(model.image_size)
        # The predictor's own transforms (resize to image_size, ImageNet mean/std); no hole
        # filling or sprinkle removal, as SAM2ImagePredictor's defaults.
        self.transforms = SAM2Transforms(resolution=self.image_size, mask_threshold=0.0)
        self.mask_threshold = 0.0
        channels = int(model.sam_prompt_encoder.embed_dim)
        size = self.image_size
        # (channels, side) of the high-resolution levels s0, s1 and the image embedding, as the
        # predictor's _bb_feat_sizes for this image size (MedSAM2's repository derives them so).
        self.levels = ((channels // 8, size // 4), (channels // 4, size // 8), (channels, size // 16))

    # The engine moves ``refiner.sam`` to the CPU after a GPU out-of-memory error.
    @property
    def sam(self) -> torch.nn.Module:
        return self.model

    @property
    def device(self) -> torch.device:
        return self.model.no_mem_embed.device

    @property
    def features_per_slice(self) -> int:
        return sum(c * s * s for c, s in self.levels)

    # ------------------------------------------------------------------ images
    @staticmethod
    def to_uint8(images_1024: torch.Tensor) -> torch.Tensor:
        """Per-image min-max to [0, 255], truncated to uint8 (the 8-bit picture the predictor
        receives); a constant image becomes all zero."""
        flat = images_1024.flatten(1)
        low = flat.min(dim=1).values[:, None, None, None]
        span = flat.max(dim=1).values[:, None, None, None] - low
        scaled = torch.where(span > 0, (images_1024 - low) / torch.where(span > 0, span, 1.0) * 255, 0.0)
        return scaled.to(torch.uint8)

    def prepare_images(self, images_1024: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 1024, 1024]`` float (any range) -> model input ``[B, 3, s, s]``: uint8 picture,
        then SAM2Transforms (``ToTensor``'s /255, resize to the image size, ImageNet mean/std)."""
        pictures = self.to_uint8(images_1024).to(self.device)
        return torch.stack([self.transforms.transforms(picture.float() / 255.0) for picture in pictures])

    @torch.inference_mode()
    def embed(self, images_1024: torch.Tensor, *, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Packed features ``[B, F]`` float32 (high-resolution s0, s1, then the image embedding,
        each flattened) for ``[B, 3, 1024, 1024]`` images."""
        prepared = self.prepare_images(images_1024.to(self.device, torch.float32))
        with torch.autocast(self.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            backbone_out = self.model.forward_image(prepared)
            _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
            if self.model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        batch = prepared.shape[0]
        # vision_feats: [HW, B, C] per level, highest resolution first.
        packed = [feat.permute(1, 2, 0).reshape(batch, -1).float() for feat in vision_feats]
        return torch.cat(packed, dim=1)

    def unpack(self, packed: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``[1, F]`` packed features -> (image embedding ``[1, C, s/16, s/16]``, high-resolution
        levels ``[[1, C/8, s/4, s/4], [1, C/4, s/8, s/8]]``)."""
        if packed.ndim != 2 or packed.shape[1] != self.features_per_slice:
            raise ValueError(f"SAM 2 features must be [1, {self.features_per_slice}], not {tuple(packed.shape)} "
                             "(were they computed by another refiner?)")
        tensors, start = [], 0
        for channels, side in self.levels:
            count = channels * side * side
            tensors.append(packed[:, start:start + count].reshape(1, channels, side, side))
            start += count
        return tensors[-1], tensors[:-1]

    # ------------------------------------------------------------------ prompts and decoding
    def _prompt_tensors(self, prompts: Sequence[ComponentPrompt]):
        """The predictor's ``concat_points`` for prompt sets of one shape: box corners (labels
        2, 3) first, then points, in the model's frame (coordinates x image_size / 1024)."""
        scale = self.image_size / FRAME
        coords, labels = [], []
        if prompts[0].box is not None:
            boxes = torch.as_tensor(np.stack([p.box for p in prompts]), dtype=torch.float, device=self.device)
            coords.append(boxes.reshape(-1, 2, 2) * scale)
            labels.append(torch.tensor([[2, 3]], dtype=torch.int, device=self.device).repeat(len(prompts), 1))
        if not self.medsam and len(prompts[0].points):
            points = torch.as_tensor(np.stack([p.points for p in prompts]), dtype=torch.float, device=self.device)
            coords.append(points * scale)
            labels.append(torch.as_tensor(np.stack([p.point_labels for p in prompts]), dtype=torch.int, device=self.device))
        return torch.cat(coords, dim=1), torch.cat(labels, dim=1)

    def decode_logits(self, embedding: torch.Tensor, prompts: Sequence[ComponentPrompt], *, multimask_output: bool,
                      pick_best_score: bool) -> Tuple[torch.Tensor, list, torch.Tensor]:
        """One decoder call for prompt sets of one shape: (chosen mask logits ``[P, 1024, 1024]``
        upsampled as the predictor does, their scores, chosen indices ``[P]``)."""
        image_embed, high_res = self.unpack(embedding.to(self.device))
        points = self._prompt_tensors(prompts)
        multimask_output = multimask_output and not self.medsam
        sparse, dense = self.model.sam_prompt_encoder(points=points, boxes=None, masks=None)
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=len(prompts) > 1,
            high_res_features=high_res,
        )
        choice = iou.argmax(dim=1) if pick_best_score else torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        rows = torch.arange(len(prompts), device=self.device)
        # Choose before upsampling: interpolation is per channel, so this equals the predictor's
        # upsampled masks at the chosen index.
        chosen = low_res[rows, choice][:, None].float()
        logits = F.interpolate(chosen, (FRAME, FRAME), mode="bilinear", align_corners=False)[:, 0]
        return logits, iou[rows, choice].tolist(), choice

    def _groups(self, prompts: Sequence[ComponentPrompt], batch_prompts: bool) -> List[List[int]]:
        groups: Dict[object, list] = {}
        for index, prompt in enumerate(prompts):
            key = (prompt.box is None, 0 if self.medsam else len(prompt.points))
            groups.setdefault(key if batch_prompts else index, []).append(index)
        return [g[i:i + MAX_PROMPTS_PER_CALL] for g in groups.values() for i in range(0, len(g), MAX_PROMPTS_PER_CALL)]

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
    ):
        """Union of the masks SAM 2 gives for each prompt set, at 1024 x 1024 (see
        :meth:`protosam.models.sam.SamRefiner.decode`, same arguments and results)."""
        union, scores, _, each = self._decode_all(embedding, prompts, multimask_output, pick_best_score,
                                                  batch_prompts, return_masks, probability=False)
        return (union, scores, each) if return_masks else (union, scores)

    @torch.inference_mode()
    def decode_with_probability(self, embedding, prompts, *, multimask_output: bool, pick_best_score: bool,
                                keep_each: bool):
        """Each prompt set on its own, keeping the sigmoid of the upsampled logits: ``(union,
        scores, probability [1024, 1024] (max over sets), each [P, 1024, 1024] or None)``."""
        return self._decode_all(embedding, prompts, multimask_output, pick_best_score, False, keep_each,
                                probability=True)

    def _decode_all(self, embedding, prompts, multimask_output, pick_best_score, batch_prompts, keep_each, probability):
        size = (FRAME, FRAME)
        union = torch.zeros(size, dtype=torch.bool, device=self.device)
        prob = torch.zeros(size, dtype=torch.float32, device=self.device) if probability else None
        each = torch.zeros((len(prompts),) + size, dtype=torch.bool, device=self.device) if keep_each else None
        scores: list = [None] * len(prompts)
        if not prompts:
            return union, scores, prob, each
        for indices in self._groups(prompts, batch_prompts):
            logits, group_scores, _ = self.decode_logits(embedding, [prompts[i] for i in indices],
                                                         multimask_output=multimask_output,
                                                         pick_best_score=pick_best_score)
            masks = logits > self.mask_threshold
            union |= masks.any(dim=0)
            if prob is not None:
                torch.maximum(prob, torch.sigmoid(logits).amax(dim=0), out=prob)
            if each is not None:
                each[indices] = masks
            for i, s in zip(indices, group_scores):
                scores[i] = s
        return union, scores, prob, each


def load_sam2_refiner(name: str, checkpoint_path, device: str = "cpu") -> Sam2Refiner:
    """The refiner for the named SAM 2 model and checkpoint.

    The model is built as the package's ``SAM2VideoPredictor`` (``build_sam2_video_predictor``):
    a ``SAM2Base`` whose image path (``forward_image``, prompt encoder, mask decoder: all this
    refiner calls) is the one ``SAM2ImagePredictor`` runs, plus the video methods memory mode
    (:mod:`protosam.models.sam2_video`) walks the slices with, so one set of weights serves both.
    Its hole filling is turned off (``fill_hole_area = 0``): it needs the package's CUDA
    extension, which ProtoSAM installs without, so every device gives the same masks.
    """
    model = load_sam2(name, checkpoint_path, device=device, video=True)
    model.fill_hole_area = 0
    return Sam2Refiner(model, box_only=_architecture(name).box_only)
