"""ProtoSAM's CVPR 2025 interactive user and scores against the challenge's own numbers.

``Testing/engine/data/cvpr25/expected.json`` was computed once with the challenge's evaluation
code (JunMa11/CVPR-MedSegFMCompetition at commit 748e862: ``CVPR25_iter_eval.py`` run
unchanged with a stand-in container that returns the fixed predictions of
``cases/<case>_predictions.npz``, ``get_boxes.py`` for the boxes, ``SurfaceDice.py`` for the
per-class numbers) by ``data/cvpr25/run_challenge_code.py``; the command and commit are stored
in the JSON. This test needs none of that code: it replays the same steps with
:mod:`protosam.evaluation.click_simulation` and :mod:`protosam.evaluation.interactive_metrics`.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from protosam.evaluation import click_simulation, interactive_metrics
from required_modules import require_module
from protosam.evaluation.click_simulation import ChallengeBox, challenge_boxes, simulate_click

DATA = Path(__file__).parent / "data" / "cvpr25"
EXPECTED = json.loads((DATA / "expected.json").read_text())
CASES = sorted(EXPECTED["cases"])


def _case(name):
    with np.load(DATA / "cases" / f"{name}.npz") as data:
        gts, spacing = data["gts"], data["spacing"]
    with np.load(DATA / "cases" / f"{name}_predictions.npz") as predictions:
        steps = predictions["steps"]
    return gts, spacing, steps


def _replayed_clicks(name, **options):
    """Clicks of steps 1..5, each placed on the previous step's prediction (the box step's
    prediction, or an empty one for a case without boxes)."""
    gts, _, steps = _case(name)
    expected = EXPECTED["cases"][name]
    has_box = expected["boxes"] is not None
    clicks = {}
    for step in range(1, 6):
        previous = steps[step - 1] if (has_box or step > 1) else np.zeros_like(gts)
        clicks[str(step)] = {}
        for cls in expected["classes"]:
            click = simulate_click(previous == cls, gts == cls, **options)
            clicks[str(step)][str(cls)] = None if click is None else {"zyx": list(click.zyx), "positive": click.positive}
    return clicks


def test_expected_numbers_name_their_source():
    assert EXPECTED["source"]["repository"] == "JunMa11/CVPR-MedSegFMCompetition"
    assert EXPECTED["source"]["commit"].startswith("748e862")
    assert "run_challenge_code.py" in EXPECTED["command"]


@pytest.mark.parametrize("name", CASES)
def test_clicks_land_on_the_same_voxels(name):
    assert _replayed_clicks(name) == EXPECTED["cases"][name]["clicks"]


def test_fixtures_exercise_ties_no_click_and_empty_start():
    # Step 4 of case_a: a 4x4x4 hole has eight equally deep voxels, so the seeded tie-break matters.
    gts, _, steps = _case("case_a")
    region = click_simulation.largest_error_region(steps[3] == 2, gts == 2)
    depth = click_simulation.region_depth(region)
    assert (depth == depth.max()).sum() == 8
    clicks = EXPECTED["cases"]["case_a"]["clicks"]
    assert clicks["4"]["3"] is None and clicks["5"]["2"] is None
    assert EXPECTED["cases"]["case_b"]["boxes"] is None


def test_six_connectivity_picks_other_voxels():
    """The comparison can fail: with 6-connected error regions (not the challenge's 26) some
    clicks move."""
    assert any(_replayed_clicks(name, connectivity=6) != EXPECTED["cases"][name]["clicks"] for name in CASES)


def test_other_tie_break_seed_picks_other_voxels():
    assert _replayed_clicks("case_a", seed=0) != EXPECTED["cases"]["case_a"]["clicks"]


@pytest.mark.parametrize("name", [name for name in CASES if EXPECTED["cases"][name]["boxes"] is not None])
def test_boxes_equal_get_boxes(name):
    expected = EXPECTED["cases"][name]["boxes"]
    gts, _, _ = _case(name)
    boxes = challenge_boxes(gts)
    assert [boxes[c].to_json() for c in sorted(boxes)] == expected
    assert ChallengeBox.from_json(expected[0]) == boxes[min(boxes)]


def test_box_jitter_is_drawn_and_scaled():
    gts, _, _ = _case("case_c")
    jittered, tight = challenge_boxes(gts), challenge_boxes(gts, seed=None)
    assert jittered[2].x_min < tight[2].x_min and jittered[2].z_mid == tight[2].z_mid
    small, _, _ = _case("case_a")  # 32-pixel slices: int(shift * 32 / 256) = 0
    assert challenge_boxes(small) == challenge_boxes(small, seed=None)


@pytest.mark.parametrize("name", CASES)
def test_scores_and_aucs_equal_the_challenge(name):
    require_module("monai", "pip install 'protosam[evaluation]'")
    gts, spacing, steps = _case(name)
    expected = EXPECTED["cases"][name]
    assert list(spacing) == expected["spacing"]
    dscs, nsds = [], []
    for step, prediction in enumerate(steps):
        if step == 0 and expected["boxes"] is None:
            dscs.append(0.0)  # the challenge scores a skipped box step as 0
            nsds.append(0.0)
            continue
        scores = interactive_metrics.case_scores(prediction, gts, spacing)
        dscs.append(scores["dsc"])
        nsds.append(scores["nsd"])
        for cls in expected["classes"]:
            per_class = expected["per_class"][step][str(cls)]
            assert interactive_metrics.dice(prediction == cls, gts == cls) == pytest.approx(per_class["dsc"], abs=1e-12)
            assert interactive_metrics.surface_dice(prediction == cls, gts == cls, spacing) == pytest.approx(
                per_class["nsd_raw"], abs=1e-6)
    assert dscs == pytest.approx(expected["dsc"], abs=1e-12)
    assert nsds == pytest.approx(expected["nsd"], abs=1e-6)
    assert interactive_metrics.click_auc(dscs) == pytest.approx(expected["dsc_auc"], abs=1e-12)
    assert interactive_metrics.click_auc(nsds) == pytest.approx(expected["nsd_auc"], abs=1e-6)
    assert dscs[-1] == pytest.approx(expected["dsc_final"]) and nsds[-1] == pytest.approx(expected["nsd_final"], abs=1e-6)
    assert interactive_metrics.time_budget(len(expected["classes"])) == expected["runtime_upperbound"]


def test_nsd_is_zero_at_low_dice():
    require_module("monai", "pip install 'protosam[evaluation]'")
    gts, spacing, _ = _case("case_b")
    far = np.roll(gts, 8, axis=2)
    scores = interactive_metrics.case_scores(far, gts, spacing)
    assert scores["dsc"] <= 0.2 and scores["nsd"] == 0.0
    assert interactive_metrics.surface_dice(far == 1, gts == 1, spacing) > 0.0
