"""One timed benchmark phase: load an engine, run one flow, report time and peak memory.

A phase is described by a JSON-able dict (the "spec") so it can run in a fresh process
(``propagation_benchmark.py --worker SPEC``) and report that process's own peak RSS.

Phases:
- ``naive``: :func:`naive_flow.naive_segment_volume` with the ``paper`` preset;
- ``ours``: :func:`protosam.segment_volume`, ``paper`` preset, auto extent off (same slices
  and decoding as ``naive``: its masks must be identical);
- ``ours_auto_extent``: ``segment_volume`` with the ``default`` preset (auto extent on);
- ``ours_default_fp32``: as ``ours_auto_extent`` with the precision pinned to fp32 (``default``
  resolves ``auto`` to bf16 on CPUs with bfloat16 units; this phase measures its float32 speed);
- ``ours_bf16``: as ``ours`` with bf16 autocast for both encoders;
- ``ours_cached_rerun``: ``default`` preset with an embedding cache: one full run, then a
  re-run with every support slice moved by one (timed separately; encoders come from the cache).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Dict
from unittest import mock

import numpy as np
import torch

from protosam import PRESETS, Engine, ModelSelection, segment_volume
from protosam.heap import KEEP_MALLOC_DEFAULTS

from naive_flow import naive_segment_volume

logger = logging.getLogger(__name__)

__all__ = ["PHASES", "run_phase", "peak_rss_mib"]

PHASES = ("naive", "ours", "ours_auto_extent", "ours_default_fp32", "ours_bf16", "ours_cached_rerun")
CACHE_BYTES = 3 << 30


def peak_rss_mib() -> float:
    """This process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(spec: Dict, phase: str) -> Engine:
    preset = {
        "naive": "paper",
        "ours": "paper",
        "ours_auto_extent": "default",
        "ours_default_fp32": replace(PRESETS["default"], precision="fp32"),
        "ours_bf16": replace(PRESETS["paper"], name="paper-bf16", precision="bf16"),
        "ours_cached_rerun": "default",
    }[phase]
    models = ModelSelection(**spec["models"])
    cache = CACHE_BYTES if phase == "ours_cached_rerun" else 0
    batch = None if phase == "naive" else spec.get("batch_size")
    return Engine(models, preset=preset, device=spec["device"], download=False, cache_bytes=cache, batch_size=batch)


def _engine_keeping_glibc_heap(spec: Dict, phase: str) -> Engine:
    """The engine of the reference flow, built with glibc's own heap thresholds (the published
    reference runs with them; the thresholds are the process's, so with --in-process they hold
    until a later phase's engine fixes them). The environment is as before afterwards: a
    ``PROTOSAM_MALLOC_DEFAULTS`` the user set for the whole benchmark stays."""
    with mock.patch.dict(os.environ, {KEEP_MALLOC_DEFAULTS: "1"}):
        return _engine(spec, phase)


