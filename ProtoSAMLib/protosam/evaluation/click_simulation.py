"""Simulated user of the CVPR 2025 interactive challenge: its boxes and its corrective clicks.

The challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation" (evaluation
code: JunMa11/CVPR-MedSegFMCompetition, ``CVPR25_iter_eval.py`` and ``get_boxes.py`` at commit
748e862, Apache-2.0) defines the user that every method is measured with. This module is
ProtoSAM's own implementation of that user, written from the description and checked against
numbers produced by the challenge's code (``Testing/engine/data/cvpr25/``):

* **Box** (:func:`challenge_box`): on the median foreground slice ``z_mid`` (the middle entry of
  the sorted list of slices that contain the class, upper middle for an even count) the 2-D
  bounding box of the class, widened on each side by a random shift of 0..5 pixels scaled by
  ``size / 256`` (so images under 256 pixels wide get no shift), drawn from a generator seeded
  once with 2025 and used class after class; ``z_min``/``z_max`` give the class's slice extent.
* **Click** (:func:`simulate_click`): the error of one class (prediction != ground truth) is
  split into 26-connected regions; in the largest (the first in raster order on a tie) the
  click goes to the voxel farthest from the region's outside by the Euclidean distance
  transform in voxels, computed on the region's bounding box padded by 25 % of its size on
  each side (at least one voxel), so the volume border counts as outside. Ties between equally
  deep voxels are broken by a generator seeded with 42 before every click, choosing uniformly
  among the deepest voxels in raster order. The click is positive (foreground) when the ground
  truth has the class there, negative otherwise.

Coordinates are array indices ``(z, y, x)`` of the volume as stored (slice axis first), as in
the challenge's ``clicks`` entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

#: The generator seed the challenge's click simulator sets before every click.
CLICK_SEED = 42
#: The seed ``get_boxes.py`` gives numpy's generator once, before the first box.
BOX_SEED = 2025
#: Largest box jitter drawn, in pixels of a 256-pixel image (0..5 inclusive).
BOX_MAX_SHIFT = 5
#: Padded crops with more voxels than this are downsampled 2x for the distance transform,
#: as the challenge does (memory); such huge error regions do not occur in the fixtures.
LARGE_ROI_VOXELS = 60_000_000
#: Neighbourhoods of the error regions: 26 is the challenge's; 6 and 18 exist for tests.
CONNECTIVITY_RANKS = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class SimulatedClick:
    """One click: ``(z, y, x)`` array index, positive (foreground) or not, and the size in
    voxels of the error region it corrects."""

    zyx: Tuple[int, int, int]
    positive: bool
    region_voxels: int

    def to_json(self) -> Dict[str, object]:
        return {"zyx": list(self.zyx), "positive": self.positive, "region_voxels": self.region_voxels}


@dataclass(frozen=True)
class ChallengeBox:
    """A class's box: slice extent ``z_min..z_max``, median foreground slice ``z_mid`` and the
    2-D box on it, ``x``/``y`` inclusive pixel bounds (column, row)."""

    z_min: int
    z_max: int
    z_mid: int
    x_min: int
    y_min: int
    x_max: int
    y_max: int

    def xyxy(self) -> Tuple[int, int, int, int]:
        return self.x_min, self.y_min, self.x_max, self.y_max

    def to_json(self) -> Dict[str, int]:
        """The keys of the challenge's ``boxes`` entries."""
        return {"z_min": self.z_min, "z_max": self.z_max, "z_mid": self.z_mid, "z_mid_x_min": self.x_min,
                "z_mid_y_min": self.y_min, "z_mid_x_max": self.x_max, "z_mid_y_max": self.y_max}

    @classmethod
    def from_json(cls, entry) -> "ChallengeBox":
        try:
            return cls(*(int(entry[k]) for k in ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min",
                                                  "z_mid_x_max", "z_mid_y_max")))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"A box entry needs z_min, z_max, z_mid and z_mid_x/y_min/max integers: {error}") from None


