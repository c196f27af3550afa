"""docs/render_gesture_figures.py end to end with the tiny random-weight models on Colin27.

The pictures of docs/corrections.md must come from a real correction session and show what each
gesture really did: the script runs ``Session.start``, each gesture then its undo, and
``set_negatives`` + ``update``; these tests check the PNGs and that the saved masks changed as
each gesture's rule says (only the gesture's slice; a negative scribble's voxels all out, a
lasso's all in; "not this" leaves no voxel of the other segment off the painted slice).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "render_gesture_figures.py"


@pytest.fixture(scope="module")
def figure_script():
    before = list(sys.path)
    spec = importlib.util.spec_from_file_location("render_gesture_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    sys.path[:] = before  # the script puts docs/ and benchmarks/ on the path
    return module


def test_each_gesture_picture_shows_a_real_change_of_its_slice(figure_script, tiny_models, colin27, tmp_path,
                                                                one_thread):
    from protosam.session import _rasterise_polygon, _rasterise_polyline

    folder, summary_path, masks = tmp_path / "pictures", tmp_path / "s.json", tmp_path / "masks.npz"
    work = Path(tiny_models.dinov2_checkpoint).parent  # the same tiny checkpoints (seed 0), reused
    assert figure_script.main(["--out-dir", str(folder), "--work-dir", str(work), "--slices", "12", "--size", "64",
                               "--summary", str(summary_path), "--masks", str(masks)]) == 0
    summary = json.loads(summary_path.read_text())
    saved = np.load(masks)
    preview = saved["preview"]
    for name in figure_script.GESTURES:
        png = folder / f"gesture_{name}.png"
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == figure_script.FIGURE_PIXELS
            assert np.asarray(image.convert("RGB")).std() > 10
        entry, after = summary["gestures"][name], saved[f"after_{name}"]
        k = entry["slice"]
        assert np.flatnonzero((preview != after).any(axis=(1, 2))).tolist() == entry["changed_slices"]
        assert entry["changed_slices"] and entry["added"] + entry["removed"] > 0, name
        if name != "not_this":
            assert entry["changed_slices"] == [k], f"{name} changed another slice"
    k = summary["gestures"]["lasso"]["slice"]
    lasso = _rasterise_polygon(np.asarray(summary["gestures"]["lasso"]["drawn"]), preview.shape[1:])
    assert saved["after_lasso"][k][lasso].all()
    stroke = _rasterise_polyline(np.asarray(summary["gestures"]["scribble_negative"]["drawn"]), preview.shape[1:])
    assert not saved["after_scribble_negative"][k][stroke].any()
    stroke = _rasterise_polyline(np.asarray(summary["gestures"]["scribble_positive"]["drawn"]), preview.shape[1:])
    assert saved["after_scribble_positive"][k][stroke].all()
    x0, y0, x1, y1 = (int(v) for v in summary["gestures"]["box"]["drawn"])
    assert saved["after_box"][k][y0:y1 + 1, x0:x1 + 1].any()
    # "Not this": the other segment's voxels are out of the structure off the painted slice.
    from benchmark_volumes import colin27_volume

    other = colin27_volume(12, 64, figure_script.SEGMENTS).masks[summary["not_this_segment"]].astype(bool)
    other[summary["support_slice"]] = False
    assert (preview.astype(bool) & other).any() and not (saved["after_not_this"].astype(bool) & other).any()
