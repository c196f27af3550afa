"""Refiner phases (image embeddings + decoding) and peak memory for SAM, SAM 2.1 and MedSAM2.

Each refiner runs in its own process (so its peak memory is its own) on the real architecture
with random weights: speed and memory do not depend on the weights' values, and pretrained
weights cannot be downloaded here. Per slice it encodes one 1024 x 1024 image, then decodes
``--structures`` prompt sets (a box and two points each, as ProtoSAM's default preset sends one
per coarse-mask component) the way the engine does on a CPU (one set per decoder call).

    python benchmarks/refiner_benchmark.py --slices 64 --structures 4 \
        --out benchmarks/results/cpu_refiners_64slices.json

Figures printed and written: seconds for the embeddings and the decoding (totals and per
slice), peak resident memory of the process, the machine (CPU, threads, load average).
Segmentation quality needs pretrained weights: see docs/refiners.md.

``--precision bf16`` encodes under the engine's bf16 autocast (what ``auto`` picks on CPUs with
bfloat16 units); decoding stays float32 here (each refiner's own decoder; the engine decodes
SAM in bf16 for a bf16 run on a CPU, see ``protosam.models.sam_decoder.SharedImageDecoder``).

``--mode memory`` (SAM 2 refiners) measures memory mode instead: each of ``--structures``
structures is painted on slice 0 (a conditioning frame) and walked up through every slice by
SAM 2's video predictor exactly as the engine walks (``protosam.models.sam2_video.SliceWalk``,
features encoded once per slice for all structures), with prototype prompts on every
``--prompt-every``-th slice. Written besides the times: the frames and bytes the inference
state holds at the end of the walk (bounded: the same for 30 slices as for 200).

    python benchmarks/refiner_benchmark.py --mode memory --refiners sam2.1_hiera_tiny \
        --slices 200 --structures 1 --out benchmarks/results/cpu_sam2_memory_200slices.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "ProtoSAMLib"))

from protosam import catalogue  # noqa: E402  (torch-free)

DEFAULT_REFINERS = (catalogue.SAM_VIT_B, catalogue.SAM2_1_HIERA_TINY, catalogue.SAM2_1_HIERA_SMALL, catalogue.MEDSAM2)


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--refiners", default=",".join(DEFAULT_REFINERS), help="comma-separated --sam names")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--structures", type=int, default=4, help="prompt sets decoded per slice")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="the image encoder's precision (bf16: autocast, as the engine's `auto` on CPUs with "
                             "bfloat16 units; decoding stays float32 as in the engine)")
    parser.add_argument("--mode", default="per-slice", choices=("per-slice", "memory"),
                        help="per-slice: embed + decode each slice; memory: SAM 2's video predictor walks the slices")
    parser.add_argument("--prompt-every", type=int, default=4, help="memory mode: prototype prompts every N slices")
    parser.add_argument("--reuse-features", action="store_true",
                        help="memory mode: encode one slice and give its features to every slice (peak memory is "
                             "the same, a slice's features being dropped after use; the times then leave out encoding)")
    parser.add_argument("--note", default="", help="written into the JSON (e.g. 'machine under load from other work')")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one refiner
    return parser.parse_args(argv)


def _refiner(name):
    """The engine's refiner object for ``name`` with random weights (the real architecture)."""
    import torch

    torch.manual_seed(0)
    if catalogue.refiner_family(name) == "sam2":
        from protosam.models.sam2_refiner import SAM2_ARCHITECTURES, Sam2Refiner, build_sam2_model

        return Sam2Refiner(build_sam2_model(name).requires_grad_(False), box_only=SAM2_ARCHITECTURES[name].box_only)
    from protosam.models.sam import SAM_ARCHITECTURES, SamRefiner, build_sam
    from protosam.models.sam_memory import limit_global_attention_memory

    sam = limit_global_attention_memory(build_sam(name).requires_grad_(False))
    return SamRefiner(sam, medsam=SAM_ARCHITECTURES[name].medsam)


def _prompts(count, seed):
    import numpy as np

    from protosam.prompts import ComponentPrompt

    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        x0, y0 = rng.uniform(100, 700, 2)
        box = np.array([x0, y0, x0 + 200, y0 + 180])
        points = np.array([[x0 + 100, y0 + 90], [x0 + 60, y0 + 40]])
        prompts.append(ComponentPrompt(box, points, np.ones(2, np.int64), (slice(0, 1), slice(0, 1)),
                                       np.ones((1, 1), bool), 1.0))
    return prompts


