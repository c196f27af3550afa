"""One entry point for every refiner family: check a refiner name, load a refiner.

``"sam"`` (SAM, MedSAM: :class:`protosam.models.sam.SamRefiner`) and ``"sam2"`` (SAM 2.1,
MedSAM2: :class:`protosam.models.sam2_refiner.Sam2Refiner`, imported only when chosen, as it
needs the optional ``sam2`` package). Both have the same interface (``prepare_images``,
``embed``, ``decode``, ``medsam`` for box-only), so the engine, sessions and propagation use
either unchanged.
"""
from __future__ import annotations

from .. import catalogue

__all__ = ["check_refiner_name", "load_refiner"]


def check_refiner_name(name: str) -> str:
    """The refiner's family; ValueError naming the choices for an unknown name."""
    return catalogue.refiner_family(name)


def load_refiner(name: str, checkpoint_path, device: str = "cpu"):
    """The loaded refiner of the named model on ``device``."""
    if check_refiner_name(name) == "sam2":
        from .sam2_refiner import load_sam2_refiner

        return load_sam2_refiner(name, checkpoint_path, device=device)
    from .sam import SAM_ARCHITECTURES, SamRefiner, load_sam

    return SamRefiner(load_sam(name, checkpoint_path, device=device), medsam=SAM_ARCHITECTURES[name].medsam)
