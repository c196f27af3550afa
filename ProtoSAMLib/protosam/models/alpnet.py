"""ALPNet adaptive local prototype pooling and prototype matching (training-free).

Shapes: support/query features are ``[C, h, w]`` / ``[N, C, h, w]`` float tensors on one
feature grid; masks are ``[h, w]`` float tensors in {0, 1} on the same grid. Scores come back
as ``[N, 2, h, w]`` logits with channel 0 = background, 1 = foreground.

The rules follow the published ALPNet/ProtoSAM defaults (see docs/ALGORITHM.md):
background = local prototypes from ``pool_window`` x ``pool_window`` average pooling whose
pooled background fraction is > 0.95; foreground = local prototypes (fraction > 0.95) plus
one global masked-average prototype when some ``grid // 8`` window is >= 95 % foreground,
otherwise the global prototype alone, matched by plain cosine similarity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["ALPNetConfig", "Prototypes", "compute_prototypes", "pool_prototypes", "score_queries", "mask_to_grid"]


@dataclass(frozen=True)
class ALPNetConfig:
    pool_window: int = 2
    fg_threshold: float = 0.95
    bg_threshold: float = 0.95
    # Local foreground prototypes are used only if some window of grid // divisor cells is
    # almost all foreground: small structures get the global prototype alone.
    local_fg_window_divisor: int = 8
    temperature: float = 20.0
    norm_eps: float = 1e-4
    # The reference pads the global prototype's denominator with this value.
    global_proto_eps: float = 1e-5


@dataclass(frozen=True)
class Prototypes:
    """L2-normalised prototypes of one support slice (and the features they came from).

    ``background``: ``[Pb, C]``; ``foreground``: ``[Pf, C]`` (normalised rows when
    ``foreground_is_local``); ``foreground_is_local`` False means ``foreground`` is the single
    raw global prototype, matched by cosine similarity as in the reference's 'mask' mode.
    """

    background: torch.Tensor
    foreground: torch.Tensor
    foreground_is_local: bool

    def to(self, device) -> "Prototypes":
        """The same prototypes on ``device`` (self when already there)."""
        if self.background.device == torch.device(device):
            return self
        return Prototypes(self.background.to(device), self.foreground.to(device), self.foreground_is_local)

    @property
    def num_background(self) -> int:
        return int(self.background.shape[0])

    @property
    def num_foreground(self) -> int:
        return int(self.foreground.shape[0])


def mask_to_grid(mask: torch.Tensor, grid_hw) -> torch.Tensor:
    """Nearest-neighbour resize of an ``[H, W]`` {0,1} mask to the feature grid ``[h, w]``."""
    return F.interpolate(mask[None, None].float(), size=tuple(grid_hw), mode="nearest")[0, 0]


def _safe_normalize(rows: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide each row ``[P, C]`` by max(||row||, eps)."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(eps)


def _local_prototypes(features: torch.Tensor, mask: torch.Tensor, window: int, threshold: float) -> torch.Tensor:
    """Average-pool features ``[C,h,w]`` and mask ``[h,w]``; keep cells with pooled mask > threshold."""
    pooled_features = F.avg_pool2d(features[None], window)[0]  # C x h' x w'
    pooled_mask = F.avg_pool2d(mask[None, None], window)[0, 0]  # h' x w'
    keep = pooled_mask > threshold
    return pooled_features.permute(1, 2, 0)[keep]  # P x C, row-major order of the cells


def _global_prototype(features: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Masked average of features ``[C,h,w]`` under ``mask`` ``[h,w]`` -> ``[1, C]``."""
    return ((features * mask).sum(dim=(1, 2)) / (mask.sum() + eps))[None]


