"""A correction session on one volume: propagate, fix slices by clicks or painting, update.

The session owns the volume's encoder outputs (DINOv2 features and SAM image embeddings of
every slice it has encoded) in one byte-bounded LRU :class:`~protosam.cache.EmbeddingCache`,
the same store a propagation run reads through (``propagation._SliceStore``): a run inside
the session fills it, and a click or an update reads from it, so only prototype matching,
prompt extraction and SAM decoding run again. A slice evicted under the budget is encoded
again on demand, with the same result.

Frames: ``volume`` is 3-D in the caller's index order with ``axis`` the slicing axis (as
:func:`protosam.propagation.segment_volume` takes it). Slice ``k`` is
``np.moveaxis(volume, axis, 0)[k]``, an ``[H, W]`` array; a click ``(x, y)`` is its column
``x`` (index along W) and row ``y`` (index along H), in voxels. Masks are uint8 ``[H, W]``
per slice and uint8 volumes with ``volume``'s shape.

Rules:
- A corrected or painted slice is *fixed*: it keeps its mask through every update, and at
  the next :meth:`Session.update` it becomes a support of its structure (when not empty), also
  when the first support came from another volume.
- A click joins the prompt set (SAM box + points of one coarse component) whose box contains
  it; a positive click outside every box starts a new prompt set of its own (points only); a
  negative click outside every box joins the set whose box is nearest (it can only remove
  something SAM produced from a set). Clicks are kept per slice until the session ends.
- MedSAM takes boxes only: clicks are refused with :class:`~protosam.errors.InputError`
  (turning a point into a small box asks MedSAM for a tiny object round the point, not for
  "this belongs to the structure"); painting a slice (:meth:`Session.add_support`) works.
- Gestures (:meth:`Session.box`, :meth:`Session.scribble`, :meth:`Session.lasso`) change one
  slice, which becomes fixed (a support at the next update, like a painted slice):
  a *box* ``(x0, y0, x1, y1)`` (inclusive voxels) replaces all of the slice's prompt sets by
  one set with that box; the slice's clicks inside it join it, those outside are dropped, and
  earlier scribbles and lassos of the slice are dropped too (the box starts the slice anew).
  A *lasso* (closed polygon, voxel vertices) adds (positive) or removes (negative) the
  enclosed voxels (pixel centres inside the polygon, and the voxels its outline crosses),
  with no decoding. A *scribble* (open polyline) says "these voxels are / are not the
  structure": the voxels it covers are set to 1 (positive) or 0 (negative), only those (not
  the whole connected part of the mask it crosses: a leak joined to the structure would take
  the structure with it), and up to ``SCRIBBLE_MAX_POINTS`` points sampled along it (one per
  ``SCRIBBLE_POINT_SPACING`` voxels of length, at the middles of equal arc-length pieces) join
  the slice's prompt sets as clicks of its sign, so the refiner re-decodes round them.
  Lasso and scribble voxels stay forced through the slice's later clicks (they are applied,
  in order, after every re-decoding). MedSAM refuses scribbles as it refuses clicks; boxes
  and lassos work with every refiner.
- Undo (:meth:`Session.undo`, alias :meth:`Session.undo_click`) takes back the slice's last
  correction (one click, or one box, scribble or lasso) and gives the slice back exactly as it
  was before it; :meth:`Session.clear_clicks` gives it back as it was before its first one.
- Exclusive structures (``Session(..., exclusive=True)``): every result the session gives
  (:meth:`Session.start`, :meth:`Session.update`, :meth:`Session.mask`, :meth:`Session.masks`
  and the slice a correction returns) gives each voxel to at most one structure, by the rule of
  ``segment_volume(exclusive=True)`` (:func:`protosam.propagation.resolve_exclusive`, the same
  code): the structure whose refined mask probability there is highest, a fixed (painted or
  corrected) slice counting as probability 1, ties to the structure that entered the session
  first (:meth:`Session.start`'s order, then :meth:`Session.adopt`'s); an adopted structure,
  until its first update, counts as probability 0.5 (the threshold). Each structure keeps its
  own mask inside the session and the rule is applied to what is read, so a voxel a structure
  gave up comes back to it when the structure that took it lets it go (at its update or undo).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

from . import catalogue
from .cache import EmbeddingCache, volume_fingerprint
from .confidence import evidence_from_array, rescore_slices, slice_scores, structure_score, volume_score
from .errors import InputError
from .models.sam import SAM_IMAGE_SIZE
from .engine import Engine, check_propagation
from .preprocessing import normalize_volume
from .prompts import ComponentPrompt, connected_components_with_bounds
from .models.alpnet import pool_prototypes
from .propagation import (
    DEFAULT_SIMILAR_K, SUPPORT_MODES, CroppedMask, _as_support_example, _check_example, _check_range,
    _check_similar_k, _example_features, _nbytes, _propagate, _seed_slices, _SliceStore, _Structure, combine_supports,
    crop_mask, largest_area_slice, resolve_exclusive, slice_descriptor,
)
from .validation import as_binary_mask, as_float_slices

logger = logging.getLogger(__name__)

__all__ = ["Session", "engine_session_cache_bytes"]

def engine_session_cache_bytes(engine: Engine, slices: int = 64) -> int:
    """The default session budget for ``engine``'s models: ``slices`` slices of its DINOv2
    features at its input size and of its refiner's image features
    (:func:`protosam.catalogue.encoder_cache_bytes_per_slice`: with the default models 64 x 11.3 MB,
    with SAM 2.1 at 1024 px 64 x 23.9 MB). The Slicer module sizes its worker's cache the same way."""
    return slices * catalogue.encoder_cache_bytes_per_slice(engine.models.dinov2, engine.models.sam,
                                                            engine.encoder_input_size)


# A scribble gives the refiner one point per this many voxels of its length, at most this many.
SCRIBBLE_POINT_SPACING = 16.0
SCRIBBLE_MAX_POINTS = 4


@dataclass
class _Click:
    x: float
    y: float
    positive: bool
    # A point sampled along a scribble (not listed by Session.clicks).
    scribbled: bool = False


@dataclass
class _Gesture:
    """A slice as it was before a box, scribble or lasso: undoing the gesture restores it."""

    kind: str
    mask: np.ndarray
    fixed: Optional[np.ndarray]
    clicks: Optional[List[_Click]]
    before_clicks: Optional["_BeforeClicks"]
    edits: Optional[list]


