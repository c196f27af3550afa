"""Tiny random-weight models in the official checkpoint formats, for tests, self-tests and CI.

They run the same loading and inference code as the published models, in a fraction of a
second per slice; their masks mean nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .models.dinov2 import save_random_checkpoint as save_random_dinov2_checkpoint
from .models.sam import save_random_sam_checkpoint
from .pipeline import ModelSelection

__all__ = ["TINY_DINOV2", "TINY_SAM", "write_tiny_checkpoints"]

TINY_DINOV2 = "dinov2_tiny14"
TINY_SAM = "sam_tiny"


def write_tiny_checkpoints(folder: Union[str, Path], *, input_size: int = 224, seed: int = 0) -> ModelSelection:
    """Write ``dinov2_tiny14.pth`` and ``sam_tiny.pth`` into ``folder`` (created if needed)
    unless present, and return a :class:`ModelSelection` that uses them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dinov2_path = folder / f"{TINY_DINOV2}.pth"
    sam_path = folder / f"{TINY_SAM}.pth"
    if not dinov2_path.exists():
        save_random_dinov2_checkpoint(TINY_DINOV2, dinov2_path, seed=seed)
    if not sam_path.exists():
        save_random_sam_checkpoint(TINY_SAM, sam_path, seed=seed)
    return ModelSelection(
        dinov2=TINY_DINOV2, dinov2_checkpoint=str(dinov2_path), sam=TINY_SAM, sam_checkpoint=str(sam_path),
        input_size=input_size,
    )
