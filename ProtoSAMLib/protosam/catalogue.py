"""The model catalogue: every model name, the label users see, its family, and the defaults.

This is the one place a model name or a model default is written: the engine
(:mod:`protosam.models.dinov2`, :mod:`protosam.models.sam`), the command
line, the weights registry and the Slicer module read it from here
(``Testing/engine/test_layout.py`` checks that). It imports nothing but the standard library,
so Slicer's settings code and ``protosam --help`` read it without torch. :class:`ModelSelection`
(which models a run uses) lives here for the same reason: Slicer's process builds it and sends
it to the worker without importing torch.

Families: ``"dinov2"`` (the feature encoder), ``"sam"`` (the refiner; MedSAM is a SAM ViT-B
fine-tuned on medical images, marked ``medsam``). Test-only models are tiny random-weight
architectures for tests and wiring checks (:mod:`protosam.testing`); no weights are published.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

__all__ = [
    "CatalogueModel", "MODELS", "FAMILIES", "models_of", "choices", "test_only_models",
    "DEFAULT_DINOV2", "DEFAULT_SAM", "DEFAULT_INPUT_SIZE", "PAPER_DINOV2", "PAPER_SAM",
    "TINY_DINOV2", "TINY_DINOV2_REG4", "TINY_SAM", "TINY_MEDSAM", "ModelSelection",
]

FAMILIES = ("dinov2", "sam")

# Official DINOv2 backbones (Meta's checkpoint file is "<name>_pretrain.pth") and their
# 4-register twins.
DINOV2_VITS14 = "dinov2_vits14"
DINOV2_VITB14 = "dinov2_vitb14"
DINOV2_VITL14 = "dinov2_vitl14"
DINOV2_VITG14 = "dinov2_vitg14"
REGISTERS_SUFFIX = "_reg4"
# Official SAM encoders (segment-anything's registry keys) and MedSAM.
SAM_VIT_B = "vit_b"
SAM_VIT_L = "vit_l"
SAM_VIT_H = "vit_h"
MEDSAM_VIT_B = "medsam_vit_b"
# Test-only architectures (no download; protosam.testing writes random checkpoints).
TINY_DINOV2 = "dinov2_tiny14"
TINY_DINOV2_REG4 = TINY_DINOV2 + REGISTERS_SUFFIX
TINY_SAM = "sam_tiny"
TINY_MEDSAM = "medsam_tiny"  # sam_tiny's size with MedSAM's conventions (box-only refiner)


@dataclass(frozen=True)
class CatalogueModel:
    """One model: ``name`` as typed on the command line and stored in settings, ``label`` as
    shown in Slicer's model lists (empty: not offered there), ``family`` "dinov2" or "sam"."""

    name: str
    family: str
    label: str = ""
    medsam: bool = False
    test_only: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, not {self.family!r}")


MODELS: Tuple[CatalogueModel, ...] = (
    CatalogueModel(DINOV2_VITS14, "dinov2", "DINOv2 ViT-S/14 (fastest)"),
    CatalogueModel(DINOV2_VITB14, "dinov2", "DINOv2 ViT-B/14 (default)"),
    CatalogueModel(DINOV2_VITL14, "dinov2", "DINOv2 ViT-L/14 (paper)"),
    CatalogueModel(DINOV2_VITG14, "dinov2", "DINOv2 ViT-g/14 (largest)"),
    CatalogueModel(DINOV2_VITS14 + REGISTERS_SUFFIX, "dinov2"),
    CatalogueModel(DINOV2_VITB14 + REGISTERS_SUFFIX, "dinov2"),
    CatalogueModel(DINOV2_VITL14 + REGISTERS_SUFFIX, "dinov2"),
    CatalogueModel(DINOV2_VITG14 + REGISTERS_SUFFIX, "dinov2"),
    CatalogueModel(SAM_VIT_B, "sam", "SAM ViT-B (default)"),
    CatalogueModel(SAM_VIT_L, "sam", "SAM ViT-L"),
    CatalogueModel(SAM_VIT_H, "sam", "SAM ViT-H (paper)"),
    CatalogueModel(MEDSAM_VIT_B, "sam", "MedSAM ViT-B", medsam=True),
    CatalogueModel(TINY_DINOV2, "dinov2", test_only=True),
    CatalogueModel(TINY_DINOV2_REG4, "dinov2", test_only=True),
    CatalogueModel(TINY_SAM, "sam", test_only=True),
    CatalogueModel(TINY_MEDSAM, "sam", medsam=True, test_only=True),
)

#: name -> model, read-only.
BY_NAME: Mapping[str, CatalogueModel] = MappingProxyType({model.name: model for model in MODELS})

#: The models a new user gets (command line, Python API, Slicer settings).
DEFAULT_DINOV2 = DINOV2_VITB14
DEFAULT_SAM = SAM_VIT_B
#: Side S of the square every slice is resized to for ALPNet/DINOv2 (the paper's value).
DEFAULT_INPUT_SIZE = 672
#: The published reference's models (``protosam evaluate`` defaults).
PAPER_DINOV2 = DINOV2_VITL14
PAPER_SAM = SAM_VIT_H


@dataclass(frozen=True)
class ModelSelection:
    """Which models to run. ``*_checkpoint`` None means the official file from the cache."""

    dinov2: str = DEFAULT_DINOV2
    dinov2_checkpoint: Optional[str] = None
    sam: str = DEFAULT_SAM
    sam_checkpoint: Optional[str] = None
    input_size: int = DEFAULT_INPUT_SIZE

    def __post_init__(self):
        if not isinstance(self.input_size, int) or self.input_size < 14:
            raise ValueError(f"input_size must be an integer >= 14, not {self.input_size!r}")


def models_of(family: str) -> Tuple[CatalogueModel, ...]:
    """The models of one family, in catalogue order (test-only ones last)."""
    return tuple(model for model in MODELS if model.family == family)


def choices(family: str) -> Tuple[Tuple[str, str], ...]:
    """(name, label) of the models offered to users in Slicer, smallest first."""
    return tuple((model.name, model.label) for model in models_of(family) if model.label)


def test_only_models() -> Mapping[str, str]:
    """name -> family of the test-only architectures (no published weights)."""
    return MappingProxyType({model.name: model.family for model in MODELS if model.test_only})
