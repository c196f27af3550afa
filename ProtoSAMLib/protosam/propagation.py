"""Whole-volume propagation: one painted slice per structure -> every slice of a volume.

Two ways to say how a volume is sliced: give its geometry (``query_ijk_to_ras``, and
``support_ijk_to_ras`` for a separate support volume) and a ``plane``, and the engine brings
both volumes into the canonical order of :mod:`protosam.orientation` (slices as Slicer's slice
view of that plane shows them), runs there and maps everything back to the caller's ``[k, j, i]``
voxel order; or pass the arrays "as stored" with ``axis`` naming the slicing axis (array-level
callers such as the evaluation protocol, which reads datasets as stored).

Work is shared: each query slice is encoded once by DINOv2 and at most once by SAM, whatever
the number of structures; support features are computed once per support slice; SAM never
runs on a slice whose coarse mask is empty. With ``auto_extent`` (the ``default`` preset) each
structure is followed outwards from its support slice(s) and dropped after it has been absent
for ``stop_after_empty`` consecutive slices.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .cache import EmbeddingCache, volume_fingerprint
from .confidence import evidence_array, slice_evidence, slice_scores, structure_score, volume_score
from .errors import CancelledError, InputError
from .models.alpnet import Prototypes, pool_prototypes
from .orientation import canonical_orientation, choose_plane
from .engine import Engine, check_propagation
from .preprocessing import normalize_volume
from .validation import as_binary_mask, as_float_slices

logger = logging.getLogger(__name__)

__all__ = ["VolumeResult", "segment_volume", "largest_area_slice", "resolve_exclusive", "with_background_examples",
           "SUPPORT_MODES", "SupportExample", "slice_descriptor", "DEFAULT_SIMILAR_K"]

# How a query slice uses several support slices of one structure: "nearest" takes the
# prototypes of the support (seed) nearest to it; "all" pools the prototypes of every support,
# as ALPNet does for several shots (see :func:`protosam.models.alpnet.pool_prototypes`);
# "similar" pools the prototypes of the k supports whose slices look most like the query slice
# (see :func:`slice_descriptor`).
SUPPORT_MODES = ("nearest", "all", "similar")
DEFAULT_SIMILAR_K = 3


@dataclass(frozen=True)
class SupportExample:
    """A support slice from another volume, as plain arrays (an example bank's entry, an
    example sent over the wire): the engine needs no file or volume to use it.

    ``image``: ``[H, W]`` float32, the slice exactly as the engine normalised it
    (:func:`protosam.preprocessing.normalize_volume` of its whole volume), in the slicing
    order the query is run in (with geometry: the canonical order of
    :mod:`protosam.orientation` for the query's plane); ``mask``: ``[H, W]``, non-zero = the
    structure on the whole slice; ``slice_index`` of ``slice_count``: its place along the
    slicing axis of its volume (it seeds the query slice at the same relative position);
    ``features``: optional ``[C, g, g]`` encoder features of ``image`` for the engine in use
    (an array or a tensor), so that the example costs no encoder work; None: encoded here.
    """

    image: np.ndarray
    mask: np.ndarray
    slice_index: int
    slice_count: int
    features: object = None

    def seed(self, query_count: int) -> int:
        """The query slice it seeds: the same relative position (as :func:`_seed_slices`)."""
        return int(round(self.slice_index * (query_count - 1) / max(self.slice_count - 1, 1)))


def slice_descriptor(features: torch.Tensor) -> torch.Tensor:
    """What "similar" compares: a slice's encoder features ``[C, g, g]`` averaged over the whole
    grid and scaled to unit length, ``[C]``. Two slices' similarity is the cosine of their
    descriptors (the dot product): slices of the same anatomy at the same level score near 1."""
    vector = features.float().mean(dim=(-2, -1))
    return vector / vector.norm().clamp_min(1e-8)

SupportSlices = Mapping[Hashable, Union[int, Sequence[int]]]


@dataclass
class VolumeResult:
    """``masks``: uint8 volumes with the query's shape and voxel order, one per structure key;
    ``support_slices``: the support slice indices used per key (along the support's ``axis``);
    ``processed_slices``: query slices the engine ran on per key (sorted, along ``axis``);
    ``seconds``: wall time of the run; ``axis``: the query array axis the slice indices run
    along (with geometry: the axis of the plane; the support's may differ, see
    ``support_axis``); ``plane``: the slicing plane when geometry was given, else ``""``.
    ``slice_confidence``: per key, ``[N]`` float32 scores in ``[0, 1]`` of the ``N`` slices along
    ``axis`` (NaN: no score, outside the structure's extent); ``structure_confidence``: per key;
    ``volume_confidence``: the lowest of those (see :mod:`protosam.confidence`);
    ``slice_evidence``: per key, ``[N, 3]`` float64, what those scores came from on each slice
    (:func:`protosam.confidence.evidence_array`), so that a session adopting this result
    rescores it after corrections as it would have (``Session.adopt(evidence=...)``)."""

    masks: Dict[Hashable, np.ndarray]
    support_slices: Dict[Hashable, List[int]]
    processed_slices: Dict[Hashable, List[int]]
    seconds: float
    axis: int = 0
    support_axis: int = 0
    plane: str = ""
    slice_confidence: Dict[Hashable, np.ndarray] = field(default_factory=dict)
    structure_confidence: Dict[Hashable, float] = field(default_factory=dict)
    volume_confidence: Optional[float] = None
    slice_evidence: Dict[Hashable, np.ndarray] = field(default_factory=dict)


def largest_area_slice(mask: np.ndarray) -> int:
    """Index along axis 0 of the slice where ``mask`` ``[N, H, W]`` has the most voxels."""
    return int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))


# Host memory a run may use to keep a slice's encoder outputs for a later phase that visits it
# again (the up and down walks of structures whose seeds differ overlap between the seeds).
# 1 GiB holds ~90 slices of DINOv2 ViT-B features at 672 px (7 MiB) plus SAM ViT-B embeddings
# (4 MiB); beyond it a slice is encoded again, as without keeping.
KEEP_FOR_LATER_PHASES_BYTES = 2**30


def _nbytes(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.element_size() * tensor.nelement()


class _SliceStore:
    """Per-run access to one volume's slices: model input, DINOv2 features, SAM embedding.

    Features are computed in batches along the walking direction and dropped once used,
    unless a later phase of the run (see :meth:`expect`) visits the slice again: then they
    are kept, in host memory and within ``KEEP_FOR_LATER_PHASES_BYTES``, so a run encodes
    each slice once. A run never holds features for the whole volume (the engine's bounded
    cache may).
    """

    def __init__(self, engine: Engine, volume: np.ndarray, cache: Optional[EmbeddingCache] = None,
                 fingerprint: Optional[str] = None):
        self.engine = engine
        self.volume = volume
        # The engine's cache across runs, or a session's (protosam.session) for its volume.
        self.cache = engine.cache if cache is None else cache
        if not self.cache.max_bytes:
            self.fingerprint = ""
        else:
            self.fingerprint = fingerprint if fingerprint is not None else volume_fingerprint(volume)
        self._features: Dict[int, torch.Tensor] = {}
        self._embeddings: Dict[int, torch.Tensor] = {}
        self._phases: List[set] = []  # slices of the current phase, then of the later ones
        self._kept: Dict[int, int] = {}  # slice -> bytes kept for a later phase

    def image(self, index: int) -> torch.Tensor:
        return self.engine.to_model_input(self.volume[index:index + 1])[0]

    def features(self, index: int, upcoming: Sequence[int] = ()) -> torch.Tensor:
        if index not in self._features:
            wanted = [index] + [k for k in upcoming if k not in self._features][: self.engine.batch_size - 1]
            missing = []
            for k in wanted:
                cached = self.cache.get(("dinov2", self.fingerprint, k)) if self.fingerprint else None
                if cached is not None:
                    self._features[k] = cached
                else:
                    missing.append(k)
            if missing:
                encoded = self.engine.encode(self.engine.to_model_input(self.volume[missing]))
                for k, feats in zip(missing, encoded):
                    self._features[k] = feats
                    if self.fingerprint:
                        self.cache.put(("dinov2", self.fingerprint, k), feats)
        # Kept features wait in host memory; no-op on the CPU.
        return self._features[index].to(self.engine.device)

    def sam_embedding(self, index: int) -> torch.Tensor:
        if index not in self._embeddings:
            key = ("sam", self.fingerprint, index)
            cached = self.cache.get(key) if self.fingerprint else None
            if cached is None:
                cached = self.engine.sam_embedding(self.image(index))
                if self.fingerprint:
                    self.cache.put(key, cached)
            self._embeddings[index] = cached
        return self._embeddings[index]

    def has_sam_embedding(self, index: int) -> bool:
        """Whether :meth:`sam_embedding` can answer without encoding (held, or in the cache)."""
        cached = bool(self.fingerprint) and ("sam", self.fingerprint, index) in self.cache
        return index in self._embeddings or cached

    def expect(self, phases: Sequence[Sequence[int]]) -> None:
        """The slices each phase of the run may visit, in run order (the first is current)."""
        self._phases = [set(phase) for phase in phases]

    def release(self, index: int) -> None:
        """Done with ``index`` in this phase: keep its outputs if a later phase visits it."""
        if index in self._kept:
            return
        later = any(index in phase for phase in self._phases[1:])
        size = _nbytes(self._features.get(index)) + _nbytes(self._embeddings.get(index))
        if later and sum(self._kept.values()) + size <= KEEP_FOR_LATER_PHASES_BYTES:
            for outputs in (self._features, self._embeddings):
                if index in outputs:
                    outputs[index] = outputs[index].to("cpu")
            self._kept[index] = size
            return
        self._drop(index)

    def end_phase(self) -> None:
        """The current phase is over: drop what no remaining phase visits (kept slices, and
        slices encoded ahead for a walk that stopped before reaching them)."""
        self._phases = self._phases[1:]
        for index in set(self._features) | set(self._embeddings):
            if not any(index in phase for phase in self._phases):
                self._drop(index)

    def _drop(self, index: int) -> None:
        self._kept.pop(index, None)
        self._features.pop(index, None)
        self._embeddings.pop(index, None)


@dataclass
class _Structure:
    key: Hashable
    support_indices: List[int]  # support slices the user's mask is taken from
    seeds: List[int]  # query slices where propagation starts
    copied: Dict[int, np.ndarray]  # query slices whose mask is the user's own (same volume)
    prototypes_by_seed: Dict[int, Prototypes]
    output: np.ndarray  # [N, H, W] uint8, query order with the slice axis first
    processed: List[int]
    # Prompt sets SAM was given per processed slice (1024 frame): click corrections add to them.
    prompts: Dict[int, list] = field(default_factory=dict)
    # The structure is known to be present at its seeds (painted on the query volume itself).
    known_present: bool = False
    # When a dict (correction sessions): each processed slice's prompt sets' own masks at the
    # slice's size, as cropped masks (see crop_mask), so a click re-decodes only its set.
    prompt_masks: Optional[Dict[int, list]] = None
    # "Other segments": [N, H, W] bool voxels that are not this structure (None: no such option).
    negatives: Optional[np.ndarray] = None
    # Exclusive runs: per processed slice with a mask, (rows, cols, float32 crop) of the refined
    # mask probability over the mask's bounding box (see resolve_exclusive). None: not kept.
    probabilities: Optional[Dict[int, tuple]] = None
    # Per processed slice, what the models computed that says how sure it is (protosam.confidence).
    evidence: Dict[int, object] = field(default_factory=dict)
    # support_mode "similar": every support's (descriptor [C], prototypes), in support order,
    # and how many the query slice pools (see prototypes_for). None: by seed.
    similar: Optional[List[Tuple[torch.Tensor, Prototypes]]] = None
    similar_k: int = DEFAULT_SIMILAR_K
    _pooled: Dict[tuple, Prototypes] = field(default_factory=dict)
    # Correction sessions: each slice's outcome in the previous run (``reusable``) and in this
    # one (``outcomes``), keyed by what determines it (see _SliceOutcome). None: not kept.
    reusable: Optional[Dict[int, "_SliceOutcome"]] = None
    outcomes: Optional[Dict[int, "_SliceOutcome"]] = None

    def nearest_prototypes(self, index: int) -> Prototypes:
        seed = min(self.prototypes_by_seed, key=lambda s: (abs(s - index), s))
        return self.prototypes_by_seed[seed]

    def prototypes_for(self, index: int, features: torch.Tensor) -> Prototypes:
        """The prototypes query slice ``index`` (features ``[C, g, g]``) is scored with: the
        nearest seed's, or with ``similar`` the pool of the k supports whose descriptors have
        the highest cosine with the slice's (ties: the support given first)."""
        if not self.similar:
            return self.nearest_prototypes(index)
        query = slice_descriptor(features)
        scores = [float(torch.dot(query, descriptor.to(query.device))) for descriptor, _ in self.similar]
        chosen = tuple(sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: self.similar_k]))
        if chosen not in self._pooled:
            self._pooled[chosen] = pool_prototypes([self.similar[i][1] for i in chosen])
        return self._pooled[chosen]


@dataclass(frozen=True)
class CroppedMask:
    """A 2-D bool mask stored as its bounding box: ``rows``/``cols`` slices of the full
    ``[H, W]`` frame and ``values`` the bool crop (an empty mask has an empty box)."""

    rows: slice
    cols: slice
    values: np.ndarray

    def paint(self, target: np.ndarray) -> None:
        """OR the mask into ``target`` (``[H, W]`` uint8), in place."""
        target[self.rows, self.cols] |= self.values.astype(target.dtype)


def crop_mask(mask: np.ndarray) -> CroppedMask:
    """Crop an ``[H, W]`` mask to the box of its non-zero pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return CroppedMask(slice(0, 0), slice(0, 0), np.zeros((0, 0), bool))
    cols = np.flatnonzero(mask.any(axis=0))
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    return CroppedMask(box[0], box[1], mask[box].astype(bool))


@dataclass(frozen=True)
class _SliceOutcome:
    """One slice's result for one structure, with the signature of everything it depends on
    besides the slice's own (cached, deterministic) encodings: the prototypes' values, the
    slice's "not this structure" voxels and what the run keeps. A session's update reuses it
    when the signature is unchanged: the same inputs through the same steps give the same bits,
    so only slices whose nearest support (or negatives) changed are matched and decoded again."""

    signature: bytes
    mask: CroppedMask
    prompts: list
    prompt_masks: Optional[list]
    probability: Optional[tuple]
    evidence: object = None  # protosam.confidence's slice evidence, kept with the slice


def _outcome_signature(prototypes: Prototypes, negative: Optional[np.ndarray], keep: bool,
                       keep_probability: bool, known: Dict[int, bytes]) -> bytes:
    """Digest of a slice's inputs besides its encodings (``known``: digests by prototypes id)."""
    digest = known.get(id(prototypes))
    if digest is None:
        hasher = hashlib.blake2b(digest_size=16)
        for tensor in (prototypes.background, prototypes.foreground):
            hasher.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        hasher.update(bytes([prototypes.foreground_is_local]))
        digest = known[id(prototypes)] = hasher.digest()
    hasher = hashlib.blake2b(digest, digest_size=16)
    hasher.update(bytes([keep, keep_probability, negative is not None]))
    if negative is not None:
        hasher.update(np.packbits(negative).tobytes())
    return hasher.digest()


class _Progress:
    def __init__(self, total: int, callback: Optional[Callable[[int, int], None]]):
        self.total, self.done, self.callback = max(total, 1), 0, callback

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def finish(self) -> None:
        if self.done < self.total:
            self.advance(self.total - self.done)


def _as_index_list(value, name: str, length: int) -> List[int]:
    values = [value] if np.isscalar(value) else list(value)
    if not values:
        raise InputError(f"No support slice given for {name}.")
    result = []
    for v in values:
        if int(v) != v or not 0 <= int(v) < length:
            raise InputError(f"Support slice {v} for {name} is outside the volume (0..{length - 1}).")
        result.append(int(v))
    return sorted(set(result))


def segment_volume(
    engine: Engine,
    query_volume,
    support_volume,
    support_masks: Mapping[Hashable, np.ndarray],
    *,
    query_ijk_to_ras=None,
    support_ijk_to_ras=None,
    plane: str = "auto",
    axis: Optional[int] = None,
    support_slices: Optional[SupportSlices] = None,
    support_mode: str = "nearest",
    slice_range: Optional[Tuple[int, int]] = None,
    modality: str = "auto",
    auto_extent: Optional[bool] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[threading.Event] = None,
    exclusive: bool = False,
    negatives: Optional[Mapping[Hashable, np.ndarray]] = None,
    examples: Optional[Mapping[Hashable, Sequence[SupportExample]]] = None,
    similar_k: int = DEFAULT_SIMILAR_K,
    propagation: Optional[str] = None,
) -> VolumeResult:
    """Segment every structure of ``support_masks`` and ``examples`` through ``query_volume``.

    Args:
        query_volume: 3-D array to segment (raw intensities; see ``modality``), indexed
            ``[k, j, i]`` when ``query_ijk_to_ras`` is given.
        support_volume: 3-D array the masks were painted on; ``None`` or the query itself
            for propagation within one volume (the painted slices are then kept as painted).
        support_masks: key -> 3-D mask (non-zero = structure) with the support's shape.
        query_ijk_to_ras: (4, 4) voxel-to-RAS matrix of the query (nested lists or an array;
            SimpleITK's LPS geometry converts with
            :func:`protosam.orientation.ijk_to_ras_from_lps`). Given, the engine segments in the
            canonical order of :mod:`protosam.orientation` and maps the results back; ``None``
            means "as stored": the arrays are segmented along ``axis`` as they are.
        support_ijk_to_ras: the same for a separate support volume (required with
            ``query_ijk_to_ras`` when a support volume is given).
        plane: with geometry, "axial", "coronal", "sagittal" or "auto" (the coarsest-spacing
            axis of the query, axial when isotropic).
        axis: as stored only: slicing axis of both arrays (0, 1 or 2; default 0).
        support_slices: key -> slice index or indices along the support's slicing axis (in
            its own voxel order); default: the slice where the structure is largest.
            Across volumes a support slice seeds
            the query slice at the same relative position (with geometry: in canonical order,
            so both volumes run the same anatomical way); two support slices of one key that
            seed the same query slice are refused (:class:`InputError`).
        support_mode: with several support slices, "nearest" (each query slice uses the
            prototypes of the nearest one), "all" (the prototypes of all, pooled) or
            "similar" (the pool of the ``similar_k`` supports whose slices are most alike the
            query slice: the highest cosine between :func:`slice_descriptor` of both).
        slice_range: inclusive ``(first, last)`` query slices (along the query's slicing
            axis, its own voxel order) to process; default all.
        modality: intensity preprocessing, "auto" | "ct" | "mri" | "none".
        auto_extent: stop following a structure once absent (default: the preset's choice).
        progress: called with ``(done, total)`` slices; monotonic, ends at ``total``.
        cancel: set it from another thread to stop; raises :class:`CancelledError`.
        exclusive: give each voxel to at most one structure: the one whose refined mask
            probability there is highest (see :func:`resolve_exclusive`; ties go to the first
            key of ``support_masks``; painted support slices count as probability 1).
        negatives: key -> 3-D bool volume with the query's shape (and voxel order) of voxels
            that are *not* that structure (e.g. the other visible segments): on each slice where
            they appear they are removed from its result, give the refiner negative points
            (:func:`protosam.prompts.add_negative_points`; none for MedSAM) and give ALPNet
            background prototypes (:func:`with_background_examples`). Painted support slices
            keep what was painted.
        examples: key -> :class:`SupportExample` list: supports from other volumes given as
            arrays (e.g. an example bank's, :mod:`protosam.examples`), used together with the
            key's support mask when it has one; a key may have examples only. Each seeds the
            query slice at its relative position; supports that seed one slice are pooled.
        similar_k: how many supports a query slice pools with ``support_mode="similar"``.
        propagation: "per-slice" or "memory" (SAM 2's video predictor walks the slices from the
            painted ones, see :func:`_propagate_memory`; SAM 2 refiners only); None: the
            engine's (``Engine(propagation=...)``).
    """
    if propagation is not None:
        check_propagation(propagation, engine.models.sam)
    if query_ijk_to_ras is not None:
        if axis is not None:
            raise ValueError("Give either the geometry (query_ijk_to_ras, plane) or axis (as stored), not both.")
        return _segment_oriented(
            engine, query_volume, support_volume, support_masks, query_ijk_to_ras=query_ijk_to_ras,
            support_ijk_to_ras=support_ijk_to_ras, plane=plane, support_slices=support_slices,
            slice_range=slice_range, support_mode=support_mode, modality=modality, auto_extent=auto_extent,
            progress=progress, cancel=cancel, exclusive=exclusive, negatives=negatives, examples=examples,
            similar_k=similar_k, propagation=propagation)
    if support_ijk_to_ras is not None:
        raise ValueError("support_ijk_to_ras needs query_ijk_to_ras as well (or neither, for arrays as stored).")
    axis = 0 if axis is None else axis
    started = time.perf_counter()
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, not {axis!r}")
    examples = {key: [_as_support_example(key, number, example) for number, example in enumerate(value)]
                for key, value in (examples or {}).items() if value}
    if not support_masks and not examples:
        raise InputError("No structure to segment: give at least one support mask or example.")
    query = np.moveaxis(as_float_slices(query_volume, "query volume", 3), axis, 0)
    same_volume = support_volume is None or support_volume is query_volume
    if not same_volume:
        support = np.moveaxis(as_float_slices(support_volume, "support volume", 3), axis, 0)
        same_volume = support.shape == query.shape and np.array_equal(support, query)
    query = normalize_volume(query, modality)
    support = query if same_volume else normalize_volume(support, modality)
    count = query.shape[0]
    first, last = _check_range(slice_range, count)
    use_auto_extent = engine.preset.auto_extent if auto_extent is None else auto_extent

    masks = {
        key: np.moveaxis(as_binary_mask(mask, f"support mask '{key}'", np.moveaxis(support, 0, axis).shape), axis, 0)
        for key, mask in support_masks.items()
    }
    query_store = _SliceStore(engine, query)
    support_store = query_store if same_volume else _SliceStore(engine, support)
    keys = list(masks) + [key for key in examples if key not in masks]
    structures = [
        _prepare_structure(engine, key, masks.get(key), support_store, support_slices, same_volume, query.shape,
                           (first, last), support_mode, examples.get(key, ()), similar_k)
        for key in keys
    ]
    for structure in structures:
        if negatives is not None and negatives.get(structure.key) is not None:
            structure.negatives = np.moveaxis(
                as_binary_mask(negatives[structure.key], f"negatives of '{structure.key}'", np.moveaxis(query, 0, axis).shape),
                axis, 0).astype(bool)
        if exclusive:
            structure.probabilities = {}
    _propagate(engine, query_store, structures, (first, last), use_auto_extent, progress, cancel, propagation)

    for structure in structures:
        for index, painted in structure.copied.items():
            structure.output[index] = painted
    if exclusive:
        resolve_exclusive(structures)
    results = {}
    for structure in structures:
        results[structure.key] = np.ascontiguousarray(np.moveaxis(structure.output, 0, axis))
    slice_confidence = {s.key: slice_scores(s.output, s.evidence, s.copied) for s in structures}
    structure_confidence = {s.key: structure_score(slice_confidence[s.key], s.copied) for s in structures}
    seconds = time.perf_counter() - started
    logger.info("Propagated %d structure(s) over %d slices in %.1f s", len(structures), count, seconds)
    return VolumeResult(
        masks=results,
        support_slices={s.key: list(s.support_indices) for s in structures},
        processed_slices={s.key: sorted(set(s.processed)) for s in structures},
        seconds=seconds,
        axis=axis,
        support_axis=axis,
        slice_confidence=slice_confidence,
        structure_confidence=structure_confidence,
        volume_confidence=volume_score(structure_confidence),
        slice_evidence={s.key: evidence_array(s.evidence, count) for s in structures},
    )


def _propagate(engine: Engine, query_store: _SliceStore, structures: List[_Structure], bounds: Tuple[int, int],
               use_auto_extent: bool, progress, cancel, propagation: Optional[str] = None) -> None:
    """Run prepared structures over the query slices ``bounds`` (inclusive): fills each
    structure's ``output``, ``processed`` and ``prompts``. Shared by :func:`segment_volume`
    and :class:`protosam.session.Session`, so a session's update and a fresh run with the
    same supports run the same code in the same order. ``propagation``: "per-slice" or
    "memory" (:func:`_propagate_memory`); None: the engine's."""
    if (propagation or getattr(engine, "propagation", "per-slice")) == "memory":
        return _propagate_memory(engine, query_store, structures, bounds, use_auto_extent, progress, cancel)
    first, last = bounds
    query_shape = query_store.volume.shape
    plans = [_plan(s, first, last, use_auto_extent) for s in structures]
    known_prototypes: Dict[int, bytes] = {}  # outcome signatures' prototype digests, by id
    tracker = _Progress(sum(len(p.fixed) + len(p.up) + len(p.down) for p in plans), progress)

    def run_slice(index: int, active: List[Tuple[_Structure, "_Plan"]], upcoming: Sequence[int]) -> Dict[int, bool]:
        if cancel is not None and cancel.is_set():
            raise CancelledError("Cancelled by the user; no result was written.")
        features = None
        found = {}
        for position, (structure, _) in enumerate(active):
            if structure.similar and features is None:  # "similar" picks supports by the slice's features
                features = query_store.features(index, upcoming)
            prototypes = structure.prototypes_for(index, features)
            negative = None
            if structure.negatives is not None and structure.negatives[index].any():
                negative = structure.negatives[index]
            keep = structure.prompt_masks is not None
            keep_probability = structure.probabilities is not None
            signature = None
            if structure.outcomes is not None:
                signature = _outcome_signature(prototypes, negative, keep, keep_probability, known_prototypes)
                previous = (structure.reusable or {}).get(index)
                if previous is not None and previous.signature == signature:
                    found[position] = _reuse_outcome(structure, index, previous)
                    continue
            if features is None:
                features = query_store.features(index, upcoming)
            if negative is not None:
                prototypes = with_background_examples(engine, prototypes, features, negative)
            logits = engine.coarse_logits(prototypes, features[None])[0]
            refined = engine.refine(logits, lambda: query_store.sam_embedding(index), keep_prompt_masks=keep,
                                    keep_probability=keep_probability, extra_negatives=negative)
            mask = engine.to_slice_size(refined.mask, query_shape[1:])
            if negative is not None:
                mask[negative] = 0
            structure.output[index] = mask
            structure.processed.append(index)
            structure.prompts[index] = kept_prompts = _without_component_pixels(refined.prompts)
            structure.evidence[index] = slice_evidence(logits, refined.mask, refined.scores)
            if keep:
                each_masks = [engine.to_slice_size(each, query_shape[1:]) for each in refined.prompt_masks]
                if negative is not None:
                    for each in each_masks:
                        each[negative] = 0
                structure.prompt_masks[index] = [crop_mask(each) for each in each_masks]
            if keep_probability:
                box = crop_mask(mask)
                if box.values.size:
                    probability = engine.probability_to_slice_size(refined.probability, query_shape[1:])
                    structure.probabilities[index] = (box.rows, box.cols, probability[box.rows, box.cols].copy())
                else:
                    structure.probabilities.pop(index, None)
            if signature is not None:
                structure.outcomes[index] = _SliceOutcome(
                    signature, crop_mask(mask), kept_prompts,
                    structure.prompt_masks[index] if keep else None,
                    structure.probabilities.get(index) if keep_probability else None,
                    structure.evidence[index])
            found[position] = bool(mask.any())
        query_store.release(index)
        tracker.advance(len(active))
        return found

    # Slices every structure must visit (between its seeds, or everything without auto extent).
    fixed_slices = sorted(set().union(*[p.fixed for p in plans]))
    query_store.expect([fixed_slices] + [set().union(*[getattr(p, d) for p in plans]) for d in ("up", "down")])
    for i, index in enumerate(fixed_slices):
        active = [(s, p) for s, p in zip(structures, plans) if index in p.fixed]
        found = run_slice(index, active, fixed_slices[i + 1:])
        for position, (_, plan) in enumerate(active):
            plan.fixed_found[index] = found[position]
    query_store.end_phase()
    # Outward walks, all structures in one sweep per direction so slices are shared.
    for direction in ("up", "down"):
        _sweep(structures, plans, direction, run_slice, tracker, engine.preset.stop_after_empty)
        query_store.end_phase()
    tracker.finish()


def _without_component_pixels(prompts: list) -> list:
    """Prompt sets as a run keeps them for click corrections, which read only their boxes and
    points: without the component's pixels (``local_mask``, up to 1 MiB per set in SAM's 1024
    frame), which across a volume's thousands of sets held hundreds of MiB until the run ended."""
    return [dataclasses.replace(p, window=None, local_mask=None) for p in prompts]


def _reuse_outcome(structure: _Structure, index: int, outcome: _SliceOutcome) -> bool:
    """Fill ``structure``'s records for ``index`` from an earlier run's outcome; whether present."""
    mask = np.zeros(structure.output.shape[1:], np.uint8)
    outcome.mask.paint(mask)
    structure.output[index] = mask
    structure.processed.append(index)
    structure.prompts[index] = outcome.prompts
    if structure.prompt_masks is not None:
        structure.prompt_masks[index] = outcome.prompt_masks
    if structure.probabilities is not None:
        if outcome.probability is None:
            structure.probabilities.pop(index, None)
        else:
            structure.probabilities[index] = outcome.probability
    if outcome.evidence is not None:
        structure.evidence[index] = outcome.evidence
    structure.outcomes[index] = outcome
    return bool(outcome.mask.values.any())


def _segment_oriented(engine, query_volume, support_volume, support_masks, *, query_ijk_to_ras,
                      support_ijk_to_ras, plane, support_slices, slice_range, negatives=None,
                      **options) -> VolumeResult:
    """``segment_volume`` with geometry: canonical order in, the caller's KJI order out."""
    query = np.asarray(query_volume)
    same_volume = support_volume is None or support_volume is query_volume
    if not same_volume and support_ijk_to_ras is None:
        raise ValueError("A separate support volume needs its geometry too: pass support_ijk_to_ras.")
    plane = choose_plane(query_ijk_to_ras, plane)
    query_orientation = canonical_orientation(query_ijk_to_ras, plane)
    support = query if same_volume else np.asarray(support_volume)
    support_orientation = query_orientation if same_volume else canonical_orientation(support_ijk_to_ras, plane)
    for what, array in (("query volume", query), ("support volume", support)):
        if array.ndim != 3:
            raise InputError(f"The {what} must be 3-D; got an array of shape {array.shape}.")
    masks = {}
    for key, mask in support_masks.items():
        mask = np.asarray(mask)
        if mask.shape != support.shape:
            raise InputError(f"Support mask '{key}' has shape {mask.shape} but its image has shape {support.shape}; "
                             "they must match.")
        masks[key] = support_orientation.to_canonical(mask)
    support_count = support.shape[support_orientation.slice_axis]
    query_count = query.shape[query_orientation.slice_axis]
    canonical_support_slices = None
    if support_slices is not None:
        canonical_support_slices = {}
        for key, value in support_slices.items():
            if key not in masks:
                continue
            stored = _as_index_list(value, f"'{key}'", support_count)
            # Checked here so that the message names the caller's own slice numbers.
            _seed_slices(key, stored, support_count, query_count, same_volume,
                         [support_orientation.canonical_slice(i, support_count) for i in stored])
            canonical_support_slices[key] = [support_orientation.canonical_slice(i, support_count) for i in stored]
    canonical_range = None
    if slice_range is not None:
        first, last = _check_range(slice_range, query_count)
        ends = [query_orientation.canonical_slice(v, query_count) for v in (first, last)]
        canonical_range = (min(ends), max(ends))
    canonical_negatives = None
    if negatives is not None:
        canonical_negatives = {}
        for key, value in negatives.items():
            if value is None:
                continue
            value = np.asarray(value)
            if value.shape != query.shape:
                raise InputError(f"The negatives of '{key}' have shape {value.shape} but the volume to segment has "
                                 f"shape {query.shape}; they must match.")
            canonical_negatives[key] = query_orientation.to_canonical(value)
    result = segment_volume(
        engine, query_orientation.to_canonical(query),
        None if same_volume else support_orientation.to_canonical(support), masks, axis=0,
        support_slices=canonical_support_slices, slice_range=canonical_range, negatives=canonical_negatives,
        **options)
    return VolumeResult(
        masks={key: query_orientation.from_canonical(mask) for key, mask in result.masks.items()},
        support_slices={key: sorted(support_orientation.stored_slice(i, support_count) for i in indices)
                        for key, indices in result.support_slices.items()},
        processed_slices={key: sorted(query_orientation.stored_slice(i, query_count) for i in indices)
                          for key, indices in result.processed_slices.items()},
        seconds=result.seconds, axis=query_orientation.slice_axis, support_axis=support_orientation.slice_axis,
        plane=plane,
        # The stored slice i is the canonical slice canonical_slice(i) (a flip is its own inverse).
        slice_confidence={key: scores[[query_orientation.canonical_slice(i, query_count) for i in range(query_count)]]
                          for key, scores in result.slice_confidence.items()},
        structure_confidence=result.structure_confidence, volume_confidence=result.volume_confidence,
        slice_evidence={key: rows[[query_orientation.canonical_slice(i, query_count) for i in range(query_count)]]
                        for key, rows in result.slice_evidence.items()},
    )


@dataclass
class _Plan:
    fixed: set
    up: List[int]
    down: List[int]
    alive: Dict[str, bool]
    empty_run: Dict[str, int]
    seen: Dict[str, bool]
    # Fixed slice -> whether the structure was found there (filled as they are processed).
    fixed_found: Dict[int, bool] = field(default_factory=dict)


def _check_range(slice_range, count) -> Tuple[int, int]:
    if slice_range is None:
        return 0, count - 1
    first, last = (int(v) for v in slice_range)
    if not (0 <= first <= last < count):
        raise InputError(f"Slice range {slice_range} is outside the volume's slices 0..{count - 1} (or reversed).")
    return first, last


def _prepare_structure(engine, key, mask, support_store, support_slices, same_volume, query_shape, bounds,
                       support_mode="nearest", examples: Sequence[SupportExample] = (),
                       similar_k: int = DEFAULT_SIMILAR_K):
    """A structure's supports: slices of ``mask`` (None: none) and ``examples`` from elsewhere.

    Supports that seed the same query slice are pooled into that seed's prototypes
    (:func:`protosam.models.alpnet.pool_prototypes`, in order: the mask's slices, then the
    examples as given), so fifty examples of fifty volumes may all land near one query slice.
    Two slices of one support volume that seed one slice are still refused (``_seed_slices``):
    they are a mistake in one call, not the many volumes of a bank.
    """
    examples = list(examples or ())
    if mask is not None and not mask.any() and not examples:
        raise InputError(f"Support mask '{key}' is empty: paint the structure on at least one slice.")
    supports: List[Tuple[int, torch.Tensor, np.ndarray]] = []  # (seed, features, mask) in support order
    indices: List[int] = []
    copied = {}
    if mask is not None and mask.any():
        support_count = mask.shape[0]
        if support_slices is not None and key in support_slices:
            indices = _as_index_list(support_slices[key], f"'{key}'", support_count)
        else:
            indices = [largest_area_slice(mask)]
        for index in indices:
            if not mask[index].any():
                raise InputError(f"Support mask '{key}' is empty on support slice {index}: choose a slice where it is "
                                 "painted.")
        seeds = _seed_slices(key, indices, support_count, query_shape[0], same_volume)
        for index, seed in zip(indices, seeds):
            supports.append((seed, support_store.features(index), mask[index]))
            if same_volume and bounds[0] <= index <= bounds[1]:
                copied[index] = mask[index].astype(np.uint8)
    for number, example in enumerate(examples):
        image, example_mask = _check_example(key, number, example)
        supports.append((example.seed(query_shape[0]), _example_features(engine, example, image), example_mask))
    by_seed: Dict[int, List[Prototypes]] = {}
    described = []
    for seed, features, support_mask in supports:
        prototypes = engine.prototypes_from_features(features, support_mask)
        by_seed.setdefault(seed, []).append(prototypes)
        if support_mode == "similar":
            described.append((slice_descriptor(features), prototypes))
    pooled = {seed: pool_prototypes(shots) for seed, shots in by_seed.items()}
    structure = _Structure(key, indices, sorted(pooled), copied, combine_supports(pooled, support_mode),
                           np.zeros(query_shape, np.uint8), [], known_present=same_volume and bool(indices))
    if support_mode == "similar":
        structure.similar, structure.similar_k = described, _check_similar_k(similar_k)
    return structure


def _as_support_example(key, number: int, value) -> SupportExample:
    """A :class:`SupportExample`, or the mapping of its fields that a wire message carries
    (the worker and the server receive examples as arrays and numbers, never as paths)."""
    if isinstance(value, SupportExample):
        return value
    fields = [f.name for f in dataclasses.fields(SupportExample)]
    if not isinstance(value, Mapping) or not {"image", "mask", "slice_index", "slice_count"} <= set(value) \
            or set(value) - set(fields):
        raise InputError(f"Example {number + 1} of '{key}' must be a SupportExample or a mapping of {', '.join(fields)} "
                         "(image and mask arrays, slice_index and slice_count numbers).")
    for name in ("slice_index", "slice_count"):
        if isinstance(value[name], bool) or not isinstance(value[name], (int, np.integer)):
            raise InputError(f"Example {number + 1} of '{key}': {name} must be a whole number.")
    for name in ("image", "mask", "features"):
        if value.get(name) is not None and not isinstance(value[name], (np.ndarray, torch.Tensor)):
            raise InputError(f"Example {number + 1} of '{key}': {name} must be an array, not "
                             f"{type(value[name]).__name__}.")
    return SupportExample(**value)


def _check_similar_k(value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise InputError(f"similar_k must be a whole number of examples >= 1, not {value!r}.")
    return int(value)


def _check_example(key, number: int, example: SupportExample) -> Tuple[np.ndarray, np.ndarray]:
    """(image float32 [H, W], mask bool [H, W]) of an example, or an InputError naming it."""
    what = f"example {number + 1} of '{key}'"
    image = as_float_slices(example.image, f"the image of {what}", 2)
    mask = as_binary_mask(example.mask, f"the mask of {what}", image.shape).astype(bool)
    if not mask.any():
        raise InputError(f"The mask of {what} is empty: an example shows the structure on its slice.")
    if not (0 <= int(example.slice_index) < int(example.slice_count)):
        raise InputError(f"The {what} says it is slice {example.slice_index} of {example.slice_count}; "
                         "its index must lie in 0..count-1.")
    return image, mask


def _example_features(engine: Engine, example: SupportExample, image: np.ndarray) -> torch.Tensor:
    """The example's encoder features ``[C, g, g]`` on the engine's device: the ones it carries
    (no encoder work) or encoded now, as a support slice is (one slice per call)."""
    if example.features is None:
        return engine.encode(engine.to_model_input(image[None]))[0]
    features = torch.as_tensor(np.asarray(example.features, dtype=np.float32)
                               if not isinstance(example.features, torch.Tensor) else example.features)
    if features.ndim != 3:
        raise InputError(f"Example features must be [C, g, g] encoder features, not shape {tuple(features.shape)}.")
    return features.float().to(engine.device)


def with_background_examples(engine: Engine, prototypes: Prototypes, features: torch.Tensor,
                             negative: np.ndarray) -> Prototypes:
    """``prototypes`` with more background rows: the background prototypes ALPNet pools from
    this slice's own features ``[C, g, g]`` under ``negative`` (``[H, W]`` bool, "not the
    structure"), so those voxels score as background here. Unchanged when the negative voxels
    fill the whole slice (nothing left to be foreground) or none survive the grid."""
    try:
        extra = engine.prototypes_from_features(features, ~negative)
    except InputError:
        return prototypes
    background = torch.cat([prototypes.background, extra.background.to(prototypes.background.device)])
    return Prototypes(background, prototypes.foreground, prototypes.foreground_is_local)


def resolve_exclusive(structures: Sequence["_Structure"]) -> None:
    """Exclusive structures: each voxel kept by at most one structure, in place of ``output``.

    Where several structures' masks overlap, the voxel goes to the one whose refined mask
    probability there is highest (the sigmoid of SAM's upsampled logits, kept in
    ``probabilities`` by the run); a painted (copied) slice counts as probability 1 on its
    painted voxels; ties go to the structure listed first. Only slices where masks overlap are
    looked at; the kept probabilities are dropped afterwards.
    """
    if len(structures) < 2:
        return
    count = structures[0].output.shape[0]
    for index in range(count):
        holders = [s for s in structures if s.output[index].any()]
        if len(holders) < 2:
            continue
        stack = np.stack([s.output[index] > 0 for s in holders])
        overlap = stack.sum(axis=0) > 1
        if not overlap.any():
            continue
        scores = np.full(stack.shape, -1.0, np.float32)
        for number, structure in enumerate(holders):
            if index in structure.copied:
                scores[number][stack[number]] = 1.0
                continue
            kept = (structure.probabilities or {}).get(index)
            if kept is None:
                scores[number][stack[number]] = 0.5  # no probability kept: as sure as the threshold
                continue
            rows, cols, values = kept
            scores[number][rows, cols] = values
            scores[number][~stack[number]] = -1.0
        winner = np.argmax(scores, axis=0)  # the first holder on ties
        for number, structure in enumerate(holders):
            structure.output[index][overlap & (winner != number)] = 0
    for structure in structures:
        structure.probabilities = None


def combine_supports(prototypes_by_seed: Dict[int, Prototypes], support_mode: str) -> Dict[int, Prototypes]:
    """Prototypes each seed offers under ``support_mode``: its own ("nearest", "similar"), or every
    support's pooled in seed order ("all"), so the nearest seed's are the pooled ones."""
    if support_mode not in SUPPORT_MODES:
        raise InputError(f"Unknown support mode {support_mode!r}: choose one of {', '.join(SUPPORT_MODES)}.")
    # "similar" chooses per query slice (_Structure.prototypes_for); its seeds keep their own.
    if support_mode in ("nearest", "similar") or len(prototypes_by_seed) < 2:
        return dict(prototypes_by_seed)
    pooled = pool_prototypes([prototypes_by_seed[seed] for seed in sorted(prototypes_by_seed)])
    return {seed: pooled for seed in prototypes_by_seed}


def _seed_slices(key, shown: Sequence[int], support_count: int, query_count: int, same_volume: bool,
                 indices: Optional[Sequence[int]] = None) -> List[int]:
    """Query slice seeded by each support slice ``indices`` (default ``shown``; ``shown`` are
    the caller's numbers for messages), in the order given.

    Within one volume the painted slice is the seed. Across volumes it is the query slice at
    the same relative position: support and query are usually different patients or scans
    whose physical coordinates are not registered to each other, so a millimetre position
    along the axis names no anatomy, whereas relative position does when both volumes cover
    similar anatomy and run the same way (guaranteed by the canonical order when geometry
    is given). Two support slices that seed one query slice would silently replace each
    other's prototypes, so they are refused.
    """
    indices = list(shown if indices is None else indices)
    if same_volume:
        return indices
    seeds = [int(round(index * (query_count - 1) / max(support_count - 1, 1))) for index in indices]
    first_for_seed: Dict[int, int] = {}
    for position, seed in enumerate(seeds):
        if seed in first_for_seed:
            raise InputError(
                f"Support slices {shown[first_for_seed[seed]]} and {shown[position]} of '{key}' both map to the same "
                f"slice of the volume to segment (the support has {support_count} slices, that volume "
                f"{query_count}); give support slices that are further apart, or only one of them.")
        first_for_seed[seed] = position
    return seeds


def _plan(structure: _Structure, first: int, last: int, auto_extent: bool) -> _Plan:
    """Which slices a structure visits: ``fixed`` (between its seeds, or all without auto
    extent) and the outward walks ``up`` / ``down`` (in walking order), within first..last."""
    low, high = min(structure.seeds), max(structure.seeds)
    if auto_extent:
        fixed = set(range(max(low, first), min(high, last) + 1))
        up = list(range(max(high + 1, first), last + 1))
        down = list(range(min(low - 1, last), first - 1, -1))
    else:
        fixed, up, down = set(range(first, last + 1)), [], []
    fixed -= set(structure.copied)
    # Within one volume the structure is known to be present at its seeds, painted there,
    # even when slice_range leaves them out; across volumes it must be found first.
    seen = structure.known_present
    return _Plan(fixed, up, down, {"up": True, "down": True}, {"up": 0, "down": 0}, {"up": seen, "down": seen})


def _sweep(structures, plans, direction, run_slice, tracker, stop_after: int) -> None:
    """Walk all structures outwards in one direction, sharing each slice's encoders.

    A walk continues the seed part: it starts with the presence seen on the fixed (and
    painted) slices, in walking order, so a structure that ends at its seed stops after
    ``stop_after`` empty slices instead of walking on to the end of the volume.
    """
    step = 1 if direction == "up" else -1
    pending = {id(p): list(getattr(p, direction)) for p in plans}

    def stop_if_ended(plan) -> None:
        if plan.empty_run[direction] >= stop_after:
            plan.alive[direction] = False
            tracker.advance(len(pending[id(plan)]))
            pending[id(plan)] = []

    for structure, plan in zip(structures, plans):
        known = dict(plan.fixed_found)
        known.update({index: True for index in structure.copied})
        for index in sorted(known, reverse=(step < 0)):
            _record_presence(plan, direction, known[index])
        # Only the run of empty slices after the last seed counts (an empty seed between two
        # present ones does not end the walk), so the check follows the whole seed part.
        stop_if_ended(plan)
    candidates = sorted(set().union(*[set(getattr(p, direction)) for p in plans]), reverse=(step < 0))
    for i, index in enumerate(candidates):
        active = []
        for structure, plan in zip(structures, plans):
            if plan.alive[direction] and index in pending[id(plan)]:
                active.append((structure, plan))
        if not active:
            continue
        found = run_slice(index, active, candidates[i + 1:])
        for position, (structure, plan) in enumerate(active):
            pending[id(plan)].remove(index)
            _record_presence(plan, direction, found[position])
            stop_if_ended(plan)  # stop_after >= 1 (presets check it): a found slice never stops


def _record_presence(plan, direction: str, present: bool) -> None:
    """Count consecutive empty slices of a walk, from the first slice where the structure was seen."""
    if present:
        plan.seen[direction] = True
        plan.empty_run[direction] = 0
    elif plan.seen[direction]:
        plan.empty_run[direction] += 1


# ----------------------------------------------------------------------------- memory mode
@dataclass
class _MemoryWalk:
    """One structure's memory walk (see :func:`_propagate_memory`)."""

    structure: _Structure
    walk: object  # protosam.models.sam2_video.SliceWalk
    starts: List[int]  # conditioning slices: painted and corrected, or the first prompted one
    alive: Dict[str, bool] = field(default_factory=lambda: {"up": True, "down": True})
    empty_run: Dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    seen: Dict[str, bool] = field(default_factory=lambda: {"up": False, "down": False})


def _propagate_memory(engine: Engine, query_store: _SliceStore, structures: List[_Structure],
                      bounds: Tuple[int, int], use_auto_extent: bool, progress, cancel) -> None:
    """Memory mode (``propagation="memory"``, SAM 2 refiners): each structure is walked from its
    conditioning slices both ways by SAM 2's video predictor (:mod:`protosam.models.sam2_video`).

    - Conditioning slices: the structure's painted and corrected slices of this volume
      (``structure.copied``), each given to the predictor as exactly its mask. Without one (the
      support is another volume's slice, or bank examples) the walk starts from the first
      *prototype-prompted* slice: the query slices ordered by distance from the supports' seeds,
      the first whose coarse mask passes the rule below is decoded from its prompts alone.
    - The walk goes up from the lowest conditioning slice to the last slice, then down from
      it to the first; between the conditioning slices every slice is walked, beyond them the
      walk ends by the per-slice mode's auto-extent rule (``stop_after_empty`` empty slices
      after the structure was seen; the whole range without auto extent).
    - On each walked slice the prototypes still score the slice: when the coarse foreground's
      mean probability is above ``MEMORY_PROMPT_MIN_PROBABILITY``, its prompts (the largest
      component's box and points, as the CCA choice) correct the slice the memory tracked, so
      the walk recovers where the structure splits or the memory lost it.
    - Slices are encoded once per run for all structures (walks share each slice's features).
    """
    import torch.nn.functional as F

    from .models.sam import SAM_IMAGE_SIZE
    from .models.sam2_video import MEMORY_PROMPT_MIN_PROBABILITY, SliceWalk, prompt_for_memory
    from .prompts import add_negative_points, extract_prompts

    first, last = bounds
    count, hw = query_store.volume.shape[0], query_store.volume.shape[1:]
    tracker = _Progress(len(structures) * (last - first + 1), progress)
    box_only = bool(engine.refiner.medsam)

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError("Cancelled by the user; no result was written.")

    def picture(index: int) -> torch.Tensor:
        return engine.sam_images(query_store.image(index)[None])

    def coarse(structure: _Structure, index: int, upcoming: Sequence[int]):
        """(ALPNet logits [2, S, S], the slice's negatives or None, the memory prompt or None)."""
        features = query_store.features(index, upcoming)
        prototypes = structure.prototypes_for(index, features)
        negative = None
        if structure.negatives is not None and structure.negatives[index].any():
            negative = structure.negatives[index]
            prototypes = with_background_examples(engine, prototypes, features, negative)
        logits = engine.coarse_logits(prototypes, features[None])[0]
        at_1024 = F.interpolate(logits[None].float(), size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear",
                                align_corners=False)
        probability = torch.softmax(at_1024, dim=1)[0]
        foreground = probability[1] > probability[0]
        if not bool(foreground.any()) or float(probability[1][foreground].mean()) <= MEMORY_PROMPT_MIN_PROBABILITY:
            return logits, negative, None
        prompts = extract_prompts(probability[1].cpu().numpy(), foreground.cpu().numpy(), keep_largest_only=True)
        if negative is not None and not box_only:
            prompts = add_negative_points(prompts, negative)
        return logits, negative, prompt_for_memory(prompts, box_only)

    def record(structure: _Structure, index: int, mask_logits: torch.Tensor, logits, negative) -> bool:
        refined = engine.sam_mask_to_input_size(mask_logits > 0)
        mask = engine.to_slice_size(refined, hw)
        if negative is not None:
            mask[negative] = 0
        structure.output[index] = mask
        structure.processed.append(index)
        structure.evidence[index] = slice_evidence(logits, refined, [])
        if structure.probabilities is not None:
            box = crop_mask(mask)
            if box.values.size:
                probability = engine.probability_to_slice_size(
                    engine._probability_to_input_size(torch.sigmoid(mask_logits.float())), hw)
                structure.probabilities[index] = (box.rows, box.cols, probability[box.rows, box.cols].copy())
            else:
                structure.probabilities.pop(index, None)
        return bool(mask.any())

    walks: List[_MemoryWalk] = []
    for structure in structures:
        structure.reusable = None  # a walk depends on every slice before it: nothing to reuse
        check_cancel()
        walk = SliceWalk(engine.refiner, count, query_store.sam_embedding, picture)
        starts = sorted(structure.copied)
        for index in starts:  # their features stay until the walk up passes them (other structures')
            check_cancel()
            walk.condition(index, structure.copied[index])
        if not starts:
            seeds = structure.seeds or [first]
            order = sorted(range(first, last + 1), key=lambda k: (min(abs(k - s) for s in seeds), k))
            for position, index in enumerate(order):
                check_cancel()
                logits, negative, prompt = coarse(structure, index, order[position + 1:position + 2])
                if prompt is not None:
                    record(structure, index, walk.prompt(index, *prompt), logits, negative)
                    starts = [index]
                    break
                query_store.release(index)
        if not starts:  # no slice where the prototypes are sure enough to start from
            tracker.advance(last - first + 1)
            continue
        walk.walks_down = min(starts) > first
        walks.append(_MemoryWalk(structure, walk, starts))

    for direction in ("up", "down"):
        step = 1 if direction == "up" else -1
        for state in walks:
            state.seen[direction] = state.structure.known_present
            if step < 0:
                # The walk down continues what the walk up found from the top conditioning
                # slice down to the lowest (as the per-slice sweep counts the seed part).
                for index in range(max(state.starts), min(state.starts) - 1, -1):
                    _record_presence(state, direction, bool(state.structure.output[index].any()))
        lows = [min(w.starts) for w in walks]
        if not lows:
            break
        candidates = range(min(lows), last + 1) if step > 0 else range(max(lows) - 1, first - 1, -1)
        candidates = list(candidates)
        for position, index in enumerate(candidates):
            active = [w for w in walks if w.alive[direction] and (min(w.starts) <= index if step > 0
                                                                  else index < min(w.starts))]
            for state in active:
                check_cancel()
                structure, walk = state.structure, state.walk
                if index in structure.copied or index in state.starts:
                    walk.track(index, downwards=step < 0)  # a conditioning slice: its own mask, now walked
                    present = bool(structure.output[index].any())
                else:
                    logits, negative, prompt = coarse(structure, index, candidates[position + 1:position + 2])
                    mask_logits = walk.track(index, downwards=step < 0)
                    if prompt is not None:
                        mask_logits = walk.prompt(index, *prompt)
                    present = record(structure, index, mask_logits, logits, negative)
                tracker.advance()
                _record_presence(state, direction, present)
                beyond = index > max(state.starts) if step > 0 else True
                if use_auto_extent and beyond and state.empty_run[direction] >= engine.preset.stop_after_empty:
                    state.alive[direction] = False
                    tracker.advance((last - index) if step > 0 else (index - first))
            query_store.release(index)
    tracker.finish()
