"""What a bank of examples costs a run: encoder work and seconds, cold and cached.

Builds a bank of ``--examples`` examples (random slices with a disc) with the tiny
random-weight models (or ``--dinov2 NAME`` at full size, random weights, ``--input-size``),
then times and counts encoded slices for:

* ``supports cold``: ``ExampleBank.supports(..., engine)`` on a fresh bank (every example
  encoded once, features stored in the bank);
* ``supports cached``: the same call again (features read from the bank: no encoder work);
* ``run 1 example`` / ``run N examples``: ``segment_volume`` of a ``--slices`` query from the
  bank's cached examples: the encoder sees the query's slices only in both.

Timing only (random weights: the masks mean nothing). Prints one line per measure.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=50)
    parser.add_argument("--slices", type=int, default=10, help="slices of the query volume")
    parser.add_argument("--size", type=int, default=64, help="slice size in voxels")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from protosam import Engine, segment_volume
    from protosam.examples import ExampleBank
    from protosam.testing import write_tiny_checkpoints

    folder = Path(tempfile.mkdtemp(prefix="protosam-bank-benchmark-"))
    models = write_tiny_checkpoints(folder / "models", input_size=args.input_size)
    engine = Engine(models, preset="default", device=args.device)
    encoded = {"slices": 0}
    encode = engine.encode

    def counting(images):
        encoded["slices"] += images.shape[0]
        return encode(images)

    engine.encode = counting
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:args.size, :args.size]
    disc = (yy - args.size // 2) ** 2 + (xx - args.size // 2) ** 2 <= (args.size // 5) ** 2
    bank = ExampleBank(folder / "bank")
    bank.add_many([dict(structure="organ", image=rng.normal(size=disc.shape) + 2 * disc, mask=disc,
                        slice_index=int(k * 9 / max(args.examples - 1, 1)), slice_count=10, volume_hash=f"v{k}",
                        axis=0) for k in range(args.examples)])
    query = (rng.normal(size=(args.slices,) + disc.shape) + 2 * disc).astype(np.float32)

    def measure(label, work):
        encoded["slices"] = 0
        started = time.perf_counter()
        value = work()
        print(f"{label:<22} {time.perf_counter() - started:7.2f} s  {encoded['slices']:4d} slices encoded")
        return value

    measure("supports cold", lambda: bank.supports("organ", axis=0, engine=engine))
    supports = measure("supports cached", lambda: bank.supports("organ", axis=0, engine=engine))
    for count in (1, len(supports)):
        measure(f"run {count} example(s)", lambda: segment_volume(
            engine, query, None, {}, axis=0, modality="none", auto_extent=False,
            examples={"organ": supports[:count]}))


if __name__ == "__main__":
    main()
