"""Would float16 storage of the session's encoder outputs change masks? (tiny models, CPU)

Runs ``segment_volume`` twice on a 10-slice synthetic volume with the tiny random-weight models:
once as is (float32 encoder outputs) and once with every DINOv2 feature map and SAM embedding
rounded to float16 and back (what float16 storage in the cache would hand back). Prints the
number of differing voxels and the per-slice Dice of the float16 masks against the float32 ones.

    python benchmarks/session_fp16_check.py [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

import numpy as np

from protosam import PRESETS, Engine, segment_volume
from protosam.testing import write_tiny_checkpoints


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=None, help="folder for the tiny checkpoints")
    args = parser.parse_args()
    models = write_tiny_checkpoints(args.work_dir or tempfile.mkdtemp(prefix="protosam_fp16_"), input_size=112)
    preset = replace(PRESETS["default"], auto_extent=False)  # every slice, whatever the random models find
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    volume = rng.normal(0, 0.05, (10, 48, 48)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    for k in range(1, 9):
        truth[k] = (yy - 22) ** 2 + (xx - 26) ** 2 <= (10 - abs(k - 5) * 0.7) ** 2
    volume += 2 * truth

    def run(half: bool) -> np.ndarray:
        engine = Engine(models, preset=preset, device="cpu")
        if half:
            encode, embed = engine.encode, engine.sam_embedding
            engine.encode = lambda images: encode(images).half().float()
            engine.sam_embedding = lambda image: embed(image).half().float()
        return segment_volume(engine, volume, None, {"o": truth}, support_slices={"o": [5]}, modality="none").masks["o"]

    full, half = run(False), run(True)
    dice = [float(2 * (full[k] & half[k]).sum() / max(int(full[k].sum() + half[k].sum()), 1)) if (full[k].any() or half[k].any())
            else 1.0 for k in range(len(full))]
    print(f"voxels differing: {int((full != half).sum())} of {full.size} (float32 foreground {int(full.sum())})")
    print("per-slice Dice float16 vs float32:", [round(d, 4) for d in dice])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
