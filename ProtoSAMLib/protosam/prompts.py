"""Prompts for SAM taken from a coarse foreground map.

All arrays here are one 2-D slice at SAM's input scale (1024 x 1024 in the pipeline), in
row/column ``[y, x]`` indexing; points and boxes are returned in SAM's ``(x, y)`` convention.

Rules (published ProtoSAM defaults, see docs/ALGORITHM.md): 8-connected components of the
coarse mask; per component a tight XYXY box (inclusive pixel indices, no padding) and two
positive points: the pixel of highest foreground probability inside the component and the
component's centroid (which may fall outside a non-convex component). Optional negatives:
the highest-background-probability pixel in a 10-step 3x3 dilation ring around the component,
and the global highest-background-probability pixel among pixels with background
probability >= 0.95. Optional CCA keeps only the component with the largest foreground mass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from scipy import ndimage

__all__ = ["ComponentPrompt", "add_negative_points", "connected_components", "extract_prompts"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
NEGATIVE_RING_DILATIONS = 10
GLOBAL_NEGATIVE_MIN_BG_PROB = 0.95


@dataclass(frozen=True)
class ComponentPrompt:
    """Prompt set for one connected component.

    ``box``: ``(4,)`` float64 XYXY; ``points``: ``(P, 2)`` float64 ``(x, y)``;
    ``point_labels``: ``(P,)`` int64, 1 = positive, 0 = negative; ``window``: the component's
    bounding box as (row slice, column slice) and ``local_mask`` its pixels inside that box
    (kept cropped: a noisy coarse map can have thousands of components);
    ``mass``: sum of foreground probability over the component.
    """

    box: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    window: Tuple[slice, slice]
    local_mask: np.ndarray
    mass: float

    def full_mask(self, shape: Tuple[int, int]) -> np.ndarray:
        """The component as a bool mask of the whole slice ``shape``."""
        mask = np.zeros(shape, bool)
        mask[self.window] = self.local_mask
        return mask


def connected_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """8-connected labelling of a 2-D bool mask: ``(labels int32 [H, W], count)``.

    Numbered as OpenCV's ``connectedComponentsWithStats(..., connectivity=8)`` numbers them (the
    reference's order, which sets the prompt order and the tie-breaks below). OpenCV's 8-way
    algorithms scan 2 x 2 pixel blocks, block rows of two pixel rows from the top, blocks left
    to right, and number components in the order of the first block that holds one of their
    pixels (the four pixels of a block are always 8-connected, so a block never holds two
    components). That is not raster order of the first pixel: a component starting at (1, 0)
    comes before one starting at (0, 5). A test checks the numbering against OpenCV itself.
    """
    labels, count, _ = connected_components_with_bounds(mask)
    return labels, count


def connected_components_with_bounds(mask: np.ndarray) -> Tuple[np.ndarray, int, list]:
    """:func:`connected_components` and each component's bounding box (``ndimage.find_objects``'s
    slices, in the components' order): the numbering needs the boxes, so callers that need them
    too take them from here instead of searching the labels again."""
    labels, count = ndimage.label(mask.astype(bool), structure=_EIGHT_CONNECTED)
    labels = labels.astype(np.int32, copy=False)
    bounds = ndimage.find_objects(labels)
    if count > 1:
        height, width = labels.shape
        # A component's first block lies in the block row of its top pixel row (any block of a
        # lower block row has a higher number): its column is the leftmost of the component's
        # pixels in that block row's two pixel rows. Read inside each bounding box, this is a
        # few pixels per component, where a minimum over the whole labelled slice sorted all of
        # its pixels (60 of 130 ms per 1024 x 1024 slice with 165 components).
        first_block = np.empty(count, np.int64)
        for index, (rows, cols) in enumerate(bounds):
            block_row = rows.start // 2
            pair = labels[2 * block_row:min(2 * block_row + 2, height), cols] == index + 1
            first_column = cols.start + int(np.argmax(pair.any(axis=0)))
            first_block[index] = block_row * ((width + 1) // 2) + first_column // 2
        order = np.argsort(first_block, kind="stable")
        new_number = np.zeros(count + 1, np.int32)
        new_number[order + 1] = np.arange(1, count + 1, dtype=np.int32)
        labels = new_number[labels]
        bounds = [bounds[index] for index in order]
    return labels, int(count), bounds


def _top1_pixel_xy(values: np.ndarray, region: np.ndarray, offset=(0, 0)) -> Optional[np.ndarray]:
    """(x, y) of the largest ``values`` pixel inside bool ``region``; None if region is empty.

    torch.topk over the region's pixels in row-major order, so ties resolve exactly as the
    reference implementation does. ``offset`` (row, col) maps a cropped region back.
    """
    rows, cols = np.nonzero(region)
    if rows.size == 0:
        return None
    best = int(torch.topk(torch.from_numpy(np.ascontiguousarray(values[rows, cols])), 1).indices[0])
    return np.array([cols[best] + offset[1], rows[best] + offset[0]], dtype=np.float64)


def _centroid_xy(component: np.ndarray, offset=(0, 0)) -> np.ndarray:
    rows, cols = np.nonzero(component)
    # Integer sums divided once: the same double OpenCV's connectedComponentsWithStats gives.
    rows = rows.astype(np.int64) + offset[0]
    cols = cols.astype(np.int64) + offset[1]
    return np.array([cols.sum() / cols.size, rows.sum() / rows.size])


def _box_xyxy(component: np.ndarray, offset=(0, 0)) -> np.ndarray:
    rows, cols = np.nonzero(component)
    return np.array(
        [cols.min() + offset[1], rows.min() + offset[0], cols.max() + offset[1], rows.max() + offset[0]],
        dtype=np.float64,
    )


def _grow(window: Tuple[slice, slice], margin: int, shape) -> Tuple[slice, slice]:
    return tuple(slice(max(w.start - margin, 0), min(w.stop + margin, n)) for w, n in zip(window, shape))


def extract_prompts(
    fg_prob: np.ndarray,
    fg_mask: np.ndarray,
    *,
    keep_largest_only: bool = False,
    negative_points: bool = False,
    max_components: Optional[int] = None,
) -> List[ComponentPrompt]:
    """Prompt sets for every connected component of ``fg_mask`` (or only the largest by mass).

    Args:
        fg_prob: ``[H, W]`` float foreground probability (background = 1 - fg_prob).
        fg_mask: ``[H, W]`` bool coarse foreground (argmax of the two classes).
        keep_largest_only: CCA — keep the component with the largest foreground mass
            (the first one in OpenCV's order on ties).
        negative_points: add the ring and global background points (label 0) when found.
        max_components: keep at most this many components, those of largest mass; on equal
            masses the earlier ones in OpenCV's order (None: all).
    Returns:
        One :class:`ComponentPrompt` per kept component, in OpenCV's order of the components
        (see :func:`connected_components`; ties in CCA and ``max_components`` go to the
        component that comes first in it).
        Empty list when ``fg_mask`` is empty.
    """
    if fg_prob.shape != fg_mask.shape or fg_prob.ndim != 2:
        raise ValueError(f"fg_prob {fg_prob.shape} and fg_mask {fg_mask.shape} must be the same 2-D shape")
    if max_components is not None and max_components < 1:
        raise ValueError("max_components must be >= 1 or None")
    fg_mask = fg_mask.astype(bool, copy=False)
    labels, count, bounds = connected_components_with_bounds(fg_mask)
    if count == 0:
        return []
    masses = ndimage.sum_labels(fg_prob.astype(np.float64), labels, range(1, count + 1))
    if keep_largest_only:
        best = 0
        for index in range(1, count):
            if masses[index] > masses[best]:
                best = index
        kept = [best]
    elif max_components is not None and count > max_components:
        kept = sorted(sorted(range(count), key=lambda i: -masses[i])[:max_components])
    else:
        kept = range(count)

    bg_prob = 1.0 - fg_prob
    global_negative = None
    if negative_points:
        # '& ~fg_mask' changes nothing when fg_mask is the argmax map; it guards inconsistent input.
        global_negative = _top1_pixel_xy(bg_prob, (bg_prob >= GLOBAL_NEGATIVE_MIN_BG_PROB) & ~fg_mask)

    prompts = []
    for index in kept:
        component_id = index + 1
        # Work inside the component's bounding box: a few pixels instead of the whole slice.
        window = bounds[index]
        offset = (window[0].start, window[1].start)
        local = labels[window] == component_id
        positives = [_top1_pixel_xy(fg_prob[window], local, offset), _centroid_xy(local, offset)]
        negatives = []
        if negative_points:
            # The ring lies within NEGATIVE_RING_DILATIONS pixels of the component's box.
            grown = _grow(window, NEGATIVE_RING_DILATIONS, labels.shape)
            inside = labels[grown] == component_id
            ring = ndimage.binary_dilation(inside, structure=_EIGHT_CONNECTED, iterations=NEGATIVE_RING_DILATIONS) & ~inside
            ring_negative = _top1_pixel_xy(bg_prob[grown], ring, (grown[0].start, grown[1].start))
            negatives = [p for p in (ring_negative, global_negative) if p is not None]
        points = np.stack(positives + negatives)
        point_labels = np.array([1] * len(positives) + [0] * len(negatives), dtype=np.int64)
        prompts.append(ComponentPrompt(_box_xyxy(local, offset), points, point_labels, window, local, float(masses[index])))
    return prompts


# "Other segments" (not this structure): negative points each prompt set receives at most.
NOT_THIS_MAX_POINTS = 3


def add_negative_points(prompts: List[ComponentPrompt], negatives: np.ndarray,
                        max_points: int = NOT_THIS_MAX_POINTS) -> List[ComponentPrompt]:
    """Prompt sets (SAM's 1024 frame) with negative points from voxels known not to be the
    structure ("other segments").

    ``negatives``: ``[H, W]`` bool in the slice's own frame (any size; its voxels map to SAM's
    1024 frame as the slice is resized, pixel centres aligned). Rule: for each prompt set with a
    box, the 8-connected components of ``negatives`` with voxel centres inside the box, largest
    overlap first (ties: component order), at most ``max_points`` of them, each give one
    negative point: its voxel inside the box deepest in the component (largest Euclidean
    distance to the component's edge; ties: first in row-major order). Sets without a box, and
    sets whose box holds no negative voxel, are unchanged.
    """
    negatives = np.asarray(negatives, bool)
    if not negatives.any() or not prompts:
        return list(prompts)
    height, width = negatives.shape
    labels, _ = connected_components(negatives)
    depth = ndimage.distance_transform_edt(np.pad(negatives, 1))[1:-1, 1:-1]
    result = []
    for prompt in prompts:
        if prompt.box is None:
            result.append(prompt)
            continue
        # Voxel columns/rows whose centres lie inside the box: (v + 0.5) * 1024 / n - 0.5 in [lo, hi].
        x0, y0, x1, y1 = prompt.box
        cols = slice(max(int(np.ceil((x0 + 0.5) * width / 1024 - 0.5)), 0), min(int(np.floor((x1 + 0.5) * width / 1024 - 0.5)), width - 1) + 1)
        rows = slice(max(int(np.ceil((y0 + 0.5) * height / 1024 - 0.5)), 0), min(int(np.floor((y1 + 0.5) * height / 1024 - 0.5)), height - 1) + 1)
        inside = labels[rows, cols]
        found = np.unique(inside[inside > 0])
        if not len(found):
            result.append(prompt)
            continue
        sizes = ndimage.sum_labels(np.ones_like(inside), inside, found)
        order = sorted(range(len(found)), key=lambda i: (-sizes[i], found[i]))[:max_points]
        points, point_labels = list(prompt.points), list(prompt.point_labels)
        local_depth = depth[rows, cols]
        for i in order:
            values = np.where(inside == found[i], local_depth, -1.0)
            r, c = np.unravel_index(int(np.argmax(values)), values.shape)
            x = (c + cols.start + 0.5) * 1024 / width - 0.5
            y = (r + rows.start + 0.5) * 1024 / height - 0.5
            points.append((x, y))
            point_labels.append(0)
        result.append(ComponentPrompt(prompt.box, np.asarray(points, np.float64).reshape(-1, 2),
                                      np.asarray(point_labels, np.int64), prompt.window, prompt.local_mask, prompt.mass))
    return result
