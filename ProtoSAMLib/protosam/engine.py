"""The ProtoSAM engine: one support slice + query slices -> coarse and refined masks.

Frames and sizes: user slices are ``[H, W]`` float32 arrays (already intensity-normalised).
Inside, every slice is resized bilinearly to ``S x S`` (``S`` = ``input_size``, 672 in the
paper), DINOv2 sees ``S//14*14`` pixels, ALPNet scores on the patch grid (at least 32 x 32),
coarse logits come back at ``S``; SAM works at 1024 x 1024 and its union mask returns to ``S``
by nearest neighbour. Results are given back at each query's own ``[H, W]``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import catalogue
from .catalogue import ModelSelection  # torch-free, so Slicer's process can build one (re-exported)
from .catalogue import DEFAULT_PROPAGATION, propagation_problem
from .cache import EmbeddingCache
from .errors import CancelledError, InputError, ProtoSAMError
from .heap import return_free_heap, reuse_freed_heap_blocks
from .models.alpnet import ALPNetConfig, Prototypes, compute_prototypes, mask_to_grid, score_queries
from .models.dinov2 import get_dinov2_architecture, load_dinov2
from .models.refiners import check_refiner_name, load_refiner
from .models.sam import SAM_IMAGE_SIZE, SamRefiner, upsample_mask_logits
from .models.sam_decoder import SharedImageDecoder, StockMaskDecoder
from .models.sam_memory import limit_global_attention_memory, use_stock_global_attention
from .precision import resolve_precision
from .presets import Preset, get_preset
from .prompts import ComponentPrompt, add_negative_points, extract_prompts
from .validation import as_binary_mask, as_float_slices
from .weights import resolve_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["ModelSelection", "Engine", "SliceResults", "RefinedSlice", "resolve_device"]

# ALPNet's prototype pooling assumes at least a 32 x 32 grid (smaller grids are upsampled).
MIN_FEATURE_GRID = catalogue.MIN_FEATURE_GRID
ProgressCallback = Callable[[int, int], None]


@dataclass
class RefinedSlice:
    """SAM refinement of one slice at ``S x S``: mask and the prompts sent (1024 frame)."""

    mask: torch.Tensor  # [S, S] bool
    prompts: List[ComponentPrompt] = field(default_factory=list)
    scores: list = field(default_factory=list)
    # With refine(keep_prompt_masks=True): [P, S, S] bool, each prompt set's own mask (their
    # union is ``mask``: nearest resizing picks pixels, so it commutes with the union).
    prompt_masks: Optional[torch.Tensor] = None
    # With refine(keep_probability=True): [S, S] float32, the refined mask probability: the
    # sigmoid of SAM's upsampled mask logits at 1024 (MedSAM: its upsampled sigmoid), the
    # maximum over the prompt sets (the union's), resized to S by nearest neighbour as the mask is.
    probability: Optional[torch.Tensor] = None


@dataclass
class SliceResults:
    """Outputs for N query slices, each at the query's own size ``[H, W]``.

    The coarse mask has one rule wherever it is used: ALPNet's logits (at ``S``) resized
    bilinearly to the frame where the mask is needed, softmax, argmax (foreground wins ties
    only when strictly more probable). That frame is the query's ``[H, W]`` for the outputs
    here, and SAM's 1024 x 1024 for the prompts (the reference's choice, see ``refine``).

    ``coarse_prob``: ``[N, H, W]`` float32 foreground probability (softmax at ``[H, W]``);
    ``coarse_mask``: ``[N, H, W]`` uint8, argmax at ``[H, W]`` (no CCA); ``mask``: ``[N, H, W]``
    uint8 final mask: SAM's union mask (at ``S``, nearest-neighbour to ``[H, W]``), or with
    ``coarse_only`` the coarse mask itself, reduced to its component of largest probability
    mass when CCA is on; ``prompts``: per query, the list of prompt sets sent to SAM (empty
    when the coarse mask at 1024 is empty or SAM was not run).
    """

    coarse_prob: np.ndarray
    coarse_mask: np.ndarray
    mask: np.ndarray
    prompts: List[List[ComponentPrompt]]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else MPS (Apple GPUs), else CPU; otherwise the named
    device (checked)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("Device 'cuda' was requested but no CUDA GPU is available: use --device cpu or auto.")
    if resolved.type == "mps" and not _mps_available():
        raise InputError("Device 'mps' was requested but this computer has no usable Apple GPU (MPS needs macOS 12.3+ "
                         "on Apple silicon or an AMD GPU): use --device cpu or auto.")
    return resolved


def available_devices() -> List[dict]:
    """The devices this process's torch can compute on, best first: ``{"name", "type", "label"}``
    ("cuda:0"... with the GPU's name, "mps", "cpu")."""
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            devices.append({"name": f"cuda:{index}", "type": "cuda",
                            "label": f"GPU {index}: {torch.cuda.get_device_name(index)} (CUDA)"})
    if _mps_available():
        devices.append({"name": "mps", "type": "mps", "label": "Apple GPU (MPS)"})
    devices.append({"name": "cpu", "type": "cpu", "label": "CPU"})
    return devices


#: The text of the error PyTorch's MPS allocator raises (a plain RuntimeError, not
#: torch.cuda.OutOfMemoryError): "MPS backend out of memory (MPS allocated: ...)".
MPS_OUT_OF_MEMORY = "MPS backend out of memory"


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU out-of-memory error: CUDA's own class, or MPS's RuntimeError."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and MPS_OUT_OF_MEMORY in str(error))


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        try:
            torch.mps.empty_cache()
        except (AttributeError, RuntimeError):  # torch without MPS support
            pass


def check_propagation(mode: str, refiner: str) -> str:
    """``mode`` if the refiner ``refiner`` can walk volumes that way; :class:`InputError` saying
    what to choose otherwise (memory mode needs a SAM 2 refiner)."""
    problem = propagation_problem(mode, refiner)
    if problem:
        raise InputError(problem)
    return mode


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("Cancelled by the user.")


class Engine:
    """Loaded models plus the method's steps; reuse one Engine for many jobs.

    Args:
        models: model names, checkpoint paths and the input size ``S``.
        preset: ``"paper"``, ``"default"`` or a :class:`Preset`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        download: fetch missing official weights into the cache (else raise with instructions).
        weights_home: cache folder override (default ``$PROTOSAM_HOME`` or ``~/.protosam``).
        batch_size: slices per encoder call (default 8 on CUDA, 1 on CPU).
        cache_bytes: memory bound of the encoder-output cache reused across runs (0 = off).
        precision: the encoders' precision, ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA
            only); None keeps the preset's (``paper`` pins fp32 and refuses another). See
            :mod:`protosam.precision`; ``self.precision`` is what it resolved to on this device.
        propagation: how volumes are walked (:data:`protosam.catalogue.PROPAGATION_MODES`):
            ``"per-slice"`` (default, any refiner) or ``"memory"`` (SAM 2's video predictor
            carries the mask from slice to slice; SAM 2 refiners only, refused otherwise).
            ``segment_volume`` and ``Session`` use it unless they are given their own.
    """

    def __init__(
        self,
        models: ModelSelection = ModelSelection(),
        preset="default",
        device: str = "auto",
        *,
        cca: Optional[bool] = None,
        download: bool = True,
        weights_home=None,
        batch_size: Optional[int] = None,
        cache_bytes: int = 0,
        download_progress: Optional[ProgressCallback] = None,
        precision: Optional[str] = None,
        propagation: str = DEFAULT_PROPAGATION,
    ):
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        # Check both names before any download starts: a typo must not cost a 1 GB transfer.
        get_dinov2_architecture(models.dinov2)
        check_refiner_name(models.sam)  # SAM or SAM 2 family (ValueError listing the refiners)
        self.propagation = check_propagation(propagation, models.sam)
        self.models = models
        self.preset: Preset = get_preset(preset, cca=cca, precision=precision)
        self.device = resolve_device(device)
        # "fp32", "bf16" or "fp16": what the encoders run in (the preset holds what was asked).
        self.precision, reason = resolve_precision(self.preset.precision, self.device)
        if precision in (None, "auto") and self.preset.precision != "auto":
            reason = f"preset {self.preset.name} pins {self.preset.precision}"
        self.precision_note = f"precision {self.preset.precision} -> {self.precision} on {self.device.type} ({reason})"
        logger.info("%s", self.precision_note)
        # Batching pays on a GPU; on a CPU it only raises peak memory.
        self.batch_size = batch_size or (8 if self.device.type == "cuda" else 1)
        self.cache = EmbeddingCache(cache_bytes)
        self.alpnet = ALPNetConfig()
        dinov2_path = resolve_checkpoint(
            models.dinov2, models.dinov2_checkpoint, download=download, progress=download_progress, home=weights_home
        )
        sam_path = resolve_checkpoint(
            models.sam, models.sam_checkpoint, download=download, progress=download_progress, home=weights_home
        )
        # SAM decoding frees and allocates the same megabytes for every prompt set: keep those
        # pages resident for reuse (process-wide; see protosam.heap). False where glibc keeps
        # its own thresholds (another C library, or the environment chose them).
        self.heap_blocks_reused = reuse_freed_heap_blocks()
        self.encoder = load_dinov2(models.dinov2, dinov2_path, device=str(self.device))
        self.encoder.set_fused_attention(self.dinov2_fused_attention)
        self.refiner = load_refiner(models.sam, sam_path, device=str(self.device))
        self._decode_in_run_precision()
        logger.info(
            "ProtoSAM engine ready: %s + %s at %d px on %s, preset %s, %s, propagation %s",
            models.dinov2, models.sam, models.input_size, self.device, self.preset.name, self.precision,
            self.propagation,
        )

    # ----------------------------------------------------------------- sizes and precision
    @property
    def input_size(self) -> int:
        return self.models.input_size

    @property
    def encoder_input_size(self) -> int:
        return self.input_size // 14 * 14

    @property
    def dinov2_fused_attention(self) -> bool:
        """Whether DINOv2 attends through its fast form (PyTorch's fused kernel; under autocast on a
        CPU, bf16 products with the softmax between them, see ``vit_blocks``): the preset's choice
        in float32, and always under bf16/fp16 autocast. The explicit form exists for float32
        agreement with the reference to the last bits, which reduced precision gives up anyway;
        there it was also 1.7x slower than the fused kernel (ViT-B at 672 px, 2 CPU cores, bf16:
        1.11 against 0.64 s per slice, the same root-mean-square error against float32 features)."""
        return self.preset.fused_attention or self.precision != "fp32"

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The encoders' autocast type (None: float32, no autocast)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def decoder_dtype(self) -> torch.dtype:
        """The type SAM's decoder computes in: bfloat16 for a bf16 run on a CPU, where a prompt set
        takes about two thirds of the float32 time (see ``SharedImageDecoder``); float32
        otherwise (on GPUs the batched decoder runs as loaded)."""
        return torch.bfloat16 if self.device.type == "cpu" and self.precision == "bf16" else torch.float32

    def _decode_in_run_precision(self) -> None:
        """Give SAM's refiner the per-prompt-set decoder of :attr:`decoder_dtype` (again after a
        fall-back to the CPU, which may change the precision and moves SAM)."""
        if isinstance(self.refiner, SamRefiner):
            self.refiner.shared_decoder = SharedImageDecoder(self.refiner.sam, dtype=self.decoder_dtype)

    # ----------------------------------------------------------------- steps of the method
    def to_model_input(self, slices: np.ndarray) -> torch.Tensor:
        """``[N, H, W]`` float32 -> ``[N, 3, S, S]`` on the device (bilinear resize, 3 channels)."""
        images = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None].to(self.device)
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return images.expand(-1, 3, -1, -1)

    def _recover_from_out_of_memory(self, error: Exception) -> None:
        """On GPU out-of-memory: halve the batch; at batch 1, continue on the CPU.

        Raises ProtoSAMError when there is nothing left to try (already on the CPU, batch 1).
        """
        _empty_device_cache(self.device)
        if self.batch_size > 1:
            self.batch_size //= 2
            logger.warning("Out of memory: retrying with %d slice(s) per batch.", self.batch_size)
            return
        if self.device.type in ("cuda", "mps"):
            logger.warning("GPU out of memory even one slice at a time: continuing on the CPU (slower).")
            self.encoder.to("cpu")
            self.refiner.sam.to("cpu")
            self.device = torch.device("cpu")
            # fp16 is CUDA-only, and auto means fp32 or bf16 on a CPU: choose again for it.
            self.precision, reason = resolve_precision("auto" if self.preset.precision == "fp16" else self.preset.precision,
                                                       self.device)
            self.precision_note = f"precision {self.preset.precision} -> {self.precision} on cpu ({reason})"
            self.encoder.set_fused_attention(self.dinov2_fused_attention)
            self._decode_in_run_precision()
            logger.warning("On the CPU the encoders run in %s (%s).", self.precision, reason)
            return
        raise ProtoSAMError(
            "Out of memory while encoding one slice: close other programs, choose smaller models "
            "(e.g. dinov2_vitb14 and vit_b) or a smaller input size."
        ) from error

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """DINOv2 patch features ``[N, C, g, g]`` float32 (g >= 32) for ``[N, 3, S, S]`` images,
        on ``self.device`` as it is when the call returns (the CPU after a GPU fallback)."""
        outputs = []
        start = 0
        while start < images.shape[0]:
            batch = images[start:start + self.batch_size].to(self.device)
            try:
                features = self._encode_batch(batch)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                self._recover_from_out_of_memory(error)
                continue
            outputs.append(features)
            start += batch.shape[0]
        # After a GPU -> CPU fallback earlier batches are still on the GPU: gather on one device.
        return torch.cat([features.to(self.device) for features in outputs])

    def _encode_batch(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[-1] != self.encoder_input_size:
            size = (self.encoder_input_size, self.encoder_input_size)
            batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            features = self.encoder.patch_features(batch).float()
        if features.shape[-1] < MIN_FEATURE_GRID:
            features = F.interpolate(features, size=(MIN_FEATURE_GRID, MIN_FEATURE_GRID), mode="bilinear", align_corners=False)
        return features

    def prototypes_from_features(self, support_features: torch.Tensor, support_mask: np.ndarray) -> Prototypes:
        """Prototypes from support features ``[C, g, g]`` and a bool mask ``[H, W]``."""
        mask = torch.from_numpy(np.ascontiguousarray(support_mask, dtype=np.float32)).to(support_features.device)
        return compute_prototypes(support_features, mask_to_grid(mask, support_features.shape[-2:]), self.alpnet)

    def support_prototypes(self, support_image: np.ndarray, support_mask: np.ndarray) -> Prototypes:
        """Prototypes of one support slice ``[H, W]`` with its bool mask ``[H, W]``."""
        features = self.encode(self.to_model_input(support_image[None]))[0]
        return self.prototypes_from_features(features, support_mask)

    @torch.inference_mode()
    def coarse_logits(self, prototypes: Prototypes, features: torch.Tensor) -> torch.Tensor:
        """ALPNet logits ``[N, 2, S, S]`` (bg, fg) for query features ``[N, C, g, g]``."""
        # After a GPU -> CPU fallback, prototypes made earlier may sit on the other device.
        prototypes = prototypes.to(features.device)
        grid_logits = score_queries(features, prototypes, self.alpnet)
        return F.interpolate(grid_logits, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)

    def sam_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, 3, 1024, 1024]`` (bilinear, as the reference upsamples)."""
        if images.shape[-1] == SAM_IMAGE_SIZE:
            return images
        return F.interpolate(images, size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear", align_corners=False)

    def sam_embedding(self, image: torch.Tensor) -> torch.Tensor:
        """SAM image embedding ``[1, C, 64, 64]`` for one ``[3, S, S]`` model-input slice."""
        # The encoder's temporaries are a run's largest (its peak): start them from a heap whose
        # freed pages went back to the system, not on top of what earlier slices left free.
        return_free_heap()
        while True:
            try:
                return self.refiner.embed(self.sam_images(image[None].to(self.device)), autocast_dtype=self.autocast_dtype)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                self.batch_size = 1
                self._recover_from_out_of_memory(error)

    @torch.inference_mode()
    def refine(
        self,
        logits: torch.Tensor,
        embedding_for_slice: Callable[[], torch.Tensor],
        decode: Optional[Callable[[torch.Tensor, List[ComponentPrompt]], torch.Tensor]] = None,
        keep_prompt_masks: bool = False,
        keep_probability: bool = False,
        extra_negatives: Optional[np.ndarray] = None,
    ) -> RefinedSlice:
        """Prompts from coarse logits ``[2, S, S]`` -> SAM -> mask ``[S, S]``.

        The coarse mask the prompts come from is the argmax of the logits resized bilinearly
        to SAM's 1024 x 1024 frame, as the reference computes it (components, boxes and points
        at 1024); it can differ from ``SliceResults.coarse_mask`` (the same rule at the query's
        size) only along the boundary, by the resampling.

        ``embedding_for_slice`` is called only when the coarse mask is not empty, so slices
        without the structure never pay for SAM's image encoder. ``decode(embedding, prompts)``
        replaces the preset's SAM decoding (it returns the ``[1024, 1024]`` bool union; used by
        the benchmark's reference flow to decode through segment-anything's ``SamPredictor``).
        ``keep_prompt_masks`` also returns each prompt set's mask (``RefinedSlice.prompt_masks``;
        not with ``decode``). ``keep_probability`` also returns the refined mask probability
        (``RefinedSlice.probability``; exclusive structures): the prompt sets are then decoded one
        at a time (the CPU's way, same mask bits there; batched GPU decoding may round differently).
        ``extra_negatives``: ``[H, W]`` bool voxels of the slice that are not the structure ("other
        segments"): negative points are added to the prompt sets (see
        :func:`protosam.prompts.add_negative_points`); not for MedSAM (box-only).
        """
        if (keep_prompt_masks or keep_probability) and decode is not None:
            raise ValueError("keep_prompt_masks and keep_probability need the engine's own SAM decoding, "
                             "not a decode callable")
        logits_1024 = F.interpolate(logits[None].float(), size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear", align_corners=False)
        prob = F.softmax(logits_1024, dim=1)[0]
        # argmax's rule (background on ties) as one comparison: torch's argmax over a size-2
        # leading dim of [2, 1024, 1024] costs ~90 ms of CPU per call, the comparison ~1 ms.
        fg_mask = prob[1] > prob[0]
        size = (self.input_size, self.input_size)
        if not bool(fg_mask.any()):
            empty = torch.zeros((0,) + size, dtype=torch.bool, device=logits.device) if keep_prompt_masks else None
            return RefinedSlice(torch.zeros(size, dtype=torch.bool, device=logits.device), prompt_masks=empty)
        prompts = extract_prompts(
            prob[1].cpu().numpy(),
            fg_mask.cpu().numpy(),
            keep_largest_only=self.preset.keep_largest_component,
            negative_points=self.preset.negative_points,
            max_components=self.preset.max_components,
        )
        if extra_negatives is not None and not self.refiner.medsam and extra_negatives.any():
            prompts = add_negative_points(prompts, extra_negatives)
        embedding = embedding_for_slice().to(self.device)
        each = None
        if keep_probability:
            union, scores, prob, each = self._decode_with_probability(embedding, prompts, keep_prompt_masks)
            each = None if each is None else self.sam_mask_to_input_size(each)
            return RefinedSlice(self.sam_mask_to_input_size(union), prompts, scores, each,
                                self._probability_to_input_size(prob))
        if decode is not None:
            union, scores = decode(embedding, prompts).to(self.device), []
        else:
            decoded = self.refiner.decode(
                embedding,
                prompts,
                multimask_output=self.preset.effective_multimask,
                pick_best_score=self.preset.pick_best_score,
                # On a CPU one prompt set per call, sharing the image terms, is faster than
                # batching (measured 71 vs 99 ms per set, SAM ViT-B); batching pays on GPUs.
                batch_prompts=self.preset.batch_prompts and self.device.type != "cpu",
                return_masks=keep_prompt_masks,
            )
            union, scores = decoded[0], decoded[1]
            if keep_prompt_masks:
                each = self.sam_mask_to_input_size(decoded[2])
        return RefinedSlice(self.sam_mask_to_input_size(union), prompts, scores, each)

    def _decode_with_probability(self, embedding: torch.Tensor, prompts: List[ComponentPrompt], keep_each: bool):
        """Each prompt set decoded on its own, as ``SamRefiner`` decodes one set (same steps,
        same bits), keeping the upsampled mask logits' sigmoid: ``(union [1024, 1024] bool,
        scores, probability [1024, 1024] float32 (max over sets), each [P, 1024, 1024] or None)``."""
        if not isinstance(self.refiner, SamRefiner):  # SAM 2: the refiner's own per-set decoding
            return self.refiner.decode_with_probability(
                embedding, prompts, multimask_output=self.preset.effective_multimask,
                pick_best_score=self.preset.pick_best_score, keep_each=keep_each)
        refiner, sam = self.refiner, self.refiner.sam
        device = refiner.device
        size = (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)
        union = torch.zeros(size, dtype=torch.bool, device=device)
        probability = torch.zeros(size, dtype=torch.float32, device=device)
        each = torch.zeros((len(prompts),) + size, dtype=torch.bool, device=device) if keep_each else None
        scores = []
        multimask = False if refiner.medsam else self.preset.effective_multimask
        for number, prompt in enumerate(prompts):
            boxes = None if prompt.box is None else torch.as_tensor(prompt.box[None], dtype=torch.float, device=device)
            points = None
            if not refiner.medsam:
                points = (torch.as_tensor(prompt.points[None], dtype=torch.float, device=device),
                          torch.as_tensor(prompt.point_labels[None], dtype=torch.int, device=device))
            sparse, _ = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            # Only the mask the preset keeps is upscaled: [1, 1, ...] logits and its score.
            chosen, iou = refiner.shared_decoder.decode(embedding, sparse, multimask_output=multimask,
                                                        pick_best_score=self.preset.pick_best_score)
            if refiner.medsam:
                prob = F.interpolate(torch.sigmoid(chosen), size=size, mode="bilinear", align_corners=False)[0, 0]
                mask = prob > 0.5
            else:
                full = upsample_mask_logits(chosen)[0, 0]  # postprocess_masks' bits, one resize
                mask = full > sam.mask_threshold
                prob = torch.sigmoid(full)
            union |= mask
            torch.maximum(probability, prob.float(), out=probability)
            if each is not None:
                each[number] = mask
            scores.append(float(iou[0, 0]))
        return union, scores, probability, each

    def _probability_to_input_size(self, probability: torch.Tensor) -> torch.Tensor:
        """``[1024, 1024]`` float probability at ``[S, S]`` by nearest neighbour (as the mask)."""
        size = (self.input_size, self.input_size)
        return F.interpolate(probability[None, None], size=size, mode="nearest")[0, 0]

    @staticmethod
    def probability_to_slice_size(probability: torch.Tensor, hw) -> np.ndarray:
        """Nearest-neighbour resize of a ``[S, S]`` float probability to ``hw``; float32 numpy
        (the same voxels :meth:`to_slice_size` picks for the mask)."""
        if tuple(probability.shape) != tuple(hw):
            probability = F.interpolate(probability[None, None].float(), size=tuple(hw), mode="nearest")[0, 0]
        return probability.cpu().numpy().astype(np.float32)

    def sam_mask_to_input_size(self, masks: torch.Tensor) -> torch.Tensor:
        """SAM's ``[..., 1024, 1024]`` bool masks at the model input size ``[..., S, S]``. Nearest
        resizing picks pixels, so it commutes with the union of prompt sets' masks."""
        size = (self.input_size, self.input_size)
        flat = masks.reshape((math.prod(masks.shape[:-2]), 1) + tuple(masks.shape[-2:])).float()
        return (F.interpolate(flat, size=size, mode="nearest") > 0.5).reshape(tuple(masks.shape[:-2]) + size)

    # ----------------------------------------------------------------- slice-level job
    def segment_slices(
        self,
        support_image,
        support_mask,
        queries,
        *,
        coarse_only: bool = False,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
    ) -> SliceResults:
        """Segment N query slices from one support slice.

        Args:
            support_image: ``[H, W]`` float32, preprocessed (no intensity change is made here).
            support_mask: ``[H, W]``, non-zero = structure.
            queries: ``[N, H', W']`` float32 slices (any size; all resized to ``S``).
            coarse_only: stop after ALPNet: ``mask`` = ``coarse_mask`` (CCA applied if enabled,
                on that same mask at ``[H, W]``).
        """
        support_image = as_float_slices(support_image, "support image", 2)
        support_mask = as_binary_mask(support_mask, "support mask", support_image.shape)
        queries = as_float_slices(queries, "queries", 3)
        if not support_mask.any():
            raise InputError("The support mask is empty: paint the structure on the support slice.")
        prototypes = self.support_prototypes(support_image, support_mask)
        count, height, width = queries.shape
        coarse_prob = np.zeros((count, height, width), np.float32)
        coarse_mask = np.zeros((count, height, width), np.uint8)
        final_mask = np.zeros((count, height, width), np.uint8)
        all_prompts: List[List[ComponentPrompt]] = [[] for _ in range(count)]
        start = 0
        while start < count:
            _check_cancel(cancel)
            # The batch size may shrink inside encode (out-of-memory retry): the next window
            # starts right after this one, whatever size the following windows have.
            images = self.to_model_input(queries[start:start + self.batch_size])
            logits = self.coarse_logits(prototypes, self.encode(images))
            at_query_size = logits
            if (height, width) != (self.input_size, self.input_size):
                at_query_size = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            prob = F.softmax(at_query_size, dim=1)
            coarse_prob[start:start + len(images)] = prob[:, 1].cpu().numpy()
            coarse_mask[start:start + len(images)] = (prob[:, 1] > prob[:, 0]).cpu().numpy()  # = argmax == 1
            for offset in range(len(images)):
                index = start + offset
                _check_cancel(cancel)
                if coarse_only:
                    final_mask[index] = self._coarse_only_mask(coarse_prob[index], coarse_mask[index])
                else:
                    refined = self.refine(logits[offset], lambda i=offset: self.sam_embedding(images[i]))
                    all_prompts[index] = refined.prompts
                    final_mask[index] = self.to_slice_size(refined.mask, (height, width))
                if progress is not None:
                    progress(index + 1, count)
            start += len(images)
        return SliceResults(coarse_prob, coarse_mask, final_mask, all_prompts)

    def _coarse_only_mask(self, fg_prob: np.ndarray, coarse_mask: np.ndarray) -> np.ndarray:
        """``mask`` of a coarse-only run: the coarse mask ``[H, W]`` uint8, or with CCA its
        component of largest foreground mass (``fg_prob`` ``[H, W]``), as the prompts' CCA picks."""
        if not self.preset.keep_largest_component or not coarse_mask.any():
            return coarse_mask.copy()
        (kept,) = extract_prompts(fg_prob, coarse_mask.astype(bool), keep_largest_only=True)
        return kept.full_mask(coarse_mask.shape).astype(np.uint8)

    @staticmethod
    def to_slice_size(mask: torch.Tensor, hw) -> np.ndarray:
        """Nearest-neighbour resize of a ``[S, S]`` bool mask to ``hw``; uint8 numpy."""
        if tuple(mask.shape) != tuple(hw):
            mask = F.interpolate(mask[None, None].float(), size=tuple(hw), mode="nearest")[0, 0] > 0.5
        return mask.cpu().numpy().astype(np.uint8)

    @contextlib.contextmanager
    def reference_kernels(self):
        """Run the published reference's kernels while the context is open (benchmarks of the
        reference's cost, tests of ours): DINOv2's explicit all-heads attention, segment-anything's
        stock SAM global attention and its own ``MaskDecoder`` instead of this engine's fused and
        head-chunked attention and its restructured decoder (the same maths: features and
        logits differ by float rounding). The engine's own kernels, and SAM's chunking
        settings, come back on exit."""
        if not isinstance(self.refiner, SamRefiner):
            raise ValueError("reference_kernels compares SAM's attention kernels; the refiner here is "
                             f"{self.models.sam}, not SAM")
        sam = self.refiner.sam
        chunking = next(
            ((b.attn.heads_per_chunk, b.attn.chunk_bytes) for b in sam.image_encoder.blocks if "forward" in b.attn.__dict__),
            None,
        )
        decoder = self.refiner.shared_decoder
        self.encoder.set_fused_attention(False, heads_per_chunk=None)
        use_stock_global_attention(sam)
        self.refiner.shared_decoder = StockMaskDecoder(sam)
        try:
            yield self
        finally:
            self.refiner.shared_decoder = decoder
            self.encoder.set_fused_attention(self.dinov2_fused_attention)
            if chunking is not None:
                limit_global_attention_memory(sam, *chunking)
