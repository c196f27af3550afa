"""Best-case ratios: what each flow of a recorded propagation benchmark run would reach against
the reference flow if every step ran as fast as it has been seen to run on this machine.

Why: a whole run's ratios move by 10-20 % between runs on the same machine (clock, heap state,
other tenants), and a target such as issue #23's 10x, 12x or 15x can be missed by noise or be
out of reach of the kernels themselves. This tells the two apart. Side by side in one
invocation, each step of each flow is timed on its own, warm, several times, with the flow's
own kernels, precision and heap settings (the reference flow in its own process with glibc's
heap thresholds and the reference's kernels, as the benchmark runs it; ours in another, all
its engines there, the rounds interleaved):

- a DINOv2 pass over one slice (``Engine.encode``);
- a SAM image embedding (``Engine.sam_embedding``);
- the decoding of one prompt set, as the flow decodes: the reference through
  segment-anything's ``SamPredictor.predict`` (three masks upsampled, index 0 kept), ours
  through ``SamRefiner.decode`` one set per call (``SharedImageDecoder``) as
  ``Engine.refine`` calls it on a CPU. The sets are the ``paper`` preset's own, from the volume's
  slice next to a structure's support slice; a round decodes all of them on a fresh copy of
  the embedding, so the decoder's per-embedding terms are counted.

Each step at the fastest it was seen to take (its fastest round here, or its mean per call in
the recorded run where that was faster), times the calls the recorded run made (its JSON's
``step_calls`` and ``sam_prompt_sets``; the reference's extrapolated to the volume as the run
was), gives a flow's **best-case time**. Everything between those steps (prompt extraction, resizing,
Python) is left out of both flows. The ratio of two best cases is what those kernels reach
when nothing else costs anything: a target above it is out of their reach, not a matter of
noise. Also printed: ours' best case against the reference's recorded time (the reference as
slow as it ran), the most favourable figure for ours::

    python benchmarks/speed_ceiling.py --results benchmarks/results/cpu_vitb_64slices_epyc.json \\
        --out benchmarks/results/cpu_vitb_speed_ceiling_epyc.json

A tiny run of the propagation benchmark (``--dinov2 dinov2_tiny14 --sam sam_tiny``, see its
README) as ``--results`` checks that this works, in seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from benchmark_phases import _engine, _engine_keeping_glibc_heap  # noqa: E402
from naive_flow import _reference_kernels  # noqa: E402
from propagation_benchmark import machine_info, write_checkpoints, write_volume  # noqa: E402

logger = logging.getLogger("speed_ceiling")

OURS_PHASES = ("ours", "ours_auto_extent", "ours_default_fp32", "ours_bf16")
STEPS = ("dinov2", "sam_embedding", "decoding_per_prompt_set")
# Issue #23's targets against the reference flow, by phase of the propagation benchmark.
TARGETS = {"ours": 10.0, "ours_default_fp32": 12.0, "ours_auto_extent": 15.0, "ours_bf16": 15.0}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", type=Path, required=False,
                   default=HERE.parent / "results" / "cpu_vitb_64slices_epyc.json",
                   help="propagation benchmark JSON whose calls are counted (its models and sizes are used)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per step (after one untimed round)")
    p.add_argument("--prompt-sets", type=int, default=16, help="most prompt sets decoded per round")
    p.add_argument("--work-dir", default=None, help="folder for checkpoints and data (kept, reused)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--steps-from", type=Path, nargs="+", default=None,
                   help="earlier outputs of this script on this machine: count their measured steps again, "
                        "every file's rounds together (nothing is timed)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.prompt_sets < 1:
        p.error("--rounds and --prompt-sets must be at least 1")
    return args


def _prompt_sets(engine, volume: np.ndarray, masks: Dict[str, np.ndarray], support: Dict[str, int], most: int,
                 decode=None) -> list:
    """The ``paper`` preset's prompt sets on the slice next to each structure's support slice
    (towards the middle of the volume), in structure order, at most ``most``."""
    prompts = []
    for name, index in support.items():
        query = index + 1 if index + 1 < len(volume) else index - 1
        features = engine.encode(engine.to_model_input(volume[[index, query]]))
        prototypes = engine.prototypes_from_features(features[0], masks[name][index] > 0)
        logits = engine.coarse_logits(prototypes, features[1:])[0]
        image = engine.to_model_input(volume[query:query + 1])[0]
        refined = engine.refine(logits, lambda: engine.sam_embedding(image), decode=decode)
        prompts.extend(refined.prompts)
        if len(prompts) >= most:
            break
    if not prompts:
        raise RuntimeError("no prompt sets: every coarse mask near the support slices was empty")
    return prompts[:most]


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _decode_all(decode_one, embedding: torch.Tensor, prompts: list) -> float:
    """Seconds per prompt set for decoding every set once, on a fresh copy of ``embedding``
    (the decoder's per-embedding terms are then computed again, as for a new slice)."""
    fresh = embedding.clone()
    started = time.perf_counter()
    for prompt in prompts:
        decode_one(fresh, prompt)
    return (time.perf_counter() - started) / len(prompts)


def _our_decoder(engine):
    preset = engine.preset

    def decode_one(embedding, prompt):
        # As Engine.refine decodes on a CPU: one prompt set per call.
        engine.refiner.decode(embedding, [prompt], multimask_output=preset.effective_multimask,
                              pick_best_score=preset.pick_best_score,
                              batch_prompts=preset.batch_prompts and engine.device.type != "cpu")

    return decode_one


def measure_worker(spec: Dict) -> Dict:
    """Time the steps of ``spec["flows"]`` (``naive``, or ours' phases) in this process."""
    data = np.load(spec["data"])
    volume = data["volume"]
    names = spec["structures"]
    masks = {name: data[f"mask_{i}"] for i, name in enumerate(names)}
    support = {name: int(spec["support_slices"][name]) for name in names}
    flows = spec["flows"]
    image_index = int(spec["image_slice"])
    result: Dict = {"flows": {}, "load_average_before": list(os.getloadavg())}
    if flows == ["naive"]:
        engine = _engine_keeping_glibc_heap(spec, "naive")
        with _reference_kernels(engine) as predictor_decode:
            prompts = _prompt_sets(engine, volume, masks, support, spec["prompt_sets"], decode=predictor_decode)
            plans = {"naive": (engine, lambda embedding, prompt: predictor_decode(embedding, [prompt]))}
            result["flows"] = _rounds(plans, volume, image_index, prompts, spec["rounds"])
        result["heap_blocks_reused"] = {"naive": engine.heap_blocks_reused}
    else:
        engines = {phase: _engine(spec, phase) for phase in flows}
        prompts = _prompt_sets(engines[flows[0]], volume, masks, support, spec["prompt_sets"])
        plans = {phase: (engine, _our_decoder(engine)) for phase, engine in engines.items()}
        result["flows"] = _rounds(plans, volume, image_index, prompts, spec["rounds"])
        result["heap_blocks_reused"] = {phase: engine.heap_blocks_reused for phase, engine in engines.items()}
        result["precision"] = {phase: engine.precision for phase, engine in engines.items()}
    result["prompt_sets"] = len(prompts)
    result["load_average_after"] = list(os.getloadavg())
    return result


def _rounds(plans: Dict, volume: np.ndarray, image_index: int, prompts: list, rounds: int) -> Dict:
    """One untimed round, then ``rounds`` timed ones; the flows' order turns every round."""
    times = {flow: {step: [] for step in STEPS} for flow in plans}
    inputs = {flow: engine.to_model_input(volume[image_index:image_index + 1]) for flow, (engine, _) in plans.items()}
    order = list(plans)
    for number in range(rounds + 1):
        for flow in order:
            engine, decode_one = plans[flow]
            images = inputs[flow]
            seconds = {"dinov2": _timed(lambda: engine.encode(images))}
            started = time.perf_counter()
            embedding = engine.sam_embedding(images[0])
            seconds["sam_embedding"] = time.perf_counter() - started
            seconds["decoding_per_prompt_set"] = _decode_all(decode_one, embedding, prompts)
            if number:
                for step, value in seconds.items():
                    times[flow][step].append(value)
            logger.info("%s round %d: %s", flow, number, {k: round(v, 4) for k, v in seconds.items()})
        order = order[1:] + order[:1]
    return {flow: {step: {"rounds_seconds": values, "best_seconds": min(values),
                          "median_seconds": statistics.median(values)} for step, values in steps.items()}
            for flow, steps in times.items()}


def recorded_per_call(run: Dict) -> Dict[str, float]:
    """A run's own mean seconds per call of each step (its decoding per prompt set includes the
    rest of its refine step: prompt extraction, resizing)."""
    seconds, calls = run["step_seconds"], run["step_calls"]
    per_call = {step: seconds[step] / calls[step] for step in ("dinov2", "sam_embedding") if calls.get(step)}
    if run.get("sam_prompt_sets"):
        per_call["decoding_per_prompt_set"] = seconds["refine"] / run["sam_prompt_sets"]
    return per_call


def best_case(steps: Dict, run: Dict, scale: float = 1.0) -> Dict:
    """A flow's best-case seconds for the calls ``run`` made (times ``scale``), by step: each step
    at the fastest it was seen to take, its fastest isolated round here or its mean per call in
    the recorded run (glibc's heap, for one, speeds the reference's SAM encoding up over a run's
    first calls: fewer isolated rounds than a run's calls may not reach that)."""
    calls = run["step_calls"]
    counts = {"dinov2": calls.get("dinov2", 0), "sam_embedding": calls.get("sam_embedding", 0),
              "decoding_per_prompt_set": run["sam_prompt_sets"]}
    in_run = recorded_per_call(run)
    per_call, source = {}, {}
    for step in STEPS:
        isolated = steps[step]["best_seconds"]
        recorded = in_run.get(step, float("inf"))
        per_call[step], source[step] = (isolated, "isolated") if isolated <= recorded else (recorded, "recorded run")
    seconds = {step: scale * counts[step] * per_call[step] for step in STEPS}
    return {"calls": {step: scale * count for step, count in counts.items()}, "seconds_per_call": per_call,
            "seconds_per_call_from": source, "seconds_by_step": seconds, "seconds": sum(seconds.values())}


def ceilings(recorded: Dict, measured: Dict) -> Dict:
    """Best-case seconds of every flow measured and the ratios they give."""
    phases = recorded["phases"]
    naive = phases["naive"]
    scale = recorded["summary"]["naive_seconds"] / naive["seconds"]
    reference = best_case(measured["naive"], naive, scale)
    out: Dict = {"naive": dict(reference, recorded_seconds=recorded["summary"]["naive_seconds"], extrapolation=scale)}
    for phase in OURS_PHASES:
        if phase not in measured or phase not in phases:
            continue
        ours = best_case(measured[phase], phases[phase])
        out[phase] = dict(
            ours, recorded_seconds=phases[phase]["seconds"],
            recorded_ratio=recorded["summary"][f"speedup_{phase}"],
            best_case_ratio=reference["seconds"] / ours["seconds"],
            best_case_against_recorded_reference=recorded["summary"]["naive_seconds"] / ours["seconds"],
            target=TARGETS.get(phase),
        )
    return out


def _run_worker(spec: Dict, work: Path, name: str) -> Dict:
    """Run :func:`measure_worker` on ``spec`` in a fresh process (its own heap settings)."""
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec_path.write_text(json.dumps(dict(spec, result_out=str(out_path))))
    subprocess.run([sys.executable, str(HERE), "--worker", str(spec_path)], check=True)
    return json.loads(out_path.read_text())


def print_report(report: Dict) -> None:
    print(f"Best cases from {report['recorded_run']} (recorded at {report['recorded_commit']}), measured on "
          f"{report['machine']['cpu_model']} ({report['machine']['nproc']} cores), {report['rounds']} rounds, "
          f"{report['prompt_sets']} prompt sets")
    c = report["ceilings"]
    for flow, steps in report["steps"].items():
        text = ", ".join(f"{step} {values['best_seconds'] * (1e3 if step.startswith('decoding') else 1):.3g}"
                         f"{' ms' if step.startswith('decoding') else ' s'}" for step, values in steps.items())
        faster_in_run = [step for step, source in c.get(flow, {}).get("seconds_per_call_from", {}).items()
                         if source == "recorded run"]
        note = f" (the recorded run's mean was faster for {', '.join(faster_in_run)}: used)" if faster_in_run else ""
        print(f"  {flow}: fastest round {text}{note}")
    naive = c["naive"]
    print(f"  reference flow: best case {naive['seconds']:.4g} s (recorded {naive['recorded_seconds']:.4g} s)")
    for phase in OURS_PHASES:
        if phase in c:
            r = c[phase]
            where = "within" if r["target"] is not None and r["best_case_ratio"] >= r["target"] else "ABOVE"
            verdict = "" if r["target"] is None else f"; target {r['target']:g}x {where} the best case"
            print(f"  {phase}: best case {r['seconds']:.4g} s (recorded {r['recorded_seconds']:.4g} s): "
                  f"{r['best_case_ratio']:.2f}x against the reference's best case, "
                  f"{r['best_case_against_recorded_reference']:.2f}x against its recorded time "
                  f"(recorded run {r['recorded_ratio']:.2f}x){verdict}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result_out"]).write_text(json.dumps(measure_worker(spec), indent=1))
        return 0
    recorded = json.loads(args.results.read_text())
    config = recorded["config"]
    if "naive" not in recorded["phases"]:
        raise SystemExit(f"{args.results} has no reference flow (naive) phase to compare with")
    flows = [phase for phase in OURS_PHASES if phase in recorded["phases"]]
    if args.steps_from:
        return _finish(merge_measurements([json.loads(path.read_text()) for path in args.steps_from]), recorded, args)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="protosam_ceiling_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        checkpoints = write_checkpoints(work / "checkpoints", config["dinov2"], config["sam"])
        shape = recorded["volume"]["shape"]
        data, _, support = write_volume(work / "data.npz", recorded["volume"]["source"], shape[0], shape[1],
                                        len(recorded["volume"]["structures"]))
        names = list(data.masks)
        spec = {"models": {"dinov2": config["dinov2"], "dinov2_checkpoint": checkpoints[config["dinov2"]],
                           "sam": config["sam"], "sam_checkpoint": checkpoints[config["sam"]],
                           "input_size": config["input_size"]},
                "device": "cpu", "data": str(work / "data.npz"), "structures": names, "support_slices": support,
                "image_slice": support[names[0]], "batch_size": None, "rounds": args.rounds,
                "prompt_sets": args.prompt_sets}
        logger.info("Reference flow's steps (own process, glibc's heap thresholds)")
        reference = _run_worker(dict(spec, flows=["naive"]), work, "naive")
        logger.info("Our flows' steps: %s", ", ".join(flows))
        ours = _run_worker(dict(spec, flows=flows), work, "ours")
        report = {
            "models": {k: config[k] for k in ("dinov2", "sam", "input_size")},
            "machine": machine_info(torch.device("cpu")), "rounds": args.rounds,
            "prompt_sets": min(reference["prompt_sets"], ours["prompt_sets"]),
            "workers": {name: {k: v for k, v in worker.items() if k != "flows"}
                        for name, worker in (("naive", reference), ("ours", ours))},
            "steps": dict(reference["flows"], **ours["flows"]),
        }
        return _finish(report, recorded, args)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def merge_measurements(reports: List[Dict]) -> Dict:
    """Earlier outputs as one measurement: every step's rounds of all of them together (its
    fastest then the fastest of all), the first one's machine and models, the load averages and
    heap settings of each."""
    first = reports[0]
    if any(r["models"] != first["models"] for r in reports):
        raise SystemExit("--steps-from: the files measured different models")
    steps: Dict = {}
    for report in reports:
        for flow, flow_steps in report["steps"].items():
            for step, values in flow_steps.items():
                steps.setdefault(flow, {}).setdefault(step, []).extend(values["rounds_seconds"])
    return {
        "models": first["models"], "machine": first["machine"],
        "rounds": sum(r["rounds"] for r in reports), "prompt_sets": min(r["prompt_sets"] for r in reports),
        "measurements": [{"machine": r["machine"], "rounds": r["rounds"], "workers": r["workers"]} for r in reports],
        "workers": first["workers"],
        "steps": {flow: {step: {"rounds_seconds": values, "best_seconds": min(values),
                                "median_seconds": statistics.median(values)} for step, values in flow_steps.items()}
                  for flow, flow_steps in steps.items()},
    }


def _finish(report: Dict, recorded: Dict, args: argparse.Namespace) -> int:
    report = dict(report, recorded_run=str(args.results), recorded_commit=recorded["machine"].get("git_commit"),
                  ceilings=ceilings(recorded, report["steps"]))
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
