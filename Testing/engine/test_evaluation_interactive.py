"""``protosam evaluate --interactive``: the CVPR 2025 tracks end to end (real Colin27 + AAL
cases, tiny random-weight models, ProtoSAM's Session), and the pieces they are made of."""
import contextlib
import csv
import io
import json

import numpy as np
import pytest

from protosam.cli import main
from protosam.errors import InputError
from protosam.evaluation.click_simulation import ChallengeBox
from protosam.evaluation.interactive import (Example, InteractiveCase, PassedExamples, discover_cases,
                                             load_npz_case, support_volume_from_examples, write_challenge_npz,
                                             write_colin27_cases)
from protosam.evaluation.interactive_metrics import click_auc
from protosam.evaluation.pseudo_scans import PseudoScanSpec
from protosam.evaluation.sample_data import find_installed_sample
from protosam.testing import write_tiny_checkpoints

THALAMUS = {"thalamus": ("Thalamus",)}
#: 3 slices (even axial slices 84..88) x 32 rows x 90 columns per hemisphere: small, to keep CI fast.
SMALL = {"slice_range": (84, 90), "row_range": (90, 122), "structures": THALAMUS}


@pytest.fixture(scope="module")
def sample():
    found = find_installed_sample()
    if found is None:
        pytest.fail("Colin27/AAL not found: install Debian's mricron-data (apt-get install mricron-data).")
    return found


@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    models = write_tiny_checkpoints(tmp_path_factory.mktemp("interactive_tiny"), input_size=224)
    return ["--dinov2", models.dinov2, "--dinov2-checkpoint", models.dinov2_checkpoint, "--sam", models.sam,
            "--sam-checkpoint", models.sam_checkpoint, "--input-size", "224", "--device", "cpu", "--cca",
            "--preset", "default"]


def _run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cvpr25_track_on_a_challenge_npz_case(sample, model_args, tmp_path):
    data = tmp_path / "npz"
    label_map = write_colin27_cases(sample, data, fmt="npz", scans=(PseudoScanSpec("1", "L", 0),), **SMALL)
    (case,) = discover_cases(data)
    assert case.from_npz and case.modality == "MR" and case.boxes is not None and case.image.shape == (3, 32, 90)
    out = tmp_path / "out"
    code, stdout = _run(["evaluate", "--interactive", "cvpr25", "--data", str(data), "--label-map",
                         json.dumps(label_map), "--out", str(out), *model_args])
    assert code == 0, stdout
    steps = _rows(out / "per_step.csv")
    assert [int(r["step"]) for r in steps] == [0, 1, 2, 3, 4, 5]
    assert steps[0]["interaction"] == "box" and {r["class_name"] for r in steps} == {"thalamus"}
    truth = case.labels == 1
    for row in steps[1:]:
        assert row["interaction"] in ("click+", "click-", "none")
        if row["interaction"] != "none":
            zyx = tuple(int(v) for v in row["click_zyx"].split())
            # A positive click lands on the structure, a negative one off it.
            assert truth[zyx] == (row["interaction"] == "click+") == (row["click_positive"] == "True")
        assert 0.0 <= float(row["dsc"]) <= 1.0 and float(row["seconds"]) >= 0.0
    (summary,) = _rows(out / "per_case.csv")
    dscs = [float(v) for v in summary["dsc"].split()]
    assert dscs == pytest.approx([float(r["dsc"]) for r in steps], abs=1e-6)
    assert float(summary["dsc_auc"]) == pytest.approx(click_auc(dscs), abs=1e-5)
    assert float(summary["budget_seconds"]) == 90.0
    assert (summary["within_budget"] == "True") == (float(summary["seconds_total"]) <= 90.0)
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["tracks"] == ["cvpr25"] and len(results["steps"]) == 6
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 1 and "Track cvpr25" in report
    assert "DSC_AUC" in stdout


