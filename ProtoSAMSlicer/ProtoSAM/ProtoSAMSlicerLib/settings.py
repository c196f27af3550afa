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
}
#: Encoder outputs kept between runs on the same volume (re-runs after a corrected support,
#: click corrections): holds a 64-slice volume with DINOv2 ViT-B/14 at 672 px and SAM ViT-B
#: (11.3 MB a slice, 0.72 GB), the engine's protosam.session.DEFAULT_SESSION_CACHE_BYTES.
DEFAULT_CACHE_BYTES = 768 * 1024 * 1024


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
                          autoExtent=autoExtent, cacheBytes=DEFAULT_CACHE_BYTES,
                          computeOn=read(settings, "ComputeOn"), serverUrl=read(settings, "ServerURL"),
                          serverToken=read(settings, "ServerToken"),
                          serverAllowUnencrypted=read(settings, "ServerAllowUnencrypted") == "true")
