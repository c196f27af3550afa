"""GPU checks of the engine on a real device: bf16 autocast and the out-of-memory fallback.

Run by ``device_check.sh`` (see benchmarks/README.md). With the paper's models (random weights
in the official formats, written once into ``--work-dir``) on ``--device``:

- **bf16**: DINOv2 features and whole-volume masks with bf16 autocast against fp32 on the
  same GPU: feature cosine >= 0.98 per patch (as the CPU test asserts), masks reported as
  differing voxels and Dice (random weights: no threshold on masks, only that both run).
- **out of memory, real**: the allocator is capped with
  ``torch.cuda.set_per_process_memory_fraction`` so that a batch of ``--oom-batch`` slices
  genuinely fails to allocate; the engine must halve its batch until it fits and return the
  features of an uncapped run (cosine >= 0.999; TF32/kernel choice may differ per batch size).
  Then the cap is lowered under one slice's need: the engine must move to the CPU and still
  return them.

Prints one line per check and exits 1 if any fails. ``--device cpu`` with tiny models runs
the same code paths that do not need CUDA (``--cpu-smoke`` of the shell script).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from protosam import Engine, ModelSelection, catalogue, segment_volume
from protosam.testing import save_random_checkpoint as save_random_dinov2
from protosam.testing import save_random_sam_checkpoint

logger = logging.getLogger("device_check")


def checkpoints(work_dir: Path, dinov2: str, sam: str, input_size: int) -> ModelSelection:
    """Random-weight checkpoints in the official formats (written once, reused)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    dinov2_path, sam_path = work_dir / f"{dinov2}.pth", work_dir / f"{sam}.pth"
    if not dinov2_path.exists():
        save_random_dinov2(dinov2, dinov2_path, seed=0)
    if not sam_path.exists():
        save_random_sam_checkpoint(sam, str(sam_path), seed=0)
    return ModelSelection(dinov2=dinov2, dinov2_checkpoint=str(dinov2_path), sam=sam, sam_checkpoint=str(sam_path),
                          input_size=input_size)


def test_volume(slices: int, size: int, seed: int = 0):
    """Noise with a bright ellipsoid: (volume [N, H, W] float32, mask [N, H, W] uint8)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:slices, :size, :size]
    mask = ((zz - slices / 2) ** 2 / (slices / 3) ** 2 + (yy - size * 0.45) ** 2 / (size / 5) ** 2
            + (xx - size * 0.55) ** 2 / (size / 4) ** 2 <= 1).astype(np.uint8)
    volume = (rng.normal(0, 1, mask.shape) + 3.0 * mask).astype(np.float32)
    return volume, mask


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=1).min())


def check_bf16(models: ModelSelection, device: str, volume, mask) -> dict:
    engine = Engine(models, preset="paper", device=device)  # the paper preset runs in fp32
    fp32_preset = engine.preset
    bf16_preset = dataclasses.replace(fp32_preset, precision="bf16")
    images = engine.to_model_input(volume[:2])
    masks, features = {}, {}
    for name, preset in (("fp32", fp32_preset), ("bf16", bf16_preset)):
        engine.preset = preset  # same weights, one copy on the device
        features[name] = engine.encode(images)
        result = segment_volume(engine, volume, None, {"s": mask}, axis=0, auto_extent=False, modality="none")
        masks[name] = result.masks["s"]
    cosine = min_cosine(features["bf16"], features["fp32"])
    differing = int((masks["fp32"] != masks["bf16"]).sum())
    total = masks["fp32"].sum() + masks["bf16"].sum()
    dice = float(2 * np.logical_and(masks["fp32"], masks["bf16"]).sum() / total) if total else 1.0
    return {"check": "bf16", "device": str(engine.device), "min_feature_cosine": cosine,
            "differing_voxels": differing, "mask_dice": dice, "ok": cosine >= 0.98}


def check_out_of_memory(models: ModelSelection, device: str, volume, oom_batch: int) -> dict:
    engine = Engine(models, preset="paper", device=device, batch_size=1)
    images = engine.to_model_input(volume[:oom_batch])
    expected = engine.encode(images)
    report = {"check": "out_of_memory", "device": str(engine.device)}
    if engine.device.type != "cuda":
        report.update(ok=True, note="no CUDA device: the real out-of-memory paths were not exercised")
        return report
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(engine.device).total_memory
    resident = torch.cuda.memory_allocated(engine.device)
    torch.cuda.reset_peak_memory_stats(engine.device)
    engine.encode(images[:1])
    one_slice = torch.cuda.max_memory_allocated(engine.device) - resident
    # Room for about two slices: a batch of ``oom_batch`` cannot fit, one slice can.
    cap = resident + 2.5 * one_slice
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), engine.device)
    try:
        engine.batch_size = oom_batch
        halved = engine.encode(images)
        report.update(batch_size_after=engine.batch_size, halving_cosine=min_cosine(halved, expected),
                      one_slice_mib=one_slice / 2**20, cap_mib=cap / 2**20)
        # Under one slice's need: the engine must continue on the CPU.
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (resident + 0.3 * one_slice) / total), engine.device)
        engine.batch_size = 1
        moved = engine.encode(images[:2])
        report.update(device_after=str(engine.device), cpu_fallback_cosine=min_cosine(moved, expected[:2]))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device(device if device != "auto" else "cuda"))
    report["ok"] = (report["batch_size_after"] < oom_batch and report["halving_cosine"] >= 0.999
                    and report["device_after"] == "cpu" and report["cpu_fallback_cosine"] >= 0.999)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The paper's models on purpose: the check is of the largest models users run on a GPU.
    parser.add_argument("--dinov2", default=catalogue.PAPER_DINOV2)
    parser.add_argument("--sam", default=catalogue.PAPER_SAM)
    parser.add_argument("--input-size", type=int, default=catalogue.DEFAULT_INPUT_SIZE)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slices", type=int, default=6, help="slices of the bf16 volume")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--oom-batch", type=int, default=16, help="batch that must not fit under the cap")
    parser.add_argument("--work-dir", default="/tmp/protosam_device_check")
    parser.add_argument("--out", default=None, help="write the reports as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    models = checkpoints(Path(args.work_dir), args.dinov2, args.sam, args.input_size)
    volume, mask = test_volume(max(args.slices, args.oom_batch), args.size)
    reports = [check_bf16(models, args.device, volume[:args.slices], mask[:args.slices]),
               check_out_of_memory(models, args.device, volume, args.oom_batch)]
    for report in reports:
        print(("PASS " if report["ok"] else "FAIL ") + json.dumps(report))
    print(f"device checks took {time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=2))
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