def test_cohort_track_grows_its_examples(sample, model_args, tmp_path):
    data = tmp_path / "pairs"
    label_map = write_colin27_cases(sample, data, fmt="nifti",
                                    scans=(PseudoScanSpec("1", "L", 0), PseudoScanSpec("2", "R", 0)), **SMALL)
    out = tmp_path / "out"
    # Two clicks per volume (--clicks) keep the test short; the cvpr25 test runs all five.
    code, stdout = _run(["evaluate", "--interactive", "cohort", "--clicks", "2", "--data", str(data), "--label-map",
                         json.dumps(label_map), "--out", str(out), *model_args])
    assert code == 0, stdout
    steps = _rows(out / "per_step.csv")
    first = [r for r in steps if r["volume_index"] == "0"]
    second = [r for r in steps if r["volume_index"] == "1"]
    assert len(first) == len(second) == 3
    assert first[0]["interaction"] == "mask"
    # The second volume starts from the first volume's examples: its z_mid slice and the
    # slices its clicks corrected (those not empty).
    examples = int(second[0]["interaction"].split(":")[1])
    clicked = {int(r["click_zyx"].split()[0]) for r in first[1:] if r["click_zyx"]}
    assert 1 <= examples <= len(clicked) + 1
    assert (out / "pictures" / "cohort_volumes.png").is_file()
    assert "cohort: DSC against the volume index" in (out / "report.html").read_text() or \
        "Cohort: DSC against the volume index" in (out / "report.html").read_text()


def test_interactive_needs_data(tmp_path, capsys):
    assert main(["evaluate", "--interactive", "cvpr25", "--out", str(tmp_path / "o")]) != 0
    assert "--interactive needs --data" in capsys.readouterr().err


def test_npz_case_errors_say_what_is_wrong(tmp_path):
    np.savez(tmp_path / "bad.npz", imgs=np.zeros((2, 3, 3)))
    with pytest.raises(InputError, match="lacks gts, spacing"):
        load_npz_case(tmp_path / "bad.npz")
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 2:5, 2:5] = 1
    labels[2, 5:7, 5:7] = 2
    case = InteractiveCase("CT_x", labels.astype(np.float32), labels, (1.0, 1.0, 1.0),
                           {1: ChallengeBox(1, 1, 1, 2, 2, 4, 4)})
    write_challenge_npz(case, tmp_path / "CT_x.npz")
    with pytest.raises(InputError, match="1 boxes for 2 classes"):
        load_npz_case(tmp_path / "CT_x.npz")
    np.savez(tmp_path / "CT_y.npz", imgs=labels, gts=labels, spacing=np.array([1.0, 0.0, 1.0]))
    with pytest.raises(InputError, match="three positive numbers"):
        load_npz_case(tmp_path / "CT_y.npz")


def test_support_volume_places_examples_at_relative_positions():
    image = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
    mask = np.zeros((6, 6), np.uint8)
    mask[2:4, 2:4] = 1
    examples = PassedExamples()
    examples.add(1, Example("a", 1, 4, image[1], mask))   # slice 1 of 4 -> slice 2 of 7
    examples.add(1, Example("b", 3, 4, image[3], mask))   # slice 3 of 4 -> slice 6 of 7
    with pytest.raises(InputError, match="empty"):
        examples.add(1, Example("c", 0, 4, image[0], np.zeros((6, 6))))
    volume, support, slices = support_volume_from_examples(examples.supports(1), (7, 12, 12))
    assert slices == [2, 6] and support.shape == (7, 12, 12)
    assert support[2].sum() == 16 and support[6].sum() == 16 and support[[0, 1, 3, 4, 5]].sum() == 0
    # Each slice repeats the nearest example's image (resized), so the volume looks like a scan.
    assert np.allclose(volume[0], volume[2]) and np.allclose(volume[5], volume[6])
    assert examples.supports(2) == [] and examples.count() == 2


def test_nrrd_pairs_are_cases_with_their_spacing(tmp_path):
    import SimpleITK as sitk

    labels = np.zeros((4, 10, 12), np.uint8)
    labels[1:3, 2:6, 3:8] = 2
    for folder, array in (("images", labels.astype(np.float32) * 10), ("labels", labels)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.7, 0.8, 2.5))  # x, y, z
        (tmp_path / folder).mkdir()
        sitk.WriteImage(image, str(tmp_path / folder / "scan7.nrrd"))
    (case,) = discover_cases(tmp_path, modality="CT")
    assert case.name == "scan7" and case.classes == [2] and case.modality == "CT" and not case.from_npz
    assert case.spacing == pytest.approx((2.5, 0.8, 0.7)) and case.image.shape == (4, 10, 12)
