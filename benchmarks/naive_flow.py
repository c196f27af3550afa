"""A volume flow with the published reference's cost structure, built from the Engine's steps.

The reference (levayz/ProtoSAM) segments one structure per run and one query slice per call,
batch size 1. For every (structure, query slice) pair it:

1. encodes the support slice with DINOv2 again (support features are never kept),
2. builds the ALPNet prototypes from them,
3. encodes the query slice with DINOv2,
4. scores the query (coarse logits),
5. encodes the query slice with SAM's image encoder again (``SamPredictor.set_image``),
6. decodes SAM per connected component and takes the union.

This module repeats exactly those calls through :class:`protosam.Engine`'s public step methods
(no maths of its own), so with the same engine its masks must equal
:func:`protosam.segment_volume` with ``auto_extent=False`` on every slice both processed.

With ``reference_kernels=True`` (the default) it also runs the reference's kernels rather than
ours, which give the same bits: DINOv2's explicit attention with all heads at once (the
official code's layout), segment-anything's own all-heads global attention in SAM's encoder,
SAM decoding through segment-anything's ``SamPredictor.predict`` one component at a time
(three masks upsampled, index 0 kept).

One deliberate simplification: the reference returns before ``set_image`` when the coarse mask
is empty. Following the speed issue's definition of the naive flow ("every slice through SAM")
:func:`naive_segment_volume` computes the SAM embedding for every pair by default
(``sam_on_empty=True``); it records how many pairs had an empty coarse mask and how long SAM
took on them, so a caller can also state the cost of the reference's exact behaviour.
Masks are the same either way (the embedding of an empty pair is never decoded).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from segment_anything import SamPredictor

from protosam import Engine, InputError
from protosam.models.sam import SAM_IMAGE_SIZE

logger = logging.getLogger(__name__)

__all__ = ["NaiveResult", "naive_segment_volume"]


@dataclass
class NaiveResult:
    """Output of :func:`naive_segment_volume`.

    ``masks``: key -> uint8 ``[N, H, W]`` (slices not processed stay 0); ``processed``: the
    slice indices run, in order; ``seconds``: wall time; ``step_seconds``: wall time per step
    (``support_dinov2``, ``prototypes``, ``query_dinov2``, ``coarse``, ``sam_embedding``,
    ``sam_embedding_on_empty``, ``refine``); ``pairs``: (structure, slice) pairs run;
    ``empty_pairs``: pairs whose coarse mask was empty (SAM decoder not run).
    """

    masks: Dict[Hashable, np.ndarray]
    processed: List[int]
    seconds: float
    step_seconds: Dict[str, float] = field(default_factory=dict)
    pairs: int = 0
    empty_pairs: int = 0


class _Clock:
    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)

    def run(self, name: str, fn: Callable, *args):
        started = time.perf_counter()
        result = fn(*args)
        self.seconds[name] += time.perf_counter() - started
        return result


class _LazyEmbedding:
    """Embedding provider for :meth:`Engine.refine`: a precomputed one, or computed (and timed)
    on the first call."""

    def __init__(self, engine: Engine, image: torch.Tensor, embedding: Optional[torch.Tensor]):
        self.engine, self.image, self.embedding, self.seconds = engine, image, embedding, 0.0

    def __call__(self) -> torch.Tensor:
        if self.embedding is None:
            started = time.perf_counter()
            self.embedding = self.engine.sam_embedding(self.image)
            self.seconds = time.perf_counter() - started
        return self.embedding


def naive_segment_volume(
    engine: Engine,
    volume: np.ndarray,
    support_masks: Mapping[Hashable, np.ndarray],
    support_slices: Mapping[Hashable, int],
    *,
    slices: Optional[Sequence[int]] = None,
    sam_on_empty: bool = True,
    reference_kernels: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
) -> NaiveResult:
    """Segment each structure over ``slices`` of ``volume`` the reference's way.

    Args:
        engine: a loaded engine; its preset decides SAM decoding (use ``"paper"`` to mirror
            the reference).
        volume: ``[N, H, W]`` float32, already intensity-normalised (slice axis first); it is
            both the support and the query volume.
        support_masks: key -> ``[N, H, W]`` mask (non-zero = structure).
        support_slices: key -> index of the support slice for that structure.
        slices: query slices to process, in order; default every slice (no extent logic).
        sam_on_empty: compute the SAM embedding even when the coarse mask is empty.
        reference_kernels: run the reference's attention layouts and ``SamPredictor``
            decoding (needs the ``paper`` preset's decoding: three masks, index 0); the
            engine's own settings are restored afterwards.
        progress: called with ``(done, total)`` (structure, slice) pairs.
    """
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise InputError(f"volume must be [N, H, W]; got shape {volume.shape}")
    count, height, width = volume.shape
    order = list(range(count)) if slices is None else [int(k) for k in slices]
    if any(not 0 <= k < count for k in order):
        raise InputError(f"slices must lie in 0..{count - 1}")
    if reference_kernels:
        with _reference_kernels(engine) as decode:
            return _run(engine, volume, support_masks, support_slices, order, sam_on_empty, decode, progress)
    return _run(engine, volume, support_masks, support_slices, order, sam_on_empty, None, progress)


@contextlib.contextmanager
def _reference_kernels(engine: Engine):
    """Switch ``engine`` to the reference's kernels (:meth:`Engine.reference_kernels`); yields
    the ``SamPredictor`` decoder."""
    preset = engine.preset
    if not (preset.effective_multimask and not preset.pick_best_score) or engine.refiner.medsam:
        raise ValueError("reference kernels decode like the paper preset (SAM, 3 masks, index 0): use preset 'paper'")
    with engine.reference_kernels():
        yield _sam_predictor_decoder(engine.refiner.sam)


def _sam_predictor_decoder(sam) -> Callable[[torch.Tensor, list], torch.Tensor]:
    """The reference's decoding: ``SamPredictor.predict`` per component, mask index 0, union."""
    predictor = SamPredictor(sam)
    size = (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)

    def decode(embedding: torch.Tensor, prompts: list) -> torch.Tensor:
        # The embedding is the one set_image would compute for this 1024 x 1024 image.
        predictor.features = embedding
        predictor.original_size = predictor.input_size = size
        predictor.is_image_set = True
        union = np.zeros(size, bool)
        for prompt in prompts:
            masks, _, _ = predictor.predict(
                point_coords=prompt.points, point_labels=prompt.point_labels, box=prompt.box, multimask_output=True
            )
            union |= masks[0]
        return torch.from_numpy(union)

    return decode


def _run(engine, volume, support_masks, support_slices, order, sam_on_empty, decode, progress) -> NaiveResult:
    count, height, width = volume.shape
    clock = _Clock()
    masks: Dict[Hashable, np.ndarray] = {}
    total = len(order) * len(support_masks)
    done = empty = 0
    started = time.perf_counter()
    for key, mask in support_masks.items():
        mask = np.asarray(mask) != 0
        if mask.shape != volume.shape:
            raise InputError(f"support mask '{key}' has shape {mask.shape}, volume {volume.shape}")
        support_index = int(support_slices[key])
        support_image = volume[support_index:support_index + 1]
        output = np.zeros(volume.shape, np.uint8)
        for index in order:
            # 1-2. Support features and prototypes, recomputed for every query slice.
            support_features = clock.run("support_dinov2", lambda: engine.encode(engine.to_model_input(support_image))[0])
            prototypes = clock.run("prototypes", engine.prototypes_from_features, support_features, mask[support_index])
            # 3-4. Query features and coarse logits.
            images = engine.to_model_input(volume[index:index + 1])
            features = clock.run("query_dinov2", engine.encode, images)
            logits = clock.run("coarse", engine.coarse_logits, prototypes, features)[0]
            # 5. SAM image embedding for this (slice, structure) pair, never shared.
            embedding, sam_seconds = None, 0.0
            if sam_on_empty:
                sam_started = time.perf_counter()
                embedding = engine.sam_embedding(images[0])
                sam_seconds = time.perf_counter() - sam_started
            # 6. Prompts + SAM decoding with the engine's preset. Without ``sam_on_empty`` the
            #    engine asks for the embedding only when the coarse mask is not empty.
            lazy = _LazyEmbedding(engine, images[0], embedding)
            refined = clock.run("refine", engine.refine, logits, lazy, decode)
            coarse_empty = not refined.prompts
            clock.seconds["sam_embedding_on_empty" if coarse_empty else "sam_embedding"] += sam_seconds + lazy.seconds
            clock.seconds["refine"] -= lazy.seconds
            output[index] = engine.to_slice_size(refined.mask, (height, width))
            empty += int(coarse_empty)
            done += 1
            if progress is not None:
                progress(done, total)
        masks[key] = output
    seconds = time.perf_counter() - started
    logger.info("Naive flow: %d structure(s) x %d slices in %.1f s", len(support_masks), len(order), seconds)
    return NaiveResult(masks, order, seconds, dict(clock.seconds), done, empty)