@dataclass
class _StructureState:
    """What the session knows of one structure: its supports and fixed slices (query frame)."""

    key: Hashable
    # Supports from another volume: (normalised support volume [N', H', W'], its mask, slices).
    external: Optional[Tuple[np.ndarray, np.ndarray, List[int]]]
    fixed: Dict[int, np.ndarray] = field(default_factory=dict)  # slice -> [H, W] uint8, kept
    clicks: Dict[int, List[_Click]] = field(default_factory=dict)
    # Each clicked slice as it was before its first click; restored when its clicks are cleared.
    before_clicks: Dict[int, "_BeforeClicks"] = field(default_factory=dict)
    # Per slice, its corrections in order: "click" (one point of Session.correct) or a _Gesture.
    history: Dict[int, list] = field(default_factory=dict)
    # Per slice, (mask, fixed mask or None) before its first correction (clear_clicks restores it).
    origin: Dict[int, Tuple[np.ndarray, Optional[np.ndarray]]] = field(default_factory=dict)
    # Per slice, voxels forced by scribbles and lassos, in order: (positive, CroppedMask).
    edits: Dict[int, list] = field(default_factory=dict)
    prompts: Dict[int, list] = field(default_factory=dict)  # propagated prompt sets per slice
    # Each propagated prompt set's own mask (CroppedMask at the slice's size), per slice.
    prompt_masks: Dict[int, list] = field(default_factory=dict)
    output: Optional[np.ndarray] = None  # [N, H, W] uint8
    # "Other segments": [N, H, W] bool voxels that are not this structure (see set_negatives).
    negatives: Optional[np.ndarray] = None
    # Exclusive sessions: the last run's refined mask probability per propagated slice, as
    # propagation keeps it (rows, cols, float32 crop; see resolve_exclusive). None: none kept.
    probabilities: Optional[Dict[int, tuple]] = None
    # Supports from other volumes given as arrays (an example bank's): (example, image, mask),
    # and their encoder features for the session's engine (dropped when the engine changes).
    examples: List[Tuple[object, np.ndarray, np.ndarray]] = field(default_factory=list)
    example_features: Dict[int, torch.Tensor] = field(default_factory=dict)
    # Per propagated slice, its outcome in the last run with what it depended on: an update
    # matches and decodes again only the slices whose inputs changed (propagation._SliceOutcome).
    outcomes: Dict[int, object] = field(default_factory=dict)
    # Per propagated slice, what the models computed that says how sure it is (the last run's),
    # and the slice scores of the output as it stands (None: to be computed; protosam.confidence).
    evidence: Dict[int, object] = field(default_factory=dict)
    scores: Optional[np.ndarray] = None


