"""``protosam segment --report DIR``: pictures and a JSON summary of one volume segmentation.

Written into ``DIR`` for every structure key ``K``:

* ``overview_<K>.png`` - montage: the support slice(s) with their mask, then up to
  ``max_slices`` query slices spread over the slices where the result is non-empty (result in
  red, ground truth in green when given);
* ``slices_<K>.png`` - structure area per slice (and per-slice Dice when ground truth is given);
* ``report.json`` - per key: voxels, first/last slice with the structure, support and
  processed slices, 3-D Dice when ground truth is given.

Arrays are in the caller's index order; ``axis`` is the slice axis (as for segment_volume).
Each file is written atomically (complete or absent, never half-written), with the mode the
user's umask gives new files.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Hashable, List, Mapping, Optional, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..io import atomic_output
from .metrics import per_slice_dice, scan_dice_3d
from .pictures import Panel, spread, write_overlay_montage

logger = logging.getLogger(__name__)


def _safe_name(key: Hashable) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key))


def write_segment_report(out_dir, *, query: np.ndarray, labels: Optional[np.ndarray] = None,
                         axis: int = 0, result=None, support: Optional[np.ndarray] = None,
                         support_labels: Optional[Mapping[Hashable, np.ndarray]] = None,
                         ground_truth: Optional[Mapping[Hashable, np.ndarray]] = None,
                         max_slices: int = 8, flip_rows: bool = False, flip_cols: bool = False,
                         slice_range: Optional[Tuple[int, int]] = None) -> List[Path]:
    """Write the report files; returns their paths.

    Args:
        query: the segmented volume (3-D, any numeric dtype).
        labels: output label map (same shape); used when ``result`` is None (keys = values).
        result: the :class:`protosam.VolumeResult` (masks, support and processed slices).
        support: the support volume when it is not ``query`` (None: the support slices are
            shown from ``query``, which is right when the labels were painted on it).
        support_labels: key -> support mask volume, to draw the painted support mask.
        ground_truth: key -> reference mask volume, for Dice.
        flip_rows, flip_cols: mirror the pictures for display only.
        slice_range: inclusive (first, last) slices that were processed; pictures, plots
            and Dice are restricted to them (slice numbers stay those of the volume).
    """
    query = np.moveaxis(np.asarray(query), axis, 0)
    if result is not None:
        masks = {k: np.moveaxis(np.asarray(v), axis, 0) for k, v in result.masks.items()}
        support_slices = {k: list(v) for k, v in result.support_slices.items()}
        processed = {k: list(v) for k, v in result.processed_slices.items()}
    elif labels is not None:
        label_volume = np.moveaxis(np.asarray(labels), axis, 0)
        masks = {int(v): (label_volume == v).astype(np.uint8) for v in np.unique(label_volume) if v > 0}
        support_slices, processed = {}, {}
    else:
        raise ValueError("write_segment_report needs result= or labels=")
    support_volume = query if support is None else np.moveaxis(np.asarray(support), axis, 0)
    first, last = slice_range if slice_range is not None else (0, query.shape[0] - 1)
    if not 0 <= first <= last < query.shape[0]:
        raise ValueError(f"slice_range {slice_range} is outside the volume's 0..{query.shape[0] - 1}")
    window = np.zeros(query.shape[0], bool)
    window[first:last + 1] = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    summary: Dict[str, object] = {}
    for key, mask in masks.items():
        if mask.shape != query.shape:
            raise ValueError(f"Mask {key!r} has shape {mask.shape}, the volume {query.shape}")
        gt = None
        if ground_truth is not None and key in ground_truth:
            gt = (np.moveaxis(np.asarray(ground_truth[key]), axis, 0) != 0) & window[:, None, None]
        present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1) & window).tolist()
        entry: Dict[str, object] = {
            "voxels": int(np.count_nonzero(mask)),
            "first_slice": present[0] if present else None,
            "last_slice": present[-1] if present else None,
            "support_slices": support_slices.get(key, []),
            "processed_slices": len(processed.get(key, [])),
        }
        panels = []
        painted = None
        if support_labels is not None and key in support_labels:
            painted = np.moveaxis(np.asarray(support_labels[key]), axis, 0)
        for k in support_slices.get(key, []):
            support_mask = painted[k] if painted is not None else (mask[k] if support is None else None)
            panels.append(Panel(support_volume[k], support_mask, kind="support",
                                caption=f"support slice {k}"))
        for index in spread(present, max_slices):
            panels.append(Panel(query[index], mask[index], gt=None if gt is None else gt[index],
                                caption=f"slice {index}: {int(mask[index].sum())} px"))
        safe = _safe_name(key)
        if panels:
            overview = out_dir / f"overview_{safe}.png"
            with atomic_output(overview) as temporary:
                write_overlay_montage(temporary, panels, columns=4, flip_rows=flip_rows, flip_cols=flip_cols,
                                      title=f"structure {key}")
            written.append(overview)
        dice_by_slice = None
        if gt is not None:
            dice_by_slice = per_slice_dice(mask, gt, axis=0, slices=range(first, last + 1))
            entry["dice_3d"] = scan_dice_3d(mask, gt, axis=0, slices=range(first, last + 1))
            entry["dice_2d_mean"] = float(np.mean(list(dice_by_slice.values()))) if dice_by_slice else None
        written.append(_area_plot(out_dir / f"slices_{safe}.png", mask, gt, dice_by_slice, key, (first, last)))
        summary[str(key)] = entry
    path = out_dir / "report.json"
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    written.append(path)
    logger.info("Wrote segmentation report (%d files) to %s", len(written), out_dir)
    return written


def _area_plot(path: Path, mask: np.ndarray, gt: Optional[np.ndarray],
               dice_by_slice: Optional[Dict[int, float]], key, bounds: Tuple[int, int]) -> Path:
    figure = Figure(figsize=(7.5, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    slices = np.arange(bounds[0], bounds[1] + 1)
    axes.plot(slices, mask[slices].reshape(len(slices), -1).sum(axis=1), color="C3", label="result area (px)")
    if gt is not None:
        axes.plot(slices, gt[slices].reshape(len(slices), -1).sum(axis=1), color="C2", linestyle="--",
                  label="reference area (px)")
    axes.set_xlabel("slice index")
    axes.set_ylabel("pixels")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    if dice_by_slice:
        right = axes.twinx()
        xs = sorted(dice_by_slice)
        right.plot(xs, [dice_by_slice[x] for x in xs], color="C0", marker="o", markersize=3,
                   label="Dice per slice")
        right.set_ylim(-0.02, 1.02)
        right.set_ylabel("Dice")
        more_handles, more_names = right.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    axes.legend(handles, names, fontsize=8, loc="upper right")
    axes.set_title(f"structure {key}: area per slice", fontsize=10)
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100)
    return path
