"""``protosam evaluate --interactive``: the CVPR 2025 tracks end to end (real Colin27 + AAL
cases, tiny random-weight models, ProtoSAM's Session), and the pieces they are made of."""
import json

import numpy as np
import pytest

from protosam.cli import main
from protosam.errors import InputError
from protosam.evaluation.click_simulation import ChallengeBox, median_foreground_slice
from protosam.evaluation.interactive import (InteractiveCase, discover_cases, load_npz_case, write_challenge_npz,
                                             write_colin27_cases)
from protosam.evaluation.interactive_metrics import click_auc
from protosam.evaluation.pseudo_scans import PseudoScanSpec
from protosam.testing import write_tiny_checkpoints
from engine_helpers import csv_rows, run_cli

THALAMUS = {"thalamus": ("Thalamus",)}
#: 3 slices (even axial slices 84..88) x 32 rows x 90 columns per hemisphere: small, to keep CI fast.
SMALL = {"slice_range": (84, 90), "row_range": (90, 122), "structures": THALAMUS}



@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    models = write_tiny_checkpoints(tmp_path_factory.mktemp("interactive_tiny"), input_size=224)
    return ["--dinov2", models.dinov2, "--dinov2-checkpoint", models.dinov2_checkpoint, "--sam", models.sam,
            "--sam-checkpoint", models.sam_checkpoint, "--input-size", "224", "--device", "cpu", "--cca",
            "--preset", "default"]


def test_cvpr25_track_on_a_challenge_npz_case(sample, model_args, tmp_path):
    data = tmp_path / "npz"
    label_map = write_colin27_cases(sample, data, fmt="npz", scans=(PseudoScanSpec("1", "L", 0),), **SMALL)
    (case,) = discover_cases(data)
    assert case.from_npz and case.modality == "MR" and case.boxes is not None and case.image.shape == (3, 32, 90)
    out = tmp_path / "out"
    code, stdout = run_cli(["evaluate", "--interactive", "cvpr25", "--data", str(data), "--label-map",
                         json.dumps(label_map), "--out", str(out), *model_args])
    assert code == 0, stdout
    steps = csv_rows(out / "per_step.csv")
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
    (summary,) = csv_rows(out / "per_case.csv")
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


def test_cohort_track_grows_an_example_bank_and_starts_from_it(sample, model_args, tmp_path):
    from protosam.cli import build_parser
    from protosam.cli.common import engine_from_args
    from protosam.evaluation.interactive_metrics import dice
    from protosam.examples import ExampleBank
    from protosam.session import Session

    data = tmp_path / "pairs"
    label_map = write_colin27_cases(sample, data, fmt="nifti",
                                    scans=(PseudoScanSpec("1", "L", 0), PseudoScanSpec("2", "R", 0)), **SMALL)
    out, bank_folder = tmp_path / "out", tmp_path / "bank"
    # Two clicks per volume (--clicks) keep the test short; the cvpr25 test runs all five.
    argv = ["evaluate", "--interactive", "cohort", "--clicks", "2", "--data", str(data), "--label-map",
            json.dumps(label_map), "--out", str(out), "--examples", str(bank_folder), *model_args]
    code, stdout = run_cli(argv)
    assert code == 0, stdout
    steps = csv_rows(out / "per_step.csv")
    first = [r for r in steps if r["volume_index"] == "0"]
    second = [r for r in steps if r["volume_index"] == "1"]
    assert len(first) == len(second) == 3
    assert first[0]["interaction"] == "mask"
    # The bank grew by volume 0's painted z_mid slice and the slices its clicks corrected
    # (those that show the structure), then by volume 1's corrected slices.
    bank = ExampleBank(bank_folder, create=False)
    grown = json.loads((out / "results.json").read_text())["meta"]["examples_after_volume"]
    examples = bank.list("thalamus")
    assert len(examples) == grown[1] and 1 <= grown[0] <= grown[1] and set(bank.structures()) == {"thalamus"}
    cases = discover_cases(data)
    from_first = examples[:grown[0]]
    assert {e.volume_hash for e in from_first} == {from_first[0].volume_hash}
    z_mid = median_foreground_slice(cases[0].labels == 1)
    clicked = {int(r["click_zyx"].split()[0]) for r in first[1:] if r["click_zyx"]}
    assert {e.slice_index for e in from_first} <= clicked | {z_mid}
    assert all(e.slice_count == 3 and e.axis == 0 for e in from_first)
    clicked_second = {int(r["click_zyx"].split()[0]) for r in second[1:] if r["click_zyx"]}
    assert {e.slice_index for e in examples[grown[0]:]} <= clicked_second
    # Volume 1 started from the bank alone: the same as a user's session given those examples.
    assert second[0]["interaction"] == f"examples:{grown[0]}"
    engine = engine_from_args(build_parser().parse_args(argv))
    supports = bank.supports("thalamus", axis=0, engine=engine)[:grown[0]]
    session = Session(engine, cases[1].image, modality="auto")
    try:
        explicit = session.start({}, examples={1: supports})[1]
    finally:
        session.close()
    assert float(second[0]["dsc"]) == pytest.approx(dice(explicit, cases[1].labels == 1), abs=1e-6)
    assert (out / "pictures" / "cohort_volumes.png").is_file()
    assert "ohort: DSC against the volume index" in (out / "report.html").read_text()
    # The default bank is a temporary folder inside --out, gone after the run.
    assert not [p for p in out.iterdir() if p.name.startswith(".cohort-bank-")]


def test_cohort_bank_option_is_checked(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    assert main(["evaluate", "--interactive", "cvpr25", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--examples", str(tmp_path / "bank")]) != 0
    assert "use it with --interactive cohort" in capsys.readouterr().err
    assert main(["evaluate", "--interactive", "cohort", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--examples", str(data / "bank")]) != 0
    assert "lies inside --data" in capsys.readouterr().err
    assert main(["evaluate", "--interactive", "cohort", "--data", str(data), "--out", str(tmp_path / "b" / "o"),
                 "--examples", str(tmp_path / "b")]) != 0
    assert "inside the example bank" in capsys.readouterr().err


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
