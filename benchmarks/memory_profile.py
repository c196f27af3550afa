"""Where a propagation's peak resident memory comes from, step by step.

``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` gives one number per
process, so this samples the process's resident set (``/proc/self/statm``) from a thread every
``--interval`` seconds while one ``segment_volume`` run (the benchmark's ``ours`` phase: Colin27,
random-weight models in the official formats) goes through its steps, and reports per step
(model loading, DINOv2, SAM image embedding, refine = prompts + SAM decoding, the rest) the
highest resident memory seen while that step ran, the resident memory after loading, and the
process's ``ru_maxrss``; and the file-backed part of the resident set (shared libraries' pages)
at the peak and before the models, with the highest anonymous (resident - file-backed) memory,
which is what the run itself holds. Linux only (``/proc``)::

    python benchmarks/memory_profile.py --slices 8 --out mem.json           # ViT-B/14 + SAM ViT-B at 672
    python benchmarks/memory_profile.py --tiny                             # tiny models, seconds

Run it on a few slices and on more to see how the peak scales with the volume (the steps
hold one slice at a time, so it should not).
"""
from __future__ import annotations

import argparse
import multiprocessing
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_phases import peak_rss_mib  # noqa: E402
from benchmark_volumes import load_volume  # noqa: E402
from propagation_benchmark import machine_info, write_checkpoints  # noqa: E402

from protosam import Engine, ModelSelection, PRESETS, catalogue, segment_volume  # noqa: E402
from protosam.preprocessing import normalize_volume  # noqa: E402
from protosam.propagation import largest_area_slice  # noqa: E402

logger = logging.getLogger(__name__)

TINY = {"dinov2": catalogue.TINY_DINOV2, "sam": catalogue.TINY_SAM, "slices": 6, "size": 64, "input_size": 112}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mib() -> float:
    """This process's resident set now, in MiB (``/proc/self/statm``)."""
    return resident_and_file_backed_mib()[0]


def resident_and_file_backed_mib() -> Tuple[float, float]:
    """This process's resident set now and its file-backed part, in MiB (``/proc/self/statm``:
    resident, shared). The file-backed part is mostly the pages of the shared libraries (torch's
    alone: ~0.4 GiB); how many of those a kernel keeps mapped varies between machines, so the
    anonymous rest (resident - file-backed) is what the run's own arrays and heap hold."""
    with open("/proc/self/statm") as handle:
        fields = handle.read().split()
    return int(fields[1]) * _PAGE / (1 << 20), int(fields[2]) * _PAGE / (1 << 20)


class StepMemory:
    """Samples resident memory from a thread; attributes each sample to the step running."""

    def __init__(self, interval: float):
        self.interval = interval
        self.step = "start"
        self.peaks: Dict[str, float] = {}
        self.peak = (0.0, "start")
        self.file_backed_at_peak = 0.0
        self.peak_anonymous = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.record()

    def record(self) -> None:
        (now, file_backed), step = resident_and_file_backed_mib(), self.step
        self.peaks[step] = max(self.peaks.get(step, 0.0), now)
        self.peak_anonymous = max(self.peak_anonymous, now - file_backed)
        if now > self.peak[0]:
            self.peak = (now, step)
            self.file_backed_at_peak = file_backed

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.record()

    def wrap(self, name: str, method):
        def measured(*args, **kwargs):
            outer, self.step = self.step, name
            try:
                return method(*args, **kwargs)
            finally:
                self.record()
                self.step = outer

        return measured


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dinov2", default=catalogue.DEFAULT_DINOV2)
    p.add_argument("--sam", default=catalogue.DEFAULT_SAM)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--input-size", type=int, default=catalogue.DEFAULT_INPUT_SIZE)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--precision", default=None, help="auto|fp32|bf16 (default: the preset's)")
    p.add_argument("--volume", choices=("auto", "colin27", "synthetic"), default="auto")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    p.add_argument("--tiny", action="store_true", help="tiny random models: checks that it works")
    p.add_argument("--work-dir", default=None, help="folder for the random checkpoints (kept, reused)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="protosam_memory_"))
    # Written by a child process: building random models here would leave their freed heap
    # resident in this one and raise every figure below.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        checkpoints = pool.submit(write_checkpoints, work / "checkpoints", args.dinov2, args.sam).result()
    data = load_volume(args.volume, args.slices, args.size, args.segments)
    volume = normalize_volume(data.volume, "auto")
    names = list(data.masks)
    support = {n: largest_area_slice(data.masks[n]) for n in names}
    machine = machine_info(torch.device("cpu"))  # at the start: the commit of the code that runs
    before_models, file_backed_before_models = resident_and_file_backed_mib()
    with StepMemory(args.interval) as meter:
        meter.step = "load models"
        models = ModelSelection(dinov2=args.dinov2, dinov2_checkpoint=checkpoints[args.dinov2], sam=args.sam,
                                sam_checkpoint=checkpoints[args.sam], input_size=args.input_size)
        engine = Engine(models, preset=args.preset, device="cpu", download=False, precision=args.precision)
        meter.record()
        loaded = resident_mib()
        meter.step = "matching, prompts, rest"
        for name in ("encode", "sam_embedding", "refine"):
            setattr(engine, name, meter.wrap({"encode": "DINOv2", "sam_embedding": "SAM embedding",
                                              "refine": "refine (SAM decoding)"}[name], getattr(engine, name)))
        # Bytes of the prompt sets' component pixels (ComponentPrompt.local_mask) SAM was given:
        # what keeping each slice's prompt sets with their pixels would hold by the end.
        component_bytes = [0]
        refine = engine.refine

        def counted(*a, **k):
            refined = refine(*a, **k)
            component_bytes[0] += sum(p.local_mask.nbytes for p in refined.prompts if p.local_mask is not None)
            return refined

        engine.refine = counted
        started = time.perf_counter()
        segment_volume(engine, volume, None, data.masks, support_slices=support, modality="none",
                       auto_extent=None if args.preset != "paper" else False)
        seconds = time.perf_counter() - started
        meter.step = "after the run"
    report = {
        "command": "python benchmarks/memory_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "models": {"dinov2": args.dinov2, "sam": args.sam, "input_size": args.input_size},
        "preset": args.preset, "precision": engine.precision,
        "volume": {"source": data.source, "shape": list(volume.shape), "structures": names},
        "seconds": seconds,
        "rss_method": f"/proc/self/statm sampled every {args.interval} s, per step; ru_maxrss for the process",
        "resident_mib_before_models": before_models,
        "resident_mib_after_loading": loaded,
        "peak_resident_mib_by_step": meter.peaks,
        "peak_resident_mib": meter.peak[0],
        "peak_step": meter.peak[1],
        "file_backed_mib_before_models": file_backed_before_models,
        "file_backed_mib_at_peak": meter.file_backed_at_peak,
        "peak_anonymous_mib": meter.peak_anonymous,
        "ru_maxrss_mib": peak_rss_mib(),
        "prompt_component_pixels_mib": component_bytes[0] / (1 << 20),
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine",)}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
