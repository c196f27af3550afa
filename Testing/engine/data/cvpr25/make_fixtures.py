"""Writes the small fixed cases of the CVPR 2025 interactive-protocol validation (ProtoSAM's own
code; deterministic). Each case is an npz in the challenge's format (``imgs``, ``gts``,
``spacing`` and, for cases with boxes, ``boxes`` added by ``run_challenge_code.py``) plus
``<case>_predictions.npz`` with ``steps``: the six fixed label volumes a "model" returns at
the box step and after clicks 1..5 (they do not depend on the clicks, so the clicks the
simulator places on them can be compared voxel for voxel).

    python Testing/engine/data/cvpr25/make_fixtures.py Testing/engine/data/cvpr25/cases
"""
import sys
from pathlib import Path

import numpy as np


def ellipsoid(shape, centre, radii):
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def block(shape, low, high):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = True
    return mask


def labels_of(shape, masks):
    labels = np.zeros(shape, np.uint8)
    for value, mask in masks:
        labels[mask] = value
    return labels


def perturbed(gt, rng, step, holes, blobs, shift):
    """A prediction with errors that shrink as ``step`` grows: a shifted copy with holes and
    spurious blobs."""
    pred = np.roll(gt, shift, axis=(0, 1, 2)) if shift else gt.copy()
    for value in [v for v in np.unique(gt) if v]:
        for _ in range(max(holes - step, 0)):
            where = np.argwhere(pred == value)
            if len(where):
                centre = where[rng.randint(len(where))]
                radius = rng.randint(1, 4)
                pred[ellipsoid(gt.shape, centre, (radius,) * 3) & (pred == value)] = 0
        for _ in range(max(blobs - step, 0)):
            centre = [rng.randint(s) for s in gt.shape]
            radius = rng.randint(1, 4)
            pred[ellipsoid(gt.shape, centre, (radius, radius + 1, radius))] = value
    return pred


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(27)

    # Case a: three classes, boxes, anisotropic spacing.
    shape = (20, 32, 32)
    gt = labels_of(shape, [(1, ellipsoid(shape, (9, 12, 11), (6, 7, 6))),
                           (2, block(shape, (4, 20, 18), (14, 28, 29))),
                           (3, ellipsoid(shape, (15, 8, 24), (2.5, 3, 3)))])
    steps = [perturbed(gt, rng, s, holes=4, blobs=3, shift=(1, 0, 1) if s < 2 else 0) for s in range(6)]
    # Click 4 sees a 4x4x4 hole in class 2 (eight equally deep voxels: the seeded tie-break
    # decides) and a perfect class 3 (no click); click 5 sees only a class-1 error.
    steps[3] = gt.copy()
    steps[3][block(shape, (5, 21, 19), (9, 25, 23))] = 0
    steps[3][(steps[3] == 0) & ellipsoid(shape, (9, 3, 11), (2, 2, 3))] = 1
    steps[4] = gt.copy()
    steps[4][ellipsoid(shape, (9, 12, 11), (2, 3, 3))] = 0
    steps[5] = gt.copy()
    imgs = (gt * 40 + rng.randint(0, 30, shape)).astype(np.uint8)
    _save(out, "case_a", imgs, gt, (2.0, 0.8, 0.8), steps)

    # Case b: two classes, no boxes (the first click lands on an empty prediction).
    shape = (16, 24, 28)
    gt = labels_of(shape, [(1, ellipsoid(shape, (7, 11, 9), (5, 6, 5))),
                           (2, ellipsoid(shape, (8, 12, 21), (4, 5, 4)))])
    steps = [perturbed(gt, rng, s, holes=5, blobs=2, shift=(0, 1, 0) if s < 3 else 0) for s in range(6)]
    imgs = (gt * 50 + rng.randint(0, 40, shape)).astype(np.uint8)
    _save(out, "case_b", imgs, gt, (1.5, 1.0, 1.2), steps)

    # Case c: slices wider than 256 pixels, so the box jitter is not scaled away.
    shape = (6, 260, 270)
    gt = labels_of(shape, [(1, ellipsoid(shape, (2.5, 100, 120), (2.2, 60, 70))),
                           (2, block(shape, (1, 180, 30), (5, 240, 90)))])
    steps = []
    for s in range(6):
        pred = np.roll(gt, (0, 6 - s, 5 - s), axis=(0, 1, 2))
        pred[block(shape, (0, 10, 200), (3, 30 - 3 * s, 240))] = 2
        steps.append(pred)
    imgs = (gt * 60 + 10).astype(np.uint8)  # no noise: keeps the file small
    _save(out, "case_c", imgs, gt, (3.0, 0.5, 0.5), steps)


def _save(out, name, imgs, gts, spacing, steps):
    np.savez_compressed(out / f"{name}.npz", imgs=imgs, gts=gts, spacing=np.asarray(spacing, float))
    np.savez_compressed(out / f"{name}_predictions.npz", steps=np.stack(steps).astype(np.uint8))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "cases")
