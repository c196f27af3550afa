"""ALPNet prototypes and matching against small hand computations."""
import numpy as np
import pytest
import torch

from protosam.errors import InputError
from protosam.models.alpnet import ALPNetConfig, compute_prototypes, mask_to_grid, score_queries


def _features(grid=16, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(channels, grid, grid, generator=generator)


def _normalize(v):
    return v / max(np.linalg.norm(v), 1e-4)


def test_background_prototypes_are_pooled_cells_that_are_fully_background():
    features = _features()
    mask = torch.zeros(16, 16)
    mask[4:8, 4:8] = 1  # occupies exactly 4 of the 64 2x2 cells
    protos = compute_prototypes(features, mask)
    assert protos.num_background == 64 - 4
    f = features.numpy()
    # The first background cell in row-major order is cell (0, 0): mean of the 2x2 block.
    expected = _normalize(f[:, 0:2, 0:2].mean(axis=(1, 2)))
    np.testing.assert_allclose(protos.background[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(protos.background.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_small_structure_uses_the_global_prototype_alone_and_cosine_scores():
    features = _features()
    mask = torch.zeros(16, 16)
    mask[5, 7] = 1  # one cell: no 2x2 window (grid // 8 = 2) is >= 95 % foreground
    protos = compute_prototypes(features, mask)
    assert not protos.foreground_is_local and protos.num_foreground == 1
    f = features.numpy()
    np.testing.assert_allclose(protos.foreground[0].numpy(), f[:, 5, 7] / (1 + 1e-5), rtol=1e-5)
    query = _features(seed=1)[None]
    logits = score_queries(query, protos)
    q = query[0].numpy()
    y, x = 3, 11
    cosine = q[:, y, x] @ f[:, 5, 7] / (np.linalg.norm(q[:, y, x]) * np.linalg.norm(f[:, 5, 7]))
    assert logits[0, 1, y, x].item() == pytest.approx(20 * cosine, rel=1e-4)


def test_large_structure_uses_local_plus_global_prototypes_and_softmax_weighted_score():
    features = _features()
    mask = torch.zeros(16, 16)
    mask[2:10, 2:12] = 1  # 4 x 5 = 20 full 2x2 cells
    protos = compute_prototypes(features, mask)
    assert protos.foreground_is_local and protos.num_foreground == 20 + 1
    f = features.numpy()
    global_proto = _normalize((f * mask.numpy()).sum(axis=(1, 2)) / (mask.sum().item() + 1e-5))
    np.testing.assert_allclose(protos.foreground[-1].numpy(), global_proto, rtol=1e-5, atol=1e-6)

    query = _features(seed=2)[None]
    logits = score_queries(query, protos)
    q = query[0].numpy()
    y, x = 7, 1
    qn = q[:, y, x] / np.linalg.norm(q[:, y, x])
    for channel, prototypes in ((0, protos.background.numpy()), (1, protos.foreground.numpy())):
        sims = 20 * prototypes @ qn
        weights = np.exp(sims - sims.max()) / np.exp(sims - sims.max()).sum()
        assert logits[0, channel, y, x].item() == pytest.approx(float((weights * sims).sum()), rel=1e-4)


def test_fg_threshold_window_depends_on_grid_size():
    # On a 48 grid the window is 48 // 8 = 6: a 5x5 square never fills a 6x6 window.
    features = _features(grid=48)
    small = torch.zeros(48, 48)
    small[10:15, 10:15] = 1
    assert not compute_prototypes(features, small).foreground_is_local
    big = torch.zeros(48, 48)
    big[12:18, 18:24] = 1  # an aligned 6x6 block fills one window exactly
    assert compute_prototypes(features, big).foreground_is_local


def test_mask_to_grid_is_nearest_neighbour():
    mask = torch.zeros(64, 64)
    mask[0:4, 0:4] = 1
    grid = mask_to_grid(mask, (16, 16))
    assert grid.shape == (16, 16)
    assert grid[0, 0] == 1 and grid.sum() == 1


def test_empty_or_full_support_masks_are_refused_with_advice():
    features = _features()
    with pytest.raises(InputError, match="empty"):
        compute_prototypes(features, torch.zeros(16, 16))
    with pytest.raises(InputError, match="whole slice"):
        compute_prototypes(features, torch.ones(16, 16))


def test_thin_background_falls_back_to_a_global_background_prototype():
    features = _features()
    mask = torch.ones(16, 16)
    mask[::2, :] = 0  # background rows everywhere, no 2x2 cell is >= 95 % background
    protos = compute_prototypes(features, mask, ALPNetConfig())
    assert protos.num_background == 1
    assert torch.isfinite(score_queries(_features(seed=3)[None], protos)).all()
