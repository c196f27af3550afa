"""Intensity preprocessing per modality, as in the ProtoSAM data protocol (per volume).

CT: clip to the abdominal window [-125, 275] HU, then z-score. MRI: clip the top 0.5 % of
intensities, then z-score. ``none``: leave the values as they are (already preprocessed).
"""
from __future__ import annotations

import logging

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["MODALITIES", "guess_modality", "normalize_volume"]

MODALITIES = ("auto", "ct", "mri", "none")
CT_WINDOW_HU = (-125.0, 275.0)
MRI_UPPER_PERCENTILE = 99.5


def guess_modality(volume: np.ndarray) -> str:
    """'ct' when the values look like Hounsfield units (air near -1000), else 'mri'."""
    low = float(np.percentile(volume, 1))
    return "ct" if low < -500.0 else "mri"


def normalize_volume(volume: np.ndarray, modality: str = "auto") -> np.ndarray:
    """Return ``volume`` (any shape) as float32 normalised for ``modality``.

    ``none`` returns the float32 view of the input itself (no copy); the others return a new
    array and never modify the input. One working copy at most: volumes of 1000+ slices
    should not need several times their size in memory.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    volume = np.asarray(volume, dtype=np.float32)
    if modality == "none":
        return volume
    if modality == "auto":
        modality = guess_modality(volume)
        logger.info("Intensity preprocessing: guessed modality %s", modality.upper())
    if modality == "ct":
        clipped = np.clip(volume, *CT_WINDOW_HU)
    else:
        clipped = np.minimum(volume, np.float32(np.percentile(volume, MRI_UPPER_PERCENTILE)))
    # Statistics in float64: float32 sums overflow or lose precision on extreme intensities.
    mean = float(clipped.mean(dtype=np.float64))
    std = float(clipped.std(dtype=np.float64))
    if std == 0.0:
        raise InputError(
            "The image has the same intensity everywhere (after windowing): there is nothing to "
            "segment. Check that the right volume was chosen, or use modality 'none'."
        )
    clipped -= np.float32(mean)
    clipped /= np.float32(std)
    return clipped
