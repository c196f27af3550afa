"""Prompt extraction on small hand-made maps."""
import numpy as np
import pytest

from protosam.prompts import connected_components, extract_prompts


def _map(shape=(12, 14)):
    return np.zeros(shape, np.float32), np.zeros(shape, bool)


def test_components_are_eight_connected_and_numbered_in_raster_order():
    mask = np.zeros((6, 6), bool)
    mask[4, 4] = mask[3, 3] = True  # diagonal neighbours: one component
    mask[0, 5] = True  # first in raster order
    labels, count = connected_components(mask)
    assert count == 2
    assert labels[0, 5] == 1 and labels[3, 3] == labels[4, 4] == 2


def test_box_points_and_centroid_of_each_component():
    prob, mask = _map()
    mask[2:5, 3:7] = True  # component A: rows 2-4, cols 3-6
    prob[mask] = 0.6
    prob[3, 5] = 0.9  # most confident pixel of A
    mask[8, 10:13] = True  # component B
    prob[8, 10:13] = [0.7, 0.8, 0.75]
    prompts = extract_prompts(prob, mask)
    assert len(prompts) == 2
    a, b = prompts
    np.testing.assert_array_equal(a.box, [3, 2, 6, 4])
    np.testing.assert_array_equal(a.points[0], [5, 3])  # (x, y)
    np.testing.assert_allclose(a.points[1], [4.5, 3.0])
    np.testing.assert_array_equal(a.point_labels, [1, 1])
    np.testing.assert_array_equal(b.box, [10, 8, 12, 8])
    np.testing.assert_array_equal(b.points[0], [11, 8])
    assert a.mass == pytest.approx(0.6 * 11 + 0.9)


def test_centroid_of_a_non_convex_component_may_lie_outside_it():
    prob, mask = _map((10, 10))
    mask[0:9, 0] = True
    mask[8, 0:9] = True  # an L
    prob[mask] = 0.8
    (prompt,) = extract_prompts(prob, mask)
    x, y = prompt.points[1]
    assert not mask[int(round(y)), int(round(x))]
    np.testing.assert_allclose(prompt.points[1], [mask.nonzero()[1].mean(), mask.nonzero()[0].mean()])


def test_cca_keeps_the_component_with_the_largest_probability_mass_not_area():
    prob, mask = _map()
    mask[0:2, 0:6] = True
    prob[0:2, 0:6] = 0.55  # area 12, mass 6.6
    mask[6:9, 6:9] = True
    prob[6:9, 6:9] = 0.95  # area 9, mass 8.55
    (kept,) = extract_prompts(prob, mask, keep_largest_only=True)
    np.testing.assert_array_equal(kept.box, [6, 6, 8, 8])


def test_negative_points_ring_and_global():
    prob, mask = _map((40, 40))
    prob[:] = 0.2
    mask[18:22, 18:22] = True
    prob[mask] = 0.9
    prob[30, 5] = 0.01  # most background-like pixel overall (outside the ring)
    prob[24, 20] = 0.02  # most background-like pixel inside the 10-pixel ring
    (prompt,) = extract_prompts(prob, mask, negative_points=True)
    np.testing.assert_array_equal(prompt.point_labels, [1, 1, 0, 0])
    np.testing.assert_array_equal(prompt.points[2], [20, 24])
    np.testing.assert_array_equal(prompt.points[3], [5, 30])


def test_empty_coarse_mask_gives_no_prompts_and_shapes_are_checked():
    prob, mask = _map()
    assert extract_prompts(prob, mask) == []
    with pytest.raises(ValueError):
        extract_prompts(prob, mask[:, :3])


def test_max_components_keeps_the_heaviest_in_raster_order_and_scales_to_noise():
    rng = np.random.default_rng(0)
    prob = rng.random((1024, 1024)).astype(np.float32)
    mask = prob > 0.6  # thousands of speckle components
    prompts = extract_prompts(prob, mask, max_components=16)
    assert len(prompts) == 16
    _, count = connected_components(mask)
    assert count > 1000
    masses = [p.mass for p in prompts]
    everything = extract_prompts(prob, mask)
    assert sorted(masses) == sorted(sorted(p.mass for p in everything)[-16:])
    starts = [(p.window[0].start, p.window[1].start) for p in prompts]
    assert all(p.full_mask((1024, 1024)).sum() == p.local_mask.sum() for p in prompts[:3])
    assert len(starts) == 16
