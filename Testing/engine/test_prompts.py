"""Prompt extraction on small hand-made maps."""
import cv2
import numpy as np
import pytest

from protosam.prompts import connected_components, extract_prompts


def _map(shape=(12, 14)):
    return np.zeros(shape, np.float32), np.zeros(shape, bool)


def _opencv_labels(mask):
    count, labels, _, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return labels, count - 1


def test_components_are_eight_connected_and_numbered_as_opencv_numbers_them():
    mask = np.zeros((6, 8), bool)
    mask[4, 4] = mask[3, 3] = True  # diagonal neighbours: one component
    mask[0, 5] = True
    mask[1, 0] = True  # a later pixel row, but OpenCV's first 2 x 2 block row: comes first
    labels, count = connected_components(mask)
    assert count == 3
    assert labels[1, 0] == 1 and labels[0, 5] == 2 and labels[3, 3] == labels[4, 4] == 3
    np.testing.assert_array_equal(labels, _opencv_labels(mask)[0])


@pytest.mark.parametrize("seed", range(6))
def test_component_numbering_equals_opencv_on_random_masks(seed):
    """Odd and even sizes, sparse and dense masks, and 1024 x 1024 speckle (where OpenCV
    may label stripes of rows in parallel): the same label image as OpenCV's."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (1, 17), (23, 1)] + [tuple(rng.integers(2, 70, 2)) for _ in range(40)] + [(1024, 1024)]
    for shape in shapes:
        mask = rng.random(shape) > rng.uniform(0.3, 0.95)
        labels, count = connected_components(mask)
        expected, expected_count = _opencv_labels(mask)
        assert count == expected_count, shape
        np.testing.assert_array_equal(labels, expected, err_msg=str(shape))


def _equal_mass_squares(starts, size=2, shape=(16, 16)):
    prob, mask = np.zeros(shape, np.float32), np.zeros(shape, bool)
    for row, col in starts:
        mask[row:row + size, col:col + size] = True
    prob[mask] = 0.75
    return prob, mask


def test_prompt_order_and_ties_follow_opencv_numbering():
    """Three squares of equal mass whose raster order of first pixels (A at row 0, B at row 1,
    C at row 6) differs from OpenCV's (B's block comes first): prompts come in OpenCV's order,
    CCA keeps OpenCV's first on the tie, max_components=2 keeps OpenCV's first two."""
    starts = {"A": (0, 9), "B": (1, 2), "C": (6, 6)}
    prob, mask = _equal_mass_squares(starts.values())
    labels, _ = _opencv_labels(mask)
    opencv_order = sorted(starts, key=lambda name: labels[starts[name]])
    assert opencv_order == ["B", "A", "C"]

    def names(prompts):
        return [next(n for n, (r, c) in starts.items() if p.box[0] == c and p.box[1] == r) for p in prompts]

    assert names(extract_prompts(prob, mask)) == opencv_order
    assert names(extract_prompts(prob, mask, keep_largest_only=True)) == opencv_order[:1]
    assert names(extract_prompts(prob, mask, max_components=2)) == opencv_order[:2]


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
