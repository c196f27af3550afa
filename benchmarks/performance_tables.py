"""Render docs/performance.md's benchmark tables from the JSON files in benchmarks/results/.

Each table sits in docs/performance.md between ``<!-- table:NAME -->`` and
``<!-- /table:NAME -->``; this script writes everything between the two markers, so the
figures quoted there are the recorded ones and nothing is typed by hand::

    python benchmarks/performance_tables.py            # print the tables
    python benchmarks/performance_tables.py --write    # rewrite them in docs/performance.md
    python benchmarks/performance_tables.py --check    # exit 1 if the page is out of date

Tables (``name``: source):

- ``propagation``: every phase of one propagation-benchmark run (``--results``, default
  ``results/cpu_vitb_64slices_with_default_preset.json``): wall and CPU seconds, the ratio to
  the reference ("naive") flow of the *same run* by wall and by CPU time, the encoder and
  decoding seconds, prompt sets, peak RSS and the mask comparison;
- ``corrections``: the corrections benchmark (``--corrections``, default
  ``results/cpu_vitb_corrections_64slices.json``): full propagation, one click, an update.

Only ratios inside one file are computed: times from different runs or machines are never
divided by each other.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "performance.md"
DEFAULT_PROPAGATION = RESULTS / "cpu_vitb_64slices_with_default_preset.json"
DEFAULT_CORRECTIONS = RESULTS / "cpu_vitb_corrections_64slices.json"

PHASE_LABELS = {
    "naive": "reference flow (naive)",
    "ours": "ours, `paper` semantics, fp32",
    "ours_auto_extent": "ours, `default` preset",
    "ours_bf16": "ours, `paper` semantics, bf16 autocast",
    "ours_cached_rerun": "ours, `default`, cached re-run",
}


def _row(cells: List[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: List[str], rows: List[List[str]]) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows])


def _machine(report: Dict) -> str:
    m = report.get("machine", {})
    parts = [str(m.get("cpu_model", m.get("cpu", "?"))), f"{m.get('nproc', m.get('threads', '?'))} cores",
             f"torch {m.get('torch', '?')}", f"{m.get('torch_threads', m.get('threads', '?'))} threads"]
    load = m.get("load_average_at_start") or m.get("load_average_start")
    if load:
        parts.append(f"load average at start {load[0]:.1f}")
    commit = m.get("git_commit")
    if commit:
        parts.append(f"commit `{commit[:7]}`")
    return ", ".join(parts)


def propagation_table(report: Dict, source: str) -> str:
    phases, summary = report["phases"], report.get("summary", {})
    naive = phases.get("naive")
    rows = []
    for name, r in phases.items():
        steps = r.get("step_seconds", {})
        if name == "naive":
            seconds = f"{r['seconds']:.0f}"
            if r.get("extrapolated"):
                seconds += f" (first {r['slices']} slices) -> {r['full_volume_seconds']:.0f} extrapolated"
            wall_ratio = cpu_ratio = "1x"
        else:
            seconds = f"{r['seconds']:.0f}"
            wall_ratio = f"**{summary[f'speedup_{name}']:.2f}x**" if naive else ""
            cpu_ratio = f"{summary[f'cpu_time_ratio_{name}']:.2f}x" if naive else ""
        masks = ""
        if name == "ours" and "identity" in report:
            masks = f"{report['identity']['differing_voxels']} of {report['identity']['voxels_compared']} voxels differ from naive"
        if name == "ours_bf16" and "bf16_vs_fp32" in report:
            cmp = report["bf16_vs_fp32"]
            dice = min(d["dice"] for d in cmp["per_structure"].values())
            masks = f"{cmp['differing_voxels']} voxels differ from fp32, Dice >= {dice:.4f}"
        rows.append([
            PHASE_LABELS.get(name, name), seconds, f"{r['cpu_seconds']:.0f}", wall_ratio, cpu_ratio,
            f"{steps.get('dinov2', 0):.0f} / {steps.get('sam_embedding', 0):.0f} / {steps.get('refine', 0):.0f}",
            f"{r.get('sam_prompt_sets', 0)}", f"{r['peak_rss_mib'] / 1024:.2f} GiB", masks,
        ])
    header = ["phase", "wall s", "CPU s", "vs reference (wall)", "vs reference (CPU)",
              "DINOv2 / SAM embedding / decoding s", "prompt sets", "peak RSS", "masks"]
    v = report["volume"]
    c = report["config"]
    caption = (f"*{source}: {_machine(report)}; {c['dinov2']} + SAM {c['sam']} at {c['input_size']} "
               f"(random weights), {v['source']} {' x '.join(map(str, v['shape']))}, {len(v['structures'])} structures; "
               f"ratios within this one run.*")
    return _table(header, rows) + "\n\n" + caption


def corrections_table(report: Dict, source: str) -> str:
    rows = [
        ["full propagation (`start`)", f"{report['full_propagation_s']:.1f} s", ""],
        [f"one click (slice {report['click_slice']})", f"{report['click_s'] * 1000:.0f} ms", ""],
        [f"update after painting slice {report['added_support_slice']}", f"{report['update_s']:.1f} s",
         f"{report['update_speedup']:.1f}x faster than the full propagation"],
    ]
    for key, label in (("box_s", "box"), ("scribble_s", "scribble"), ("lasso_s", "lasso")):
        if key in report:
            rows.append([label, f"{report[key] * 1000:.0f} ms", ""])
    if "update_slices_run_again" in report:
        rows[2][2] += f"; {report['update_slices_run_again']} of {report['processed_slices']} slices run again"
    v, m = report["volume"], report["models"]
    caption = (f"*{source}: {_machine(report)}; {m['dinov2']} + SAM {m['sam']} at {m['input_size']}, "
               f"{v['source']} {v['slices']} slices, structure {v['structure']}.*")
    return _table(["step", "time", "notes"], rows) + "\n\n" + caption


def render(propagation: Path, corrections: Path) -> Dict[str, str]:
    rel = lambda p: str(p.resolve().relative_to(HERE.parent)) if p.resolve().is_relative_to(HERE.parent) else str(p)  # noqa: E731
    return {
        "propagation": propagation_table(json.loads(propagation.read_text()), f"`{rel(propagation)}`"),
        "corrections": corrections_table(json.loads(corrections.read_text()), f"`{rel(corrections)}`"),
    }


def replace_tables(page: str, tables: Dict[str, str]) -> str:
    for name, text in tables.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(page):
            raise SystemExit(f"docs/performance.md has no <!-- table:{name} --> ... <!-- /table:{name} --> markers")
        page = pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), page)
    return page


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=DEFAULT_PROPAGATION, help="propagation benchmark JSON")
    p.add_argument("--corrections", type=Path, default=DEFAULT_CORRECTIONS, help="corrections benchmark JSON")
    p.add_argument("--page", type=Path, default=PAGE)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the tables in the page")
    mode.add_argument("--check", action="store_true", help="exit 1 when the page's tables are out of date")
    args = p.parse_args(argv)
    tables = render(args.results, args.corrections)
    if not (args.write or args.check):
        for name, text in tables.items():
            print(f"<!-- table:{name} -->\n{text}\n<!-- /table:{name} -->\n")
        return 0
    page = args.page.read_text()
    updated = replace_tables(page, tables)
    if args.check:
        if updated != page:
            print(f"{args.page} is out of date: run python benchmarks/performance_tables.py --write")
            return 1
        return 0
    args.page.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