def compute_prototypes(
    support_features: torch.Tensor, support_mask_grid: torch.Tensor, config: ALPNetConfig = ALPNetConfig()
) -> Prototypes:
    """Build background and foreground prototypes from one support slice.

    Args:
        support_features: ``[C, h, w]`` float features of the support slice.
        support_mask_grid: ``[h, w]`` {0,1} foreground mask already on the feature grid.
    Raises:
        InputError: when the mask is empty on the feature grid (structure too small for the
            grid or not painted) or leaves no background at all.
    """
    if support_features.dim() != 3 or support_mask_grid.shape != support_features.shape[1:]:
        raise ValueError(
            f"support features [C,h,w] {tuple(support_features.shape)} and mask [h,w] "
            f"{tuple(support_mask_grid.shape)} must share the grid"
        )
    fg = support_mask_grid.to(support_features.dtype)
    bg = 1.0 - fg
    if fg.sum() == 0:
        raise InputError(
            "The support mask is empty at the model's feature resolution: paint a larger part of "
            "the structure on the support slice, or choose a slice where it is bigger."
        )
    if bg.sum() == 0:
        raise InputError(
            "The support mask covers the whole slice, so there is no background to learn from: "
            "paint only the structure, not the entire slice."
        )

    background = _local_prototypes(support_features, bg, config.pool_window, config.bg_threshold)
    if background.shape[0] == 0:
        # The reference would score every pixel 0 for background here; a global background
        # prototype keeps the prediction meaningful when the background is thin and scattered.
        background = _global_prototype(support_features, bg, config.global_proto_eps)
    background = _safe_normalize(background, config.norm_eps)

    grid_h = support_features.shape[1]
    window = max(grid_h // config.local_fg_window_divisor, 1)
    densest = F.avg_pool2d(fg[None, None], window).max()
    if densest >= config.fg_threshold:
        local = _local_prototypes(support_features, fg, config.pool_window, config.fg_threshold)
        global_proto = _global_prototype(support_features, fg, config.global_proto_eps)
        foreground = _safe_normalize(torch.cat([local, global_proto], dim=0), config.norm_eps)
        return Prototypes(background, foreground, foreground_is_local=True)
    return Prototypes(background, _global_prototype(support_features, fg, config.global_proto_eps), False)


def pool_prototypes(shots: Sequence[Prototypes], config: ALPNetConfig = ALPNetConfig()) -> Prototypes:
    """One set of prototypes from several support slices ("shots"), as ALPNet pools shots.

    ALPNet's multi-shot forward pools every shot's local prototypes into one list and scores
    the query against all of them; in its global-only ('mask') mode it averages the shots'
    global prototypes. Here: background rows of all shots concatenated; foreground rows of
    all shots concatenated when any shot has local foreground prototypes (a global-only shot
    then joins with its normalised global prototype), otherwise the mean of the raw global
    prototypes, matched by cosine similarity. One shot comes back unchanged.
    """
    if not shots:
        raise ValueError("pool_prototypes needs at least one support's prototypes")
    if len(shots) == 1:
        return shots[0]
    background = torch.cat([shot.background for shot in shots], dim=0)
    if any(shot.foreground_is_local for shot in shots):
        rows = [
            shot.foreground if shot.foreground_is_local else _safe_normalize(shot.foreground, config.norm_eps)
            for shot in shots
        ]
        return Prototypes(background, torch.cat(rows, dim=0), foreground_is_local=True)
    mean_global = torch.stack([shot.foreground[0] for shot in shots]).mean(dim=0, keepdim=True)
    return Prototypes(background, mean_global, foreground_is_local=False)


def _soft_max_weighted_similarity(
    query_normed: torch.Tensor, prototypes: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``[N,C,h,w]`` x ``[P,C]`` -> ``[N,1,h,w]``: sum_k softmax_k(sim) * sim_k, sim = cos * T."""
    similarity = F.conv2d(query_normed, prototypes[:, :, None, None]) * temperature  # N x P x h x w
    return (F.softmax(similarity, dim=1) * similarity).sum(dim=1, keepdim=True)


def score_queries(
    query_features: torch.Tensor, prototypes: Prototypes, config: ALPNetConfig = ALPNetConfig()
) -> torch.Tensor:
    """Score query features ``[N, C, h, w]`` -> logits ``[N, 2, h, w]`` (bg, fg) on the grid."""
    query_normed = query_features / query_features.norm(dim=1, keepdim=True).clamp_min(config.norm_eps)
    background = _soft_max_weighted_similarity(query_normed, prototypes.background, config.temperature)
    if prototypes.foreground_is_local:
        foreground = _soft_max_weighted_similarity(query_normed, prototypes.foreground, config.temperature)
    else:
        foreground = (
            F.cosine_similarity(query_features, prototypes.foreground[0][None, :, None, None], dim=1, eps=config.norm_eps)
            * config.temperature
        )[:, None]
    return torch.cat([background, foreground], dim=1)
