"""Abdominal datasets laid out as one NIfTI image + one NIfTI label volume per scan.

Supported folder layouts (``layout="auto"`` picks the first that matches):

* ``alpnet``: ``image_<id>.nii.gz`` and ``label_<id>.nii.gz`` side by side (the preprocessed
  Synapse/SABS and CHAOS-T2 sets of SSL-ALPNet and ProtoSAM).
* ``nnunet``: ``imagesTr/<case>_0000.nii.gz`` (or ``<case>.nii.gz``) and ``labelsTr/<case>.nii.gz``.
* ``pairs``: ``images/<name>`` and ``labels/<name>`` with identical file names.

Arrays come from SimpleITK's ``GetArrayFromImage`` and are therefore in KJI order
(slice, row, column); the slice axis is axis 0, as in the reference code.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .protocol import scan_sort_key

logger = logging.getLogger(__name__)

#: Label values of the four evaluated organs in the public label maps.
LABEL_MAPS: Dict[str, Dict[str, int]] = {
    "synapse": {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6},
    "chaos": {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4},
}
#: Column order and short names of the paper's tables.
ORGAN_ORDER: Tuple[str, ...] = ("left_kidney", "right_kidney", "spleen", "liver")
ORGAN_SHORT: Dict[str, str] = {"left_kidney": "LK", "right_kidney": "RK", "spleen": "Spleen",
                               "liver": "Liver"}
#: Intensity normalisation per label-map preset (CT: dataset statistics; MR: per volume).
DEFAULT_NORMALIZATION: Dict[str, str] = {"synapse": "dataset", "chaos": "volume"}
NORMALIZATIONS = ("dataset", "volume", "none")

_NIFTI = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


_STRUCTURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]*")


def short_name(organ: str) -> str:
    """Table heading of a structure ("LK" for left_kidney, the name itself otherwise)."""
    return ORGAN_SHORT.get(organ, organ)


def parse_label_map(value: str) -> Dict[str, int]:
    """A preset name (``synapse``/``chaos``), a JSON object text, or a path to a JSON file.

    Returns ``{structure name: label value}`` with positive integer values.
    """
    text = value.strip()
    if text.lower() in LABEL_MAPS:
        return dict(LABEL_MAPS[text.lower()])
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"Label map {value!r} is neither a preset ({', '.join(LABEL_MAPS)}), "
                             "a JSON object nor an existing JSON file.")
        text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Label map is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ValueError('Label map JSON must be a non-empty object like {"liver": 6}.')
    result: Dict[str, int] = {}
    for name, label in raw.items():
        # Names become parts of output file names: keep them from leaving the output folder.
        if not _STRUCTURE_NAME.fullmatch(str(name)) or ".." in str(name):
            raise ValueError(
                f"Structure name {name!r} may use only letters, digits, space, '_', '-' and '.' "
                "(it becomes part of output file names)."
            )
        if isinstance(label, bool) or not isinstance(label, int) or label <= 0:
            raise ValueError(f"Label value of {name!r} must be a positive integer, got {label!r}")
        result[str(name)] = label
    return result


def ordered_organs(names: Sequence[str]) -> List[str]:
    """The paper's column order first (LK, RK, Spleen, Liver), then the rest as given."""
    known = [o for o in ORGAN_ORDER if o in names]
    return known + [n for n in names if n not in ORGAN_ORDER]


@dataclass(frozen=True)
class ScanFiles:
    """Paths of one scan's image and label volume."""

    scan_id: str
    image: Path
    label: Path


def _strip_ext(name: str) -> Optional[str]:
    for ext in _NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _alpnet(root: Path) -> List[ScanFiles]:
    labels = {}
    for path in root.iterdir():
        stem = _strip_ext(path.name)
        if stem is not None and stem.startswith("label_"):
            labels[stem[len("label_"):]] = path
    scans = []
    for path in root.iterdir():
        stem = _strip_ext(path.name)
        if stem is None or not stem.startswith("image_"):
            continue
        key = stem[len("image_"):]
        if key in labels:
            digits = re.findall(r"\d+", key)
            scans.append(ScanFiles(digits[-1] if digits else key, path, labels[key]))
        else:
            logger.warning("No label volume for %s; skipped.", path)
    return scans


def _paired_dirs(image_dir: Path, label_dir: Path, strip_channel: bool) -> List[ScanFiles]:
    labels = {}
    for path in label_dir.iterdir():
        stem = _strip_ext(path.name)
        if stem is not None:
            labels[stem] = path
    scans = []
    for path in image_dir.iterdir():
        stem = _strip_ext(path.name)
        if stem is None:
            continue
        key = stem[:-5] if strip_channel and stem.endswith("_0000") else stem
        if key in labels:
            scans.append(ScanFiles(key, path, labels[key]))
    return scans


