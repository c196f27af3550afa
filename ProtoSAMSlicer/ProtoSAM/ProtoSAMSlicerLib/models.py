"""Model choices, weights status and downloads, and a per-device engine cache (no Qt, no MRML).

Nothing here imports torch (Slicer's process never does): the model names come from the
engine's torch-free catalogue, the weights status from ``protosam.weights`` (files and the
registry), and :class:`ModelSelection` is the catalogue's (torch-free, the engine's own). Only :class:`EngineCache` (the deprecated in-process path) loads the engine, lazily.

The Slicer module offers the official models by name; a custom checkpoint path (offline sites,
fine-tuned MedSAM) replaces the cached official file. Weights live in the ProtoSAM cache
(``protosam.weights``: ``$PROTOSAM_HOME`` or ``~/.protosam``, or the folder set in the module's
settings), never inside the extension folder, so they survive extension updates.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from protosam import catalogue
from protosam.catalogue import ModelSelection
from protosam import weights as protosamWeights

logger = logging.getLogger(__name__)

#: (name, label) of the DINOv2 encoders offered in the GUI, smallest first.
DINOV2_CHOICES: Tuple[Tuple[str, str], ...] = catalogue.choices("dinov2")
#: (name, label) of the SAM refiners offered in the GUI.
SAM_CHOICES: Tuple[Tuple[str, str], ...] = catalogue.choices("sam")
DEFAULT_DINOV2 = catalogue.DEFAULT_DINOV2
DEFAULT_SAM = catalogue.DEFAULT_SAM
#: Side of the square the engine resizes slices to (the paper's value).
DEFAULT_INPUT_SIZE = catalogue.DEFAULT_INPUT_SIZE


def _architectures(family: str) -> frozenset:
    return frozenset(model.name for model in catalogue.models_of(family))


def modelSelection(dinov2: str = DEFAULT_DINOV2, sam: str = DEFAULT_SAM, *, dinov2Checkpoint: str = "",
                   samCheckpoint: str = "", inputSize: int = DEFAULT_INPUT_SIZE) -> ModelSelection:
    """Validated ModelSelection from GUI values; empty checkpoint strings mean "official file"."""
    if dinov2 not in _architectures("dinov2"):
        raise ValueError(f"Unknown DINOv2 model {dinov2!r}; choose one of {', '.join(n for n, _ in DINOV2_CHOICES)}")
    if sam not in _architectures("sam") | _architectures("sam2"):
        raise ValueError(f"Unknown SAM model {sam!r}; choose one of {', '.join(n for n, _ in SAM_CHOICES)}")
    return ModelSelection(dinov2=dinov2, dinov2_checkpoint=dinov2Checkpoint.strip() or None,
                          sam=sam, sam_checkpoint=samCheckpoint.strip() or None, input_size=int(inputSize))


@dataclasses.dataclass(frozen=True)
class WeightsStatus:
    """Where the weights of one model come from and whether they are ready.

    status: "custom" (explicit checkpoint path), "verified", "present" (right size, hash not
    checked yet), "partial" (resumable download), "wrong size", "missing", "local only" (no
    published checksum: the user gives the file as a custom checkpoint), or
    "custom missing" (the explicit path does not exist).
    """

    model: str
    family: str
    status: str
    path: Path
    url: str = ""
    sizeBytes: Optional[int] = None

    @property
    def ready(self) -> bool:
        return self.status in ("custom", "verified", "present")


def weightsStatus(models, home: Optional[str] = None,
                  registry: Optional[Mapping[str, "protosamWeights.WeightsEntry"]] = None) -> List[WeightsStatus]:
    """Status of the DINOv2 and SAM weights ``models`` needs (cheap: no hashing).

    registry: the downloadable checkpoints (default: the official protosam registry).
    """
    registry = protosamWeights.REGISTRY if registry is None else registry
    statuses = []
    for family, name, checkpoint in (("dinov2", models.dinov2, models.dinov2_checkpoint),
                                     ("sam", models.sam, models.sam_checkpoint)):
        if checkpoint:
            path = Path(checkpoint).expanduser()
            statuses.append(WeightsStatus(name, family, "custom" if path.is_file() else "custom missing", path))
            continue
        if name not in registry:
            statuses.append(WeightsStatus(name, family, "custom missing", Path("")))
            continue
        entry = registry[name]
        statuses.append(WeightsStatus(name, family, protosamWeights.cache_status(entry, home),
                                      protosamWeights.cache_path(entry, home), entry.url, entry.size))
    return statuses


def offlineInstructions(statuses: Sequence[WeightsStatus]) -> str:
    """Plain-text steps to install missing weights by hand (firewalled or offline sites)."""
    lines = []
    for status in statuses:
        if status.ready:
            continue
        if status.status == "custom missing":
            lines.append(f"- {status.model}: the checkpoint file {status.path} does not exist; choose an existing "
                         "file or clear the custom path to use the official weights.")
        elif status.status == "local only":  # no published checksum: never downloaded (docs/weights.md)
            lines.append(f"- {status.model}: ProtoSAM cannot verify a download of this file (no published "
                         f"checksum): download {status.url} yourself and choose it as the SAM checkpoint file.")
        else:
            lines.append(f"- {status.model}: download {status.url} on a computer with internet access and copy "
                         f"it to {status.path}")
    if not lines:
        return "All model weights are installed."
    return "Missing model weights:\n" + "\n".join(lines)


def downloadWeightsFunction(models, home: Optional[str] = None, *,
                            registry: Optional[Mapping[str, "protosamWeights.WeightsEntry"]] = None,
                            baseUrl: Optional[str] = None):
    """Worker job that downloads the missing official weights of ``models`` (a RequestFunction:
    the worker process runs it, so a download never crawls on a starved thread in Slicer).

    Progress is reported in bytes over all files; cancel leaves resumable ``.part`` files.
    baseUrl: an institutional mirror holding the same files (still checked against the
    published size and SHA-256). The job's result is the list of checkpoint paths. It fails
    with WeightsUnavailableError and offline instructions when the network fails.
    """
    from protosam.serving import protocol

    from .worker_client import RequestFunction

    for status in weightsStatus(models, home, registry):
        if status.status == "custom missing":
            raise FileNotFoundError(offlineInstructions([status]))
    entries = None if registry is None else [dataclasses.asdict(entry) for entry in registry.values()]
    request = protocol.JobSubmit(id=protocol.new_id(), operation="download_weights", kwargs={
        "models": dataclasses.asdict(models), "weights_home": None if home is None else str(home),
        "base_url": baseUrl, "registry": entries})
    return RequestFunction(request, decodeResult=lambda paths: [Path(path) for path in paths])


class EngineCache:
    """The last Engine built, reused while models, preset and device stay the same.

    Build and use it only on one thread (PyTorch/cuDNN cache kernels and plans per thread).
    One engine at a time: big models do not fit twice in GPU memory.
    """

    def __init__(self):
        self._key = None
        self._engine = None
        self._lock = threading.Lock()

    def get(self, models, preset: str, device: str, *, weightsHome: Optional[str] = None,
            download: bool = False, cacheBytes: int = 0):
        import protosam  # the engine, with torch: only this deprecated in-process path loads it

        models = protosam.ModelSelection(**dataclasses.asdict(models))
        key = (models, preset, device, weightsHome, cacheBytes)
        with self._lock:
            if self._engine is None or self._key != key:
                self._engine = None  # release the previous models before loading new ones
                logger.info("Loading ProtoSAM models %s + %s on %s", models.dinov2, models.sam, device)
                self._engine = protosam.Engine(models, preset=preset, device=device, download=download,
                                      weights_home=weightsHome, cache_bytes=cacheBytes)
                self._key = key
            return self._engine

    def clear(self) -> None:
        with self._lock:
            self._engine = None
            self._key = None


_engineCaches: Dict[str, EngineCache] = {}
_engineCachesLock = threading.Lock()


def engineCacheForDevice(device: str) -> EngineCache:
    """The session-wide engine cache of a device (pairs with worker_client.workerForDevice)."""
    with _engineCachesLock:
        return _engineCaches.setdefault(device, EngineCache())