class StepMeter:
    """Times an engine's main steps by wrapping its bound methods on the instance (no maths
    changes): ``dinov2`` (:meth:`Engine.encode`), ``sam_embedding``, ``refine`` (prompts + SAM
    decoding, excluding a SAM embedding computed inside it). Also counts the prompt sets
    (connected components) sent to SAM and the refine calls with an empty coarse mask.
    On CUDA the step times are approximate (kernels are asynchronous)."""

    def __init__(self, engine: Engine):
        self.seconds: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self.components = 0
        self.empty = 0
        self._nested = [0.0]
        engine.encode = self._wrap("dinov2", engine.encode)
        engine.sam_embedding = self._wrap("sam_embedding", engine.sam_embedding)
        engine.refine = self._wrap("refine", engine.refine)

    def _wrap(self, name: str, method):
        def timed(*args, **kwargs):
            self._nested.append(0.0)
            started = time.perf_counter()
            try:
                result = method(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self.seconds[name] += elapsed - self._nested.pop()
                self._nested[-1] += elapsed
                self.calls[name] += 1
            if name == "refine":
                self.components += len(result.prompts)
                self.empty += int(not result.prompts)
            return result

        return timed

    def figures(self) -> Dict:
        return {"step_seconds": dict(self.seconds), "step_calls": dict(self.calls),
                "sam_prompt_sets": self.components, "empty_coarse_pairs": self.empty}


def _warm_up(engine: Engine, volume: np.ndarray) -> float:
    """One DINOv2 and one SAM encoding (kernel selection, allocator) before timing."""
    started = time.perf_counter()
    images = engine.to_model_input(volume[:1])
    engine.encode(images)
    engine.sam_embedding(images[0])
    _sync(engine.device)
    return time.perf_counter() - started


def _progress(phase: str, started: float):
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter() - started
        if now - last[0] >= 30 or done == total:
            last[0] = now
            logger.info("%s: %d/%d (%.0f s)", phase, done, total, now)

    return report


def run_phase(spec: Dict) -> Dict:
    """Run ``spec["phase"]`` on the data in ``spec["data"]`` (npz: ``volume``, ``mask_<k>``).

    Writes the masks to ``spec["masks_out"]`` (npz, one array per structure, same order) and
    returns the figures: ``seconds`` (flow only, models loaded), ``model_load_seconds``,
    ``warmup_seconds``, ``slices``/``pairs`` processed, ``peak_rss_mib`` (whole process so
    far: in a worker process that is this phase alone), and flow-specific details.
    """
    phase = spec["phase"]
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    data = np.load(spec["data"])
    volume = data["volume"]
    names = spec["structures"]
    masks = {name: data[f"mask_{i}"] for i, name in enumerate(names)}
    support = {name: int(spec["support_slices"][name]) for name in names}
    load_started = time.perf_counter()
    engine = _engine_keeping_glibc_heap(spec, phase) if phase == "naive" else _engine(spec, phase)
    load_seconds = time.perf_counter() - load_started
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    warmup = _warm_up(engine, volume) if spec.get("warmup") else 0.0
    meter = StepMeter(engine)
    result: Dict = {"phase": phase, "preset": engine.preset.name, "precision": engine.preset.precision,
                    "resolved_precision": engine.precision,
                    "batch_size": engine.batch_size, "heap_blocks_reused": engine.heap_blocks_reused,
                    "model_load_seconds": load_seconds, "warmup_seconds": warmup,
                    "load_average_before": list(os.getloadavg())}
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    if phase == "naive":
        slices = list(range(spec["naive_slices"]))
        out = naive_segment_volume(engine, volume, masks, support, slices=slices, progress=_progress(phase, started))
        _sync(engine.device)
        result.update(seconds=time.perf_counter() - started, slices=len(slices), pairs=out.pairs,
                      empty_pairs=out.empty_pairs, naive_step_seconds=out.step_seconds)
        out_masks, processed = out.masks, {name: slices for name in names}
    else:
        kwargs = dict(support_slices=support, modality="none", progress=_progress(phase, started))
        if spec.get("same_slices"):
            kwargs["slice_range"] = (0, spec["naive_slices"] - 1)
        auto = phase in ("ours_auto_extent", "ours_default_fp32", "ours_cached_rerun")
        out = segment_volume(engine, volume, None, masks, auto_extent=None if auto else False, **kwargs)
        _sync(engine.device)
        result["seconds"] = time.perf_counter() - started
        if phase == "ours_cached_rerun":
            # A corrected support: every structure's support slice moved by one painted slice.
            moved = {n: _neighbour_painted(masks[n], support[n]) for n in names}
            result["first_run_cpu_seconds"] = cpu_seconds() - cpu_started
            cpu_started = cpu_seconds()
            hits_before = engine.cache.hits
            result["first_run"] = meter.figures()
            meter = StepMeter(engine)
            rerun_started = time.perf_counter()
            out = segment_volume(engine, volume, None, masks, auto_extent=None, **dict(kwargs, support_slices=moved))
            _sync(engine.device)
            result.update(first_run_seconds=result["seconds"], seconds=time.perf_counter() - rerun_started,
                          cache_hits=engine.cache.hits - hits_before, cache_mib=engine.cache.nbytes / (1 << 20),
                          rerun_support_slices=moved)
        processed = {name: out.processed_slices[name] for name in names}
        out_masks = out.masks
        result.update(slices=len(set().union(*[set(p) for p in processed.values()])),
                      pairs=sum(len(p) for p in processed.values()))
    # CPU time of the timed flow (with a cached re-run: the re-run); steadier than wall time
    # when other processes compete for the cores.
    result["cpu_seconds"] = cpu_seconds() - cpu_started
    result.update(meter.figures())
    result["processed_slices"] = {name: [int(k) for k in processed[name]] for name in names}
    result["peak_rss_mib"] = peak_rss_mib()
    result["rss_method"] = "resource.getrusage(RUSAGE_SELF).ru_maxrss"
    result["load_average_after"] = list(os.getloadavg())
    if engine.device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(engine.device) / (1 << 20)
    np.savez_compressed(spec["masks_out"], **{f"mask_{i}": out_masks[name] for i, name in enumerate(names)})
    return result


def _neighbour_painted(mask: np.ndarray, index: int) -> int:
    for candidate in (index + 1, index - 1):
        if 0 <= candidate < mask.shape[0] and mask[candidate].any():
            return candidate
    return index


def worker_main(spec_path: str) -> int:
    """Entry point of a worker process: run the spec, write ``spec["result_out"]`` JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result = run_phase(spec)
    Path(spec["result_out"]).write_text(json.dumps(result, indent=1))
    return 0
