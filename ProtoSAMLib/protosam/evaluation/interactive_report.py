"""Files of an interactive evaluation: CSV and JSON results, curves (PNG) and a one-file HTML
report with the curves embedded.

Curves: DSC and NSD against the interaction step (0 = box or mask, 1..5 = clicks), one line
per class, one figure per track and modality (means over the cases holding the class); for the
cohort track also DSC against the volume index (before the clicks: what the examples alone
give; and after the five clicks).
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .interactive import CaseSummary, ClassSummary, InteractiveResults, StepRecord, results_to_json

RESULT_FILES = ("per_step.csv", "per_class.csv", "per_case.csv", "results.json", "report.html")


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    if isinstance(value, list):
        return " ".join(str(_csv_value(v)) for v in value)
    return value


def _write_csv(path: Path, record_type, records: Sequence) -> Path:
    columns = [f.name for f in fields(record_type)]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: _csv_value(v) for k, v in asdict(record).items()})
    return path


def _mean_curves(steps: Sequence[StepRecord], metric: str) -> Dict[str, Dict[int, float]]:
    """{class name: {step: mean over cases}}."""
    values: Dict[str, Dict[int, List[float]]] = {}
    for row in steps:
        value = getattr(row, metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        values.setdefault(row.class_name, {}).setdefault(row.step, []).append(float(value))
    return {name: {step: float(np.mean(v)) for step, v in by_step.items()} for name, by_step in values.items()}


def _figure(width=9.0, height=3.6, columns=2):
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, columns, i + 1) for i in range(columns)]


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def write_step_curves(path: Path, steps: Sequence[StepRecord], *, title: str) -> Path:
    """DSC (left) and NSD (right) against the interaction step, one line per class."""
    figure, axes = _figure()
    for axis, metric, label in ((axes[0], "dsc", "DSC"), (axes[1], "nsd", "NSD (2 mm)")):
        for index, (name, curve) in enumerate(sorted(_mean_curves(steps, metric).items())):
            xs = sorted(curve)
            axis.plot(xs, [curve[x] for x in xs], marker="o", markersize=4, color=f"C{index % 10}", label=name)
        axis.set_ylim(-0.02, 1.02)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("interaction step (0 = box or mask, 1..5 = clicks)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    return _save(figure, Path(path))


def write_cohort_curve(path: Path, steps: Sequence[StepRecord], *, title: str) -> Path:
    """Cohort track: DSC against the volume index, before the clicks and after the last."""
    figure, axes = _figure()
    last_step = max(r.step for r in steps)
    for axis, step, label in ((axes[0], 0, "DSC before clicks (examples only)"),
                              (axes[1], last_step, f"DSC after {last_step} clicks")):
        by_class: Dict[str, Dict[int, List[float]]] = {}
        for row in steps:
            if row.step == step:
                by_class.setdefault(row.class_name, {}).setdefault(row.volume_index, []).append(row.dsc)
        for index, (name, curve) in enumerate(sorted(by_class.items())):
            xs = sorted(curve)
            axis.plot(xs, [float(np.mean(curve[x])) for x in xs], marker="o", markersize=4,
                      color=f"C{index % 10}", label=name)
        axis.set_ylim(-0.02, 1.02)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("volume index (0 = the volume with the one starting example)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    return _save(figure, Path(path))


def _png_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _number(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_number(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_interactive_results(results: InteractiveResults, out_dir: Path, *, title: str = "ProtoSAM interactive evaluation",
                              notice: Optional[str] = None) -> Dict[str, Path]:
    """Write per_step.csv, per_class.csv, per_case.csv, results.json, pictures/*.png and
    report.html (self-contained) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "per_step": _write_csv(out_dir / "per_step.csv", StepRecord, results.steps),
        "per_class": _write_csv(out_dir / "per_class.csv", ClassSummary, results.classes),
        "per_case": _write_csv(out_dir / "per_case.csv", CaseSummary, results.cases),
    }
    paths["json"] = out_dir / "results.json"
    paths["json"].write_text(json.dumps(results_to_json(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")

    sections: List[str] = []
    pictures: List[Path] = []
    tracks = list(dict.fromkeys(r.track for r in results.steps))
    for track in tracks:
        rows = [r for r in results.steps if r.track == track]
        sections.append(f"<h2>Track {html.escape(track)}</h2>")
        for modality in sorted({r.modality for r in rows}):
            picked = [r for r in rows if r.modality == modality]
            cases = len({r.case for r in picked})
            picture = write_step_curves(out_dir / "pictures" / f"{track}_{modality}_steps.png", picked,
                                        title=f"{track}, modality {modality}: mean over {cases} case(s)")
            pictures.append(picture)
            sections.append(f"<h3>{html.escape(modality)}: DSC and NSD against the interaction step</h3>"
                            + _png_tag(picture, f"{track} {modality} curves"))
        if track == "cohort":
            picture = write_cohort_curve(out_dir / "pictures" / "cohort_volumes.png", rows,
                                         title="cohort: DSC against the volume index")
            pictures.append(picture)
            sections.append("<h3>Cohort: DSC against the volume index</h3>" + _png_tag(picture, "cohort curve"))
        case_rows = [asdict(c) for c in results.cases if c.track == track]
        for row in case_rows:
            row["dsc per step"] = " ".join(f"{v:.3f}" for v in row["dsc"])
            row["nsd per step"] = " ".join(f"{v:.3f}" for v in row["nsd"])
            row["seconds per step"] = " ".join(f"{v:.2f}" for v in row["seconds_per_step"])
        sections.append("<h3>Cases (the challenge's rows)</h3>" + _table(case_rows, [
            "volume_index", "case", "modality", "classes", "dsc_auc", "nsd_auc", "dsc_final", "nsd_final",
            "dsc per step", "nsd per step", "seconds per step", "seconds_total", "budget_seconds", "within_budget"]))
        sections.append("<h3>Classes</h3>" + _table([asdict(c) for c in results.classes if c.track == track], [
            "volume_index", "case", "class_name", "dsc_initial", "dsc_auc", "nsd_auc", "dsc_final", "nsd_final",
            "seconds_total"]))
    meta = html.escape(json.dumps(results.meta, indent=1, default=str))
    body = "\n".join(sections)
    notice_html = f'<p class="notice">{html.escape(notice)}</p>' if notice else ""
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #bbb;padding:2px 6px}} img{{max-width:100%}} .notice{{background:#fff3cd;padding:8px}}</style>
</head><body><h1>{html.escape(title)}</h1>{notice_html}
<p>Protocol of the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation":
step 0 is the box (cvpr25) or the ground-truth mask of the median slice (one-shot; cohort: the examples);
steps 1..5 are clicks at the innermost voxel of the largest 26-connected error. DSC; NSD at 2 mm (0 when the
DSC is at most 0.2); AUC: trapezoids over the five click steps (largest value 4); budget: 90 s per class.</p>
{body}
<h2>Run</h2><pre>{meta}</pre></body></html>
""", encoding="utf-8")
    paths["pictures"] = pictures
    return paths
