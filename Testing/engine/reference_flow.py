"""An independent, deliberately plain computation of the published ProtoSAM flow (tests only).

Built from the official pieces — the DINOv2 snapshot from PyPI, OpenCV's connected components,
segment-anything's ``SamPredictor`` — and explicit loops for ALPNet, following the facts in
docs/ALGORITHM.md. It shares no code with ``protosam`` except the checkpoint files.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor

from dinov2_reference import snapshot_patch_features


def _features(dino, image: np.ndarray) -> torch.Tensor:
    size = image.shape[-1] // 14 * 14
    x = torch.from_numpy(image)[None, None].repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    features = snapshot_patch_features(dino, x)
    if features.shape[-1] < 32:
        features = F.interpolate(features, size=(32, 32), mode="bilinear", align_corners=False)
    return features[0]


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v / max(float(v.norm()), 1e-4)


def _alpnet_logits(fs: torch.Tensor, mask: np.ndarray, fq: torch.Tensor) -> torch.Tensor:
    grid = fs.shape[-1]
    fg = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(grid, grid), mode="nearest")[0, 0]
    bg = 1 - fg
    background, local_fg = [], []
    for i in range(0, grid, 2):
        for j in range(0, grid, 2):
            if bg[i:i + 2, j:j + 2].mean() > 0.95:
                background.append(_norm(fs[:, i:i + 2, j:j + 2].mean(dim=(1, 2))))
            if fg[i:i + 2, j:j + 2].mean() > 0.95:
                local_fg.append(fs[:, i:i + 2, j:j + 2].mean(dim=(1, 2)))
    window = grid // 8
    densest = max(float(fg[i:i + window, j:j + window].mean()) for i in range(0, grid - window + 1, window) for j in range(0, grid - window + 1, window))
    global_fg = (fs * fg).sum(dim=(1, 2)) / (fg.sum() + 1e-5)
    # Prototype rows stacked once (P x C); each pixel is still scored on its own below.
    background = torch.stack(background)
    local_mode = densest >= 0.95
    foreground = torch.stack([_norm(p) for p in local_fg + [global_fg]]) if local_mode else None
    logits = torch.zeros(2, grid, grid)
    for y in range(grid):
        for x in range(grid):
            q = fq[:, y, x]
            qn = _norm(q)
            sims = 20 * (background @ qn)
            logits[0, y, x] = (torch.softmax(sims, 0) * sims).sum()
            if local_mode:
                sims = 20 * (foreground @ qn)
                logits[1, y, x] = (torch.softmax(sims, 0) * sims).sum()
            else:
                logits[1, y, x] = 20 * (q @ global_fg) / max(float(q.norm() * global_fg.norm()), 1e-4)
    return logits


def uses_local_foreground(mask: np.ndarray, grid: int) -> bool:
    """Whether the reference takes local foreground prototypes for this support mask: some
    ``grid // 8`` window of the mask on the feature grid is at least 95 % foreground."""
    fg = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(grid, grid), mode="nearest")[0, 0]
    window = grid // 8
    return max(float(fg[i:i + window, j:j + window].mean()) for i in range(0, grid - window + 1, window)
               for j in range(0, grid - window + 1, window)) >= 0.95


def reference_paper_flow(dino, sam, support: np.ndarray, mask: np.ndarray, query: np.ndarray):
    """One query slice ``[S, S]`` -> (coarse fg probability ``[S, S]``, final mask ``[S, S]`` bool, boxes)."""
    size = query.shape[-1]
    grid_logits = _alpnet_logits(_features(dino, support), mask, _features(dino, query))
    logits = F.interpolate(grid_logits[None], size=(size, size), mode="bilinear", align_corners=False)
    coarse_prob = torch.softmax(logits, dim=1)[0, 1].numpy()

    logits_1024 = F.interpolate(logits, size=(1024, 1024), mode="bilinear", align_corners=False)
    image_1024 = F.interpolate(torch.from_numpy(query)[None, None].repeat(1, 3, 1, 1), size=(1024, 1024), mode="bilinear", align_corners=False)
    prob = torch.softmax(logits_1024, dim=1)[0]
    pred = prob.argmax(dim=0).numpy().astype(np.uint8)
    if pred.max() == 0:
        return coarse_prob, np.zeros((size, size), bool), []
    count, labels, _, centroids = cv2.connectedComponentsWithStats(pred, connectivity=8)
    hwc = image_1024[0].permute(1, 2, 0).numpy()
    predictor = SamPredictor(sam)
    predictor.set_image(((hwc - hwc.min()) / (hwc.max() - hwc.min()) * 255).astype(np.uint8))
    union = np.zeros((1024, 1024), bool)
    boxes = []
    for component in range(1, count):
        rows, cols = np.nonzero(labels == component)
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()])
        best = torch.topk(prob[1][torch.from_numpy(labels == component)], 1).indices[0]
        points = np.array([[cols[best], rows[best]], centroids[component]], dtype=np.float64)
        masks, _, _ = predictor.predict(point_coords=points, point_labels=np.array([1, 1]), box=box, multimask_output=True)
        union |= masks[0]
        boxes.append(box)
    final = F.interpolate(torch.from_numpy(union)[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0
    return coarse_prob, final.numpy(), boxes