def median_foreground_slice(mask: np.ndarray) -> int:
    """``z_mid``: entry ``len // 2`` of the sorted slices (axis 0) containing the mask."""
    slices = np.flatnonzero(np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1))
    if slices.size == 0:
        raise ValueError("The mask is empty: a class without voxels has no box.")
    return int(slices[len(slices) // 2])


def challenge_box(mask: np.ndarray, generator: Optional[np.random.RandomState] = None) -> ChallengeBox:
    """The challenge's box of one class (3-D mask, slice axis first). ``generator``: the
    shared seeded generator (one 0..5 draw per class, see :func:`challenge_boxes`); None
    means no jitter (the tight box)."""
    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise ValueError(f"A box needs a 3-D mask, got shape {mask.shape}.")
    slices = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    z_mid = median_foreground_slice(mask)
    rows, cols = np.nonzero(mask[z_mid])
    height, width = mask.shape[1:]
    shift = 0 if generator is None else int(generator.randint(0, BOX_MAX_SHIFT + 1, 1)[0])
    # The challenge defines the shift for 256-pixel images and scales it per axis.
    shift_x, shift_y = int(shift * width / 256), int(shift * height / 256)
    return ChallengeBox(
        z_min=int(slices[0]), z_max=int(slices[-1]), z_mid=z_mid,
        x_min=max(0, int(cols.min()) - shift_x), y_min=max(0, int(rows.min()) - shift_y),
        x_max=min(width - 1, int(cols.max()) + shift_x), y_max=min(height - 1, int(rows.max()) + shift_y),
    )


def challenge_boxes(labels: np.ndarray, *, seed: Optional[int] = BOX_SEED) -> Dict[int, ChallengeBox]:
    """Boxes of every non-zero class of a label volume, in increasing class order, with one
    generator seeded ``seed`` (None: no jitter) as ``get_boxes.py`` gives to a case."""
    labels = np.asarray(labels)
    generator = None if seed is None else np.random.RandomState(seed)
    return {int(c): challenge_box(labels == c, generator) for c in np.unique(labels) if c != 0}


def largest_error_region(prediction: np.ndarray, truth: np.ndarray, *, connectivity: int = 26) -> np.ndarray:
    """Bool mask of the largest connected region of ``prediction != truth`` (both binary);
    on equal sizes the region met first in raster order. Empty when there is no error."""
    error = (np.asarray(prediction) != 0) != (np.asarray(truth) != 0)
    if not error.any():
        return error
    structure = ndimage.generate_binary_structure(3, CONNECTIVITY_RANKS[connectivity])
    regions, count = ndimage.label(error, structure=structure)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    sizes[0] = 0
    return regions == int(np.argmax(sizes))


def _block_max_2x(volume: np.ndarray) -> np.ndarray:
    """2x2x2 maximum pooling, padding odd sizes with zeros (outside)."""
    padded = np.pad(volume, [(0, s % 2) for s in volume.shape])
    z, y, x = (s // 2 for s in padded.shape)
    return padded.reshape(z, 2, y, 2, x, 2).max(axis=(1, 3, 5))


def region_depth(region: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) of each voxel of ``region`` to the nearest voxel outside it,
    with everything beyond the region's bounding box padded by 25 % (at least 1 voxel) counted
    as outside; zero outside the region."""
    region = np.asarray(region, dtype=bool)
    coords = np.argwhere(region)
    low, high = coords.min(axis=0), coords.max(axis=0) + 1
    size = high - low
    pad = np.maximum((size * 0.25).astype(int), 1)
    crop = np.zeros(size + 2 * pad, np.uint8)
    inner = tuple(slice(p, p + s) for p, s in zip(pad, size))
    crop[inner] = region[tuple(slice(a, b) for a, b in zip(low, high))]
    downsampled = crop.size > LARGE_ROI_VOXELS
    if downsampled:
        crop = _block_max_2x(crop)
    depth = ndimage.distance_transform_edt(crop)
    if downsampled:
        depth = depth.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    full = np.zeros(region.shape, depth.dtype)
    full[tuple(slice(a, b) for a, b in zip(low, high))] = depth[inner]
    return full * region


def innermost_voxel(region: np.ndarray, *, seed: int = CLICK_SEED) -> Tuple[int, int, int]:
    """The deepest voxel of ``region`` (:func:`region_depth`); among equally deep voxels one
    drawn uniformly (raster order) by a generator seeded ``seed``. Should every depth be zero
    (only possible after the 2x downsampling of huge regions) any voxel of the region counts."""
    depth = region_depth(region)
    candidates = depth if depth.sum() > 0 else np.asarray(region, dtype=bool)
    deepest = np.argwhere(candidates == candidates.max())
    chosen = deepest[np.random.RandomState(seed).choice(len(deepest))]
    return tuple(int(v) for v in chosen)


def simulate_click(prediction: np.ndarray, truth: np.ndarray, *, connectivity: int = 26,
                   seed: int = CLICK_SEED) -> Optional[SimulatedClick]:
    """The challenge user's next click for one class (binary 3-D masks, slice axis first), or
    None when the prediction is already perfect."""
    prediction = np.asarray(prediction) != 0
    truth = np.asarray(truth) != 0
    if prediction.shape != truth.shape or prediction.ndim != 3:
        raise ValueError(f"Prediction and truth must be 3-D masks of one shape: {prediction.shape} vs {truth.shape}.")
    region = largest_error_region(prediction, truth, connectivity=connectivity)
    if not region.any():
        return None
    zyx = innermost_voxel(region, seed=seed)
    return SimulatedClick(zyx, bool(truth[zyx]), int(region.sum()))


def simulate_clicks_per_class(prediction_labels: np.ndarray, truth_labels: np.ndarray,
                              classes: List[int], **options) -> Dict[int, Optional[SimulatedClick]]:
    """One click per class on label volumes (the challenge's step)."""
    return {c: simulate_click(prediction_labels == c, truth_labels == c, **options) for c in classes}
