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
- ``propagation_latest``: the same table for the latest run on this project's Intel Xeon
  (``--latest``, default ``results/cpu_vitb_64slices_xeon.json``, with the default preset in
  fp32 and bf16 beside the ``paper`` phases);
- ``propagation_epyc``: the same table for the latest run on the AMD EPYC reference benchmark
  machine (``--epyc``, default ``results/cpu_vitb_64slices_epyc.json``);
- ``corrections``: the corrections benchmark (``--corrections``, default
  ``results/cpu_vitb_corrections_64slices.json``): full propagation, one click, an update;
- ``corrections_latest``: the same table for the latest run (``--corrections-latest``, default
  ``results/cpu_vitb_corrections_64slices_fp32_xeon.json``), with the gestures and the precision;
- ``corrections_epyc``: the same for the latest run on the AMD EPYC (``--corrections-epyc``,
  default ``results/cpu_vitb_corrections_64slices_fp32_epyc.json``);
- ``memory``: ``memory_profile.py`` runs (every ``results/cpu_vitb_memory_*.json``, in name
  order): peak resident memory and the step it occurred in, before and after a change;
- ``bf16``: ``bf16_check.py`` (``--bf16``, default ``results/cpu_vitb_bf16_vs_fp32_xeon.json``):
  bf16 autocast against float32, errors on fixed inputs, masks, the interleaved speed ratio;
- ``bf16_epyc``: the same for the latest run on the AMD EPYC (``--bf16-epyc``, default
  ``results/cpu_vitb_bf16_vs_fp32_epyc.json``);
- ``ceiling_epyc``: ``speed_ceiling.py`` on the AMD EPYC (``--ceiling-epyc``, default
  ``results/cpu_vitb_speed_ceiling_epyc.json``): each flow's steps at the fastest they were seen
  to run, counted by the recorded run's calls, and the best-case ratios against issue #23's
  targets;
- ``refiners``: ``refiner_benchmark.py`` in per-slice mode (``--refiners``, default
  ``results/cpu_refiners_64slices_xeon.json``) and, below it, in memory mode
  (``--sam2-memory``, default ``results/cpu_sam2_memory_64slices_xeon.json``): image
  embeddings and decoding (or the memory walk) per refiner, the ratio to SAM ViT-B's per-slice
  refiner phases *of the same run*, peak RSS; and the per-slice run with bf16 encoders
  (``--refiners-bf16``, default ``results/cpu_refiners_64slices_bf16_xeon.json``).

Each caption names the machine that gave the figures (the CPU model the run recorded, or for
older files that recorded none, the machine they were run on: ``MACHINES``).

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
sys.path.insert(0, str(HERE.parent / "ProtoSAMLib"))

from protosam import catalogue  # noqa: E402  (torch-free)

RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "performance.md"
DEFAULT_PROPAGATION = RESULTS / "cpu_vitb_64slices_with_default_preset.json"
DEFAULT_PROPAGATION_LATEST = RESULTS / "cpu_vitb_64slices_xeon.json"
DEFAULT_PROPAGATION_EPYC = RESULTS / "cpu_vitb_64slices_epyc.json"
DEFAULT_CORRECTIONS = RESULTS / "cpu_vitb_corrections_64slices.json"
DEFAULT_CORRECTIONS_LATEST = RESULTS / "cpu_vitb_corrections_64slices_fp32_xeon.json"
DEFAULT_CORRECTIONS_EPYC = RESULTS / "cpu_vitb_corrections_64slices_fp32_epyc.json"
DEFAULT_BF16 = RESULTS / "cpu_vitb_bf16_vs_fp32_xeon.json"
DEFAULT_BF16_EPYC = RESULTS / "cpu_vitb_bf16_vs_fp32_epyc.json"
DEFAULT_CEILING_EPYC = RESULTS / "cpu_vitb_speed_ceiling_epyc.json"
MEMORY_GLOB = "cpu_vitb_memory_*.json"
DEFAULT_REFINERS = RESULTS / "cpu_refiners_64slices_xeon.json"
DEFAULT_SAM2_MEMORY = RESULTS / "cpu_sam2_memory_64slices_xeon.json"
DEFAULT_REFINERS_BF16 = RESULTS / "cpu_refiners_64slices_bf16_xeon.json"