def _autocast(precision):
    import torch

    return torch.bfloat16 if precision == "bf16" else None


def run_one(name, slices, structures, threads, precision="fp32"):
    import torch

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    refiner = _refiner(name)
    build_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1)
    embed_seconds = decode_seconds = embed_cpu = decode_cpu = 0.0
    for index in range(slices):
        coarse = torch.randn(1, 1, 32, 32, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(1024, 1024), mode="bilinear", align_corners=False)
        image = image.expand(1, 3, -1, -1).contiguous()
        tick, cpu = time.perf_counter(), time.process_time()
        embedding = refiner.embed(image, autocast_dtype=_autocast(precision))
        embed_seconds += time.perf_counter() - tick
        embed_cpu += time.process_time() - cpu
        tick, cpu = time.perf_counter(), time.process_time()
        refiner.decode(embedding, _prompts(structures, index), multimask_output=True, pick_best_score=True,
                       batch_prompts=False)
        decode_seconds += time.perf_counter() - tick
        decode_cpu += time.process_time() - cpu
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "refiner": name, "slices": slices, "structures_per_slice": structures, "precision": precision,
        "build_seconds": round(build_seconds, 2),
        "embed_seconds": round(embed_seconds, 2), "decode_seconds": round(decode_seconds, 2),
        "refiner_seconds": round(embed_seconds + decode_seconds, 2),
        # CPU seconds of this process: on a busy machine (other work, see load_average) wall time
        # grows with the contention, CPU time much less (with one torch thread, hardly at all).
        "embed_cpu_seconds": round(embed_cpu, 2), "decode_cpu_seconds": round(decode_cpu, 2),
        "refiner_cpu_seconds": round(embed_cpu + decode_cpu, 2),
        "embed_seconds_per_slice": round(embed_seconds / slices, 3),
        "decode_seconds_per_prompt_set": round(decode_seconds / (slices * structures), 4),
        "cache_bytes_per_slice": catalogue.refiner_cache_bytes_per_slice(name),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }


def _state_bytes(value, seen=None) -> int:
    """Bytes of the tensor storages an inference state holds, each storage once (expanded views
    share one; the lazy frames hold none)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(_state_bytes(v, seen) for k, v in value.items() if k != "images")
    if isinstance(value, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in value)
    return 0


def run_one_memory(name, slices, structures, threads, prompt_every=4, reuse_features=False, precision="fp32"):
    """Memory mode's walk (see the module docstring) on random weights: times and held state."""
    import numpy as np
    import torch

    from protosam.models.sam2_refiner import SAM2_ARCHITECTURES, Sam2Refiner, build_sam2_model
    from protosam.models.sam2_video import SliceWalk

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_sam2_model(name, video=True).requires_grad_(False)
    model.fill_hole_area = 0  # as protosam.models.sam2_refiner.load_sam2_refiner builds it
    refiner = Sam2Refiner(model, box_only=SAM2_ARCHITECTURES[name].box_only)
    build_seconds = time.perf_counter() - start
    features = {}
    timing = {"embed": 0.0, "embed_cpu": 0.0}

    def picture(index):
        coarse = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(index))
        image = torch.nn.functional.interpolate(coarse, size=(1024, 1024), mode="bilinear", align_corners=False)
        return image.expand(1, 3, -1, -1).contiguous()

    def packed(index):
        index = 0 if reuse_features else index
        if index not in features:
            features.clear()  # one slice at a time, as the engine's store releases them
            tick, cpu = time.perf_counter(), time.process_time()
            features[index] = refiner.embed(picture(index), autocast_dtype=_autocast(precision))
            timing["embed"] += time.perf_counter() - tick
            timing["embed_cpu"] += time.process_time() - cpu
        return features[index]

    walks = []
    tick, cpu = time.perf_counter(), time.process_time()
    for number in range(structures):
        walk = SliceWalk(refiner, slices, packed, picture)
        painted = np.zeros((1024, 1024), bool)
        painted[300 + 20 * number:600, 300:640 - 20 * number] = True
        walk.condition(0, painted)
        walk.walks_down = False  # painted on the first slice: the engine walks up only
        walks.append(walk)
    held_at = {}
    for index in range(slices):
        for number, walk in enumerate(walks):
            walk.track(index, downwards=False)
            if index and index % prompt_every == 0:
                (prompt,) = _prompts(1, index * 31 + number)
                walk.prompt(index, prompt.box, prompt.points, prompt.point_labels)
        if index + 1 in (30, slices) or (index + 1) % 10 == 0:
            seen = set()
            held_at[index + 1] = {"frames": walks[0].frames_held(),
                                  "state_mib": round(sum(_state_bytes(w.state, seen) for w in walks) / 2**20, 2),
                                  "peak_rss_mib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
            print(f"after {index + 1} slices: {held_at[index + 1]}", file=sys.stderr, flush=True)
    walk_seconds = time.perf_counter() - tick - timing["embed"]
    walk_cpu = time.process_time() - cpu - timing["embed_cpu"]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "refiner": name, "mode": "memory", "slices": slices, "structures": structures, "precision": precision,
        "prompt_every": prompt_every, "window_frames": walks[0].window, "reuse_features": reuse_features,
        "build_seconds": round(build_seconds, 2),
        "embed_seconds": round(timing["embed"], 2), "embed_cpu_seconds": round(timing["embed_cpu"], 2),
        # Memory attention, decoding and memory encoding of every structure on every slice.
        "walk_seconds": round(walk_seconds, 2), "walk_cpu_seconds": round(walk_cpu, 2),
        "refiner_seconds": round(timing["embed"] + walk_seconds, 2),
        "refiner_cpu_seconds": round(timing["embed_cpu"] + walk_cpu, 2),
        "walk_seconds_per_slice_and_structure": round(walk_seconds / (slices * structures), 3),
        "held": {str(k): v for k, v in held_at.items()},
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }


