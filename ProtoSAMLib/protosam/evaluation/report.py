"""Evaluation records and their files: CSV per slice / per scan / per organ, JSON, a text table.

Files written by :meth:`EvaluationReport.write` into the output folder:

* ``per_slice.csv`` - one row per evaluated (protocol, organ, scan, slice);
* ``per_scan.csv`` - one row per (protocol, organ, query scan): 2-D mean, 3-D Dice, extents,
  false positives outside the structure (realistic protocol);
* ``summary.csv`` - one row per (protocol, organ) plus a ``mean`` row per protocol;
* ``results.json`` - all of the above plus ``meta`` (models, preset, seed, versions, data);
* ``table.txt`` - the printed table (as in the paper: Dice in %, organs as columns).
"""
from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import platform
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .datasets import ordered_organs, short_name
from .metrics import mean_or_nan, std_or_nan


@dataclass
class SliceRecord:
    protocol: str
    organ: str
    scan_id: str
    slice_index: int
    chunk: int
    support_slice: int
    dice: float
    gt_voxels: int
    pred_voxels: int


@dataclass
class ScanRecord:
    protocol: str
    organ: str
    scan_id: str
    support_scan: str
    support_slices: str
    first_gt_slice: int
    last_gt_slice: int
    n_slices_2d: int
    dice_2d_mean: float
    dice_3d: float
    n_slices_processed: int
    fp_slices_outside: Optional[int] = None
    fp_voxels_outside: Optional[int] = None
    fp_slices_without_structure: Optional[int] = None
    seconds: float = 0.0


@dataclass
class OrganSummary:
    protocol: str
    organ: str
    n_scans: int
    n_slices: int
    dice_2d: float  # mean over all evaluated slices (pooled over scans), ProtoSAM's number
    dice_2d_std: float
    dice_3d: float  # mean over scans of the per-scan 3-D Dice, SSL-ALPNet's number
    dice_3d_std: float
    fp_slices_outside_mean: Optional[float] = None


