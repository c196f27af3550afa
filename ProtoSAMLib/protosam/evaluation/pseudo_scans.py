"""A small multi-scan dataset cut from real images: Colin27 + AAL split into pseudo-scans.

Colin27 is one brain, so "scans" are made by splitting it:

* two hemispheres: the left one (array columns ``i < 90``, AAL ``*_L`` regions) and the
  right one (``i > 90``, ``*_R`` regions) mirrored with :func:`SimpleITK.Flip`, so that both
  show the structure on the same side of the image;
* two interleaved slice sets per hemisphere (even / odd axial slices, 2 mm apart), so no
  voxel appears in two scans and the organ extents differ a little between scans.

Each AAL region group is written under the label value of one abdominal organ of the
chosen layout (Synapse by default), so the abdominal evaluation runs on it unchanged.
The result is the SSL-ALPNet layout: ``image_<id>.nii.gz`` + ``label_<id>.nii.gz`` plus a
``dataset.json`` that records where every label came from.
"""
from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .datasets import LABEL_MAPS
from .sample_data import SampleFiles, read_label_names

logger = logging.getLogger(__name__)

#: Which AAL regions stand in for which organ (per hemisphere, the side suffix is added).
DEFAULT_STAND_INS: Dict[str, Tuple[str, ...]] = {
    "spleen": ("Thalamus",),
    "right_kidney": ("Putamen",),
    "left_kidney": ("Caudate",),
    "liver": ("Cerebelum_*",),
}
#: Midline column of the 181-column MNI grid (x = 0 mm).
MIDLINE_COLUMN = 90


@dataclass(frozen=True)
class PseudoScanSpec:
    """One pseudo-scan: hemisphere ("L"/"R") and slice parity (0 even, 1 odd)."""

    scan_id: str
    side: str
    parity: int


DEFAULT_SCANS: Tuple[PseudoScanSpec, ...] = (
    PseudoScanSpec("1", "L", 0), PseudoScanSpec("2", "L", 1),
    PseudoScanSpec("3", "R", 0), PseudoScanSpec("4", "R", 1),
)


def region_values(names: Mapping[int, str], patterns: Sequence[str], side: str) -> List[int]:
    """AAL values whose name matches ``<pattern>_<side>`` for any pattern."""
    values = []
    for value, name in names.items():
        if any(fnmatch.fnmatchcase(name, f"{p}_{side}") for p in patterns):
            values.append(value)
    return sorted(values)


def _hemisphere(image: sitk.Image, side: str) -> sitk.Image:
    size_i = image.GetSize()[0]
    if side == "L":
        return image[:MIDLINE_COLUMN, :, :]
    if side == "R":
        return sitk.Flip(image[MIDLINE_COLUMN + 1: size_i, :, :], [True, False, False])
    raise ValueError(f"side must be 'L' or 'R', got {side!r}")


def build_pseudo_dataset(sample: SampleFiles, out_dir: Path, *, layout: str = "synapse",
                         stand_ins: Optional[Mapping[str, Sequence[str]]] = None,
                         slice_range: Optional[Tuple[int, int]] = None,
                         row_range: Optional[Tuple[int, int]] = None,
                         scans: Sequence[PseudoScanSpec] = DEFAULT_SCANS) -> Dict[str, object]:
    """Write pseudo-scans of Colin27 + AAL to ``out_dir``; returns the dataset description.

    ``stand_ins``: organ name -> AAL name patterns (defaults to :data:`DEFAULT_STAND_INS`);
    organs must exist in ``LABEL_MAPS[layout]``. ``slice_range``/``row_range``: half-open
    ranges of axial slices (k) / rows (j) to keep before splitting, to make scans smaller.
    """
    if layout not in LABEL_MAPS:
        raise ValueError(f"layout must be one of {sorted(LABEL_MAPS)}, got {layout!r}")
    stand_ins = dict(stand_ins if stand_ins is not None else DEFAULT_STAND_INS)
    label_map = LABEL_MAPS[layout]
    unknown = sorted(set(stand_ins) - set(label_map))
    if unknown:
        raise ValueError(f"{unknown} are not organs of the {layout} layout ({sorted(label_map)})")
    names = read_label_names(sample.names)
    image = sitk.ReadImage(str(sample.image), sitk.sitkFloat32)
    atlas = sitk.ReadImage(str(sample.labels))
    if image.GetSize() != atlas.GetSize():
        raise ValueError(f"Sample image {image.GetSize()} and atlas {atlas.GetSize()} grids differ")
    k0, k1 = slice_range if slice_range is not None else (0, image.GetSize()[2])
    j0, j1 = row_range if row_range is not None else (0, image.GetSize()[1])
    image = image[:, j0:j1, k0:k1]
    atlas = atlas[:, j0:j1, k0:k1]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    description: Dict[str, object] = {
        "source": {"image": str(sample.image), "labels": str(sample.labels),
                   "origin": sample.source},
        "layout": layout, "label_map": {o: label_map[o] for o in stand_ins},
        "slice_range": [k0, k1], "row_range": [j0, j1], "scans": {},
    }
    for spec in scans:
        half_image = _hemisphere(image, spec.side)
        half_atlas = _hemisphere(atlas, spec.side)
        n_slices = half_image.GetSize()[2]
        scan_image = half_image[:, :, spec.parity:n_slices:2]
        scan_atlas = sitk.GetArrayFromImage(half_atlas[:, :, spec.parity:n_slices:2])
        labels = np.zeros(scan_atlas.shape, dtype=np.uint8)
        regions: Dict[str, List[str]] = {}
        for organ, patterns in stand_ins.items():
            values = region_values(names, patterns, spec.side)
            if not values:
                raise ValueError(f"No AAL region matches {list(patterns)} on side {spec.side}")
            labels[np.isin(scan_atlas, values)] = label_map[organ]
            regions[organ] = [names[v] for v in values]
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(scan_image)
        sitk.WriteImage(scan_image, str(out_dir / f"image_{spec.scan_id}.nii.gz"))
        sitk.WriteImage(label_image, str(out_dir / f"label_{spec.scan_id}.nii.gz"))
        description["scans"][spec.scan_id] = {
            "side": spec.side, "parity": spec.parity, "size_ijk": list(scan_image.GetSize()),
            "spacing": list(scan_image.GetSpacing()), "regions": regions,
        }
    (out_dir / "dataset.json").write_text(json.dumps(description, indent=2), encoding="utf-8")
    logger.info("Wrote %d pseudo-scans to %s", len(scans), out_dir)
    return description
