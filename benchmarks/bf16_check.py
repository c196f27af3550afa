"""bf16 autocast against float32 on a CPU: errors on fixed inputs and the speed ratio.

On Colin27 slices (the propagation benchmark's volume, random-weight models in the official
formats), in one process, with one engine per precision sharing the same weights:

1. **Errors on fixed inputs**: DINOv2 features and SAM image embeddings of ``--error-slices``
   slices, and SAM's upsampled mask logits for the float32 run's own prompt sets decoded from
   each embedding by each engine's own decoder (on a CPU the bf16 engine decodes in bf16, see
   ``SharedImageDecoder``): max absolute error, and max relative error = max absolute error /
   largest float32 magnitude.
2. **Masks**: ``segment_volume`` (``paper`` semantics, every slice) over the whole volume in
   float32 and in bf16: per structure, the coarse (ALPNet) and final voxels that differ and the
   Dice of bf16 against float32.
3. **Speed**: interleaved A/B repetitions (fp32, bf16, fp32, bf16, ... on the same slice;
   the order flips every repetition) of one DINOv2 encoding and one SAM embedding, per
   precision; the median bf16/fp32 time ratio and its spread, the load average. Decoding is
   not timed here (the propagation benchmark's bf16 phases time it). The whole-run ratio is
   derived from those medians and the measured run's own step times.

    python benchmarks/bf16_check.py --slices 16 --out benchmarks/results/cpu_vitb_bf16_vs_fp32_xeon.json
    python benchmarks/bf16_check.py --tiny      # tiny models, seconds: checks it works

The parts can run as separate processes (``--skip-errors``, ``--skip-masks``, ``--skip-speed``;
on a shared machine two processes get more of it) and be merged into one file::

    python benchmarks/bf16_check.py --merge errors_speed.json masks.json --out results.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_phases import StepMeter  # noqa: E402
from benchmark_volumes import load_volume  # noqa: E402
from propagation_benchmark import machine_info, write_checkpoints  # noqa: E402

from protosam import Engine, ModelSelection, PRESETS, catalogue, segment_volume  # noqa: E402
from protosam.precision import cpu_bf16_units  # noqa: E402
from protosam.preprocessing import normalize_volume  # noqa: E402
from protosam.propagation import largest_area_slice  # noqa: E402
from dataclasses import replace  # noqa: E402

logger = logging.getLogger(__name__)

TINY = {"dinov2": catalogue.TINY_DINOV2, "sam": catalogue.TINY_SAM, "slices": 6, "size": 64, "input_size": 112,
        "repeats": 2, "error_slices": 2}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dinov2", default=catalogue.DEFAULT_DINOV2)
    p.add_argument("--sam", default=catalogue.DEFAULT_SAM)
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--input-size", type=int, default=catalogue.DEFAULT_INPUT_SIZE)
    p.add_argument("--volume", choices=("auto", "colin27", "synthetic"), default="auto")
    p.add_argument("--error-slices", type=int, default=4, help="slices whose values are compared")
    p.add_argument("--repeats", type=int, default=6, help="A/B repetitions per encoder")
    p.add_argument("--skip-errors", action="store_true", help="leave out the errors on fixed inputs")
    p.add_argument("--skip-masks", action="store_true", help="leave out the whole-volume mask comparison")
    p.add_argument("--skip-speed", action="store_true", help="leave out the interleaved speed comparison")
    p.add_argument("--tiny", action="store_true", help="tiny random models: checks that it works")
    p.add_argument("--work-dir", default=None, help="folder for the random checkpoints (kept, reused)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--merge", nargs=2, metavar=("ERRORS_SPEED", "MASKS"),
                   help="merge a run's errors and speed with another run's masks into --out, and derive the "
                        "whole-run ratio from the masks run's float32 steps")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def value_errors(reference: torch.Tensor, other: torch.Tensor) -> Dict[str, float]:
    """Max absolute error and that error over the largest float32 magnitude."""
    absolute = (other.float() - reference.float()).abs().max().item()
    scale = reference.abs().max().item()
    return {"max_abs": absolute, "largest_fp32_magnitude": scale, "max_rel_to_largest": absolute / scale if scale else 0.0}


def worst(errors: List[Dict[str, float]]) -> Dict[str, float]:
    return {key: max(e[key] for e in errors) for key in ("max_abs", "max_rel_to_largest")}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def mask_logits(engine: Engine, embedding: torch.Tensor, prompt) -> torch.Tensor:
    """The chosen (index 0, ``paper``) upsampled mask logits of one prompt set, as the engine decodes."""
    from protosam.models.sam import upsample_mask_logits

    sam, refiner = engine.refiner.sam, engine.refiner
    points = (torch.as_tensor(prompt.points[None], dtype=torch.float), torch.as_tensor(prompt.point_labels[None]))
    box = torch.as_tensor(prompt.box[None], dtype=torch.float)
    with torch.inference_mode():
        sparse, _ = sam.prompt_encoder(points=points, boxes=box, masks=None)
        low_res, _ = refiner.shared_decoder.decode(embedding, sparse, multimask_output=True)
        return upsample_mask_logits(low_res[:, :1])


def coarse_recorder(engine: Engine, store: Dict):
    """Wrap ``engine.coarse_logits`` to record each call's coarse mask at S (fg > bg), in call order."""
    original = engine.coarse_logits

    def recorded(prototypes, features):
        logits = original(prototypes, features)
        store.setdefault("masks", []).append((logits[:, 1] > logits[:, 0]).cpu().numpy())
        return logits

    engine.coarse_logits = recorded


