"""``protosam evaluate`` for abdominal datasets: choose the split, run the protocols, write files.

Programmatic use (the CLI does the same)::

    from protosam import Engine
    from protosam.evaluation.runner import AbdominalEvaluation, run_abdominal
    engine = Engine(models, preset="paper")
    report = run_abdominal(engine, AbdominalEvaluation(data=Path("sabs"), label_map="synapse",
                                                       out_dir=Path("results")))
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .abdominal import PAPER, PictureOptions, run_paper_protocol
from .datasets import DEFAULT_NORMALIZATION, ScanCache, discover_scans, parse_label_map
from .protocol import DEFAULT_N_CHUNKS, DEFAULT_N_FOLDS, explicit_split, fold_split
from .realistic import REALISTIC, run_realistic_protocol
from .report import EvaluationReport, package_versions

logger = logging.getLogger(__name__)

PROTOCOLS = (PAPER, REALISTIC)


@dataclass
class AbdominalEvaluation:
    """What to evaluate. ``label_map``: preset name, JSON text or JSON file path.

    ``organs``: subset of the label map's names (default all). ``support_scan`` overrides
    the fold rule (every other scan is then a query). ``normalization``: ``dataset`` |
    ``volume`` | ``none`` | None (None = the label-map preset's rule, else ``volume``).
    ``save_masks``: also write each predicted mask as NIfTI under ``out_dir/masks``.
    """

    data: Path
    out_dir: Path
    label_map: str = "synapse"
    organs: Optional[Sequence[str]] = None
    layout: str = "auto"
    fold: int = 0
    n_folds: int = DEFAULT_N_FOLDS
    support_scan: Optional[str] = None
    protocols: Sequence[str] = (PAPER,)
    n_chunks: int = DEFAULT_N_CHUNKS
    normalization: Optional[str] = None
    pictures: str = "first"
    save_masks: bool = False
    seed: int = 0
    extra_meta: Dict[str, object] = field(default_factory=dict)


def _resolved_label_map(config: AbdominalEvaluation) -> Dict[str, int]:
    label_map = parse_label_map(config.label_map)
    if config.organs:
        unknown = [o for o in config.organs if o not in label_map]
        if unknown:
            raise ValueError(f"Organs {unknown} are not in the label map ({', '.join(label_map)}).")
        label_map = {o: label_map[o] for o in config.organs}
    return label_map


def _engine_meta(engine) -> Dict[str, object]:
    models = getattr(engine, "models", None)
    preset = getattr(engine, "preset", None)
    return {
        "models": asdict(models) if models is not None else {},
        "preset": getattr(preset, "name", str(preset)),
        "preset_fields": asdict(preset) if preset is not None else {},
        "device": str(getattr(engine, "device", "")),
    }


def run_abdominal(engine, config: AbdominalEvaluation, *,
                  progress: Optional[Callable[[str], None]] = None,
                  cancel: Optional[threading.Event] = None) -> EvaluationReport:
    """Evaluate ``engine`` on an abdominal dataset; writes the report files and pictures."""
    unknown = [p for p in config.protocols if p not in PROTOCOLS]
    if unknown or not config.protocols:
        raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {list(config.protocols)}")
    label_map = _resolved_label_map(config)
    files = discover_scans(Path(config.data), config.layout)
    scan_ids = [f.scan_id for f in files]
    if config.support_scan is not None:
        split = explicit_split(scan_ids, str(config.support_scan))
    else:
        split = fold_split(scan_ids, config.fold, config.n_folds)
    normalization = config.normalization
    if normalization is None:
        normalization = DEFAULT_NORMALIZATION.get(config.label_map.strip().lower(), "volume")
    fold_scans = [split.support_scan, *split.query_scans]
    cache = ScanCache(files, normalization, stats_ids=fold_scans)
    _seed_everything(config.seed)

    report = EvaluationReport()
    report.meta.update(_engine_meta(engine))
    report.meta.update({
        "seed": config.seed, "dataset": str(config.data), "layout": config.layout,
        "label_map": label_map, "fold": split.fold, "n_folds": config.n_folds,
        "support_scan": split.support_scan, "query_scans": list(split.query_scans),
        "protocols": list(config.protocols), "n_chunks": config.n_chunks,
        "normalization": normalization, "versions": package_versions(), "skipped": [],
    })
    report.meta.update(config.extra_meta)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = PictureOptions(out_dir=out_dir / "pictures", mode=config.pictures)
    sink = _mask_writer(out_dir / "masks", cache) if config.save_masks else None

    if PAPER in config.protocols:
        run_paper_protocol(engine, cache, split, label_map, report, n_chunks=config.n_chunks,
                           pictures=pictures, progress=progress, cancel=cancel, mask_sink=sink)
    if REALISTIC in config.protocols:
        run_realistic_protocol(engine, cache, split, label_map, report, pictures=pictures,
                               progress=progress, cancel=cancel, mask_sink=sink)
    if report.meta.get("normalization") == "dataset":
        report.meta["dataset_mean"] = cache.dataset_mean
        report.meta["dataset_std"] = cache.dataset_std
    report.meta["pictures"] = [str(p.relative_to(out_dir)) for p in pictures.written]
    report.write(out_dir)
    return report


def _mask_writer(folder: Path, cache: ScanCache):
    """A mask sink writing ``<protocol>_<organ>_scan<id>.nii.gz`` on the query's grid."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(protocol: str, organ: str, scan_id: str, prediction: np.ndarray) -> None:
        image = sitk.GetImageFromArray(np.ascontiguousarray(prediction, dtype=np.uint8))
        image.CopyInformation(cache.get(scan_id).reference)
        sitk.WriteImage(image, str(folder / f"{protocol}_{organ}_scan{scan_id}.nii.gz"), True)

    return write


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