def _held_bytes(value, seen: set, depth: int = 0) -> int:
    """Bytes of the numpy arrays and torch tensors reachable from ``value`` through dataclasses,
    dicts (their values), lists and tuples; each array counted once (``seen``: their ids)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return int(value.nbytes) if isinstance(value, np.ndarray) else _nbytes(value)
    if depth > 12 or isinstance(value, (str, bytes, int, float, bool, slice)) or value is None:
        return 0
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return 0
    return sum(_held_bytes(item, seen, depth + 1) for item in items)


def _resolved_slice(method):
    """A correction returns its slice as the session's results give it: in an exclusive
    session, with the voxels another structure wins taken out (rule in the module docstring).
    The slice and its neighbours are scored again (:meth:`Session.confidence`)."""
    @functools.wraps(method)
    def correction(self, structure, index, *args, **kwargs):
        mask = method(self, structure, index, *args, **kwargs)
        self._rescore(structure, int(index))
        if not self.exclusive_structures or len(self.structures) < 2:
            return mask
        with self._lock:
            return self._resolved(int(index))[structure][0].copy()
    return correction


@dataclass
class _BeforeClicks:
    """A clicked slice before its first click: its mask and fixed mask (restored when its
    clicks are cleared), the prompt sets the clicks join with each set's mask (kept for the
    slice's later clicks, also after an update re-propagated the others), and the masks already
    decoded for a set with a given list of clicks (so an undo decodes nothing)."""

    mask: np.ndarray
    fixed: Optional[np.ndarray]
    prompts: List[ComponentPrompt]
    prompt_masks: list
    decoded: Dict[tuple, CroppedMask] = field(default_factory=dict)


class Session:
    """Propagation plus corrections on one volume, with the volume's encoder outputs cached.

    Args:
        engine: loaded models; the caches belong to its models, input size and preset.
        volume: 3-D raw intensities in the caller's order; ``axis`` is the slicing axis.
        modality: intensity preprocessing, as for ``segment_volume``.
        cache_bytes: budget of the encoder-output cache (LRU; evicted slices are re-encoded);
            ``"auto"`` (default): 64 slices of the engine's models (:func:`engine_session_cache_bytes`,
            so a SAM 2 refiner gets room for its larger features); None shares the engine's own
            cache (``Engine(cache_bytes=...)``), so a session opened after an engine run in the
            same process finds that run's encodings.
        support_mode: "nearest", "all" or "similar" (see ``segment_volume``).
        slice_range, auto_extent, similar_k: as for ``segment_volume``.
        propagation: "per-slice" or "memory" (SAM 2 refiners: every run walks the volume with
            SAM 2's video predictor, the fixed slices, painted or corrected, being its
            conditioning frames); None: the engine's (``Engine(propagation=...)``).
        exclusive: give each voxel to at most one structure in every result (rule in the
            module docstring; ``segment_volume(exclusive=True)``'s). Settable later through
            the attribute ``exclusive_structures`` (``exclusive`` names the lock's context).
    """

    def __init__(
        self,
        engine: Engine,
        volume,
        *,
        axis: int = 0,
        modality: str = "auto",
        cache_bytes: Union[int, None, str] = "auto",
        support_mode: str = "nearest",
        slice_range: Optional[Tuple[int, int]] = None,
        auto_extent: Optional[bool] = None,
        exclusive: bool = False,
        similar_k: int = DEFAULT_SIMILAR_K,
        propagation: Optional[str] = None,
    ):
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, not {axis!r}")
        if support_mode not in SUPPORT_MODES:
            raise InputError(f"Unknown support mode {support_mode!r}: choose one of {', '.join(SUPPORT_MODES)}.")
        self.axis = axis
        self.modality = modality
        self.support_mode = support_mode
        self.similar_k = _check_similar_k(similar_k)
        self.slice_range = slice_range
        self.auto_extent = auto_extent
        self.exclusive_structures = bool(exclusive)
        # "per-slice" or "memory" (each update walks again with the fixed slices as SAM 2
        # conditioning frames); None: the engine's. Checked against the refiner at every run.
        self.propagation = None if propagation is None else check_propagation(propagation, engine.models.sam)
        if cache_bytes == "auto":
            cache_bytes = engine_session_cache_bytes(engine)
        self._shares_engine_cache = cache_bytes is None
        self.cache = engine.cache if cache_bytes is None else EmbeddingCache(cache_bytes)
        self.structures: Dict[Hashable, _StructureState] = {}
        self.engine = engine
        self._lock = threading.RLock()
        self._set_volume(volume)
        self._key = self._cache_key()

    # ------------------------------------------------------------------ lifecycle
    def _set_volume(self, volume) -> None:
        self.caller_shape = tuple(np.shape(volume))  # the volume's shape in the caller's order
        raw = np.moveaxis(as_float_slices(volume, "volume", 3), self.axis, 0)
        self.volume = normalize_volume(raw, self.modality)  # [N, H, W] float32, slice-first
        self.fingerprint = volume_fingerprint(self.volume)
        self.bounds = _check_range(self.slice_range, self.volume.shape[0])
        self.structures.clear()
        self.store = _SliceStore(self.engine, self.volume, cache=self.cache, fingerprint=self.fingerprint)

    def _cache_key(self):
        return (self.fingerprint, self.engine.models, self.engine.preset)

    def rebind(self, engine: Optional[Engine] = None, volume=None) -> bool:
        """Point the session at another engine and/or volume. The encoder caches are dropped
        when the volume, the models, the input size or the preset changed (the cached outputs
        would be wrong); a changed volume also drops every structure. Returns True if dropped."""
        with self._lock:
            if engine is not None:
                self.engine = engine
                # Another engine may round differently (device): decode every slice again.
                for state in self.structures.values():
                    state.outcomes = {}
                if self._shares_engine_cache:
                    self.cache = engine.cache
            if volume is not None:
                new = normalize_volume(np.moveaxis(as_float_slices(volume, "volume", 3), self.axis, 0), self.modality)
                if volume_fingerprint(new) != self.fingerprint:
                    self._set_volume(volume)
            self.store = _SliceStore(self.engine, self.volume, cache=self.cache, fingerprint=self.fingerprint)
            key = self._cache_key()
            if key == self._key:
                return False
            self._key = key
            self.cache.clear()
            for state in self.structures.values():
                # Features made by (or carried for) the previous models no longer apply.
                state.example_features.clear()
                state.examples = [(dataclasses.replace(example, features=None), image, mask)
                                  for example, image, mask in state.examples]
            logger.info("Session caches dropped: the volume, models, input size or preset changed.")
            return True

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True):
        """Hold the session for several calls made as one step; yields False instead of waiting
        when ``wait`` is False and another thread is in an operation (e.g. an update)."""
        held = self._lock.acquire(blocking=wait)
        try:
            yield held
        finally:
            if held:
                self._lock.release()

    def array_bytes(self) -> int:
        """Bytes of the arrays this session holds besides its encoder cache: its volume and, per
        structure, everything its state keeps (output and fixed masks, other segments, kept
        probabilities, prompt sets and their masks, the slices as they were before corrections,
        edits, bank examples and their features, the last run's outcomes and evidence). What a
        server counts against a user's memory budget (an array reached twice counts once).

        Never waits for the session's lock: the server counts under its own scheduler lock, and an
        update holds the session's for its whole run, which would stall every user's requests.
        The count reads snapshots of the state (``list`` copies of its containers, made under the
        GIL), so an operation running meanwhile gives a figure from just before or after it."""
        seen: set = set()
        return _held_bytes(self.volume, seen) + sum(_held_bytes(state, seen)
                                                    for state in list(self.structures.values()))

    def close(self) -> None:
        """Free the cached encoder outputs of this volume and every structure. A cache shared
        with the engine (``cache_bytes=None``) keeps the other volumes' encodings: it serves
        other runs and sessions too."""
        with self._lock:
            if self._shares_engine_cache:
                fingerprint = self.fingerprint
                self.cache.discard(lambda key: isinstance(key, tuple) and len(key) > 1 and key[1] == fingerprint)
            else:
                self.cache.clear()
            self.structures.clear()

    # ------------------------------------------------------------------ propagation
    def start(
        self,
        support_masks: Mapping[Hashable, np.ndarray],
        *,
        support_volume=None,
        support_slices: Optional[Mapping[Hashable, Sequence[int]]] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        cancel: Optional[threading.Event] = None,
        negatives: Optional[Mapping[Hashable, np.ndarray]] = None,
        examples: Optional[Mapping[Hashable, Sequence[object]]] = None,
    ) -> Dict[Hashable, np.ndarray]:
        """First propagation of each structure, as ``segment_volume`` does it (same results).

        ``examples``: key -> :class:`protosam.propagation.SupportExample` list (an example
        bank's, :meth:`protosam.examples.ExampleBank.supports`), kept as supports of the key at
        every update, with its painted slices or alone (a key may have examples only).

        ``support_masks``: key -> 3-D mask on ``support_volume`` (None: this volume, the painted
        slices then become fixed slices) in the caller's order; ``support_slices``: key ->
        support slice indices (default: each structure's largest slice); ``negatives``: key ->
        3-D voxels that are not that structure (see :meth:`set_negatives`).
        Returns key -> uint8 mask volume in the caller's order.
        """
        with self._lock:
            external_volume = None
            if support_volume is not None:
                support = np.moveaxis(as_float_slices(support_volume, "support volume", 3), self.axis, 0)
                support = normalize_volume(support, self.modality)
                if support.shape != self.volume.shape or not np.array_equal(support, self.volume):
                    external_volume = support
            shape = (self.volume if external_volume is None else external_volume).shape
            caller_shape = self.caller_shape if external_volume is None else np.shape(support_volume)
            prepared_examples = {key: self._prepare_examples(key, value) for key, value in (examples or {}).items()
                                 if value}
            if not support_masks and not prepared_examples:
                raise InputError("No structure to segment: give at least one support mask or example.")
            for key, mask in support_masks.items():
                mask = np.moveaxis(as_binary_mask(mask, f"support mask '{key}'", caller_shape), self.axis, 0)
                if not mask.any():
                    raise InputError(f"Support mask '{key}' is empty: paint the structure on at least one slice.")
                wanted = support_slices.get(key) if support_slices else None
                indices = sorted({int(i) for i in (wanted if wanted is not None else [largest_area_slice(mask)])})
                for index in indices:
                    if not 0 <= index < shape[0]:
                        raise InputError(f"Support slice {index} for '{key}' is outside the volume (0..{shape[0] - 1}).")
                    if not mask[index].any():
                        raise InputError(
                            f"Support mask '{key}' is empty on support slice {index}: choose a slice where it is painted."
                        )
                if external_volume is None:
                    state = _StructureState(key, None)
                    state.fixed = {i: mask[i].astype(np.uint8) for i in indices}
                else:
                    state = _StructureState(key, (external_volume, mask, indices))
                if negatives is not None and negatives.get(key) is not None:
                    state.negatives = self._as_negatives(key, negatives[key])
                self.structures[key] = state
            keys = list(support_masks) + [key for key in prepared_examples if key not in support_masks]
            for key in keys:
                if key not in support_masks:
                    self.structures[key] = _StructureState(key, None)
                    if negatives is not None and negatives.get(key) is not None:
                        self.structures[key].negatives = self._as_negatives(key, negatives[key])
                self.structures[key].examples = prepared_examples.get(key, [])
            self._run(keys, progress, cancel)
            return self.masks(keys)

    def _prepare_examples(self, key: Hashable, examples) -> List[Tuple[object, np.ndarray, np.ndarray]]:
        """(example, image, mask) of each example, checked (all of them before any work)."""
        prepared = []
        for number, value in enumerate(examples):
            example = _as_support_example(key, number, value)
            image, mask = _check_example(key, number, example)
            prepared.append((example, image, mask))
        return prepared

    def adopt(self, structure: Hashable, masks, fixed_slices: Sequence[int], *, support_volume=None,
              support_mask=None, support_slices: Optional[Sequence[int]] = None,
              examples: Optional[Sequence[object]] = None, evidence=None) -> None:
        """Take over a result propagated elsewhere (another process's run on this volume):
        ``masks`` uint8 volume in the caller's order, ``fixed_slices`` the slices painted by
        the user (they stay as they are and are supports at the next update). Such slices have
        no recorded prompt sets: a click joins the box of the mask's component holding it and
        only the clicked components are decoded again (see :func:`_mask_prompts`).

        When the run's support came from another volume, pass it as ``support_volume`` (raw
        intensities, 3-D, in the caller's order with the same slicing ``axis``), its 3-D
        ``support_mask`` and the ``support_slices`` used: every update then keeps that support,
        as :meth:`start` would have, besides the fixed slices of this volume. ``examples``: the
        run's bank examples of the structure (as :meth:`start` takes them), kept likewise.

        ``evidence``: the run's ``VolumeResult.slice_evidence`` of the structure (``[N, 3]``
        along ``axis``), so that the session's review scores (:meth:`confidence`) are the run's
        and are rescored after corrections from it; without it the slices are scored by their
        neighbours alone until the first update."""
        prepared_examples = self._prepare_examples(structure, examples or ())
        with self._lock:
            mask = np.moveaxis(as_binary_mask(masks, f"mask of '{structure}'", self.caller_shape), self.axis, 0)
            known = {}
            if evidence is not None:
                rows = np.asarray(evidence)
                if rows.shape != (mask.shape[0], 3):
                    raise InputError(f"The slice evidence of '{structure}' has shape {rows.shape}; it must be "
                                     f"({mask.shape[0]}, 3), one row per slice along axis {self.axis}.")
                known = evidence_from_array(rows)
            external = None
            if support_volume is not None:
                external = self._external_support(structure, support_volume, support_mask, support_slices)
            state = _StructureState(structure, external)
            state.output = mask.astype(np.uint8)
            state.fixed = {int(k): state.output[int(k)].copy() for k in fixed_slices}
            state.prompts = {}
            state.prompt_masks = {}
            state.examples = prepared_examples
            state.evidence = known
            self.structures[structure] = state

    def _external_support(self, structure: Hashable, support_volume, support_mask,
                          support_slices) -> Optional[Tuple[np.ndarray, np.ndarray, List[int]]]:
        """(normalised support volume, its mask, slices) slice-first, or None when the support
        volume is this volume (then its painted slices are this volume's fixed slices)."""
        support = np.moveaxis(as_float_slices(support_volume, "support volume", 3), self.axis, 0)
        support = normalize_volume(support, self.modality)
        if support.shape == self.volume.shape and np.array_equal(support, self.volume):
            return None
        if support_mask is None or not support_slices:
            raise InputError(f"The support of '{structure}' comes from another volume: give its mask and slices too.")
        mask = np.moveaxis(as_binary_mask(support_mask, f"support mask '{structure}'", np.shape(support_volume)),
                           self.axis, 0)
        indices = sorted({int(i) for i in support_slices})
        for index in indices:
            if not 0 <= index < support.shape[0] or not mask[index].any():
                raise InputError(
                    f"Support slice {index} of '{structure}' is outside the support volume or empty there.")
        return support, mask, indices

    def set_negatives(self, structure: Hashable, negatives) -> None:
        """Voxels that are *not* ``structure`` ("other segments as not this"): a 3-D bool volume
        in the caller's order (e.g. the union of the other visible segments), or None to drop
        the option. From the next :meth:`update` (or :meth:`start`) on, on every propagated
        slice where they appear they are removed from the structure's mask, give the refiner
        negative points (:func:`protosam.prompts.add_negative_points`, not for MedSAM) and give
        ALPNet background prototypes from that slice
        (:func:`protosam.propagation.with_background_examples`). Fixed slices keep their masks."""
        with self._lock:
            state = self._state(structure)
            state.negatives = None if negatives is None else self._as_negatives(structure, negatives)

    def _as_negatives(self, structure: Hashable, negatives) -> Optional[np.ndarray]:
        mask = np.moveaxis(as_binary_mask(negatives, f"negatives of '{structure}'", self.caller_shape), self.axis, 0)
        return mask.astype(bool) if mask.any() else None

    def has_sam_embedding(self, index: int) -> bool:
        """Whether slice ``index``'s SAM image embedding is at hand, so a click there needs no
        encoding (the worker then answers it at once; otherwise it reports progress)."""
        return self.store.has_sam_embedding(int(index))

    def update(self, structure: Hashable, *, progress=None, cancel=None) -> np.ndarray:
        """Propagate ``structure`` again with every fixed slice as a support, from the cached
        encodings. Fixed slices keep their masks. Returns its uint8 mask volume (caller's order)."""
        with self._lock:
            self._state(structure)
            self._run([structure], progress, cancel)
            return self.mask(structure)

    def _run(self, keys: List[Hashable], progress, cancel) -> None:
        first, last = self.bounds
        prepared = []
        for key in keys:
            state = self.structures[key]
            prototypes: Dict[int, object] = {}
            support_indices: List[int] = []
            described = []  # (descriptor, prototypes) of every support, for support_mode "similar"
            similar = self.support_mode == "similar"
            if state.external is not None:
                support, mask, indices = state.external
                external_store = _SliceStore(self.engine, support)
                seeds = _seed_slices(key, indices, support.shape[0], self.volume.shape[0], False)
                for index, seed in zip(indices, seeds):
                    features = external_store.features(index)
                    prototypes[seed] = self.engine.prototypes_from_features(features, mask[index])
                    support_indices.append(index)
                    if similar:
                        described.append((slice_descriptor(features), prototypes[seed]))
            copied = {}
            unusable: List[str] = []
            for index in sorted(state.fixed):
                painted = state.fixed[index]
                if painted.any():
                    try:
                        # A slice of this volume wins over a support from elsewhere on the same seed.
                        features = self.store.features(index)
                        prototypes[index] = self.engine.prototypes_from_features(features, painted.astype(bool))
                        if similar:
                            described.append((slice_descriptor(features), prototypes[index]))
                    except InputError as error:
                        # A fixed slice that cannot teach (e.g. a corrected mask covering the
                        # whole slice, or too small for the feature grid) is still kept exactly
                        # as fixed below; it only does not become an example.
                        unusable.append(f"slice {index}: {error}")
                        logger.warning("Structure '%s', slice %d is kept as fixed but is not used as an example: %s",
                                       key, index, error)
                if first <= index <= last:
                    copied[index] = painted
            # Bank examples pool with what shares their seed (as in segment_volume): this volume's
            # slice first, then the examples in the order given.
            shots: Dict[int, list] = {}
            for number, (example, image, example_mask) in enumerate(state.examples):
                # Encoded once per engine (or carried by the example): updates cost no encoder work.
                if number not in state.example_features:
                    state.example_features[number] = _example_features(self.engine, example, image)
                features = state.example_features[number]
                seed = example.seed(self.volume.shape[0])
                shot = self.engine.prototypes_from_features(features, example_mask)
                shots.setdefault(seed, []).append(shot)
                if similar:
                    described.append((slice_descriptor(features), shot))
            for seed, pooled in shots.items():
                prototypes[seed] = pool_prototypes(([prototypes[seed]] if seed in prototypes else []) + pooled)
            if not prototypes:
                reasons = (" (" + "; ".join(unusable) + ")") if unusable else ""
                raise InputError(f"Structure '{key}' has no usable support slice left{reasons}: "
                                 "paint the structure on one slice.")
            structure = _Structure(
                key, support_indices + sorted(state.fixed), sorted(prototypes), copied,
                combine_supports(prototypes, self.support_mode), np.zeros(self.volume.shape, np.uint8), [],
                known_present=any(p.any() for p in state.fixed.values()), prompt_masks={},
                negatives=state.negatives, probabilities={} if self.exclusive_structures else None,
                reusable=state.outcomes, outcomes={},
            )
            if similar:
                structure.similar, structure.similar_k = described, self.similar_k
            prepared.append(structure)
        auto_extent = self.engine.preset.auto_extent if self.auto_extent is None else self.auto_extent
        if self.propagation is not None:
            check_propagation(self.propagation, self.engine.models.sam)  # the engine may have been rebound
        _propagate(self.engine, self.store, prepared, (first, last), auto_extent, progress, cancel, self.propagation)
        for structure in prepared:
            state = self.structures[structure.key]
            for index, painted in structure.copied.items():
                structure.output[index] = painted
            state.output = structure.output
            state.prompts = {k: v for k, v in structure.prompts.items() if k not in state.fixed}
            state.prompt_masks = {k: v for k, v in structure.prompt_masks.items() if k not in state.fixed}
            state.probabilities = structure.probabilities
            state.outcomes = structure.outcomes
            state.evidence = dict(structure.evidence)
            state.scores = None  # every slice is scored again, from the new evidence

    # ------------------------------------------------------------------ corrections
    @_resolved_slice
    def add_support(self, structure: Hashable, index: int, mask) -> np.ndarray:
        """A painted slice ``index`` (``[H, W]``, non-zero = structure) becomes fixed and, at the
        next update, a support. Its clicks, gestures and their undo history are dropped (the
        painting replaces them)."""
        with self._lock:
            state = self._state(structure)
            index = self._check_slice(index)
            painted = as_binary_mask(mask, "painted slice", self.volume.shape[1:]).astype(np.uint8)
            state.fixed[index] = painted
            self._forget_corrections(state, index)
            state.output[index] = painted
            return painted.copy()

    @_resolved_slice
    def correct(self, structure: Hashable, index: int, points, labels) -> np.ndarray:
        """Add clicks on slice ``index``: ``points`` ``[P, 2]`` ``(x, y)`` voxels of the slice,
        ``labels`` ``[P]`` 1 = positive, 0 = negative. SAM re-decodes the slice from its cached
        embedding (encoded now if it is not cached). Only this slice changes until
        :meth:`update`. Returns the slice's new uint8 mask ``[H, W]``."""
        self._refuse_points("clicks")
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = np.asarray(labels).reshape(-1)
        if len(points) != len(labels) or not len(points):
            raise InputError("Give one label (1 positive, 0 negative) for each clicked point.")
        height, width = self.volume.shape[1:]
        with self._lock:
            state = self._state(structure)
            index = self._check_slice(index)
            for (x, y), label in zip(points, labels):
                if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
                    raise InputError(f"Click ({x:g}, {y:g}) is outside slice {index} ({width} x {height} voxels).")
                if int(label) not in (0, 1):
                    raise InputError(f"Click label {label!r} must be 1 (positive) or 0 (negative).")
            self._begin_correction(state, index)
            self._open_clicks(state, index)
            state.clicks[index].extend(_Click(float(x), float(y), bool(label)) for (x, y), label in zip(points, labels))
            state.history[index].extend(["click"] * len(points))
            return self._redecode(state, index)

    # ------------------------------------------------------------------ gestures
    @_resolved_slice
    def box(self, structure: Hashable, index: int, box_xyxy) -> np.ndarray:
        """A box dragged on slice ``index``: ``box_xyxy`` ``(x0, y0, x1, y1)`` voxels of the
        slice (column, row; inclusive, any corner order). It replaces all of the slice's prompt
        sets by one set with this box (edges at the outer edges of those voxels, in SAM's frame);
        the slice's clicks inside it join it, the others are dropped, and so are the slice's
        scribbles and lassos. The refiner decodes it (any refiner, MedSAM too); the slice becomes
        fixed. Returns its new uint8 mask ``[H, W]``."""
        values = np.asarray(box_xyxy, dtype=np.float64).reshape(-1)
        if values.shape != (4,) or not np.isfinite(values).all():
            raise InputError("A box is four numbers (x0, y0, x1, y1) in voxels of the slice.")
        x0, x1 = sorted(values[[0, 2]])
        y0, y1 = sorted(values[[1, 3]])
        height, width = self.volume.shape[1:]
        if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
            raise InputError(f"Box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the slice ({width} x {height} voxels).")
        x0, x1 = max(x0, 0.0), min(x1, width - 1.0)
        y0, y1 = max(y0, 0.0), min(y1, height - 1.0)
        with self._lock:
            state = self._state(structure)
            index = self._check_slice(index)
            hw = self.volume.shape[1:]
            prompt = ComponentPrompt(_voxel_box_to_sam(x0, y0, x1, y1, hw), np.zeros((0, 2)), np.zeros(0, np.int64),
                                     None, None, 0.0)
            only_box = self._decode_set(index, prompt)
            self._begin_correction(state, index)
            self._push_gesture(state, index, "box")
            kept = [c for c in state.clicks.get(index, []) if x0 <= c.x <= x1 and y0 <= c.y <= y1]
            mask = np.zeros(hw, np.uint8)
            only_box.paint(mask)
            before = _BeforeClicks(mask, mask, [prompt], [only_box])
            state.before_clicks[index] = before
            state.clicks[index] = kept
            state.edits.pop(index, None)
            if kept:
                return self._redecode(state, index)
            state.output[index] = mask
            state.fixed[index] = mask.copy()
            return mask.copy()

    @_resolved_slice
    def scribble(self, structure: Hashable, index: int, points_xy, positive: bool, *, radius: float = 0.0) -> np.ndarray:
        """A scribble (open polyline) on slice ``index``: ``points_xy`` ``[P, 2]`` ``(x, y)``
        voxels of the slice, in drawing order (one point: a dot). The voxels it covers (its
        segments rasterised one voxel wide, widened by ``radius`` voxels) become structure
        (``positive``) or not, and points sampled along it join the slice's prompt sets as
        clicks of its sign (rule in the module docstring), so the refiner re-decodes the sets
        they join. Refused for box-only refiners (MedSAM). The slice becomes fixed; at the next
        update its mask (with the scribbled voxels in or out) is a support. Returns the new uint8
        mask ``[H, W]``."""
        self._refuse_points("scribbles")
        points = self._gesture_points(points_xy, "scribble", 1)
        covered = _rasterise_polyline(points, self.volume.shape[1:], radius)
        sampled = _sample_along(points)
        with self._lock:
            state = self._state(structure)
            index = self._check_slice(index)
            self._begin_correction(state, index)
            self._push_gesture(state, index, "scribble")
            self._open_clicks(state, index)
            state.clicks[index].extend(_Click(float(x), float(y), bool(positive), True) for x, y in sampled)
            state.edits.setdefault(index, []).append((bool(positive), crop_mask(covered)))
            return self._redecode(state, index)

    @_resolved_slice
    def lasso(self, structure: Hashable, index: int, polygon_xy, positive: bool) -> np.ndarray:
        """A lasso (closed polygon) on slice ``index``: ``polygon_xy`` ``[P, 2]`` ``(x, y)``
        voxel vertices (P >= 3; the last joins the first). The voxels it encloses (centres
        inside, even-odd rule, plus the voxels its outline crosses) are added to
        (``positive``) or removed from the slice's mask directly, with no decoding, for every
        refiner. The slice becomes fixed. Returns the new uint8 mask ``[H, W]``."""
        points = self._gesture_points(polygon_xy, "lasso", 3)
        enclosed = _rasterise_polygon(points, self.volume.shape[1:])
        with self._lock:
            state = self._state(structure)
            index = self._check_slice(index)
            self._begin_correction(state, index)
            self._push_gesture(state, index, "lasso")
            edit = (bool(positive), crop_mask(enclosed))
            state.edits.setdefault(index, []).append(edit)
            mask = state.output[index].copy()
            _apply_edits(mask, [edit])
            state.output[index] = mask
            state.fixed[index] = mask.copy()
            return mask.copy()

    # ------------------------------------------------------------------ undo
    @_resolved_slice
    def undo(self, structure: Hashable, index: int) -> np.ndarray:
        """Take back the last correction of slice ``index`` (one click, or one box, scribble or
        lasso): the slice is exactly as it was before it (mask, fixed or not, clicks). Returns
        the slice's uint8 mask ``[H, W]``."""
        with self._lock:
            state = self._state(structure)
            index = self._check_slice(index)
            history = state.history.get(index)
            if not history:
                raise InputError(f"Slice {index} has no click to undo, nor a box, scribble or lasso.")
            last = history.pop()
            if isinstance(last, _Gesture):
                state.output[index] = last.mask.copy()
                _restore(state.fixed, index, last.fixed)
                _restore(state.clicks, index, last.clicks)
                _restore(state.before_clicks, index, last.before_clicks)
                _restore(state.edits, index, last.edits)
            else:
                state.clicks[index].pop()
                if state.clicks[index]:
                    self._redecode(state, index)
                else:
                    # As before the slice's first click (or before its clicks since its box).
                    before = state.before_clicks[index]
                    mask = before.mask.copy()
                    _apply_edits(mask, state.edits.get(index, []))
                    state.output[index] = mask
                    _restore(state.fixed, index, before.fixed)
            if not history:
                self._forget_corrections(state, index)
            return state.output[index].copy()

    def undo_click(self, structure: Hashable, index: int) -> np.ndarray:
        """Alias of :meth:`undo` (the slice's last correction, a click or a gesture); without
        corrections left the slice is as before them."""
        return self.undo(structure, index)

    @_resolved_slice
    def clear_clicks(self, structure: Hashable, index: int) -> np.ndarray:
        """Drop every correction of slice ``index`` (clicks, boxes, scribbles, lassos) and give
        it back the mask it had before them."""
        with self._lock:
            state = self._state(structure)
            index = self._check_slice(index)
            origin = state.origin.get(index)
            if origin is not None:
                state.output[index] = origin[0].copy()
                _restore(state.fixed, index, origin[1])
            self._forget_corrections(state, index)
            return state.output[index].copy()

    def clicks(self, structure: Hashable, index: int) -> List[Tuple[float, float, int]]:
        """The clicks of slice ``index`` as ``(x, y, label)``, in the order given (not the points
        sampled along scribbles)."""
        return [(c.x, c.y, int(c.positive)) for c in self._state(structure).clicks.get(index, []) if not c.scribbled]

    def corrections(self, structure: Hashable, index: int) -> List[str]:
        """The kinds of slice ``index``'s corrections that :meth:`undo` can take back, oldest
        first: "click", "box", "scribble", "lasso"."""
        return [e if isinstance(e, str) else e.kind for e in self._state(structure).history.get(index, [])]

    def fixed_slices(self, structure: Hashable) -> List[int]:
        return sorted(self._state(structure).fixed)

    def confidence(self, structures: Optional[Sequence[Hashable]] = None) -> Dict[str, object]:
        """The review scores of the session's results as they stand (:mod:`protosam.confidence`,
        with the same keys as :class:`protosam.VolumeResult`'s): ``slice_confidence`` (key ->
        ``[N]`` float32 along the slicing axis, NaN: no score), ``structure_confidence`` (key ->
        float) for ``structures`` (default: every structure) and ``volume_confidence`` (the
        lowest of every structure's). Fixed slices (painted or corrected: user-confirmed) score
        1 and are left out of the structure's mean. After :meth:`start` they equal
        ``segment_volume``'s; a correction scores its slice and the two beside it again, an
        update every slice."""
        with self._lock:
            every = [key for key, state in self.structures.items() if state.output is not None]
            slice_confidence = {key: self._scores(self.structures[key]) for key in every}
            structure_confidence = {key: structure_score(slice_confidence[key], self.structures[key].fixed)
                                    for key in every}
            keys = every if structures is None else list(structures)
            for key in keys:
                self._state(key)
            return {"slice_confidence": {key: slice_confidence[key].copy() for key in keys},
                    "structure_confidence": {key: structure_confidence[key] for key in keys},
                    "volume_confidence": volume_score(structure_confidence) if every else None}

    def _scores(self, state: _StructureState) -> np.ndarray:
        if state.scores is None:
            state.scores = slice_scores(state.output, state.evidence, state.fixed)
        return state.scores

    def _rescore(self, structure: Hashable, index: int) -> None:
        """After a correction of slice ``index``: its score and its neighbours' (see
        :func:`protosam.confidence.rescore_slices`)."""
        with self._lock:
            state = self.structures.get(structure)
            if state is not None and state.scores is not None and state.output is not None:
                state.scores = rescore_slices(state.scores, state.output, state.evidence, state.fixed, [index])

    def mask(self, structure: Hashable) -> np.ndarray:
        """uint8 mask volume of ``structure`` in the caller's order (exclusive sessions: with the
        voxels other structures win taken out)."""
        return self.masks([structure])[structure]

    def masks(self, structures: Optional[Sequence[Hashable]] = None) -> Dict[Hashable, np.ndarray]:
        """uint8 mask volumes (caller's order) of ``structures`` (default: every structure), as
        :meth:`mask` gives them; an exclusive session resolves the structures once for all."""
        with self._lock:
            keys = [key for key, state in self.structures.items() if state.output is not None] \
                if structures is None else list(structures)
            outputs = {key: self._state(key).output for key in keys}
            if self.exclusive_structures and len(self.structures) > 1:
                resolved = self._resolved()
                outputs = {key: resolved[key] for key in keys}
            return {key: np.ascontiguousarray(np.moveaxis(output, 0, self.axis)) for key, output in outputs.items()}

    def _resolved(self, index: Optional[int] = None) -> Dict[Hashable, np.ndarray]:
        """Every structure's ``[N, H, W]`` output (only slice ``index``, as ``[1, H, W]``, when
        given) with each voxel given to at most one structure, by
        :func:`protosam.propagation.resolve_exclusive` on copies (the outputs stay each
        structure's own). Fixed slices are its painted ones; structures in session order."""
        window = slice(None) if index is None else slice(index, index + 1)
        offset = 0 if index is None else index

        def on_window(record: Mapping[int, object]) -> Dict[int, object]:
            return {k - offset: v for k, v in record.items() if index is None or k == index}

        contenders = [
            _Structure(state.key, [], [], on_window(state.fixed), {}, state.output[window].copy(), [],
                       probabilities=on_window(state.probabilities or {}))
            for state in self.structures.values() if state.output is not None
        ]
        resolve_exclusive(contenders)
        return {contender.key: contender.output for contender in contenders}

    # ------------------------------------------------------------------ correction helpers
    def _refuse_points(self, what: str) -> None:
        if self.engine.refiner.medsam:
            raise InputError(
                f"MedSAM takes boxes only, so {what} cannot correct its masks: draw a box or a lasso, or paint the "
                "slice instead (a painted slice becomes a support), or choose a SAM model for click and scribble "
                "corrections."
            )

    def _gesture_points(self, points_xy, what: str, at_least: int) -> np.ndarray:
        points = np.asarray(points_xy, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < at_least or not np.isfinite(points).all():
            raise InputError(f"A {what} is a list of at least {at_least} (x, y) points in voxels of the slice.")
        height, width = self.volume.shape[1:]
        outside = (points[:, 0] < 0) | (points[:, 0] > width - 1) | (points[:, 1] < 0) | (points[:, 1] > height - 1)
        if outside.any():
            x, y = points[np.argmax(outside)]
            raise InputError(f"The {what}'s point ({x:g}, {y:g}) is outside the slice ({width} x {height} voxels).")
        return points

    def _begin_correction(self, state: _StructureState, index: int) -> None:
        if index not in state.origin:
            fixed = state.fixed.get(index)
            state.origin[index] = (state.output[index].copy(), None if fixed is None else fixed.copy())
        state.history.setdefault(index, [])

    def _push_gesture(self, state: _StructureState, index: int, kind: str) -> None:
        fixed = state.fixed.get(index)
        clicks = state.clicks.get(index)
        edits = state.edits.get(index)
        state.history[index].append(_Gesture(
            kind, state.output[index].copy(), None if fixed is None else fixed.copy(),
            None if clicks is None else list(clicks), state.before_clicks.get(index),
            None if edits is None else list(edits)))

    def _open_clicks(self, state: _StructureState, index: int) -> None:
        if index not in state.clicks:
            state.before_clicks[index] = self._before_clicks(state, index)
            state.clicks[index] = []

    def _forget_corrections(self, state: _StructureState, index: int) -> None:
        for record in (state.clicks, state.before_clicks, state.history, state.origin, state.edits):
            record.pop(index, None)

    def _decode_set(self, index: int, prompt: ComponentPrompt) -> CroppedMask:
        """One prompt set decoded on slice ``index``, at the slice's size."""
        embedding = self.store.sam_embedding(index).to(self.engine.device)
        with torch.inference_mode():
            union, _ = self.engine.refiner.decode(
                embedding, [prompt], multimask_output=self.engine.preset.effective_multimask,
                pick_best_score=self.engine.preset.pick_best_score, batch_prompts=False,
            )
        self.store.release(index)
        return crop_mask(self.engine.to_slice_size(self.engine.sam_mask_to_input_size(union), self.volume.shape[1:]))

    def _before_clicks(self, state: _StructureState, index: int) -> _BeforeClicks:
        """The slice's state before its first click, with the prompt sets its clicks join: the
        sets propagation gave SAM with their masks, or, for a slice without them (painted,
        adopted), box-only sets of the mask's components, each component its own mask."""
        mask = state.output[index].copy()
        if index in state.prompts:
            prompts, masks = state.prompts[index], state.prompt_masks[index]
        else:
            # The mask's components (disjoint): each set's mask is its component's pixels.
            prompts = _mask_prompts(mask)
            masks = [crop_mask(prompt.full_mask(mask.shape)) for prompt in prompts]
        return _BeforeClicks(mask, state.fixed.get(index), list(prompts), list(masks))

    def _redecode(self, state: _StructureState, index: int) -> np.ndarray:
        """The slice's mask from its prompt sets with the clicks added: a set without a click
        keeps its mask as it was; only sets with clicks are decoded by SAM, each on its own
        (as propagation decodes them on a CPU), and a set decoded before with the same clicks
        is not decoded again. Nearest resizing picks pixels, so the union of per-set masks at
        the slice's size equals resizing the union: the result is what decoding every set
        and resizing their union gives."""
        before = state.before_clicks[index]
        hw = self.volume.shape[1:]
        prompts = _with_clicks(before.prompts, state.clicks[index], hw)
        mask = np.zeros(hw, np.uint8)
        todo = []
        for number, prompt in enumerate(prompts):
            if number < len(before.prompts) and len(prompt.points) == len(before.prompts[number].points):
                before.prompt_masks[number].paint(mask)
                continue
            key = (number, prompt.points.tobytes(), prompt.point_labels.tobytes())
            if key in before.decoded:
                before.decoded[key].paint(mask)
            else:
                todo.append((key, prompt))
        if todo:
            embedding = self.store.sam_embedding(index).to(self.engine.device)
            with torch.inference_mode():
                for key, prompt in todo:
                    union, _ = self.engine.refiner.decode(
                        embedding, [prompt], multimask_output=self.engine.preset.effective_multimask,
                        pick_best_score=self.engine.preset.pick_best_score, batch_prompts=False,
                    )
                    decoded = crop_mask(self.engine.to_slice_size(self.engine.sam_mask_to_input_size(union), hw))
                    before.decoded[key] = decoded
                    decoded.paint(mask)
            # The embedding stays in the session's cache (within its budget), not in the store.
            self.store.release(index)
        # Scribbled and lassoed voxels stay as the user drew them, in the order drawn.
        _apply_edits(mask, state.edits.get(index, []))
        state.output[index] = mask
        state.fixed[index] = mask.copy()
        return mask.copy()

    def _state(self, structure: Hashable) -> _StructureState:
        state = self.structures.get(structure)
        if state is None or state.output is None:
            raise InputError(f"No structure '{structure}' in this session: propagate it first.")
        return state

    def _check_slice(self, index) -> int:
        count = self.volume.shape[0]
        if int(index) != index or not 0 <= int(index) < count:
            raise InputError(f"Slice {index} is outside the volume (0..{count - 1}).")
        return int(index)


def _to_sam_frame(x: float, y: float, hw) -> Tuple[float, float]:
    """Voxel ``(x, y)`` of an ``[H, W]`` slice -> pixel coordinates of SAM's 1024 frame (the
    slice is resized to it, pixel centres aligned as bilinear resizing aligns them)."""
    height, width = hw
    return (x + 0.5) * SAM_IMAGE_SIZE / width - 0.5, (y + 0.5) * SAM_IMAGE_SIZE / height - 0.5


def _with_clicks(prompts: List[ComponentPrompt], clicks: List[_Click], hw) -> List[ComponentPrompt]:
    """The propagated prompt sets with the clicks added (rules in the module docstring)."""
    sets = [[p, list(p.points), list(p.point_labels)] for p in prompts]
    for click in clicks:
        x, y = _to_sam_frame(click.x, click.y, hw)
        holder = None
        for entry in sets:
            box = entry[0].box
            if box is not None and box[0] <= x <= box[2] and box[1] <= y <= box[3]:
                holder = entry
                break
        if holder is None and click.positive:
            holder = [ComponentPrompt(None, np.zeros((0, 2)), np.zeros(0, np.int64), None, None, 0.0), [], []]
            sets.append(holder)
        if holder is None:
            boxed = [entry for entry in sets if entry[0].box is not None]
            if not boxed:
                continue  # nothing SAM produced here that a negative click could remove
            holder = min(boxed, key=lambda e: _box_distance(e[0].box, x, y))
        holder[1].append((x, y))
        holder[2].append(1 if click.positive else 0)
    return [
        replace(prompt, points=np.asarray(points, np.float64).reshape(-1, 2), point_labels=np.asarray(labels, np.int64))
        for prompt, points, labels in sets
    ]


def _mask_prompts(mask: np.ndarray) -> List[ComponentPrompt]:
    """Box-only prompt sets (SAM's 1024 frame) of the 8-connected components of an ``[H, W]``
    mask; ``window``/``local_mask`` hold the component in the mask's own frame."""
    labels, _, bounds = connected_components_with_bounds(mask.astype(bool))
    height, width = mask.shape
    prompts = []
    for number, window in enumerate(bounds, start=1):
        rows, cols = window
        x0, y0 = _to_sam_frame(cols.start, rows.start, mask.shape)
        x1, y1 = _to_sam_frame(cols.stop - 1, rows.stop - 1, mask.shape)
        # The box spans the component's voxels, edges included, at SAM's scale.
        half_x, half_y = 0.5 * SAM_IMAGE_SIZE / width, 0.5 * SAM_IMAGE_SIZE / height
        box = np.array([x0 - half_x + 0.5, y0 - half_y + 0.5, x1 + half_x - 0.5, y1 + half_y - 0.5])
        prompts.append(ComponentPrompt(box, np.zeros((0, 2)), np.zeros(0, np.int64), window,
                                       labels[window] == number, float((labels == number).sum())))
    return prompts


def _box_distance(box, x: float, y: float) -> float:
    dx = max(box[0] - x, 0.0, x - box[2])
    dy = max(box[1] - y, 0.0, y - box[3])
    return float(np.hypot(dx, dy))


def _restore(record: dict, index: int, value) -> None:
    """``record[index] = value``, or no entry when ``value`` is None (copies arrays and lists)."""
    if value is None:
        record.pop(index, None)
    else:
        record[index] = value.copy() if isinstance(value, (np.ndarray, list)) else value


def _apply_edits(mask: np.ndarray, edits) -> None:
    """Force the voxels of each ``(positive, CroppedMask)`` edit to 1 or 0, in order, in place."""
    for positive, pixels in edits:
        if positive:
            pixels.paint(mask)
        else:
            mask[pixels.rows, pixels.cols] &= (~pixels.values).astype(mask.dtype)


def _voxel_box_to_sam(x0: float, y0: float, x1: float, y1: float, hw) -> np.ndarray:
    """XYXY box in SAM's 1024 frame spanning voxels ``x0..x1``, ``y0..y1`` (inclusive, edges
    included), as :func:`_mask_prompts` makes a component's box."""
    height, width = hw
    a, b = _to_sam_frame(x0, y0, hw)
    c, d = _to_sam_frame(x1, y1, hw)
    half_x, half_y = 0.5 * SAM_IMAGE_SIZE / width, 0.5 * SAM_IMAGE_SIZE / height
    return np.array([a - half_x + 0.5, b - half_y + 0.5, c + half_x - 0.5, d + half_y - 0.5])


def _rasterise_polyline(points: np.ndarray, hw, radius: float = 0.0) -> np.ndarray:
    """bool ``[H, W]``: the voxels an ``(x, y)`` polyline passes through (its segments sampled
    every quarter voxel, each sample's nearest voxel), widened to a disc of ``radius`` voxels."""
    height, width = hw
    mask = np.zeros(hw, bool)
    samples = [points[:1]]
    for start, stop in zip(points[:-1], points[1:]):
        steps = max(int(np.ceil(np.abs(stop - start).max() * 4)), 1)
        t = np.linspace(0.0, 1.0, steps + 1)[1:, None]
        samples.append(start + t * (stop - start))
    xy = np.rint(np.concatenate(samples)).astype(np.int64)
    mask[np.clip(xy[:, 1], 0, height - 1), np.clip(xy[:, 0], 0, width - 1)] = True
    if radius > 0:
        r = int(np.floor(radius))
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        mask = ndimage.binary_dilation(mask, structure=(xx**2 + yy**2) <= radius**2)
    return mask


def _rasterise_polygon(points: np.ndarray, hw) -> np.ndarray:
    """bool ``[H, W]``: voxels whose centres lie inside the closed ``(x, y)`` polygon (even-odd
    rule), plus the voxels its outline passes through."""
    closed = np.concatenate([points, points[:1]])
    mask = _rasterise_polyline(closed, hw)
    height, width = hw
    x_lo, x_hi = max(int(np.floor(points[:, 0].min())), 0), min(int(np.ceil(points[:, 0].max())), width - 1)
    y_lo, y_hi = max(int(np.floor(points[:, 1].min())), 0), min(int(np.ceil(points[:, 1].max())), height - 1)
    yy, xx = np.mgrid[y_lo:y_hi + 1, x_lo:x_hi + 1].astype(np.float64)
    inside = np.zeros(xx.shape, bool)
    for (xa, ya), (xb, yb) in zip(closed[:-1], closed[1:]):
        crosses = (ya > yy) != (yb > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = xa + (yy - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (xx < x_cross)
    mask[y_lo:y_hi + 1, x_lo:x_hi + 1] |= inside
    return mask


def _sample_along(points: np.ndarray) -> np.ndarray:
    """``[K, 2]`` points along an ``(x, y)`` polyline: K = its length / SCRIBBLE_POINT_SPACING
    rounded up, between 1 and SCRIBBLE_MAX_POINTS, at the middles of K equal arc-length pieces
    (a single point or a zero-length scribble: that point)."""
    lengths = np.hypot(*np.diff(points, axis=0).T) if len(points) > 1 else np.zeros(0)
    total = float(lengths.sum())
    if total == 0:
        return points[:1].copy()
    count = int(min(max(np.ceil(total / SCRIBBLE_POINT_SPACING), 1), SCRIBBLE_MAX_POINTS))
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    wanted = (np.arange(count) + 0.5) * total / count
    return np.stack([np.interp(wanted, cumulative, points[:, 0]), np.interp(wanted, cumulative, points[:, 1])], axis=1)