def machine():
    """The machine and commit, as the propagation benchmark records them, plus the load average
    now (the end of the run; ``main`` adds the one at its start)."""
    import torch

    from propagation_benchmark import machine_info  # imports the engine: only the parent, after its children

    return dict(machine_info(torch.device("cpu")), load_average=list(os.getloadavg()))


def main(argv=None) -> int:
    args = _parse(argv)
    if args.one:
        if args.mode == "memory":
            print(json.dumps(run_one_memory(args.one, args.slices, args.structures, args.threads, args.prompt_every,
                                            args.reuse_features, args.precision)))
        else:
            print(json.dumps(run_one(args.one, args.slices, args.structures, args.threads, args.precision)))
        return 0
    names = [name.strip() for name in args.refiners.split(",") if name.strip()]
    for name in names:
        problem = catalogue.propagation_problem("memory" if args.mode == "memory" else "per-slice", name)
        if problem:  # unknown names, or memory mode with SAM, fail before any work
            raise SystemExit(problem)
    results = []
    load_before = list(os.getloadavg())
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--slices", str(args.slices),
                   "--structures", str(args.structures), "--mode", args.mode, "--prompt-every", str(args.prompt_every),
                   "--precision", args.precision]
        command += ["--threads", str(args.threads)] if args.threads else []
        command += ["--reuse-features"] if args.reuse_features else []
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        second = f"walk {r['walk_seconds']:8.2f} s" if args.mode == "memory" else f"decode {r['decode_seconds']:7.2f} s"
        print(f"{name:24s} embed {r['embed_seconds']:8.2f} s  {second}  "
              f"refiner {r['refiner_seconds']:8.2f} s (CPU {r['refiner_cpu_seconds']:8.2f} s)  "
              f"peak {r['peak_rss_mib']:7.1f} MiB" + (f"  held {r['held']}" if args.mode == "memory" else ""), flush=True)
    report = {"benchmark": f"refiner phases, random weights, real architectures, {args.mode} mode",
              "machine": dict(machine(), load_average_at_start=load_before), "results": results}
    if args.note:
        report["note"] = args.note
    base = next((r for r in results if r["refiner"] == catalogue.SAM_VIT_B), None)
    if base:
        for r in results:
            r["refiner_time_vs_sam_vit_b"] = round(r["refiner_seconds"] / base["refiner_seconds"], 3)
            r["refiner_cpu_time_vs_sam_vit_b"] = round(r["refiner_cpu_seconds"] / base["refiner_cpu_seconds"], 3)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
