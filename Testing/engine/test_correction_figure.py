"""docs/render_correction_figure.py end to end with the tiny random-weight models on Colin27.

The README's picture of a corrected slice must come from a real correction session and show
a real change: the script runs ``Session.start`` then ``Session.correct`` on real data, and
these tests check the PNG it writes and that the masks it saved differ between the preview and
the corrected result on the clicked slice, and on no other slice.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "render_correction_figure.py"


@pytest.fixture(scope="module")
def figure_script():
    before = list(sys.path)
    spec = importlib.util.spec_from_file_location("render_correction_figure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    sys.path[:] = before  # the script puts benchmarks/ on the path for its volume loader
    return module


def test_figure_shows_a_real_correction_of_one_slice(figure_script, tiny_models, colin27, tmp_path, capsys,
                                                     one_thread):
    png, masks, summary_path = tmp_path / "pictures" / "corrected.png", tmp_path / "masks.npz", tmp_path / "s.json"
    work = Path(tiny_models.dinov2_checkpoint).parent  # the same tiny checkpoints (seed 0), reused
    assert figure_script.main(["--out", str(png), "--work-dir", str(work), "--slices", "8", "--size", "64",
                               "--masks", str(masks), "--summary", str(summary_path)]) == 0

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == figure_script.FIGURE_PIXELS
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn, not a blank canvas

    summary = json.loads(summary_path.read_text())
    saved = np.load(masks)
    preview, corrected = saved["preview"], saved["corrected"]
    assert preview.shape == corrected.shape == (8, 64, 64)
    clicked, support = summary["clicked_slice"], summary["support_slice"]
    assert clicked != support
    # The picture shows a real change, on the clicked slice only.
    changed = np.flatnonzero((preview != corrected).any(axis=(1, 2))).tolist()
    assert changed == [clicked] == summary["changed_slices"]
    assert summary["changed_voxels"] == int((preview != corrected).sum()) > 0
    # The painted slice is kept as painted, before and after.
    assert preview[support].any() and np.array_equal(preview[support], corrected[support])
    # At least one click, each on a voxel of the slice, labelled 1 (add) or 0 (remove).
    assert 1 <= len(summary["clicks"]) <= 2
    for x, y, label in summary["clicks"]:
        assert 0 <= x < 64 and 0 <= y < 64 and label in (0, 1)
    # The caption says which models made the picture and what it can show.
    assert summary["models"].startswith("dinov2_tiny14 + sam_tiny")
    assert figure_script.RANDOM_CAPTION in summary["models"]
    assert f"changed slices [{clicked}]" in capsys.readouterr().out


def test_choose_clicks_targets_what_the_preview_misses_and_adds(figure_script):
    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 1
    preview = np.zeros_like(truth)
    preview[5:15, 5:10] = 1   # the right half of the structure is missed
    preview[0:4, 14:20] = 1   # a wrong blob near it
    (x_add, y_add, add), (x_remove, y_remove, remove) = figure_script.choose_clicks(preview, truth)
    assert (add, remove) == (1, 0)
    assert truth[int(y_add), int(x_add)] and not preview[int(y_add), int(x_add)]
    assert preview[int(y_remove), int(x_remove)] and not truth[int(y_remove), int(x_remove)]
    assert figure_script.choose_clicks(truth, truth) == []


def test_real_weights_need_both_files(figure_script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        figure_script.parse_args(["--dinov2", str(tmp_path / "dinov2.pth")])
    assert "give both --dinov2 and --sam" in capsys.readouterr().err


def test_given_checkpoints_are_used_and_named_in_the_caption(figure_script, tiny_models, tmp_path):
    args = figure_script.parse_args([
        "--dinov2", tiny_models.dinov2_checkpoint, "--dinov2-model", "dinov2_tiny14",
        "--sam", tiny_models.sam_checkpoint, "--sam-model", "sam_tiny", "--input-size", "112"])
    selection, words = figure_script.load_models(args)
    assert (selection.dinov2, selection.dinov2_checkpoint) == ("dinov2_tiny14", tiny_models.dinov2_checkpoint)
    assert (selection.sam, selection.sam_checkpoint, selection.input_size) == ("sam_tiny", tiny_models.sam_checkpoint, 112)
    assert words == "models: dinov2_tiny14 (dinov2_tiny14.pth) + SAM sam_tiny (sam_tiny.pth)"
    missing = figure_script.parse_args(["--dinov2", str(tmp_path / "no.pth"), "--sam", tiny_models.sam_checkpoint])
    with pytest.raises(SystemExit, match="not found"):
        figure_script.load_models(missing)
