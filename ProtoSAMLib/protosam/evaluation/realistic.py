"""The protocol a user faces: one support slice, whole-volume propagation, no GT extent.

For each query scan, every organ present in the support scan is given by ONE support slice
(the middle of the support's organ slices, the paper's 1-part rule) and
:func:`protosam.segment_volume` runs over the whole query volume (all organs in one call, so
encoders are shared). Nothing about the query's ground truth is used while segmenting.

Recorded per (organ, scan): 3-D Dice over the whole volume, the 2-D Dice of the slices that
contain the organ, false positives on slices outside the structure (before the first or after
the last GT slice, and on GT-empty slices), the number of slices the engine processed, and the
wall time of the call (shared by all organs of that scan).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, Mapping, Optional

import numpy as np

from ..errors import CancelledError
from ..propagation import segment_volume
from .abdominal import MaskSink, PictureOptions
from .datasets import ScanCache, short_name
from .metrics import outside_false_positives, per_slice_dice, scan_dice_3d
from .pictures import Panel, axial_display_flips, spread, write_dice_plot, write_overlay_montage
from .protocol import FoldSplit, organ_slice_list, support_slice_indices
from .report import EvaluationReport, ScanRecord, SliceRecord

logger = logging.getLogger(__name__)

REALISTIC = "realistic"


def run_realistic_protocol(engine, cache: ScanCache, split: FoldSplit, label_map: Mapping[str, int],
                           report: EvaluationReport, *, pictures: Optional[PictureOptions] = None,
                           progress: Optional[Callable[[str], None]] = None,
                           cancel: Optional[threading.Event] = None,
                           mask_sink: Optional[MaskSink] = None) -> None:
    """Run the realistic protocol; append records to ``report``."""
    pictures = pictures or PictureOptions(mode="none")
    support = cache.get(split.support_scan)
    skipped = report.meta.setdefault("skipped", [])
    support_masks: Dict[str, np.ndarray] = {}
    support_slice: Dict[str, int] = {}
    for organ, value in label_map.items():
        slices = organ_slice_list(support.label, value)
        if not slices:
            skipped.append({"protocol": REALISTIC, "organ": organ, "scan_id": support.scan_id,
                            "reason": "not in support"})
            continue
        k = support_slice_indices(slices, 1)[0]
        one_slice = np.zeros(support.label.shape, np.uint8)
        one_slice[k] = support.label[k] == value
        support_masks[organ] = one_slice
        support_slice[organ] = k
    if not support_masks:
        return
    curves: Dict[str, Dict[str, Dict[int, float]]] = {organ: {} for organ in support_masks}
    for position, scan_id in enumerate(split.query_scans):
        if cancel is not None and cancel.is_set():
            raise CancelledError("Evaluation cancelled.")
        query = cache.get(scan_id)
        result = segment_volume(engine, query.image, support.image, support_masks, axis=0,
                                support_slices=support_slice, modality="none", cancel=cancel)
        for organ, value in label_map.items():
            if organ not in support_masks:
                continue
            gt = query.mask(value)
            prediction = result.masks[organ]
            if not gt.any():
                skipped.append({"protocol": REALISTIC, "organ": organ, "scan_id": scan_id,
                                "reason": "not in query"})
                continue
            if mask_sink is not None:
                mask_sink(REALISTIC, organ, scan_id, prediction)
            dice_by_slice = per_slice_dice(prediction, gt, axis=0)
            for index, dice in dice_by_slice.items():
                report.slices.append(SliceRecord(
                    protocol=REALISTIC, organ=organ, scan_id=scan_id, slice_index=index, chunk=0,
                    support_slice=support_slice[organ], dice=dice,
                    gt_voxels=int(gt[index].sum()), pred_voxels=int(prediction[index].sum())))
            outside = outside_false_positives(prediction, gt, axis=0)
            dice_3d = scan_dice_3d(prediction, gt, axis=0)
            report.scans.append(ScanRecord(
                protocol=REALISTIC, organ=organ, scan_id=scan_id, support_scan=support.scan_id,
                support_slices=str(support_slice[organ]),
                first_gt_slice=outside.first_gt_slice, last_gt_slice=outside.last_gt_slice,
                n_slices_2d=len(dice_by_slice),
                dice_2d_mean=float(np.mean(list(dice_by_slice.values()))),
                dice_3d=dice_3d, n_slices_processed=len(result.processed_slices.get(organ, [])),
                fp_slices_outside=outside.slices_outside_extent,
                fp_voxels_outside=outside.voxels_outside_extent,
                fp_slices_without_structure=outside.slices_without_structure,
                seconds=float(result.seconds)))
            curves[organ][f"scan {scan_id}"] = dice_by_slice
            if progress is not None:
                progress(f"{REALISTIC}: {organ} scan {scan_id}: 3-D {100 * dice_3d:.1f}% "
                         f"FP slices outside {outside.slices_outside_extent}")
            if pictures.wants(position):
                _realistic_montage(pictures, organ, support, support_masks[organ], support_slice[organ],
                                   query, gt, prediction, dice_by_slice)
    if pictures.out_dir is not None and pictures.mode != "none":
        for organ, series in curves.items():
            if series:
                pictures.written.append(write_dice_plot(
                    pictures.out_dir / f"{REALISTIC}_dice_{organ}.png", series,
                    title=f"{short_name(organ)}: per-slice Dice, one support slice + propagation",
                    xlabel="query slice index"))


def _realistic_montage(pictures, organ, support, support_mask, k, query, gt, prediction, dice_by_slice):
    panels = [Panel(support.image[k], support_mask[k], kind="support",
                    caption=f"support {support.scan_id} slice {k} (only input)")]
    gt_slices = organ_slice_list(gt, 1)
    chosen = spread(gt_slices, max(1, pictures.max_query_slices - 2))
    # Show the worst false-positive slices outside the structure, if any.
    areas = prediction.reshape(prediction.shape[0], -1).sum(axis=1)
    outside = [i for i in np.argsort(-areas).tolist()
               if areas[i] > 0 and (i < gt_slices[0] or i > gt_slices[-1])][:2]
    for index in sorted(chosen + outside):
        caption = (f"slice {index} Dice {dice_by_slice[index]:.2f}" if index in dice_by_slice
                   else f"slice {index} outside: {int(areas[index])} FP px")
        panels.append(Panel(query.image[index], prediction[index], gt=gt[index],
                            caption=f"scan {query.scan_id} {caption}"))
    flip_rows, flip_cols = axial_display_flips(query.reference.GetDirection())
    pictures.written.append(write_overlay_montage(
        pictures.out_dir / f"{REALISTIC}_{organ}_scan{query.scan_id}.png", panels, columns=4,
        flip_rows=flip_rows, flip_cols=flip_cols,
        title=f"{short_name(organ)}, realistic protocol: scan {support.scan_id} slice {k} -> scan {query.scan_id}"))
