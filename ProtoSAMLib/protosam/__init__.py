"""ProtoSAM: one-shot medical image segmentation (DINOv2 + ALPNet prototypes -> SAM).

Public API::

    from protosam import Engine, ModelSelection, segment_volume
    engine = Engine(ModelSelection(dinov2="dinov2_vitb14", sam="vit_b"), preset="default")
    result = engine.segment_slices(support_image, support_mask, queries)   # 2-D slices
    volume = segment_volume(engine, query, support, {"liver": mask})       # whole volumes
"""
import importlib
from typing import TYPE_CHECKING

from .errors import (
    CancelledError,
    CheckpointError,
    InputError,
    IntegrityError,
    ProtoSAMError,
    WeightsUnavailableError,
)

# The model classes pull in torch and segment-anything (seconds to import): load them on
# first use so that `protosam --help` and `protosam weights ...` start instantly.
_LAZY = {
    "Engine": "engine",
    "ModelSelection": "catalogue",
    "SliceResults": "engine",
    "resolve_device": "engine",
    "Preset": "presets",
    "PRESETS": "presets",
    "get_preset": "presets",
    "VolumeResult": "propagation",
    "largest_area_slice": "propagation",
    "segment_volume": "propagation",
    "Session": "session",
}

if TYPE_CHECKING:  # pragma: no cover
    from .catalogue import ModelSelection
    from .engine import Engine, SliceResults, resolve_device
    from .presets import PRESETS, Preset, get_preset
    from .propagation import VolumeResult, largest_area_slice, segment_volume
    from .session import Session


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'protosam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Engine",
    "ModelSelection",
    "SliceResults",
    "VolumeResult",
    "segment_volume",
    "largest_area_slice",
    "Session",
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