def derived_whole_run(fp32_run: Dict, speed: Dict) -> float:
    """bf16/fp32 of a whole run, derived: the float32 run's encoder step times scaled by the
    measured medians, decoding and the rest as the float32 run took them (an upper bound: a bf16
    run on a CPU also decodes in bf16, which this check does not time)."""
    step_seconds = fp32_run["steps"]["step_seconds"]
    encoders = {"dinov2": step_seconds.get("dinov2", 0.0), "sam_embedding": step_seconds.get("sam_embedding", 0.0)}
    rest = fp32_run["seconds"] - sum(encoders.values())
    return (rest + sum(encoders[k] * speed[k]["bf16_over_fp32_median"] for k in encoders)) / fp32_run["seconds"]


def merge(errors_speed: Path, masks: Path, out: Path) -> None:
    report = json.loads(errors_speed.read_text())
    other = json.loads(masks.read_text())
    report["masks"] = other["masks"]
    report["masks_volume"] = other["volume"]
    report["masks_command"] = other["command"]
    report["masks_machine"] = other["machine"]
    runs = other["masks"]["runs"]
    report["speed"]["whole_run_bf16_over_fp32_derived"] = derived_whole_run(runs["fp32"], report["speed"])
    report["speed"]["whole_run_bf16_over_fp32_measured"] = runs["bf16"]["seconds"] / runs["fp32"]["seconds"]
    out.write_text(json.dumps(report, indent=1))


