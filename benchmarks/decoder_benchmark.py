"""SAM's mask decoder per prompt set: ProtoSAM's ``SharedImageDecoder`` against segment-anything's
``MaskDecoder``, speed and agreement, on the same model, embedding and prompt sets.

A random-weight SAM of the chosen architecture (the decoder's cost does not depend on the
weights' values), one random image embedding, ``--prompt-sets`` prompt sets of a box and two
positive and one negative point (the `paper` preset's shape), three masks each. In one process:

1. **Agreement**: for every prompt set, the largest absolute difference of the low-resolution
   mask logits and of the scores, in float32 epsilons of the largest stock logit (the bound the
   tests hold: 64), and how many low-resolution logits change sign.
2. **Speed**: ``--repeats`` interleaved rounds (stock, ours, ours, stock, ...: the order flips
   every round), each decoding every prompt set once; per decoder the median milliseconds per
   prompt set over the rounds and their range, and the ratio of the medians.

    python benchmarks/decoder_benchmark.py --out benchmarks/results/cpu_sam_decoder_vitb_xeon.json
    python benchmarks/decoder_benchmark.py --sam sam_tiny --prompt-sets 4 --repeats 2   # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from propagation_benchmark import machine_info  # noqa: E402

from protosam import catalogue  # noqa: E402
from protosam.models.sam import SAM_IMAGE_SIZE, build_sam  # noqa: E402
from protosam.models.sam_decoder import SharedImageDecoder, StockMaskDecoder  # noqa: E402

EPSILON = torch.finfo(torch.float32).eps


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sam", default=catalogue.SAM_VIT_B, help="SAM architecture (random weights)")
    p.add_argument("--prompt-sets", type=int, default=16, help="prompt sets decoded per round")
    p.add_argument("--repeats", type=int, default=6, help="interleaved rounds per decoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.prompt_sets < 1 or args.repeats < 1:
        p.error("--prompt-sets and --repeats must be at least 1")
    return args


def _prompt_sets(sam, count: int, generator: torch.Generator) -> List[torch.Tensor]:
    """Sparse prompt embeddings of ``count`` sets: a box around three points, two positive."""
    sets = []
    with torch.inference_mode():
        for _ in range(count):
            points = 100 + torch.rand(1, 3, 2, generator=generator) * (SAM_IMAGE_SIZE - 200)
            box = torch.cat([points[0].min(0).values - 20, points[0].max(0).values + 20])[None]
            sparse, _ = sam.prompt_encoder(points=(points, torch.tensor([[1, 1, 0]])), boxes=box, masks=None)
            sets.append(sparse)
    return sets


def agreement(ours: SharedImageDecoder, stock: StockMaskDecoder, embedding, sets) -> Dict:
    logits_eps, scores_eps, flips, logits = [], [], 0, 0
    for sparse in sets:
        (our_masks, our_scores) = ours.decode(embedding, sparse, multimask_output=True)
        (stock_masks, stock_scores) = stock.decode(embedding, sparse, multimask_output=True)
        scale = max(float(stock_masks.abs().max()), 1.0)
        logits_eps.append(float((our_masks - stock_masks).abs().max()) / scale / EPSILON)
        scale = max(float(stock_scores.abs().max()), 1.0)
        scores_eps.append(float((our_scores - stock_scores).abs().max()) / scale / EPSILON)
        flips += int(((our_masks > 0) != (stock_masks > 0)).sum())
        logits += stock_masks.numel()
    return {"max_logit_error_eps_of_largest": max(logits_eps), "max_score_error_eps_of_largest": max(scores_eps),
            "sign_changes": flips, "logits_compared": logits, "bound_eps": 64}


def speed(decoders: Dict[str, object], embedding, sets, repeats: int) -> Dict:
    for decoder in decoders.values():  # warm-up: kernels chosen, image terms computed
        decoder.decode(embedding, sets[0], multimask_output=True)
    per_set: Dict[str, List[float]] = {name: [] for name in decoders}
    names = list(decoders)
    for round_number in range(repeats):
        for name in (names if round_number % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            for sparse in sets:
                decoders[name].decode(embedding, sparse, multimask_output=True)
            per_set[name].append((time.perf_counter() - started) / len(sets) * 1000)
    result = {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "rounds_ms": v}
              for name, v in per_set.items()}
    result["ours_over_stock"] = result["ours"]["median_ms"] / result["stock"]["median_ms"]
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    sam = build_sam(args.sam)
    generator = torch.Generator().manual_seed(args.seed + 1)
    grid = sam.prompt_encoder.image_embedding_size
    embedding = 0.5 * torch.randn(1, sam.prompt_encoder.embed_dim, *grid, generator=generator)
    sets = _prompt_sets(sam, args.prompt_sets, generator)
    ours, stock = SharedImageDecoder(sam), StockMaskDecoder(sam)
    report = {
        "config": {"sam": args.sam, "prompt_sets": args.prompt_sets, "repeats": args.repeats, "seed": args.seed},
        "machine": machine_info(torch.device("cpu")),
        "agreement": agreement(ours, stock, embedding, sets),
        "speed": speed({"stock": stock, "ours": ours}, embedding, sets, args.repeats),
    }
    report["machine"]["load_average_after"] = list(os.getloadavg())
    a, s = report["agreement"], report["speed"]
    print(f"SAM {args.sam} decoder, {args.prompt_sets} prompt sets x {args.repeats} interleaved rounds, "
          f"{report['machine']['cpu_model']}, {report['machine']['torch_threads']} threads")
    for name in ("stock", "ours"):
        print(f"  {name:<6} {s[name]['median_ms']:7.1f} ms per prompt set (median; range "
              f"{s[name]['min_ms']:.1f}-{s[name]['max_ms']:.1f})")
    print(f"  ours / stock: {s['ours_over_stock']:.2f}")
    print(f"  agreement: logits within {a['max_logit_error_eps_of_largest']:.1f} float32 epsilons of the largest "
          f"(bound {a['bound_eps']}), scores {a['max_score_error_eps_of_largest']:.1f}; "
          f"{a['sign_changes']} of {a['logits_compared']} low-resolution logits change sign")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if a["max_logit_error_eps_of_largest"] <= a["bound_eps"] else 2


if __name__ == "__main__":
    sys.exit(main())
