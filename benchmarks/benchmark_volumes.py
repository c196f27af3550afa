"""Benchmark volumes: Colin27 T1 MRI with AAL structures (Debian mricron-data) or synthetic.

Both give a volume ``[N, H, W]`` float32 (raw intensities, slice axis first) and structure
masks ``[N, H, W]`` uint8 of the same shape; ``N`` = requested slices, ``H = W`` = requested
size. Slices run along the image's first array axis (SimpleITK's z: axial for Colin27).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = ["BenchmarkVolume", "COLIN27_DIR", "AAL_STRUCTURES", "colin27_volume", "synthetic_volume", "load_volume"]

COLIN27_DIR = Path("/usr/share/mricron/templates")
# AAL structures with different axial extents (superior cortex, deep grey matter, temporal
# lobe), then more in case more segments are asked for.
AAL_STRUCTURES = (
    "Precentral_L", "Thalamus_L", "Putamen_R", "Hippocampus_R",
    "Caudate_L", "Insula_R", "Temporal_Sup_L", "Frontal_Sup_R",
)


@dataclass
class BenchmarkVolume:
    """``volume``: ``[N, H, W]`` float32 raw intensities; ``masks``: name -> ``[N, H, W]`` uint8."""

    volume: np.ndarray
    masks: Dict[str, np.ndarray]
    source: str
    notes: List[str] = field(default_factory=list)


def _resample(array: np.ndarray, shape, order: int) -> np.ndarray:
    factors = [t / s for t, s in zip(shape, array.shape)]
    out = ndimage.zoom(array, factors, order=order, grid_mode=True, mode="grid-constant" if order == 0 else "nearest")
    # zoom can be one voxel off by rounding; pad or crop to the exact shape.
    fixed = np.zeros(shape, out.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, shape))
    fixed[region] = out[region]
    return fixed


def _square(array: np.ndarray) -> np.ndarray:
    """Zero-pad the last two axes, centred, to a square."""
    height, width = array.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    pad = [(0, 0)] * (array.ndim - 2) + [(top, side - height - top), (left, side - width - left)]
    return np.pad(array, pad)


def colin27_volume(slices: int, size: int, segments: int, folder: Path = COLIN27_DIR) -> BenchmarkVolume:
    """Colin27 T1 cropped to the chosen AAL structures' axial extent (plus a margin of empty
    slices) and the head's in-plane box (squared), resampled to ``[slices, size, size]``
    (linear for the image, nearest for the labels)."""
    import SimpleITK as sitk

    if not 1 <= segments <= len(AAL_STRUCTURES):
        raise ValueError(f"segments must be 1..{len(AAL_STRUCTURES)} for Colin27/AAL")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ch2.nii.gz"))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "aal.nii.gz")))
    names = {}
    for line in (folder / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names[parts[1]] = int(parts[0])
    chosen = AAL_STRUCTURES[:segments]
    present = np.isin(labels, [names[n] for n in chosen])
    z = np.nonzero(present.any(axis=(1, 2)))[0]
    margin = max(3, (z[-1] - z[0]) // 8)
    z0, z1 = max(0, z[0] - margin), min(image.shape[0], z[-1] + margin + 1)
    head = image > np.percentile(image, 60)
    ys = np.nonzero(head.any(axis=(0, 2)))[0]
    xs = np.nonzero(head.any(axis=(0, 1)))[0]
    box = (slice(z0, z1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    image, labels = _square(image[box]), _square(labels[box])
    shape = (slices, size, size)
    volume = _resample(image, shape, order=1).astype(np.float32)
    masks = {}
    for name in chosen:
        mask = _resample((labels == names[name]).astype(np.uint8), shape, order=0)
        if not mask.any():
            raise ValueError(f"AAL structure {name} vanished at {shape}; use more slices or a larger size")
        masks[name] = mask
    note = (
        f"Colin27 ch2 z {z0}..{z1 - 1}, y {ys[0]}..{ys[-1]}, x {xs[0]}..{xs[-1]} (padded square) "
        f"resampled to {shape}"
    )
    return BenchmarkVolume(volume, masks, "colin27", [note])


def synthetic_volume(slices: int, size: int, segments: int, seed: int = 0) -> BenchmarkVolume:
    """Noisy volume with ``segments`` bright ellipsoids of different intensities, each spanning
    about half of the slices, at different positions."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(
        np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij"
    )
    volume = rng.normal(0.0, 0.3, (slices, size, size)).astype(np.float32)
    masks = {}
    for k in range(segments):
        angle = 2 * np.pi * k / max(segments, 1)
        cz, cy, cx = 0.4 * np.sin(angle + 1.0), 0.45 * np.cos(angle), 0.45 * np.sin(angle)
        inside = ((zz - cz) / 0.5) ** 2 + ((yy - cy) / 0.25) ** 2 + ((xx - cx) / 0.2) ** 2 <= 1.0
        volume[inside] += 1.0 + k
        masks[f"blob{k + 1}"] = inside.astype(np.uint8)
    return BenchmarkVolume(volume, masks, "synthetic", [f"seed {seed}"])


def load_volume(kind: str, slices: int, size: int, segments: int) -> BenchmarkVolume:
    """``kind``: "colin27", "synthetic" or "auto" (Colin27 when its files exist)."""
    if slices < 2 or size < 14 or segments < 1:
        raise ValueError("need at least 2 slices, size >= 14 and 1 segment")
    have_colin = all((COLIN27_DIR / f).is_file() for f in ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt"))
    if kind == "colin27" or (kind == "auto" and have_colin and segments <= len(AAL_STRUCTURES)):
        if not have_colin:
            raise FileNotFoundError(f"Colin27/AAL not found in {COLIN27_DIR}: apt-get install mricron-data")
        return colin27_volume(slices, size, segments)
    if kind not in ("auto", "synthetic"):
        raise ValueError(f"unknown volume kind {kind!r}")
    return synthetic_volume(slices, size, segments)
