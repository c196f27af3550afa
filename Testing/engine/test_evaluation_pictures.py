"""Overlay montage, Dice plot and the segment report, drawn from real Colin27 slices."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from protosam import VolumeResult
from protosam.evaluation.pictures import (
    COLORS,
    Panel,
    axial_display_flips,
    compose_panel,
    from_sam_frame,
    overlay_montage_figure,
    prompts_to_arrays,
    spread,
    write_dice_plot,
    write_overlay_montage,
)
from protosam.evaluation.segment_report import write_segment_report
from protosam.evaluation.sample_data import find_installed_sample
from protosam.prompts import extract_prompts


@pytest.fixture(scope="module")
def thalamus():
    """Axial Colin27 slices 78..85 (float32) and the left thalamus mask (uint8), KJI."""
    sample = find_installed_sample()
    if sample is None:
        pytest.fail("Colin27/AAL not found: install Debian's mricron-data.")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.image), sitk.sitkFloat32))[78:86]
    atlas = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.labels)))[78:86]
    return image, (atlas == 77).astype(np.uint8)


def _counts(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return {
        "red": int(np.count_nonzero(r - np.maximum(g, b) > 80)),
        "green": int(np.count_nonzero(g - np.maximum(r, b) > 80)),
        "yellow": int(np.count_nonzero((r > 180) & (g > 180) & (b < 80))),
        "cyan": int(np.count_nonzero((g > 180) & (b > 180) & (r < 80))),
        "size": rgb.shape[1::-1],
    }


def _prompts_for(mask):
    """Real prompt sets (engine code) for a mask resized to the 1024 frame."""
    hw = mask.shape
    rows = ((np.arange(1024) + 0.5) * hw[0] / 1024 - 0.5).round().clip(0, hw[0] - 1).astype(int)
    cols = ((np.arange(1024) + 0.5) * hw[1] / 1024 - 0.5).round().clip(0, hw[1] - 1).astype(int)
    big = mask[rows][:, cols].astype(bool)
    return extract_prompts(big.astype(np.float64), big)


def test_compose_panel_draws_exact_colours(thalamus):
    image, mask = thalamus
    k = 4
    coarse = np.zeros_like(mask[k])
    coarse[100:110, 60:80] = 1
    boxes, points, labels = prompts_to_arrays(_prompts_for(mask[k]))
    assert boxes.shape == (1, 4) and points.shape == (1, 2, 2) and labels.tolist() == [[1, 1]]
    rgb = compose_panel(Panel(image[k], mask[k], coarse=coarse, gt=mask[k], boxes=boxes), factor=1)
    assert rgb.shape == image[k].shape + (3,)
    as_int = (rgb * 255).round().astype(int)

    def has(color):
        return np.all(as_int == np.asarray(color), axis=-1)

    # The GT outline is drawn last and sits on the boundary of the mask.
    rows, cols = np.nonzero(has(COLORS["gt"]))
    assert rows.size > 20 and mask[k][rows, cols].all()
    assert has(COLORS["coarse"]).sum() > 20
    # The box outline in slice pixels matches the mask's bounding box (within rounding).
    box_rows, box_cols = np.nonzero(has(COLORS["box"]))
    mask_rows, mask_cols = np.nonzero(mask[k])
    assert abs(box_rows.min() - mask_rows.min()) <= 1 and abs(box_rows.max() - mask_rows.max()) <= 1
    assert abs(box_cols.min() - mask_cols.min()) <= 1 and abs(box_cols.max() - mask_cols.max()) <= 1
    # Inside the mask (away from outlines) the final mask is blended red over grey.
    inner = mask[k].astype(bool) & ~has(COLORS["gt"]) & ~has(COLORS["box"]) & ~has(COLORS["coarse"])
    assert (as_int[inner][:, 0] > as_int[inner][:, 1]).all()
    plain = compose_panel(Panel(image[k]))
    assert np.allclose(plain[..., 0], plain[..., 1])  # no overlay: grey only


def test_sam_frame_mapping_uses_pixel_centres():
    xy = from_sam_frame(np.array([[0.0, 0.0], [1023.0, 1023.0], [511.5, 511.5]]), (256, 512))
    np.testing.assert_allclose(xy, [[-0.25, -0.375], [511.25, 255.375], [255.5, 127.5]])
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread([1, 2], 5) == [1, 2]
    assert axial_display_flips((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == (True, True)
    assert axial_display_flips((1, 0, 0, 0, 1, 0, 0, 0, 1)) == (False, False)


def test_montage_png_has_size_and_visible_overlays(thalamus, tmp_path):
    image, mask = thalamus
    panels = [Panel(image[4], mask[4], kind="support", caption="support")]
    for k in (1, 3, 5, 7):
        boxes, points, labels = prompts_to_arrays(_prompts_for(mask[k]))
        coarse = np.roll(mask[k], 3, axis=1)
        panels.append(Panel(image[k], mask[k], coarse=coarse, gt=np.roll(mask[k], -2, axis=0), boxes=boxes,
                            points=points, point_labels=labels, caption=f"slice {k}"))
    path = write_overlay_montage(tmp_path / "m.png", panels, title="thalamus", columns=3, flip_rows=True)
    counts = _counts(path)
    assert counts["size"] == (960, 795)  # 3 x 3.2 in by (2 x (3.2 + 0.35 caption) + 0.4 title + 0.45 legend) in at 100 dpi
    assert counts["red"] > 500 and counts["green"] > 100 and counts["yellow"] > 20 and counts["cyan"] > 20
    bare = write_overlay_montage(tmp_path / "bare.png", [Panel(image[k]) for k in range(5)], columns=3)
    bare_counts = _counts(bare)
    assert bare_counts["size"] == (960, 710)  # no title, no legend
    assert bare_counts["red"] == bare_counts["green"] == bare_counts["yellow"] == bare_counts["cyan"] == 0


def test_dice_plot_png(tmp_path):
    path = write_dice_plot(tmp_path / "d.png", {"scan 1": {3: 0.5, 4: 0.7}, "scan 2": {}},
                           chunk_starts={"scan 1": [3, 4]}, title="t")
    with Image.open(path) as picture:
        assert picture.size == (750, 380)
        rgb = np.asarray(picture.convert("RGB")).astype(int)
    blue = (abs(rgb[..., 0] - 31) < 30) & (abs(rgb[..., 1] - 119) < 30) & (abs(rgb[..., 2] - 180) < 30)
    assert blue.sum() > 100  # the line of scan 1 (matplotlib's C0)
    with pytest.raises(ValueError):
        write_overlay_montage(tmp_path / "x.png", [])


def test_segment_report_along_another_axis(thalamus, tmp_path):
    image, mask = thalamus
    # The caller's slice axis is the last one.
    query = np.moveaxis(image, 0, 2)
    result_mask = np.moveaxis(mask, 0, 2).copy()
    result_mask[..., 0] = 0  # the "result" misses slice 0 (it has 1.0 Dice elsewhere)
    truth = np.moveaxis(mask, 0, 2)
    result = VolumeResult(masks={5: result_mask}, support_slices={5: [4]},
                          processed_slices={5: list(range(8))}, seconds=0.0)
    written = write_segment_report(tmp_path, query=query, axis=2, result=result, ground_truth={5: truth})
    names = sorted(p.name for p in written)
    assert names == ["overview_5.png", "report.json", "slices_5.png"]
    summary = json.loads((tmp_path / "report.json").read_text())["5"]
    present = [k for k in range(8) if mask[k].any()]
    assert summary["first_slice"] == max(1, present[0]) and summary["last_slice"] == present[-1]
    assert summary["voxels"] == int(result_mask.sum())
    assert summary["support_slices"] == [4] and summary["processed_slices"] == 8
    # by hand: tp = all but slice 0, fn = slice 0
    tp, fn = int(mask[1:].sum()), int(mask[0].sum())
    assert summary["dice_3d"] == pytest.approx(2 * tp / (2 * tp + fn))
    assert _counts(tmp_path / "overview_5.png")["red"] > 300
    # Restricted to the processed slices 2..5: Dice over that window only (here perfect).
    write_segment_report(tmp_path / "window", query=query, axis=2, result=result, ground_truth={5: truth},
                         slice_range=(2, 5))
    window = json.loads((tmp_path / "window" / "report.json").read_text())["5"]
    assert (window["first_slice"], window["last_slice"], window["dice_3d"]) == (2, 5, 1.0)
    with pytest.raises(ValueError, match="slice_range"):
        write_segment_report(tmp_path / "bad", query=query, axis=2, result=result, slice_range=(3, 9))
    # Labels-only mode (no VolumeResult): one entry per label value.
    labels = np.where(mask > 0, 3, 0).astype(np.uint8)
    write_segment_report(tmp_path / "labels", query=image, labels=labels)
    assert list(json.loads((tmp_path / "labels" / "report.json").read_text())) == ["3"]


@pytest.mark.parametrize("shape", [(181, 217), (128, 128), (60, 90), (200, 120)])
def test_montage_captions_sit_between_their_own_tile_and_the_row_above(shape):
    """Three rows of tiles with a title and a legend: every caption is drawn above its own
    image and below the images of the row above (tight_layout put the captions of rows 2 and 3
    over the images above them for square-ish slices)."""
    rng = np.random.default_rng(0)
    panels = [Panel(rng.random(shape), (rng.random(shape) > 0.7).astype(np.uint8), kind="support" if i == 0 else "query",
                    gt=(rng.random(shape) > 0.8).astype(np.uint8), caption=f"scan 12 slice {i} (part 2)")
              for i in range(10)]
    figure = overlay_montage_figure(panels, title="liver: support and queries", columns=4)
    renderer = figure.canvas.get_renderer()
    tiles = figure.axes[:len(panels)]
    boxes = [(axes.title.get_window_extent(renderer), axes.get_window_extent(renderer)) for axes in tiles]
    for index, (caption, tile) in enumerate(boxes):
        assert caption.y0 >= tile.y1 - 0.5, (index, caption, tile)  # above its own image
        assert caption.x0 < tile.x1 and caption.x1 > tile.x0, (index, caption, tile)
        if index >= 4:
            above = boxes[index - 4][1]
            assert caption.y1 <= above.y0 + 0.5, (index, caption, above)  # below the row above
    top_captions = max(caption.y1 for caption, _ in boxes)
    assert top_captions <= figure._suptitle.get_window_extent(renderer).y0 + 0.5
