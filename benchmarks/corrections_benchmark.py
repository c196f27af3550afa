"""Corrections benchmark: full propagation vs one click vs an update after adding a support.

A correction session (protosam.session) on one volume and one structure, ``default`` preset:

1. ``start``: the full propagation (every visited slice encoded by DINOv2, SAM where needed);
2. one positive click on a slice whose SAM embedding the run cached (SAM decoding only);
3. a box, a negative scribble and a positive lasso, each on a slice with a cached SAM
   embedding (a box and a scribble decode with SAM; a lasso decodes nothing), then their undo;
4. ``add_support`` of the true mask on another slice, then ``update`` (cached encodings:
   prototype matching, prompts and SAM decoding only).

Random weights in the official formats (timing only; the masks mean nothing)::

    python benchmarks/corrections_benchmark.py                 # ViT-B/14 + SAM ViT-B, 64 slices at 672
    python benchmarks/corrections_benchmark.py --tiny          # tiny models, seconds: checks it works

Targets of the corrections issues: a click < 0.5 s; a box, scribble or lasso < 0.5 s (ViT-B,
embeddings cached, 2 CPU cores); update >= 10x faster than the full run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_volumes import load_volume  # noqa: E402
from propagation_benchmark import machine_info  # noqa: E402

from protosam import Engine, ModelSelection  # noqa: E402
from protosam import catalogue  # noqa: E402
from protosam.testing import save_random_checkpoint as save_random_dinov2  # noqa: E402
from protosam.testing import save_random_sam_checkpoint  # noqa: E402
from protosam.session import Session  # noqa: E402

TINY = {"dinov2": catalogue.TINY_DINOV2, "sam": catalogue.TINY_SAM, "slices": 16, "size": 64, "input_size": 112}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dinov2", default=catalogue.DEFAULT_DINOV2)
    p.add_argument("--sam", default=catalogue.DEFAULT_SAM)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="slice height = width")
    p.add_argument("--input-size", type=int, default=catalogue.DEFAULT_INPUT_SIZE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="the encoders' precision (the preset's auto: bf16 on CPUs with bfloat16 units)")
    p.add_argument("--volume", choices=("auto", "colin27", "synthetic"), default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny random models, %d slices of %d px at %d" %
                   (TINY["slices"], TINY["size"], TINY["input_size"]))
    p.add_argument("--work-dir", default=None, help="folder for the random checkpoints (kept, reused)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="protosam_corrections_"))
    work.mkdir(parents=True, exist_ok=True)
    paths = {"dinov2": work / f"{args.dinov2}.pth", "sam": work / f"{args.sam}.pth"}
    if not paths["dinov2"].exists():
        save_random_dinov2(args.dinov2, paths["dinov2"])
    if not paths["sam"].exists():
        save_random_sam_checkpoint(args.sam, paths["sam"])
    models = ModelSelection(args.dinov2, str(paths["dinov2"]), args.sam, str(paths["sam"]), args.input_size)
    engine = Engine(models, preset="default", device=args.device, download=False, precision=args.precision)
    data = load_volume(args.volume, args.slices, args.size, 1)
    name, truth = next(iter(data.masks.items()))
    present = [k for k in range(truth.shape[0]) if truth[k].any()]
    support = max(present, key=lambda k: int(truth[k].sum()))

    load_start = list(os.getloadavg())
    session = Session(engine, data.volume)
    started = time.perf_counter()
    session.start({name: truth}, support_slices={name: [support]})
    full = time.perf_counter() - started
    state = session.structures[name]
    processed = sorted(state.prompts)
    embedded = [k for k in range(args.slices) if session.cache.get(("sam", session.fingerprint, k)) is not None]
    # One click each on up to five slices whose SAM embedding the run cached (the first one is
    # the figure compared with the target; the others show the spread).
    click_slices = [k for k in embedded if k != support][:5]
    clicked = click_slices[0] if click_slices else None
    click_times = []
    height, width = data.volume.shape[1:]
    for k in click_slices:
        started = time.perf_counter()
        session.correct(name, k, [[width / 2, height / 2]], [1])
        click_times.append(time.perf_counter() - started)
    click = click_times[0] if click_times else None
    # Gestures on the clicked slices (clicks undone first, so each gesture meets a propagated slice).
    gesture_times = {}
    if click_slices:
        k = click_slices[0]
        session.clear_clicks(name, k)
        x0, y0, x1, y1 = width * 0.3, height * 0.3, width * 0.7, height * 0.7
        gestures = {
            "box": lambda: session.box(name, k, (x0, y0, x1, y1)),
            "scribble": lambda: session.scribble(name, k, [[x0, height / 2], [x1, height / 2]], False),
            "lasso": lambda: session.lasso(name, k, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], True),
        }
        for kind, gesture in gestures.items():
            started = time.perf_counter()
            gesture()
            gesture_times[f"{kind}_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for _ in gestures:
            session.undo(name, k)
        gesture_times["undo_three_s"] = time.perf_counter() - started
    added = max((k for k in present if k != support and k not in click_slices), key=lambda k: abs(k - support))
    session.add_support(name, added, truth[added])
    refine, run_again = engine.refine, []

    def counting_refine(*args, **kwargs):  # slices the update matches and decodes again
        run_again.append(1)
        return refine(*args, **kwargs)

    engine.refine = counting_refine
    started = time.perf_counter()
    session.update(name)
    update = time.perf_counter() - started
    del engine.refine

    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": str(engine.device), "torch": torch.__version__,
                    # Other work on the machine slows every figure: the load at start and end.
                    "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
                    # The CPU's model name and the code's commit, as the propagation benchmark records them.
                    **{k: v for k, v in machine_info(engine.device).items() if k in ("cpu_model", "git_commit")}},
        "models": {"dinov2": args.dinov2, "sam": args.sam, "input_size": args.input_size},
        "precision": {"asked": args.precision, "used": engine.precision, "note": engine.precision_note},
        "volume": {"source": data.source, "slices": args.slices, "size": args.size, "structure": name},
        "support_slice": support, "processed_slices": len(processed), "slices_with_sam_embedding": len(embedded),
        "cache_bytes": session.cache.nbytes,
        "full_propagation_s": full, "click_slice": clicked, "click_s": click,
        "click_slices": click_slices, "click_times_s": click_times, "gestures": gesture_times,
        "added_support_slice": added, "update_s": update, "update_slices_run_again": len(run_again),
        "update_speedup": full / update if update else None,
    }
    print(f"volume {data.source} {args.slices} x {args.size}^2, {args.dinov2} + {args.sam} at {args.input_size}, "
          f"{engine.device}, {torch.get_num_threads()} threads; {engine.precision_note}")
    print(f"full propagation: {full:8.2f} s  ({len(processed)} slices processed, {len(embedded)} SAM-encoded, "
          f"cache {session.cache.nbytes / 2**20:.0f} MiB)")
    if click is None:
        print("one click:        not measured (no slice besides the support had a cached SAM embedding)")
    else:
        print(f"one click:        {click:8.3f} s  (slice {clicked}; target < 0.5 s; full run / click = {full / click:.0f}x)")
        print(f"clicks on {len(click_times)} slices: median {np.median(click_times):.3f} s, max {max(click_times):.3f} s")
    for kind, seconds in gesture_times.items():
        print(f"{kind[:-2].replace('_', ' ') + ':':18}{seconds:8.3f} s" + ("" if kind.startswith("undo") else "  (target < 0.5 s)"))
    print(f"update:           {update:8.2f} s  (support added on slice {added}; full run / update = "
          f"{report['update_speedup']:.1f}x; target >= 10x; {len(run_again)} of {len(processed)} slices run again, "
          f"the others' inputs unchanged)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
