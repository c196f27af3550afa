"""ProtoSAM: one-shot medical image segmentation (DINOv2 + ALPNet prototypes -> SAM).

Public API::

    from protosam import Engine, ModelSelection, segment_volume
    engine = Engine(ModelSelection(dinov2="dinov2_vitb14", sam="vit_b"), preset="default")
    result = engine.segment_slices(support_image, support_mask, queries)   # 2-D slices
    volume = segment_volume(engine, query, support, {"liver": mask})       # whole volumes
"""
from .errors import (
    CancelledError,
    CheckpointError,
    InputError,
    IntegrityError,
    ProtoSAMError,
    WeightsUnavailableError,
)
from .pipeline import Engine, ModelSelection, SliceResults, resolve_device
from .presets import PRESETS, Preset, get_preset
from .propagation import VolumeResult, largest_area_slice, segment_volume

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "ModelSelection",
    "SliceResults",
    "VolumeResult",
    "segment_volume",
    "largest_area_slice",
    "resolve_device",
    "Preset",
    "PRESETS",
    "get_preset",
    "ProtoSAMError",
    "InputError",
    "CheckpointError",
    "IntegrityError",
    "WeightsUnavailableError",
    "CancelledError",
    "__version__",
]