def discover_scans(root: Path, layout: str = "auto") -> List[ScanFiles]:
    """Find image/label pairs under ``root``; sorted by numeric scan id."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"Dataset folder not found: {root}")
    finders = {
        "alpnet": lambda: _alpnet(root),
        "nnunet": lambda: _paired_dirs(root / "imagesTr", root / "labelsTr", True)
        if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir() else [],
        "pairs": lambda: _paired_dirs(root / "images", root / "labels", False)
        if (root / "images").is_dir() and (root / "labels").is_dir() else [],
    }
    if layout != "auto" and layout not in finders:
        raise ValueError(f"Unknown layout {layout!r}; use auto, {', '.join(finders)}")
    for name in ([layout] if layout != "auto" else list(finders)):
        scans = finders[name]()
        if scans:
            ids = [s.scan_id for s in scans]
            if len(set(ids)) != len(ids):
                raise InputError(f"Duplicate scan ids in {root}: {sorted(ids)}")
            logger.info("Found %d scans in %s (layout %s)", len(scans), root, name)
            return sorted(scans, key=lambda s: scan_sort_key(s.scan_id))
    raise InputError(
        f"No image/label volume pairs found in {root}. Expected image_<id>.nii.gz + "
        "label_<id>.nii.gz, or imagesTr/ + labelsTr/, or images/ + labels/.")


@dataclass
class Scan:
    """One loaded scan. ``image`` float32 and ``label`` int32, both (slices, rows, cols)."""

    scan_id: str
    image: np.ndarray
    label: np.ndarray
    reference: sitk.Image = field(repr=False)

    @property
    def spacing_kji(self) -> Tuple[float, float, float]:
        sx, sy, sz = self.reference.GetSpacing()
        return (sz, sy, sx)

    def mask(self, label_value: int) -> np.ndarray:
        """uint8 (slices, rows, cols) mask of one label value."""
        return (self.label == label_value).astype(np.uint8)


def read_scan(files: ScanFiles) -> Scan:
    """Load image (float32) and label (int32) volumes; checks that their grids agree."""
    try:
        image = sitk.ReadImage(str(files.image))
        label = sitk.ReadImage(str(files.label))
    except RuntimeError as exc:
        raise InputError(f"Cannot read scan {files.scan_id}: {exc}") from exc
    image_array = sitk.GetArrayFromImage(image).astype(np.float32)
    label_array = sitk.GetArrayFromImage(label)
    if image_array.ndim != 3:
        raise InputError(f"{files.image} is not a 3-D single-channel volume "
                         f"(array shape {image_array.shape}).")
    if label_array.shape != image_array.shape:
        raise InputError(f"Scan {files.scan_id}: label shape {label_array.shape} differs from "
                         f"image shape {image_array.shape}; resample the label onto the image grid.")
    if not np.issubdtype(label_array.dtype, np.integer):
        rounded = np.rint(label_array)
        if not np.allclose(rounded, label_array):
            raise InputError(f"{files.label} holds non-integer values; it is not a label map.")
        label_array = rounded
    return Scan(files.scan_id, image_array, label_array.astype(np.int32), image)


class ScanCache:
    """Loads each scan once; normalises intensities by the chosen rule.

    ``normalization``: ``"dataset"`` z-scores every scan with the mean/std of all voxels of
    the scans in ``stats_ids`` (the reference's CT rule, over the fold's scans);
    ``"volume"`` z-scores each scan by its own mean/std (the reference's MR rule);
    ``"none"`` leaves intensities as stored.
    """

    def __init__(self, files: Sequence[ScanFiles], normalization: str = "volume",
                 stats_ids: Optional[Sequence[str]] = None):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self._files: Mapping[str, ScanFiles] = {f.scan_id: f for f in files}
        self._scans: Dict[str, Scan] = {}
        self.normalization = normalization
        self._stats_ids = list(stats_ids) if stats_ids is not None else list(self._files)
        self.dataset_mean: Optional[float] = None
        self.dataset_std: Optional[float] = None

    def _dataset_stats(self) -> Tuple[float, float]:
        if self.dataset_mean is None:
            total, total_sq, count = 0.0, 0.0, 0
            for scan_id in self._stats_ids:
                raw = read_scan(self._files[scan_id]).image.astype(np.float64)
                total += raw.sum()
                total_sq += np.square(raw).sum()
                count += raw.size
            mean = total / count
            std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
            self.dataset_mean, self.dataset_std = float(mean), std
        return self.dataset_mean, self.dataset_std

    def get(self, scan_id: str) -> Scan:
        if scan_id not in self._scans:
            if scan_id not in self._files:
                raise InputError(f"Unknown scan id {scan_id!r}")
            scan = read_scan(self._files[scan_id])
            if self.normalization == "volume":
                scan.image = _zscore(scan.image, float(scan.image.mean()), float(scan.image.std()))
            elif self.normalization == "dataset":
                mean, std = self._dataset_stats()
                scan.image = _zscore(scan.image, mean, std)
            self._scans[scan_id] = scan
        return self._scans[scan_id]


def _zscore(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    if std <= 0:
        return (image - mean).astype(np.float32)
    return ((image - mean) / std).astype(np.float32)
