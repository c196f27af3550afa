"""User settings of ProtoSAM (models, device, weights folder), shared by module and effect.

Stored in Slicer's application settings under "ProtoSAM/"; this module only needs an object
with ``value(key)`` and ``setValue(key, value)`` (``qt.QSettings()`` in Slicer), so it has no
Qt import of its own. The ProtoSAM server token ("ProtoSAM/ServerToken") is stored there too,
as plain text in Slicer's settings file (``qt.QSettings().fileName()``, readable by your user
account only on a normal installation): the module says so next to the token field.
"""

from __future__ import annotations

from typing import Optional

from protosam import catalogue
from protosam.precision import PRECISIONS

PREFIX = "ProtoSAM/"
#: setting name -> default value
DEFAULTS = {
    "DINOv2": catalogue.DEFAULT_DINOV2,
    "SAM": catalogue.DEFAULT_SAM,
    "SAMCheckpoint": "",
    "DINOv2Checkpoint": "",
    "Preset": "default",
    "Device": "auto",
    # The encoders' precision (protosam.precision.PRECISIONS): auto, fp32, bf16, fp16 (CUDA only).
    "Precision": "auto",
    # How volumes are walked (protosam.catalogue.PROPAGATION_MODES): per-slice, or memory (SAM 2 refiners).
    "Propagation": catalogue.DEFAULT_PROPAGATION,
    "Modality": "auto",
    "WeightsFolder": "",
    # "local" (this computer) or "server" (a ProtoSAM server: URL and token).
    "ComputeOn": "local",
    "ServerURL": "",
    "ServerToken": "",
    # "true": plain http:// to a computer other than this one is allowed (token and images unencrypted).
    "ServerAllowUnencrypted": "false",
    # The example bank's folder (ProtoSAMSlicerLib.bank; "" none) and what Propagate learns from:
    # "painted" slices, the "bank" alone, or "both".
    "ExampleBank": "",
    "Supports": "painted",
}
#: Encoder outputs kept between runs on the same volume (re-runs after a corrected support,
#: click corrections) hold this many slices of the chosen models: the engine's session default
#: (protosam.session.engine_session_cache_bytes). 0.72 GB with DINOv2 ViT-B/14 at 672 px and SAM
#: ViT-B (11.3 MB a slice); 1.5 GB with SAM 2.1, whose slices keep two more feature levels.
CACHED_SLICES = 64


def cacheBytes(selection) -> int:
    """The worker's encoder cache budget for a catalogue.ModelSelection: CACHED_SLICES slices of
    its DINOv2 features at its input size and of its refiner's image features (no torch here)."""
    return CACHED_SLICES * catalogue.encoder_cache_bytes_per_slice(selection.dinov2, selection.sam,
                                                                   selection.input_size)


def read(settings, name: str) -> str:
    if name not in DEFAULTS:
        raise ValueError(f"unknown ProtoSAM setting {name!r}")
    value = settings.value(PREFIX + name)
    return DEFAULTS[name] if value is None or str(value) == "" else str(value)


def write(settings, name: str, value) -> None:
    if name not in DEFAULTS:
        raise ValueError(f"unknown ProtoSAM setting {name!r}")
    settings.setValue(PREFIX + name, "" if value is None else str(value))


def processOptions(settings, *, autoExtent: Optional[bool] = None):
    """ProcessOptions from the settings (imports the engine: call after dependency setup)."""
    from . import models
    from .logic import ProcessOptions

    selection = models.modelSelection(read(settings, "DINOv2"), read(settings, "SAM"),
                                      dinov2Checkpoint=read(settings, "DINOv2Checkpoint"),
                                      samCheckpoint=read(settings, "SAMCheckpoint"))
    precision = read(settings, "Precision")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r} in ProtoSAM's settings: choose one of {', '.join(PRECISIONS)} "
                         "in the module's Advanced section.")
    propagation = read(settings, "Propagation")
    problem = catalogue.propagation_problem(propagation, selection.sam)
    if problem:
        raise ValueError(f"{problem} (ProtoSAM's settings: the module's Advanced section.)")
    return ProcessOptions(models=selection, preset=read(settings, "Preset"), device=read(settings, "Device"),
                          precision=precision, propagation=propagation,
                          modality=read(settings, "Modality"), weightsHome=read(settings, "WeightsFolder") or None,
                          autoExtent=autoExtent, cacheBytes=cacheBytes(selection),
                          computeOn=read(settings, "ComputeOn"), serverUrl=read(settings, "ServerURL"),
                          serverToken=read(settings, "ServerToken"),
                          serverAllowUnencrypted=read(settings, "ServerAllowUnencrypted") == "true")