def _encode_with_own_attention(engine: Engine) -> None:
    """The two engines share one DINOv2 module, whose attention setting each engine chooses
    (``Engine.dinov2_fused_attention``: the explicit form in float32 for ``paper``, the fused
    kernel under bf16): set it to this engine's before each of its encodings."""
    encode = engine.encode

    def encode_with_own_attention(images):
        engine.encoder.set_fused_attention(engine.dinov2_fused_attention)
        return encode(images)

    engine.encode = encode_with_own_attention


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.merge:
        merge(Path(args.merge[0]), Path(args.merge[1]), Path(args.out))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="protosam_bf16_"))
    checkpoints = write_checkpoints(work / "checkpoints", args.dinov2, args.sam)
    data = load_volume(args.volume, args.slices, args.size, args.segments)
    volume = normalize_volume(data.volume, "auto")
    names = list(data.masks)
    support = {n: largest_area_slice(data.masks[n]) for n in names}
    models = ModelSelection(dinov2=args.dinov2, dinov2_checkpoint=checkpoints[args.dinov2], sam=args.sam,
                            sam_checkpoint=checkpoints[args.sam], input_size=args.input_size)
    engines = {"fp32": Engine(models, preset="paper", device="cpu", download=False)}
    bf16 = Engine(models, preset=replace(PRESETS["paper"], name="paper-bf16", precision="bf16"), device="cpu",
                  download=False)
    # The same weights: the second engine uses the first one's models (no second copy in memory).
    bf16.encoder, bf16.refiner = engines["fp32"].encoder, engines["fp32"].refiner
    engines["bf16"] = bf16
    for engine in engines.values():
        _encode_with_own_attention(engine)
    report: Dict = {
        "command": "python benchmarks/bf16_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": dict(machine_info(torch.device("cpu")), cpu_bf16_units=cpu_bf16_units()),
        "models": {"dinov2": args.dinov2, "sam": args.sam, "input_size": args.input_size, "weights": "random, seed 0"},
        "volume": {"source": data.source, "shape": list(volume.shape), "structures": names, "support_slices": support},
    }

    middle = args.slices // 2

    def save() -> None:  # after each part, so a long run interrupted keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))

    # 1. Errors on fixed inputs (the volume's middle slices).
    chosen = list(range(max(0, middle - args.error_slices // 2), min(args.slices, middle - args.error_slices // 2 + args.error_slices)))
    errors: Dict[str, list] = {"dinov2_features": [], "sam_embedding": [], "mask_logits": []}
    prompt_sets = 0
    for index in ([] if args.skip_errors else chosen):
        images = engines["fp32"].to_model_input(volume[index:index + 1])
        features = {p: e.encode(images)[0] for p, e in engines.items()}
        embeddings = {p: e.sam_embedding(images[0]) for p, e in engines.items()}
        errors["dinov2_features"].append(value_errors(features["fp32"], features["bf16"]))
        errors["sam_embedding"].append(value_errors(embeddings["fp32"], embeddings["bf16"]))
        # The float32 run's prompt sets for the first structure painted near this slice.
        name = min(names, key=lambda n: abs(support[n] - index))
        engine = engines["fp32"]
        prototypes = engine.prototypes_from_features(engine.encode(engine.to_model_input(volume[support[name]:support[name] + 1]))[0],
                                                     data.masks[name][support[name]] > 0)
        refined = engine.refine(engine.coarse_logits(prototypes, features["fp32"][None])[0], lambda: embeddings["fp32"])
        for prompt in refined.prompts[:8]:
            errors["mask_logits"].append(value_errors(mask_logits(engine, embeddings["fp32"], prompt),
                                                      mask_logits(engine, embeddings["bf16"], prompt)))
            prompt_sets += 1
    if not args.skip_errors:
        report["errors_on_fixed_inputs"] = {
            "slices": chosen, "mask_logit_prompt_sets": prompt_sets,
            "worst": {name: worst(values) for name, values in errors.items() if values},
            "each": errors,
        }
        logger.info("Errors: %s", json.dumps(report["errors_on_fixed_inputs"]["worst"]))
        save()

    # 2. Whole-volume masks, paper semantics, every slice.
    if not args.skip_masks:
        runs = {}
        for precision, engine in engines.items():
            coarse: Dict = {}
            original = engine.coarse_logits
            coarse_recorder(engine, coarse)
            meter = StepMeter(engine)
            started, cpu = time.perf_counter(), os.times()
            out = segment_volume(engine, volume, None, data.masks, support_slices=support, modality="none",
                                 auto_extent=False)
            after = os.times()
            runs[precision] = {"out": out, "coarse": coarse["masks"], "seconds": time.perf_counter() - started,
                               "cpu_seconds": after.user + after.system - cpu.user - cpu.system,
                               "steps": meter.figures()}
            for name in ("encode", "sam_embedding", "refine", "coarse_logits"):
                engine.__dict__.pop(name, None)
            assert engine.coarse_logits == original
            logger.info("%s run: %.0f s", precision, runs[precision]["seconds"])
        per_structure = {}
        # Coarse masks are recorded in call order: slice by slice, on each slice the structures
        # in key order, each structure's painted support slice left out (kept as painted).
        owners = [name for index in range(args.slices) for name in names if index != support[name]]
        for name in names:
            final = {p: runs[p]["out"].masks[name] > 0 for p in runs}
            compared = [k for k in runs["fp32"]["out"].processed_slices[name] if k != support[name]]
            a = np.stack([final["fp32"][k] for k in compared])
            b = np.stack([final["bf16"][k] for k in compared])
            mine = [number for number, owner in enumerate(owners) if owner == name]
            assert len(owners) == len(runs["fp32"]["coarse"]) == len(runs["bf16"]["coarse"])
            ca = np.concatenate([runs["fp32"]["coarse"][n] for n in mine])
            cb = np.concatenate([runs["bf16"]["coarse"][n] for n in mine])
            per_structure[name] = {
                "slices_compared": len(compared),
                "final_voxels": int(a.size), "final_differing_voxels": int((a != b).sum()), "final_dice": dice(a, b),
                "coarse_pixels_at_S": int(ca.size), "coarse_differing_pixels": int((ca != cb).sum()),
                "coarse_dice": dice(ca, cb),
            }
        report["masks"] = {
            "note": "coarse: ALPNet's mask at the input size S per (structure, slice) call, support slices "
                    "included; final: the volume's voxels on processed slices, painted support slices left out",
            "per_structure": per_structure,
            "runs": {p: {k: v for k, v in r.items() if k not in ("out", "coarse")} for p, r in runs.items()},
        }
        logger.info("Masks: %s", json.dumps(per_structure))
        save()
    if args.skip_speed:
        return 0

    # 3. Speed: interleaved A/B of each encoder on one slice.
    images = engines["fp32"].to_model_input(volume[middle:middle + 1])
    steps = {"dinov2": lambda e: e.encode(images), "sam_embedding": lambda e: e.sam_embedding(images[0])}
    for engine in engines.values():  # untimed first calls (kernel choice, allocator)
        for step in steps.values():
            step(engine)
    speed: Dict = {"load_average_before": list(os.getloadavg()), "repeats": args.repeats}
    for step_name, step in steps.items():
        seconds: Dict[str, list] = {"fp32": [], "bf16": []}
        for repeat in range(args.repeats):
            order = ("fp32", "bf16") if repeat % 2 == 0 else ("bf16", "fp32")
            for precision in order:
                started = time.perf_counter()
                step(engines[precision])
                seconds[precision].append(time.perf_counter() - started)
        ratios = [b / a for a, b in zip(seconds["fp32"], seconds["bf16"])]
        speed[step_name] = {"seconds": seconds, "bf16_over_fp32_median": statistics.median(ratios),
                            "bf16_over_fp32_min": min(ratios), "bf16_over_fp32_max": max(ratios)}
    speed["load_average_after"] = list(os.getloadavg())
    if "masks" in report:
        speed["whole_run_bf16_over_fp32_derived"] = derived_whole_run(report["masks"]["runs"]["fp32"], speed)
        runs = report["masks"]["runs"]
        speed["whole_run_bf16_over_fp32_measured"] = runs["bf16"]["seconds"] / runs["fp32"]["seconds"]
    report["speed"] = speed
    logger.info("Speed: %s", json.dumps({k: v.get("bf16_over_fp32_median") if isinstance(v, dict) else v
                                         for k, v in speed.items()}))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
