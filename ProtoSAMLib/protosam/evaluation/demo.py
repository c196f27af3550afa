"""``protosam demo``: the main job end to end on the Colin27 + AAL sample.

One support slice per structure (the middle of the AAL region's axial slices, as a user
would paint it) is propagated through the whole Colin27 volume with
:func:`protosam.segment_volume`; the result is written as a label map with Colin27's geometry,
compared with the AAL region (3-D Dice, per-slice Dice, false positives outside the region)
and drawn as an overlay montage plus a per-slice plot.
"""
from __future__ import annotations

import difflib
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..orientation import canonical_orientation, ijk_to_ras_from_lps
from ..propagation import segment_volume
from .metrics import outside_false_positives, per_slice_dice, scan_dice_3d
from .pictures import axial_display_flips
from .protocol import organ_slice_list, support_slice_indices
from .sample_data import SampleFiles, get_sample, read_label_names
from .segment_report import write_segment_report

logger = logging.getLogger(__name__)

DEFAULT_STRUCTURES: Tuple[str, ...] = ("Thalamus_L", "Thalamus_R")


@dataclass
class DemoResult:
    """Paths written and the figures measured, per structure name."""

    segmentation: Path
    summary: Path
    pictures: List[Path]
    dice_3d: Dict[str, float]
    dice_2d_mean: Dict[str, float]
    fp_slices_outside: Dict[str, int]
    support_slices: Dict[str, int]
    seconds: float
    sample: SampleFiles
    extra: Dict[str, object] = field(default_factory=dict)


def structure_values(names: Dict[int, str], wanted: Sequence[str]) -> Dict[str, int]:
    """AAL values of the requested region names; unknown names raise with suggestions."""
    by_name = {n: v for v, n in names.items()}
    values = {}
    for name in wanted:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=4)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise InputError(f"{name!r} is not an AAL region name.{hint} The names are listed in the "
                             "sample's aal.nii.txt (e.g. Thalamus_L, Putamen_R, Hippocampus_L).")
        values[name] = by_name[name]
    return values


def run_demo(engine, out_dir: Path, *, structures: Sequence[str] = DEFAULT_STRUCTURES,
             slice_range: Optional[Tuple[int, int]] = None, download: bool = True,
             sample: Optional[SampleFiles] = None, progress: Optional[Callable[[int, int], None]] = None,
             cancel: Optional[threading.Event] = None) -> DemoResult:
    """Run the demo with ``engine``; ``slice_range`` is inclusive (first, last) axial slices."""
    if not structures:
        raise ValueError("Name at least one AAL structure for the demo.")
    sample = sample or get_sample(download=download)
    image = sitk.ReadImage(str(sample.image), sitk.sitkFloat32)
    atlas_image = sitk.ReadImage(str(sample.labels))
    volume = sitk.GetArrayFromImage(image)  # (k, j, i): axial slices along axis 0 (checked below)
    atlas = sitk.GetArrayFromImage(atlas_image)
    ijk_to_ras = ijk_to_ras_from_lps(image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    if canonical_orientation(ijk_to_ras, "axial").slice_axis != 0:
        raise InputError(f"The demo sample {sample.image} is not stored in axial slices; use the published Colin27 "
                         "sample (delete the cached copy to download it again).")
    values = structure_values(read_label_names(sample.names), structures)
    support_masks: Dict[str, np.ndarray] = {}
    support_slices: Dict[str, int] = {}
    for name, value in values.items():
        slices = organ_slice_list(atlas, value)
        if slice_range is not None:
            slices = [k for k in slices if slice_range[0] <= k <= slice_range[1]]
        if not slices:
            raise InputError(f"{name} does not appear in the chosen slices {slice_range}.")
        k = support_slice_indices(slices, 1)[0]
        one_slice = np.zeros(atlas.shape, np.uint8)
        one_slice[k] = atlas[k] == value
        support_masks[name] = one_slice
        support_slices[name] = k
    # Through the geometry, as every caller that has one: the engine sees the axial slices in
    # the canonical order (protosam.orientation) and returns masks in the file's (k, j, i) order.
    result = segment_volume(engine, volume, None, support_masks, query_ijk_to_ras=ijk_to_ras, plane="axial",
                            support_slices=support_slices, slice_range=slice_range, modality="mri",
                            progress=progress, cancel=cancel)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_volume = np.zeros(atlas.shape, np.uint8)
    for position, name in reversed(list(enumerate(values, start=1))):
        label_volume[result.masks[name] > 0] = position
    label_image = sitk.GetImageFromArray(label_volume)
    label_image.CopyInformation(image)
    segmentation = out_dir / "demo_segmentation.nii.gz"
    sitk.WriteImage(label_image, str(segmentation), True)

    ground_truth = {name: (atlas == value).astype(np.uint8) for name, value in values.items()}
    evaluated = _evaluation_window(atlas.shape[0], slice_range)
    dice_3d, dice_2d, fp = {}, {}, {}
    for name in values:
        prediction = result.masks[name][evaluated]
        gt = ground_truth[name][evaluated]
        dice_3d[name] = scan_dice_3d(prediction, gt)
        per_slice = per_slice_dice(prediction, gt)
        dice_2d[name] = float(np.mean(list(per_slice.values()))) if per_slice else float("nan")
        fp[name] = outside_false_positives(prediction, gt).slices_outside_extent
    flip_rows, flip_cols = axial_display_flips(image.GetDirection())
    pictures = write_segment_report(out_dir / "pictures", query=volume, axis=0, result=result,
                                    support_labels=support_masks, ground_truth=ground_truth,
                                    flip_rows=flip_rows, flip_cols=flip_cols, slice_range=slice_range)
    summary_path = out_dir / "demo_results.json"
    summary = {
        "sample": {"image": str(sample.image), "labels": str(sample.labels), "source": sample.source},
        "segmentation": segmentation.name,
        "labels": {str(i): name for i, name in enumerate(values, start=1)},
        "support_slices": support_slices, "slice_range": list(slice_range) if slice_range else None,
        "dice_3d": dice_3d, "dice_2d_mean": dice_2d, "fp_slices_outside": fp,
        "processed_slices": {n: len(result.processed_slices[n]) for n in values},
        "seconds": result.seconds,
        "models": asdict(engine.models) if hasattr(engine, "models") else {},
        "preset": getattr(getattr(engine, "preset", None), "name", ""),
        "note": "Dice is measured against the AAL atlas region, the reference drawn on this brain.",
    }
    summary_path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return DemoResult(segmentation, summary_path, [p for p in pictures if p.suffix == ".png"],
                      dice_3d, dice_2d, fp, support_slices, result.seconds, sample)


def _evaluation_window(count: int, slice_range: Optional[Tuple[int, int]]) -> slice:
    if slice_range is None:
        return slice(0, count)
    return slice(slice_range[0], slice_range[1] + 1)
