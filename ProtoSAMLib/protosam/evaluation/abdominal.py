"""The paper's protocol on abdominal scans: 3 support slices, query parts from the query's GT.

For every organ and query scan (see :mod:`.protocol` for the rules):

1. the support scan's organ slices give one support slice per part (1/6, 1/2, 5/6);
2. every query slice in the query's ground-truth extent ``[z_min, z_max]`` is segmented
   with the support slice of its part (one ``Engine.segment_slices`` call per part);
3. 2-D Dice is recorded for each query slice that contains the organ; 3-D Dice per scan is
   computed over ``[z_min, z_max]``.

Pictures (optional): an overlay montage per (organ, query scan) and a per-slice Dice plot
per organ.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

from ..errors import CancelledError
from .datasets import Scan, ScanCache, short_name
from .metrics import per_slice_dice, scan_dice_3d
from .pictures import Panel, axial_display_flips, prompts_to_arrays, spread, write_dice_plot, write_overlay_montage
from .protocol import FoldSplit, organ_slice_list, plan_query, support_slice_indices
from .report import EvaluationReport, ScanRecord, SliceRecord

logger = logging.getLogger(__name__)

MaskSink = Callable[[str, str, str, np.ndarray], None]
"""``sink(protocol, organ, scan_id, prediction)`` receives each predicted uint8 volume."""

PAPER = "paper"
PICTURE_MODES = ("none", "first", "all")


@dataclass
class PictureOptions:
    """Where and how many pictures: ``mode`` none | first (first query scan per organ) | all."""

    out_dir: Optional[Path] = None
    mode: str = "first"
    max_query_slices: int = 6
    written: List[Path] = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in PICTURE_MODES:
            raise ValueError(f"picture mode must be one of {PICTURE_MODES}, got {self.mode!r}")

    def wants(self, query_position: int) -> bool:
        if self.out_dir is None or self.mode == "none":
            return False
        return self.mode == "all" or query_position == 0


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("Evaluation cancelled.")


def run_paper_protocol(engine, cache: ScanCache, split: FoldSplit, label_map: Mapping[str, int],
                       report: EvaluationReport, *, n_chunks: int = 3,
                       pictures: Optional[PictureOptions] = None,
                       progress: Optional[Callable[[str], None]] = None,
                       cancel: Optional[threading.Event] = None,
                       mask_sink: Optional[MaskSink] = None) -> None:
    """Run the paper's protocol for every organ of ``label_map``; append records to ``report``.

    ``engine``: a :class:`protosam.Engine` (only ``segment_slices`` is used).
    Organs missing from the support scan are skipped (and listed in ``report.meta``).
    """
    pictures = pictures or PictureOptions(mode="none")
    support = cache.get(split.support_scan)
    skipped = report.meta.setdefault("skipped", [])
    for organ, value in label_map.items():
        organ_slices = organ_slice_list(support.label, value)
        if not organ_slices:
            logger.warning("Support scan %s has no %s (label %d); organ skipped.", support.scan_id, organ, value)
            skipped.append({"protocol": PAPER, "organ": organ, "scan_id": support.scan_id, "reason": "not in support"})
            continue
        support_slices = support_slice_indices(organ_slices, n_chunks)
        support_mask = support.mask(value)
        curves: Dict[str, Dict[int, float]] = {}
        chunk_starts: Dict[str, List[int]] = {}
        for position, scan_id in enumerate(split.query_scans):
            _check_cancel(cancel)
            query = cache.get(scan_id)
            gt = query.mask(value)
            gt_slices = organ_slice_list(query.label, value)
            if not gt_slices:
                logger.warning("Query scan %s has no %s; skipped.", scan_id, organ)
                skipped.append({"protocol": PAPER, "organ": organ, "scan_id": scan_id, "reason": "not in query"})
                continue
            started = time.perf_counter()
            plan = plan_query(gt_slices, n_chunks)
            prediction = np.zeros_like(gt)
            coarse = np.zeros_like(gt)
            prompts: Dict[int, object] = {}
            for chunk in range(n_chunks):
                slices = plan.slices_of_chunk(chunk)
                if not slices:
                    continue
                _check_cancel(cancel)
                k = support_slices[chunk]
                result = engine.segment_slices(support.image[k], support_mask[k], query.image[slices])
                prediction[slices] = result.mask
                coarse[slices] = result.coarse_mask
                for offset, index in enumerate(slices):
                    prompts[index] = result.prompts[offset]
            if mask_sink is not None:
                mask_sink(PAPER, organ, scan_id, prediction)
            dice_by_slice = per_slice_dice(prediction, gt, axis=0, slices=plan.organ_slices)
            for index, dice in dice_by_slice.items():
                chunk = plan.chunk_of_slice[index]
                report.slices.append(SliceRecord(
                    protocol=PAPER, organ=organ, scan_id=scan_id, slice_index=index, chunk=chunk,
                    support_slice=support_slices[chunk], dice=dice,
                    gt_voxels=int(gt[index].sum()), pred_voxels=int(prediction[index].sum())))
            dice_3d = scan_dice_3d(prediction, gt, axis=0, slices=range(plan.z_min, plan.z_max + 1))
            report.scans.append(ScanRecord(
                protocol=PAPER, organ=organ, scan_id=scan_id, support_scan=support.scan_id,
                support_slices=" ".join(str(s) for s in support_slices),
                first_gt_slice=plan.z_min, last_gt_slice=plan.z_max,
                n_slices_2d=len(dice_by_slice),
                dice_2d_mean=float(np.mean(list(dice_by_slice.values()))),
                dice_3d=dice_3d, n_slices_processed=len(plan.chunk_of_slice),
                seconds=time.perf_counter() - started))
            curves[f"scan {scan_id}"] = dice_by_slice
            chunk_starts[f"scan {scan_id}"] = [plan.slices_of_chunk(c)[0] for c in range(n_chunks)
                                               if plan.slices_of_chunk(c)]
            if progress is not None:
                progress(f"{PAPER}: {organ} scan {scan_id}: 2-D {100 * report.scans[-1].dice_2d_mean:.1f}% "
                         f"3-D {100 * dice_3d:.1f}%")
            if pictures.wants(position):
                _paper_montage(pictures, organ, support, support_mask, support_slices, query, gt,
                               coarse, prediction, prompts, plan, dice_by_slice)
        if pictures.out_dir is not None and pictures.mode != "none" and curves:
            path = pictures.out_dir / f"{PAPER}_dice_{organ}.png"
            pictures.written.append(write_dice_plot(
                path, curves, chunk_starts=chunk_starts,
                title=f"{short_name(organ)}: per-slice Dice, paper protocol (support scan {support.scan_id})",
                xlabel="query slice index (dotted: first slice of each part)"))


def _paper_montage(pictures: PictureOptions, organ: str, support: Scan, support_mask: np.ndarray,
                   support_slices: List[int], query: Scan, gt: np.ndarray, coarse: np.ndarray,
                   prediction: np.ndarray, prompts: Dict[int, object], plan, dice_by_slice) -> None:
    panels = [Panel(support.image[k], support_mask[k], kind="support",
                    caption=f"support {support.scan_id} slice {k} (part {c + 1})")
              for c, k in enumerate(support_slices)]
    for index in spread(list(plan.organ_slices), pictures.max_query_slices):
        boxes, points, labels = prompts_to_arrays(prompts.get(index))
        panels.append(Panel(query.image[index], prediction[index], coarse=coarse[index], gt=gt[index],
                            boxes=boxes, points=points, point_labels=labels,
                            caption=f"scan {query.scan_id} slice {index} (part "
                                    f"{plan.chunk_of_slice[index] + 1}) Dice {dice_by_slice[index]:.2f}"))
    flip_rows, flip_cols = axial_display_flips(query.reference.GetDirection())
    path = pictures.out_dir / f"{PAPER}_{organ}_scan{query.scan_id}.png"
    pictures.written.append(write_overlay_montage(
        path, panels, columns=max(3, len(support_slices)), flip_rows=flip_rows, flip_cols=flip_cols,
        title=f"{short_name(organ)}, paper protocol: support scan {support.scan_id} -> query scan {query.scan_id}"))
