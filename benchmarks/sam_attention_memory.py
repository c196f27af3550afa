"""SAM ViT-B's image encoder with windowed attention chunked or all at once: peak memory, same bits.

Loads a SAM checkpoint (random weights in the official format are enough), embeds one fixed
1024 x 1024 picture once to warm up, then once with every attention layer chunked
(:func:`protosam.models.sam_memory.limit_global_attention_memory`, the engine's way) and once
with the windowed layers in segment-anything's all-at-once form (the engine before the change),
sampling the resident memory every 5 ms; prints the peak above the resident memory before each
embedding and whether the two embeddings are bit-identical::

    python benchmarks/sam_attention_memory.py --sam-checkpoint random_vit_b.pth --out result.json
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_profile import resident_mib  # noqa: E402
from propagation_benchmark import machine_info  # noqa: E402

from protosam import catalogue  # noqa: E402
from protosam.models.sam import SamRefiner, load_sam  # noqa: E402
from protosam.models.sam_memory import limit_global_attention_memory  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sam", default=catalogue.SAM_VIT_B)
    p.add_argument("--sam-checkpoint", required=True)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sam = load_sam(args.sam, args.sam_checkpoint)
    refiner = SamRefiner(sam)
    torch.manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 1, 24, 24), size=(1024, 1024), mode="bilinear")
    image = smooth.expand(-1, 3, -1, -1) + 0.1 * torch.rand(1, 3, 1024, 1024)
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], resident_mib())

    threading.Thread(target=sample, daemon=True).start()
    refiner.embed(image)  # warm-up: kernel choice, allocator
    report, embeddings = {"command": "python benchmarks/sam_attention_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
                          "machine": machine_info(torch.device("cpu"))}, {}
    for name in ("windowed_chunked", "windowed_all_at_once"):
        limit_global_attention_memory(sam)
        if name == "windowed_all_at_once":
            for block in sam.image_encoder.blocks:
                if block.window_size:
                    block.attn.__dict__.pop("forward", None)
        before = resident_mib()
        peak[0] = before
        embeddings[name] = refiner.embed(image)
        report[name] = {"peak_above_before_mib": peak[0] - before}
    stop.set()
    a, b = embeddings["windowed_chunked"], embeddings["windowed_all_at_once"]
    report.update(bit_identical=bool(torch.equal(a, b)), max_abs_difference=(a - b).abs().max().item(),
                  largest_magnitude=b.abs().max().item())
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
