"""Property-based tests: any mask and probability map give valid prompts; any features and
mask give valid prototypes and finite scores, or a clear InputError."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protosam.errors import InputError
from protosam.models.alpnet import compute_prototypes, score_queries
from protosam.prompts import NEGATIVE_RING_DILATIONS, connected_components, extract_prompts

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


@st.composite
def prob_and_mask(draw):
    shape = draw(shapes)
    prob = draw(arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    mask = draw(arrays(bool, shape))
    return prob, mask


@settings(max_examples=150, deadline=None)
@given(prob_and_mask(), st.booleans(), st.booleans(), st.one_of(st.none(), st.integers(1, 4)))
def test_prompts_are_valid_for_any_map(case, cca, negatives, max_components):
    prob, mask = case
    height, width = mask.shape
    prompts = extract_prompts(prob, mask, keep_largest_only=cca, negative_points=negatives, max_components=max_components)
    _, count = connected_components(mask)
    expected = min(count, 1) if cca else (count if max_components is None else min(count, max_components))
    assert len(prompts) == expected
    covered = np.zeros_like(mask)
    for prompt in prompts:
        component = prompt.full_mask(mask.shape)
        assert component.any() and not (component & covered).any() and not (component & ~mask).any()
        covered |= component
        x0, y0, x1, y1 = prompt.box
        assert 0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height
        rows, cols = np.nonzero(component)
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max(), rows.max())
        top_x, top_y = prompt.points[0].astype(int)
        assert component[top_y, top_x] and prob[top_y, top_x] == prob[component].max()
        cx, cy = prompt.points[1]
        assert x0 <= cx <= x1 and y0 <= cy <= y1  # the centroid may leave the component, never its box
        assert list(prompt.point_labels[:2]) == [1, 1] and set(prompt.point_labels[2:]) <= {0}
        for x, y in prompt.points[2:].astype(int):
            assert 0 <= x < width and 0 <= y < height and not component[y, x]
        if negatives and len(prompt.points) > 2:
            ring_x, ring_y = prompt.points[2].astype(int)
            distance = np.max(np.abs(np.stack([rows - ring_y, cols - ring_x])), axis=0).min()
            assert distance <= NEGATIVE_RING_DILATIONS or prob[ring_y, ring_x] <= 0.05 + 1e-6


@st.composite
def features_and_mask(draw):
    grid = draw(st.sampled_from([8, 16, 32]))
    channels = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 10_000))
    features = torch.randn(channels, grid, grid, generator=torch.Generator().manual_seed(seed))
    dead = draw(st.booleans())
    if dead:
        features[:, : grid // 2] = 0  # dead features must not give NaN
    mask = torch.from_numpy(draw(arrays(bool, (grid, grid))).astype(np.float32))
    return features, mask, dead


@settings(max_examples=120, deadline=None)
@given(features_and_mask())
def test_prototypes_and_scores_are_valid_or_refused(case):
    features, mask, dead = case
    try:
        prototypes = compute_prototypes(features, mask)
    except InputError as error:
        assert mask.sum() == 0 or mask.sum() == mask.numel(), error
        return
    assert prototypes.num_background >= 1 and prototypes.num_foreground >= 1
    norms = prototypes.background.norm(dim=1)
    assert torch.all(norms <= 1 + 1e-4)
    # Unit rows, unless a pooled vector is shorter than the reference's clamp (1e-4): dead
    # features, or by chance with one or two channels (1-channel 8 x 8 example: 0.526).
    if not dead and features.shape[0] >= 3:
        assert torch.all((norms - 1).abs() < 1e-4)
    logits = score_queries(features[None], prototypes)
    assert logits.shape == (1, 2, *features.shape[1:]) and torch.isfinite(logits).all()
    assert logits.abs().max() <= 20 + 1e-3  # cosine x 20 and softmax-weighted averages of it
