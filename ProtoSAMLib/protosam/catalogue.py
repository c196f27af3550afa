"""The model catalogue: every model name, the label users see, its family, and the defaults.

This is the one place a model name or a model default is written: the engine
(:mod:`protosam.models.dinov2`, :mod:`protosam.models.sam`), the command
line, the weights registry and the Slicer module read it from here
(``Testing/engine/test_layout.py`` checks that). It imports nothing but the standard library,
so Slicer's settings code and ``protosam --help`` read it without torch. :class:`ModelSelection`
(which models a run uses) lives here for the same reason: Slicer's process builds it and sends
it to the worker without importing torch.

Families: ``"dinov2"`` (the feature encoder), ``"sam"`` (a refiner; MedSAM is a SAM ViT-B
fine-tuned on medical images, marked ``medsam``) and ``"sam2"`` (a refiner: SAM 2.1 and MedSAM2,
a SAM 2.1 Hiera-tiny fine-tuned on 3-D medical images at 512 px, run by the official ``sam2``
package, :mod:`protosam.models.sam2_refiner`). Both refiner families are chosen with ``--sam``
(:attr:`ModelSelection.sam`). Each refiner says which prompts it accepts, how its input image is
prepared and how many bytes one slice's image features take in the encoder cache
(:data:`REFINER_FAMILIES`, :func:`refiner_cache_bytes_per_slice`). Test-only models are tiny
random-weight architectures for tests and wiring checks (:mod:`protosam.testing`); no weights are
published.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

__all__ = [
    "CatalogueModel", "MODELS", "FAMILIES", "models_of", "choices", "test_only_models",
    "DEFAULT_DINOV2", "DEFAULT_SAM", "DEFAULT_INPUT_SIZE", "PAPER_DINOV2", "PAPER_SAM",
    "TINY_DINOV2", "TINY_DINOV2_REG4", "TINY_SAM", "TINY_MEDSAM", "TINY_SAM2", "ModelSelection", "REFINER_FAMILIES",
    "PROMPT_KINDS", "refiner_cache_bytes_per_slice", "refiner_family", "MIN_FEATURE_GRID",
    "encoder_cache_bytes_per_slice", "PROPAGATION_MODES", "DEFAULT_PROPAGATION", "propagation_problem",
]

FAMILIES = ("dinov2", "sam", "sam2")
#: The families whose models refine coarse masks (chosen with ``--sam``).
REFINER_FAMILIES = ("sam", "sam2")
#: Prompt kinds a refiner can accept: a box, positive/negative points, a low-resolution mask.
PROMPT_KINDS = ("box", "points", "mask")

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
# SAM 2.1 image encoders (Meta's checkpoint file is "<name>.pt") and MedSAM2 (bowang-lab).
SAM2_1_HIERA_TINY = "sam2.1_hiera_tiny"
SAM2_1_HIERA_SMALL = "sam2.1_hiera_small"
SAM2_1_HIERA_BASE_PLUS = "sam2.1_hiera_base_plus"
SAM2_1_HIERA_LARGE = "sam2.1_hiera_large"
MEDSAM2 = "medsam2"
TINY_SAM2 = "sam2_tiny"

# Input preparation, as each refiner's own code does it (the engine's slices are already
# intensity-normalised; the 1024 x 1024 frame below is the engine's refiner frame).
_SAM_INPUT = ("per-image min-max to [0, 255], truncated to uint8 (SamPredictor receives an 8-bit picture), "
              "then SAM's pixel mean/std on the 0-255 scale, at 1024 px")
_MEDSAM_INPUT = "per-image min-max to [0, 1] (MedSAM's own inference script), at 1024 px"
_SAM2_INPUT = ("per-image min-max to [0, 255], truncated to uint8, then sam2's SAM2Transforms: /255 to [0, 1], "
               "resize to the model's image size ({size} px) and ImageNet mean/std (0.485, 0.456, 0.406)/"
               "(0.229, 0.224, 0.225)")
_MEDSAM2_INPUT = (_SAM2_INPUT.format(size=512) + "; MedSAM2's medsam2_infer_3D_CT.py does the same (windowed CT "
                  "min-max to 0-255 uint8, resized to 512, /255, ImageNet mean/std)")


def _sam_cache_bytes(embedding_channels: int = 256) -> int:
    """SAM keeps one image embedding ``[C, 64, 64]`` float32 per slice (4 MiB for C = 256)."""
    return 4 * embedding_channels * 64 * 64


def _sam2_cache_bytes(image_size: int, embedding_channels: int = 256) -> int:
    """SAM 2 keeps the image embedding ``[C, s/16, s/16]`` plus the mask decoder's two
    high-resolution feature levels ``[C/8, s/4, s/4]`` and ``[C/4, s/8, s/8]``, float32
    (``s`` = image size, ``C`` = 256: 16 MiB a slice at 1024 px, 4x SAM's; 4 MiB at 512 px)."""
    levels = [(embedding_channels, image_size // 16), (embedding_channels // 8, image_size // 4),
              (embedding_channels // 4, image_size // 8)]
    return 4 * sum(channels * side * side for channels, side in levels)


@dataclass(frozen=True)
class CatalogueModel:
    """One model: ``name`` as typed on the command line and stored in settings, ``label`` as
    shown in Slicer's model lists (empty: not offered there), ``family`` one of :data:`FAMILIES`.

    Refiners (family in :data:`REFINER_FAMILIES`) also say which ``prompts`` they accept (kinds
    of :data:`PROMPT_KINDS`; a box-only refiner gets no clicks), how their ``input`` image is
    prepared, and ``cache_bytes`` that one slice's image features take in the encoder cache.
    DINOv2 encoders give ``feature_channels``, the channel count C of their features (their
    architectures' ``embed_dim``, written here so the cache budget is known without torch)."""

    name: str
    family: str
    label: str = ""
    medsam: bool = False
    test_only: bool = False
    prompts: Tuple[str, ...] = ()
    input: str = ""
    cache_bytes: int = 0
    feature_channels: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, not {self.family!r}")
        refiner = self.family in REFINER_FAMILIES
        if refiner != bool(self.prompts) or refiner != (self.cache_bytes > 0) or refiner != bool(self.input):
            raise ValueError(f"{self.name}: refiners (and only they) give prompts, input and cache_bytes")
        if (self.family == "dinov2") != (self.feature_channels > 0):
            raise ValueError(f"{self.name}: DINOv2 encoders (and only they) give feature_channels")
        if not set(self.prompts) <= set(PROMPT_KINDS):
            raise ValueError(f"{self.name}: prompts must be among {PROMPT_KINDS}, not {self.prompts!r}")

    @property
    def box_only(self) -> bool:
        """Only a box (no points): clicks and scribbles are refused, negatives are not added."""
        return "points" not in self.prompts


_SAM = dict(prompts=PROMPT_KINDS, input=_SAM_INPUT, cache_bytes=_sam_cache_bytes())
_SAM2 = dict(prompts=PROMPT_KINDS, input=_SAM2_INPUT.format(size=1024), cache_bytes=_sam2_cache_bytes(1024))

MODELS: Tuple[CatalogueModel, ...] = (
    CatalogueModel(DINOV2_VITS14, "dinov2", "DINOv2 ViT-S/14 (fastest)", feature_channels=384),
    CatalogueModel(DINOV2_VITB14, "dinov2", "DINOv2 ViT-B/14 (default)", feature_channels=768),
    CatalogueModel(DINOV2_VITL14, "dinov2", "DINOv2 ViT-L/14 (paper)", feature_channels=1024),
    CatalogueModel(DINOV2_VITG14, "dinov2", "DINOv2 ViT-g/14 (largest)", feature_channels=1536),
    CatalogueModel(DINOV2_VITS14 + REGISTERS_SUFFIX, "dinov2", feature_channels=384),
    CatalogueModel(DINOV2_VITB14 + REGISTERS_SUFFIX, "dinov2", feature_channels=768),
    CatalogueModel(DINOV2_VITL14 + REGISTERS_SUFFIX, "dinov2", feature_channels=1024),
    CatalogueModel(DINOV2_VITG14 + REGISTERS_SUFFIX, "dinov2", feature_channels=1536),
    CatalogueModel(SAM_VIT_B, "sam", "SAM ViT-B (default)", **_SAM),
    CatalogueModel(SAM_VIT_L, "sam", "SAM ViT-L", **_SAM),
    CatalogueModel(SAM_VIT_H, "sam", "SAM ViT-H (paper)", **_SAM),
    # MedSAM was trained with boxes only; its inference takes one mask per box.
    CatalogueModel(MEDSAM_VIT_B, "sam", "MedSAM ViT-B", medsam=True, prompts=("box",), input=_MEDSAM_INPUT,
                   cache_bytes=_sam_cache_bytes()),
    CatalogueModel(SAM2_1_HIERA_TINY, "sam2", "SAM 2.1 Hiera-T (smallest)", **_SAM2),
    CatalogueModel(SAM2_1_HIERA_SMALL, "sam2", "SAM 2.1 Hiera-S", **_SAM2),
    CatalogueModel(SAM2_1_HIERA_BASE_PLUS, "sam2", "SAM 2.1 Hiera-B+", **_SAM2),
    CatalogueModel(SAM2_1_HIERA_LARGE, "sam2", "SAM 2.1 Hiera-L", **_SAM2),
    # MedSAM2 (SAM 2.1 Hiera-T at 512 px) was fine-tuned with boxes (its 3-D inference prompts
    # a box on the key slice and propagates masks); points are not part of its training.
    CatalogueModel(MEDSAM2, "sam2", "MedSAM2 (SAM 2.1 Hiera-T, 512 px)", medsam=True, prompts=("box", "mask"),
                   input=_MEDSAM2_INPUT, cache_bytes=_sam2_cache_bytes(512)),
    CatalogueModel(TINY_DINOV2, "dinov2", test_only=True, feature_channels=48),
    CatalogueModel(TINY_DINOV2_REG4, "dinov2", test_only=True, feature_channels=48),
    CatalogueModel(TINY_SAM, "sam", test_only=True, prompts=PROMPT_KINDS, input=_SAM_INPUT,
                   cache_bytes=_sam_cache_bytes(32)),
    # sam_tiny's size with MedSAM's conventions: the box-only refiner of the effect's refusal tests.
    CatalogueModel(TINY_MEDSAM, "sam", medsam=True, test_only=True, prompts=("box",), input=_MEDSAM_INPUT,
                   cache_bytes=_sam_cache_bytes(32)),
    # A tiny SAM 2 built from the sam2 package's own classes (protosam.models.sam2_refiner), at
    # 256 px: embedding [32, 16, 16], high-resolution levels [4, 64, 64] and [8, 32, 32].
    CatalogueModel(TINY_SAM2, "sam2", test_only=True, prompts=PROMPT_KINDS, input=_SAM2_INPUT.format(size=256),
                   cache_bytes=_sam2_cache_bytes(256, 32)),
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
    """(name, label) of the models offered to users in Slicer, smallest first. ``"sam"`` lists
    every refiner (both refiner families: SAM first, then SAM 2)."""
    families = REFINER_FAMILIES if family in REFINER_FAMILIES else (family,)
    return tuple((model.name, model.label) for f in families for model in models_of(f) if model.label)


def refiner_family(name: str) -> str:
    """``"sam"`` or ``"sam2"`` for a refiner name; ValueError (listing the refiners) otherwise."""
    model = BY_NAME.get(name)
    if model is None or model.family not in REFINER_FAMILIES:
        known = ", ".join(m.name for m in MODELS if m.family in REFINER_FAMILIES)
        raise ValueError(f"Unknown refiner {name!r}; choose one of {known}")
    return model.family


def refiner_cache_bytes_per_slice(name: str) -> int:
    """Bytes of one slice's refiner image features in the encoder cache (float32)."""
    refiner_family(name)
    return BY_NAME[name].cache_bytes


#: Smallest side of the DINOv2 feature grid: coarser grids (input below 448 px) are upsampled to
#: it before the prototypes are computed (protosam.engine).
MIN_FEATURE_GRID = 32


def encoder_cache_bytes_per_slice(dinov2: str, refiner: str, input_size: int = DEFAULT_INPUT_SIZE) -> int:
    """Bytes one slice takes in the encoder cache: the DINOv2 features ``[C, g, g]`` float32 at
    ``input_size`` (``g = max(input_size // 14, MIN_FEATURE_GRID)``) plus the refiner's image
    features (:func:`refiner_cache_bytes_per_slice`). 11.3 MB for DINOv2 ViT-B/14 at 672 px with
    SAM ViT-B; 23.9 MB with SAM 2.1 at 1024 px."""
    model = BY_NAME.get(dinov2)
    if model is None or model.family != "dinov2":
        raise ValueError(f"{dinov2!r} is not a DINOv2 encoder; choose one of {', '.join(m.name for m in models_of('dinov2'))}")
    grid = max(int(input_size) // 14, MIN_FEATURE_GRID)
    return 4 * model.feature_channels * grid * grid + refiner_cache_bytes_per_slice(refiner)


#: How a volume is walked (``--propagation``): "per-slice" (every slice refined on its own from
#: its prototype prompts, any refiner) or "memory" (SAM 2's video predictor carries the mask
#: from slice to slice, :mod:`protosam.models.sam2_video`; SAM 2 refiners only).
PROPAGATION_MODES = ("per-slice", "memory")
DEFAULT_PROPAGATION = "per-slice"


def propagation_problem(mode: str, refiner: str) -> Optional[str]:
    """Why ``mode`` cannot run with the refiner ``refiner`` (a sentence saying what to do), or None."""
    if mode not in PROPAGATION_MODES:
        return f"Unknown propagation {mode!r}: choose one of {', '.join(PROPAGATION_MODES)}."
    if mode == "memory" and refiner_family(refiner) != "sam2":
        sam2 = ", ".join(m.name for m in models_of("sam2") if not m.test_only)
        return (f"Propagation 'memory' needs a SAM 2 refiner (its video predictor carries the mask from slice "
                f"to slice); {refiner!r} is not one. Choose a SAM 2 refiner ({sam2}) or propagation 'per-slice'.")
    return None


def test_only_models() -> Mapping[str, str]:
    """name -> family of the test-only architectures (no published weights)."""
    return MappingProxyType({model.name: model.family for model in MODELS if model.test_only})