#: Protocols on 2-D images, where the 3-D row would only repeat the per-image Dice.
PER_IMAGE_PROTOCOLS = ("polyp",)


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def package_versions() -> Dict[str, str]:
    """Versions of the packages that decide the numbers (absent ones are left out)."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("protosam", "torch", "torchvision", "segment-anything", "numpy", "scipy",
                 "SimpleITK", "timm", "matplotlib"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class EvaluationReport:
    """Everything one ``protosam evaluate`` run measured."""

    meta: Dict[str, object] = field(default_factory=dict)
    slices: List[SliceRecord] = field(default_factory=list)
    scans: List[ScanRecord] = field(default_factory=list)

    def protocols(self) -> List[str]:
        seen: List[str] = []
        for record in self.scans:
            if record.protocol not in seen:
                seen.append(record.protocol)
        return seen

    def organs(self) -> List[str]:
        return ordered_organs(list(dict.fromkeys(r.organ for r in self.scans)))

    def summaries(self) -> List[OrganSummary]:
        """Per (protocol, organ) aggregates, in the paper's organ order."""
        result = []
        for protocol in self.protocols():
            for organ in self.organs():
                scans = [r for r in self.scans if r.protocol == protocol and r.organ == organ]
                if not scans:
                    continue
                slice_dice = [s.dice for s in self.slices if s.protocol == protocol and s.organ == organ]
                fp = [r.fp_slices_outside for r in scans if r.fp_slices_outside is not None]
                result.append(OrganSummary(
                    protocol=protocol, organ=organ, n_scans=len(scans), n_slices=len(slice_dice),
                    dice_2d=mean_or_nan(slice_dice), dice_2d_std=std_or_nan(slice_dice),
                    dice_3d=mean_or_nan(r.dice_3d for r in scans),
                    dice_3d_std=std_or_nan(r.dice_3d for r in scans),
                    fp_slices_outside_mean=mean_or_nan(fp) if fp else None,
                ))
        return result

    def mean_row(self, protocol: str) -> Dict[str, float]:
        """Mean over organs of the organ-level numbers (the paper's "Mean" column)."""
        rows = [s for s in self.summaries() if s.protocol == protocol]
        return {"dice_2d": mean_or_nan(s.dice_2d for s in rows if not math.isnan(s.dice_2d)),
                "dice_3d": mean_or_nan(s.dice_3d for s in rows if not math.isnan(s.dice_3d))}

    # ------------------------------------------------------------------ text table
    def format_table(self) -> str:
        """Dice in % with organs as columns, one block per protocol, like the paper's tables."""
        lines: List[str] = []
        meta = self.meta
        models = meta.get("models", {})
        if models:
            lines.append("Models: {dinov2} + {sam}, input {input_size}px, preset {preset}, seed {seed}".format(
                dinov2=models.get("dinov2"), sam=models.get("sam"), input_size=models.get("input_size"),
                preset=meta.get("preset"), seed=meta.get("seed")))
        if meta.get("dataset"):
            lines.append(f"Data: {meta['dataset']}  support scan {meta.get('support_scan')}  "
                         f"queries {', '.join(meta.get('query_scans', []))}")
        organs = self.organs()
        heading = f"{'Dice (%)':<28}" + "".join(f"{short_name(o):>9}" for o in organs) + f"{'Mean':>9}"
        for protocol in self.protocols():
            by_organ = {s.organ: s for s in self.summaries() if s.protocol == protocol}
            lines.append("")
            lines.append(f"[{protocol}]")
            lines.append(heading)
            rows = [("2-D, mean over slices", "dice_2d"), ("3-D, mean over scans", "dice_3d")]
            if protocol in PER_IMAGE_PROTOCOLS:
                rows = [("Dice, mean over images", "dice_2d")]
            for label, key in rows:
                cells = []
                for organ in organs:
                    value = getattr(by_organ[organ], key) if organ in by_organ else math.nan
                    cells.append(f"{_pct(value):>9}")
                lines.append(f"{label:<28}" + "".join(cells) + f"{_pct(self.mean_row(protocol)[key]):>9}")
            if any(s.fp_slices_outside_mean is not None for s in by_organ.values()):
                cells = []
                for organ in organs:
                    value = by_organ[organ].fp_slices_outside_mean if organ in by_organ else None
                    cells.append(f"{'-' if value is None else f'{value:.1f}':>9}")
                lines.append(f"{'FP slices outside (mean)':<28}" + "".join(cells))
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_json(self) -> Dict[str, object]:
        def clean(record):
            return {k: _nan_to_none(v) for k, v in asdict(record).items()}

        summary = [clean(s) for s in self.summaries()]
        means = {p: {k: _nan_to_none(v) for k, v in self.mean_row(p).items()} for p in self.protocols()}
        return {"meta": self.meta, "summary": summary, "mean_over_organs": means,
                "scans": [clean(r) for r in self.scans], "slices": [clean(r) for r in self.slices]}

    def write(self, out_dir: Path) -> Dict[str, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "per_slice": _write_csv(out_dir / "per_slice.csv", SliceRecord, self.slices),
            "per_scan": _write_csv(out_dir / "per_scan.csv", ScanRecord, self.scans),
        }
        summary_rows = [asdict(s) for s in self.summaries()]
        for protocol in self.protocols():
            mean = self.mean_row(protocol)
            summary_rows.append({"protocol": protocol, "organ": "mean", "dice_2d": mean["dice_2d"],
                                 "dice_3d": mean["dice_3d"]})
        paths["summary"] = _write_rows(out_dir / "summary.csv", [f.name for f in fields(OrganSummary)],
                                       summary_rows)
        paths["json"] = out_dir / "results.json"
        paths["json"].write_text(json.dumps(self.to_json(), indent=2, allow_nan=False), encoding="utf-8")
        paths["table"] = out_dir / "table.txt"
        paths["table"].write_text(self.format_table() + "\n", encoding="utf-8")
        return paths


def _pct(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100.0 * value:.2f}"


def _write_csv(path: Path, record_type, records: Sequence) -> Path:
    return _write_rows(path, [f.name for f in fields(record_type)], [asdict(r) for r in records])


def _write_rows(path: Path, columns: Sequence[str], rows: Sequence[Dict[str, object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return value
