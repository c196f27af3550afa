"""What rescoring a correction session costs: scoring every slice vs the slice and its neighbours.

A click in a correction session must answer at once, and its reply carries the structure's
review scores (``protosam.session.Session.confidence``). After a correction only the slice
and its two neighbours are scored again (``protosam.confidence.rescore_slices``); after an
update every slice is (``slice_scores``). This times both on a synthetic structure (a sphere
through ``--slices`` slices of ``--size`` x ``--size`` voxels, evidence on every slice); no
model runs, so it needs no weights. Prints one line per measure (median of ``--repeat``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    from protosam.confidence import SliceEvidence, rescore_slices, slice_scores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    count, size = args.slices, args.size
    z, y, x = np.ogrid[:count, :size, :size]
    radius = min(count, size) * 0.45
    masks = (((z - count / 2) / (count / 2)) ** 2 * radius**2 + (y - size / 2) ** 2 + (x - size / 2) ** 2
             <= radius**2).astype(np.uint8)
    evidence = {k: SliceEvidence(0.8, 0.6, 0.9) for k in range(count)}
    scores = slice_scores(masks, evidence, [count // 2])
    corrected = count // 2 + 10
    masks[corrected, : size // 2] = 0  # a correction took half the slice away

    def timed(function):
        seconds = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            result = function()
            seconds.append(time.perf_counter() - started)
        return result, statistics.median(seconds)

    full, full_seconds = timed(lambda: slice_scores(masks, evidence, [count // 2, corrected]))
    partial, partial_seconds = timed(lambda: rescore_slices(scores, masks, evidence, [count // 2, corrected],
                                                            [corrected]))
    assert np.array_equal(full, partial, equal_nan=True)
    print(f"volume {count} x {size} x {size}")
    print(f"every slice scored (an update): {full_seconds * 1000:.1f} ms")
    print(f"one correction rescored (slice and neighbours): {partial_seconds * 1000:.2f} ms")


if __name__ == "__main__":
    main()