# Files recorded before the benchmarks wrote the CPU model: the machine they ran on.
MACHINES = {
    "cpu_vitb_corrections_64slices.json": "AMD EPYC (the reference benchmark machine)",
    "cpu_vitb_corrections_64slices_under_load.json": "AMD EPYC (the reference benchmark machine)",
    "cpu_vitb_corrections_64slices_xeon.json": "Intel Xeon (this project's shared machine)",
}

PHASE_LABELS = {
    "naive": "reference flow (naive)",
    "ours": "ours, `paper` semantics, fp32",
    "ours_auto_extent": "ours, `default` preset",
    "ours_default_fp32": "ours, `default` preset, fp32",
    "ours_bf16": "ours, `paper` semantics, bf16 autocast",
    "ours_cached_rerun": "ours, `default`, cached re-run",
}


def _row(cells: List[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: List[str], rows: List[List[str]]) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows])


def _machine(report: Dict, source: str = "") -> str:
    m = report.get("machine", {})
    cpu = m.get("cpu_model") or MACHINES.get(Path(source.strip("`")).name) or m.get("cpu", "?")
    parts = [str(cpu), f"{m.get('nproc', m.get('threads', '?'))} cores",
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
        label = PHASE_LABELS.get(name, name)
        if r.get("precision") == "auto" and r.get("resolved_precision"):
            label += f" (`auto` -> {r['resolved_precision']})"
        rows.append([
            label, seconds, f"{r['cpu_seconds']:.0f}", wall_ratio, cpu_ratio,
            f"{steps.get('dinov2', 0):.0f} / {steps.get('sam_embedding', 0):.0f} / {steps.get('refine', 0):.0f}",
            f"{r.get('sam_prompt_sets', 0)}", f"{r['peak_rss_mib'] / 1024:.2f} GiB", masks,
        ])
    header = ["phase", "wall s", "CPU s", "vs reference (wall)", "vs reference (CPU)",
              "DINOv2 / SAM embedding / decoding s", "prompt sets", "peak RSS", "masks"]
    v = report["volume"]
    c = report["config"]
    caption = (f"*{source}: {_machine(report, source)}; {c['dinov2']} + SAM {c['sam']} at {c['input_size']} "
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
    gestures = report.get("gestures", {})  # the benchmark writes them under "gestures"
    for key, label in (("box_s", "box"), ("scribble_s", "scribble"), ("lasso_s", "lasso")):
        if key in gestures:
            rows.append([label, f"{gestures[key] * 1000:.0f} ms", ""])
    if "update_slices_run_again" in report:
        rows[2][2] += f"; {report['update_slices_run_again']} of {report['processed_slices']} slices run again"
    v, m = report["volume"], report["models"]
    # Recorded since the benchmark took --precision; older files ran the preset's auto.
    precision = f", precision {report['precision']['used']}" if "precision" in report else ""
    caption = (f"*{source}: {_machine(report, source)}; {m['dinov2']} + SAM {m['sam']} at {m['input_size']}"
               f"{precision}, {v['source']} {v['slices']} slices, structure {v['structure']}.*")
    return _table(["step", "time", "notes"], rows) + "\n\n" + caption


def memory_table(reports: List[Dict], sources: List[str]) -> str:
    rows, captions = [], []
    for report, source in zip(reports, sources):
        v, steps = report["volume"], report["peak_resident_mib_by_step"]
        encoders = " / ".join(f"{steps.get(k, 0) / 1024:.2f}" for k in ("DINOv2", "SAM embedding", "refine (SAM decoding)"))
        rows.append([source, report.get("label", ""), f"{report['preset']}, {report['precision']}",
                     f"{v['shape'][0]} x {len(v['structures'])}", f"{report['resident_mib_after_loading'] / 1024:.2f} GiB",
                     encoders, f"**{report['peak_resident_mib'] / 1024:.2f} GiB** ({report['peak_step']})",
                     f"{report['ru_maxrss_mib'] / 1024:.2f} GiB"])
        captions.append(f"{source}: {_machine(report, source)}; `{report['command']}`")
    header = ["run", "code", "preset, precision", "slices x structures", "resident after loading",
              "peak during DINOv2 / SAM embedding / decoding", "peak resident (step)", "ru_maxrss"]
    return _table(header, rows) + "\n\n*" + "; ".join(captions) + ".*"


def bf16_table(report: Dict, source: str) -> str:
    errors = report["errors_on_fixed_inputs"]["worst"]
    labels = {"dinov2_features": "DINOv2 features", "sam_embedding": "SAM image embedding",
              "mask_logits": "SAM upsampled mask logits (same prompt sets)"}
    rows = [[labels[k], f"{e['max_abs']:.3g}", f"{e['max_rel_to_largest']:.3g}"] for k, e in errors.items()]
    text = _table(["bf16 against fp32, fixed inputs", "max abs error", "max error / largest fp32 value"], rows)
    masks = report.get("masks")
    if masks:
        mrows = [[name, f"{m['coarse_differing_pixels']} of {m['coarse_pixels_at_S']}", f"{m['coarse_dice']:.4f}",
                  f"{m['final_differing_voxels']} of {m['final_voxels']}", f"{m['final_dice']:.4f}"]
                 for name, m in masks["per_structure"].items()]
        text += "\n\n" + _table(["structure", "coarse pixels differing", "coarse Dice", "final voxels differing",
                                  "final Dice"], mrows)
    speed = report["speed"]
    srows = [[step, f"{speed[step]['bf16_over_fp32_median']:.2f}",
              f"{speed[step]['bf16_over_fp32_min']:.2f} - {speed[step]['bf16_over_fp32_max']:.2f}"]
             for step in ("dinov2", "sam_embedding")]
    if "whole_run_bf16_over_fp32_measured" in speed:
        srows.append(["whole run, measured (one run each, not interleaved)",
                      f"{speed['whole_run_bf16_over_fp32_measured']:.2f}", ""])
        srows.append(["whole run, derived (fp32 run's steps x the medians above)",
                      f"{speed['whole_run_bf16_over_fp32_derived']:.2f}", ""])
    text += "\n\n" + _table(["bf16 time / fp32 time", "median", "range"], srows)
    v, m = report["volume"], report["models"]
    load = speed.get("load_average_before", [0])[0], speed.get("load_average_after", [0])[0]
    shape = lambda volume: f"{volume['source']} {' x '.join(map(str, volume['shape']))}"  # noqa: E731
    masks_volume = f"; masks on {shape(report['masks_volume'])}" if "masks_volume" in report else ""
    text += (f"\n\n*{source}: {_machine(report, source)}, bf16 units {', '.join(report['machine'].get('cpu_bf16_units', [])) or 'none'}; "
             f"{m['dinov2']} + SAM {m['sam']} at {m['input_size']} (random weights), {shape(v)}, "
             f"{len(v['structures'])} structures{masks_volume}; speed: {speed['repeats']} interleaved "
             f"repetitions per encoder, load average {load[0]:.1f} before, {load[1]:.1f} after.*")
    return text


CEILING_LABELS = {"naive": "reference flow", "ours": "ours, `paper`", "ours_auto_extent": "ours, `default`",
                  "ours_default_fp32": "ours, `default`", "ours_bf16": "ours, `paper`"}


def ceiling_table(report: Dict, source: str) -> str:
    ceilings = report["ceilings"]
    precision = dict(report["workers"]["ours"].get("precision", {}), naive="fp32")
    rows = []
    for flow, c in ceilings.items():
        per_call, origin = c["seconds_per_call"], c["seconds_per_call_from"]
        mark = lambda step: "" if origin[step] == "isolated" else " *"  # noqa: E731
        calls = c["calls"]
        rows.append([
            f"{CEILING_LABELS.get(flow, flow)}, {precision.get(flow, '?')}",
            f"{per_call['dinov2']:.2f}{mark('dinov2')} / {per_call['sam_embedding']:.2f}{mark('sam_embedding')} / "
            f"{per_call['decoding_per_prompt_set'] * 1e3:.1f}{mark('decoding_per_prompt_set')}",
            f"{calls['dinov2']:.0f} / {calls['sam_embedding']:.0f} / {calls['decoding_per_prompt_set']:.0f}",
            f"{c['seconds']:,.0f}", f"{c['recorded_seconds']:,.0f}",
            "1x" if flow == "naive" else f"**{c['best_case_ratio']:.2f}x**",
            "" if flow == "naive" else f"{c['best_case_against_recorded_reference']:.2f}x",
            "" if flow == "naive" else f"{c['recorded_ratio']:.2f}x",
            "" if c.get("target") is None else (f"{c['target']:g}x: "
                                                f"{'within' if c['best_case_ratio'] >= c['target'] else 'above'}"),
        ])
    text = _table(["flow, precision", "per call: DINOv2 s / SAM embedding s / decoding ms per set",
                   "calls (DINOv2 / SAM / sets)", "best case s", "recorded s", "best case vs reference's best case",
                   "vs reference as recorded", "recorded run", "issue #23 target"], rows)
    m = report["models"]
    measurements = report.get("measurements", [report])
    commits = ", ".join(f"`{(x['machine'].get('git_commit') or '?')[:7]}`" for x in measurements)
    text += (f"\n\n*{source}: {_machine(report, source)}; {m['dinov2']} + SAM {m['sam']} at {m['input_size']} "
             f"(random weights); {len(measurements)} measurement(s) (commits {commits}), each one untimed round "
             f"and then timed ones, {report['rounds']} timed rounds per step in all, {report['prompt_sets']} prompt "
             f"sets per round; calls of `{Path(report['recorded_run']).name}` (commit `{(report['recorded_commit'] or '?')[:7]}`), "
             f"the reference's extrapolated x{ceilings['naive']['extrapolation']:g} as that run was. * the recorded "
             f"run's mean per call, faster than the fastest round here.*")
    return text


def _refiner_label(name: str) -> str:
    model = catalogue.BY_NAME.get(name)
    return f"{model.label} (`{name}`)" if model and model.label else f"`{name}`"


def _refiner_caption(report: Dict, source: str) -> str:
    m = report["machine"]
    threads = {r.get("torch_threads") for r in report["results"]}
    load = m.get("load_average_at_start", [0])[0], m.get("load_average", [0])[0]
    commit = f", commit `{m['git_commit'][:7]}`" if m.get("git_commit") else ""
    note = f"; {report['note']}" if report.get("note") else ""
    return (f"*{source}: {m.get('cpu_model', '?')}, {m.get('nproc', '?')} cores, torch {m.get('torch', '?')}, "
            f"{'/'.join(str(t) for t in sorted(threads))} threads, load average {load[0]:.1f} at start and "
            f"{load[1]:.1f} at the end{commit}; real architectures, random weights{note}.*")


def _per_slice_rows(results: List[Dict]) -> List[List[str]]:
    base = next((r for r in results if r["refiner"] == catalogue.SAM_VIT_B), None)
    rows = []
    for r in results:
        sets = r["slices"] * r["structures_per_slice"]
        ratio = f"**{r['refiner_seconds'] / base['refiner_seconds']:.2f}**" if base else ""
        cpu_ratio = f"{r['refiner_cpu_seconds'] / base['refiner_cpu_seconds']:.2f}" if base else ""
        rows.append([_refiner_label(r["refiner"]), f"{r['embed_seconds_per_slice']:.2f}",
                     f"{r['decode_seconds_per_prompt_set'] * 1000:.0f} ms",
                     f"{r['embed_seconds']:.0f} + {r['decode_seconds']:.0f} = {r['refiner_seconds']:.0f}",
                     f"{r['slices']} x {r['structures_per_slice']} ({sets} sets)", ratio, cpu_ratio,
                     f"{r['peak_rss_mib'] / 1024:.2f} GiB", f"{r['cache_bytes_per_slice'] / 2**20:.0f} MiB"])
    return rows


def refiner_table(per_slice: Dict, source: str, memory: Optional[Dict] = None, memory_source: str = "",
                  bf16: Optional[Dict] = None, bf16_source: str = "") -> str:
    """Per-slice refiner phases (float32, then bf16 encoders when recorded), then memory
    mode's, each with its ratio to SAM ViT-B's per-slice phases in the same precision; the
    memory-mode ratio divides two runs only when both files say they ran on the same CPU model
    (the captions show each run's load)."""
    results = per_slice["results"]
    base = next((r for r in results if r["refiner"] == catalogue.SAM_VIT_B), None)
    header = ["refiner (per-slice mode, {})", "embedding s / slice", "decoding / prompt set",
              "embedding + decoding s", "slices x prompt sets per slice", "vs SAM ViT-B (wall)",
              "vs SAM ViT-B (CPU)", "peak RSS", "cache per slice"]
    text = _table([header[0].format("float32")] + header[1:], _per_slice_rows(results))
    text += "\n\n" + _refiner_caption(per_slice, source)
    if bf16:
        text += "\n\n" + _table([header[0].format("bf16 encoders")] + header[1:], _per_slice_rows(bf16["results"]))
        text += "\n\n" + _refiner_caption(bf16, bf16_source)
    if memory:
        same_machine = memory["machine"].get("cpu_model") == per_slice["machine"].get("cpu_model")
        mrows = []
        for r in memory["results"]:
            held = r["held"][str(r["slices"])]
            frames = held["frames"]
            ratio = (f"{r['refiner_seconds'] / base['refiner_seconds']:.2f}"
                     if base and same_machine and base["slices"] == r["slices"] else "")
            per_slice_same = next((p for p in results if p["refiner"] == r["refiner"] and p["slices"] == r["slices"]), None)
            vs_own = f"{r['refiner_seconds'] / per_slice_same['refiner_seconds']:.2f}" if per_slice_same and same_machine else ""
            mrows.append([_refiner_label(r["refiner"]), f"{r['embed_seconds'] / r['slices']:.2f}",
                          f"{r['walk_seconds_per_slice_and_structure']:.2f}",
                          f"{r['embed_seconds']:.0f} + {r['walk_seconds']:.0f} = {r['refiner_seconds']:.0f}",
                          f"{r['slices']} x {r['structures']}", ratio, vs_own,
                          f"{frames['conditioning']} + {frames['tracked']} frames, {held['state_mib']:.0f} MiB",
                          f"{r['peak_rss_mib'] / 1024:.2f} GiB"])
        text += "\n\n" + _table(["refiner (memory mode)", "embedding s / slice", "walk s / (slice, structure)",
                                  "embedding + walk s", "slices x structures", "vs SAM ViT-B per-slice (wall)",
                                  "vs its own per-slice mode", "state held at the end", "peak RSS"], mrows)
        text += "\n\n" + _refiner_caption(memory, memory_source)
    return text


def _rel(path: Path) -> str:
    return str(path.resolve().relative_to(HERE.parent)) if path.resolve().is_relative_to(HERE.parent) else str(path)


def render(propagation: Path, corrections: Path, bf16: Path = DEFAULT_BF16, results: Path = RESULTS,
           refiners: Path = DEFAULT_REFINERS, sam2_memory: Path = DEFAULT_SAM2_MEMORY,
           latest: Path = DEFAULT_PROPAGATION_LATEST, refiners_bf16: Path = DEFAULT_REFINERS_BF16,
           corrections_latest: Path = DEFAULT_CORRECTIONS_LATEST, epyc: Path = DEFAULT_PROPAGATION_EPYC,
           corrections_epyc: Path = DEFAULT_CORRECTIONS_EPYC, bf16_epyc: Path = DEFAULT_BF16_EPYC,
           ceiling_epyc: Path = DEFAULT_CEILING_EPYC) -> Dict[str, str]:
    tables = {
        "propagation": propagation_table(json.loads(propagation.read_text()), f"`{_rel(propagation)}`"),
        "corrections": corrections_table(json.loads(corrections.read_text()), f"`{_rel(corrections)}`"),
    }
    if latest.exists():
        tables["propagation_latest"] = propagation_table(json.loads(latest.read_text()), f"`{_rel(latest)}`")
    if corrections_latest.exists():
        tables["corrections_latest"] = corrections_table(json.loads(corrections_latest.read_text()),
                                                         f"`{_rel(corrections_latest)}`")
    if epyc.exists():
        tables["propagation_epyc"] = propagation_table(json.loads(epyc.read_text()), f"`{_rel(epyc)}`")
    if corrections_epyc.exists():
        tables["corrections_epyc"] = corrections_table(json.loads(corrections_epyc.read_text()),
                                                       f"`{_rel(corrections_epyc)}`")
    memory = sorted(results.glob(MEMORY_GLOB))
    if memory:
        tables["memory"] = memory_table([json.loads(p.read_text()) for p in memory], [f"`{_rel(p)}`" for p in memory])
    if bf16.exists():
        tables["bf16"] = bf16_table(json.loads(bf16.read_text()), f"`{_rel(bf16)}`")
    if bf16_epyc.exists():
        tables["bf16_epyc"] = bf16_table(json.loads(bf16_epyc.read_text()), f"`{_rel(bf16_epyc)}`")
    if ceiling_epyc.exists():
        tables["ceiling_epyc"] = ceiling_table(json.loads(ceiling_epyc.read_text()), f"`{_rel(ceiling_epyc)}`")
    if refiners.exists():
        memory_report = json.loads(sam2_memory.read_text()) if sam2_memory.exists() else None
        bf16_report = json.loads(refiners_bf16.read_text()) if refiners_bf16.exists() else None
        tables["refiners"] = refiner_table(json.loads(refiners.read_text()), f"`{_rel(refiners)}`",
                                           memory_report, f"`{_rel(sam2_memory)}`", bf16_report, f"`{_rel(refiners_bf16)}`")
    return tables


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
    p.add_argument("--latest", type=Path, default=DEFAULT_PROPAGATION_LATEST,
                   help="propagation benchmark JSON of the latest run (a second table)")
    p.add_argument("--epyc", type=Path, default=DEFAULT_PROPAGATION_EPYC,
                   help="propagation benchmark JSON of the latest run on the AMD EPYC (a third table)")
    p.add_argument("--corrections", type=Path, default=DEFAULT_CORRECTIONS, help="corrections benchmark JSON")
    p.add_argument("--corrections-epyc", type=Path, default=DEFAULT_CORRECTIONS_EPYC,
                   help="corrections benchmark JSON of the latest run on the AMD EPYC (a third table)")
    p.add_argument("--corrections-latest", type=Path, default=DEFAULT_CORRECTIONS_LATEST,
                   help="corrections benchmark JSON of the latest run (a second table)")
    p.add_argument("--bf16", type=Path, default=DEFAULT_BF16, help="bf16_check.py JSON")
    p.add_argument("--bf16-epyc", type=Path, default=DEFAULT_BF16_EPYC,
                   help="bf16_check.py JSON of the latest run on the AMD EPYC (table bf16_epyc)")
    p.add_argument("--ceiling-epyc", type=Path, default=DEFAULT_CEILING_EPYC,
                   help="speed_ceiling.py JSON of the AMD EPYC (table ceiling_epyc)")
    p.add_argument("--refiners", type=Path, default=DEFAULT_REFINERS, help="refiner_benchmark.py JSON, per-slice mode")
    p.add_argument("--refiners-bf16", type=Path, default=DEFAULT_REFINERS_BF16,
                   help="refiner_benchmark.py JSON, per-slice mode with --precision bf16")
    p.add_argument("--sam2-memory", type=Path, default=DEFAULT_SAM2_MEMORY,
                   help="refiner_benchmark.py JSON, memory mode")
    p.add_argument("--page", type=Path, default=PAGE)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the tables in the page")
    mode.add_argument("--check", action="store_true", help="exit 1 when the page's tables are out of date")
    args = p.parse_args(argv)
    tables = render(args.results, args.corrections, args.bf16, refiners=args.refiners, sam2_memory=args.sam2_memory,
                    latest=args.latest, refiners_bf16=args.refiners_bf16, corrections_latest=args.corrections_latest,
                    epyc=args.epyc, corrections_epyc=args.corrections_epyc, bf16_epyc=args.bf16_epyc,
                    ceiling_epyc=args.ceiling_epyc)
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
