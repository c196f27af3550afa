"""Floating-point work of the reference flow and of ours on the propagation benchmark.

Counts the multiply-adds of matrix products and convolutions (``torch.utils.flop_counter``,
2 FLOP each) of the full-size models on the ``meta`` device (no weights, no data: seconds),
then multiplies them by the calls a benchmark run made (its JSON's ``step_calls`` and
``sam_prompt_sets``). The reference flow's decoding is counted as segment-anything's
``MaskDecoder``; ours as this code's ``SharedImageDecoder`` (the same function with less
arithmetic: its image-only terms once per embedding, attention folded through its
projections). For a JSON recorded before that decoder (commit 9105607) pass
``--stock-decoder`` to count ours with segment-anything's figure, as it then ran. Ours' SAM
encoder is counted as it runs since commit 0e37d39, its windowed blocks projecting only the real
tokens (segment-anything's projects the windows' padding too, 30 GFLOP more at ViT-B size); for a
JSON recorded before it pass ``--padded-windows``. The ratio of the two totals is what that
arithmetic can gain at most without running faster kernels::

    python benchmarks/flop_budget.py                                   # the recorded run
    python benchmarks/flop_budget.py --results benchmarks/results/FILE.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from protosam.models.dinov2 import build_dinov2
from protosam.models.sam import build_sam
from protosam.models.sam_decoder import SharedImageDecoder
from protosam.models.sam_memory import limit_global_attention_memory

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "cpu_vitb_64slices_with_default_preset.json"


def _flops(call) -> float:
    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


def model_flops(dinov2: str, sam: str, input_size: int) -> Dict[str, float]:
    """FLOP per DINOv2 pass (one slice), per SAM image encoding (segment-anything's encoder;
    ours: without projecting the windows' padding) and per decoded prompt set
    (segment-anything's ``MaskDecoder``; ours: per prompt set, and per embedding for the
    image-only terms it shares)."""
    size = input_size // 14 * 14
    with torch.device("meta"), torch.inference_mode():
        encoder = build_dinov2(dinov2)
        model = build_sam(sam)
        channels = model.prompt_encoder.embed_dim
        grid = model.prompt_encoder.image_embedding_size
        embedding = torch.empty(1, channels, *grid)
        # A box and two points (3 sparse tokens), three masks, as the paper preset asks.
        sparse = torch.empty(1, 3, channels)
        ours = SharedImageDecoder(model)
        return {
            "dinov2": _flops(lambda: encoder.patch_features(torch.empty(1, 3, size, size))),
            "sam_embedding": _flops(lambda: model.image_encoder(torch.empty(1, 3, 1024, 1024))),
            "ours_sam_embedding": _flops(lambda: limit_global_attention_memory(build_sam(sam)).image_encoder(
                torch.empty(1, 3, 1024, 1024))),
            "decoding_per_prompt_set": _flops(lambda: model.mask_decoder(
                image_embeddings=embedding, image_pe=torch.empty(1, channels, *grid),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=torch.empty(1, channels, *grid), multimask_output=True)),
            "ours_decoder_terms_per_embedding": _flops(lambda: ours._image_terms(embedding)),
            # The paper keeps the first of the three masks; ours upscales only that one.
            "ours_decoding_per_prompt_set": _flops(lambda: ours.decode(embedding, sparse, multimask_output=True,
                                                                       pick_best_score=False)),
        }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="propagation benchmark JSON")
    p.add_argument("--stock-decoder", action="store_true",
                   help="count our decoding as segment-anything's (runs recorded before commit 9105607)")
    p.add_argument("--padded-windows", action="store_true",
                   help="count our SAM encoding as segment-anything's, windows' padding projected "
                        "(runs recorded before commit 0e37d39)")
    args = p.parse_args(argv)
    report = json.loads(args.results.read_text())
    c = report["config"]
    per_call = model_flops(c["dinov2"], c["sam"], c["input_size"])
    for name, value in per_call.items():
        print(f"{name}: {value / 1e9:.1f} GFLOP")
    slices = report["volume"]["shape"][0]
    totals = {}
    for phase, r in report["phases"].items():
        calls = r["step_calls"]
        if phase == "naive" or args.stock_decoder:
            per_set, per_embedding = per_call["decoding_per_prompt_set"], 0.0
        else:
            per_set, per_embedding = per_call["ours_decoding_per_prompt_set"], per_call["ours_decoder_terms_per_embedding"]
        sam_calls = calls.get("sam_embedding", 0)
        per_encoding = per_call["sam_embedding" if phase == "naive" or args.padded_windows else "ours_sam_embedding"]
        total = (calls.get("dinov2", 0) * per_call["dinov2"] + sam_calls * (per_encoding + per_embedding)
                 + r["sam_prompt_sets"] * per_set)
        scale = slices / r["slices"] if phase == "naive" and r.get("extrapolated") else 1.0
        totals[phase] = total * scale
        rate = total / r["seconds"] / 1e9
        print(f"{phase}: {total / 1e12:.1f} TFLOP measured{' (x %.0f extrapolated: %.0f TFLOP)' % (scale, total * scale / 1e12) if scale != 1 else ''}, "
              f"{rate:.0f} GFLOP/s")
    if "naive" in totals:
        for phase, total in totals.items():
            if phase != "naive":
                print(f"work ratio naive / {phase}: {totals['naive'] / total:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
