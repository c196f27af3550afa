"""``protosam evaluate`` and ``protosam demo`` end to end: real Colin27 + AAL images, tiny models.

The pseudo-dataset: Colin27 axial slices 82..93 split into three scans (left hemisphere even
slices = scan 1, left odd = scan 2, right even mirrored = scan 3); AAL thalamus -> Synapse
"spleen" (1), putamen -> "right_kidney" (2). Every number in the output files is recomputed
here by hand from the saved predictions and the label files.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from protosam.evaluation.pseudo_scans import PseudoScanSpec, build_pseudo_dataset
from engine_helpers import csv_rows, run_cli

SCANS = (PseudoScanSpec("1", "L", 0), PseudoScanSpec("2", "L", 1), PseudoScanSpec("3", "R", 0))
LABELS = {"spleen": 1, "right_kidney": 2}



@pytest.fixture(scope="module")
def model_args(tiny_models):
    # The session's tiny checkpoints (conftest.py, input size 112): no second set to write, and a
    # quarter of the encoder tokens of 224. CCA keeps one prompt set per slice: one SAM decoder
    # call, which keeps the test fast.
    return ["--dinov2", tiny_models.dinov2, "--dinov2-checkpoint", tiny_models.dinov2_checkpoint,
            "--sam", tiny_models.sam, "--sam-checkpoint", tiny_models.sam_checkpoint,
            "--input-size", str(tiny_models.input_size), "--device", "cpu", "--cca"]


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


@pytest.fixture(scope="module")
def evaluation(sample, model_args, tmp_path_factory):
    data = tmp_path_factory.mktemp("pseudo")
    build_pseudo_dataset(sample, data, slice_range=(82, 94), scans=SCANS,
                         stand_ins={"spleen": ("Thalamus",), "right_kidney": ("Putamen",)})
    out = tmp_path_factory.mktemp("evaluation")
    code, stdout = run_cli(["evaluate", "--data", str(data), "--support-scan", "1", "--organs", "spleen,right_kidney",
                         "--protocol", "both", "--save-masks", "--seed", "7", "--preset", "paper",
                         "--out", str(out), *model_args])
    assert code == 0, stdout
    return data, out, stdout


def test_evaluate_writes_all_files(evaluation):
    _, out, stdout = evaluation
    for name in ("per_slice.csv", "per_scan.csv", "summary.csv", "results.json", "table.txt"):
        assert (out / name).is_file(), name
    assert "[paper]" in stdout and "[realistic]" in stdout and "Spleen" in stdout and "RK" in stdout
    assert (out / "table.txt").read_text().strip() in stdout


def test_paper_protocol_slice_choices_by_hand(evaluation):
    data, out, _ = evaluation
    spleen_support = np.flatnonzero((_array(data / "label_1.nii.gz") == 1).any(axis=(1, 2))).tolist()
    assert spleen_support == [0, 1, 2, 3, 4]  # thalamus (z 70..91) on z 82..90 -> even slices 0..4
    rows = [r for r in csv_rows(out / "per_scan.csv") if r["protocol"] == "paper"]
    assert sorted((r["organ"], r["scan_id"]) for r in rows) == [
        ("right_kidney", "2"), ("right_kidney", "3"), ("spleen", "2"), ("spleen", "3")]
    for row in rows:
        if row["organ"] == "spleen":
            # 5 slices: positions int(5/6)=0, int(2.5)=2, int(25/6)=4
            assert row["support_slices"] == "0 2 4"
        else:
            # putamen (z 61..87) on z 82, 84, 86 -> slices 0..2: int(0.5)=0, int(1.5)=1, int(2.5)=2
            assert row["support_slices"] == "0 1 2"
    query_2 = [r for r in csv_rows(out / "per_slice.csv") if r["protocol"] == "paper" and r["organ"] == "spleen"
               and r["scan_id"] == "2"]
    # Query scan 2: thalamus on slices 0..4 (z 83..91); parts z // (4 / 3), clipped: 0 0 1 2 2
    assert [(int(r["slice_index"]), int(r["chunk"]), int(r["support_slice"])) for r in query_2] == [
        (0, 0, 0), (1, 0, 0), (2, 1, 2), (3, 2, 4), (4, 2, 4)]


def test_dice_values_recomputed_from_saved_masks(evaluation):
    data, out, _ = evaluation
    slices = csv_rows(out / "per_slice.csv")
    for row in csv_rows(out / "per_scan.csv"):
        organ, scan_id, protocol = row["organ"], row["scan_id"], row["protocol"]
        gt = _array(data / f"label_{scan_id}.nii.gz") == LABELS[organ]
        prediction = _array(out / "masks" / f"{protocol}_{organ}_scan{scan_id}.nii.gz")
        assert prediction.shape == gt.shape
        gt_slices = np.flatnonzero(gt.any(axis=(1, 2)))
        z_min, z_max = int(gt_slices[0]), int(gt_slices[-1])
        assert (int(row["first_gt_slice"]), int(row["last_gt_slice"])) == (z_min, z_max)
        by_hand = {int(k): _dice(prediction[k], gt[k]) for k in gt_slices}
        recorded = {int(r["slice_index"]): float(r["dice"]) for r in slices
                    if (r["protocol"], r["organ"], r["scan_id"]) == (protocol, organ, scan_id)}
        assert recorded == pytest.approx(by_hand, abs=1e-6)
        assert float(row["dice_2d_mean"]) == pytest.approx(np.mean(list(by_hand.values())), abs=1e-6)
        if protocol == "paper":
            # Only the query's GT extent is segmented; 3-D Dice over that extent.
            assert not prediction[:z_min].any() and not prediction[z_max + 1:].any()
            expected_3d = _dice(prediction[z_min:z_max + 1], gt[z_min:z_max + 1])
            assert int(row["n_slices_processed"]) == z_max - z_min + 1
        else:
            expected_3d = _dice(prediction, gt)
            outside = [k for k in range(gt.shape[0]) if (k < z_min or k > z_max) and prediction[k].any()]
            assert int(row["fp_slices_outside"]) == len(outside)
            voxels = sum(int(prediction[k].sum()) for k in range(gt.shape[0]) if k < z_min or k > z_max)
            assert int(row["fp_voxels_outside"]) == voxels
            assert row["support_slices"] == ("2" if organ == "spleen" else "1")  # middle: int(n / 2)
        assert float(row["dice_3d"]) == pytest.approx(expected_3d, abs=1e-6)


def test_summary_aggregates_and_json_meta(evaluation):
    _, out, _ = evaluation
    slices, scans = csv_rows(out / "per_slice.csv"), csv_rows(out / "per_scan.csv")
    summary = {(r["protocol"], r["organ"]): r for r in csv_rows(out / "summary.csv")}
    assert set(summary) == {(p, o) for p in ("paper", "realistic") for o in ("spleen", "right_kidney", "mean")}
    for protocol in ("paper", "realistic"):
        for organ in LABELS:
            pooled = [float(r["dice"]) for r in slices if (r["protocol"], r["organ"]) == (protocol, organ)]
            per_scan = [float(r["dice_3d"]) for r in scans if (r["protocol"], r["organ"]) == (protocol, organ)]
            row = summary[(protocol, organ)]
            assert float(row["dice_2d"]) == pytest.approx(np.mean(pooled), abs=1e-6)
            assert float(row["dice_3d"]) == pytest.approx(np.mean(per_scan), abs=1e-6)
            assert int(row["n_slices"]) == len(pooled) and int(row["n_scans"]) == 2
    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    assert meta["models"]["dinov2"] == "dinov2_tiny14" and meta["models"]["sam"] == "sam_tiny"
    assert meta["models"]["input_size"] == 112  # the --input-size given (conftest.tiny_models)
    assert meta["preset"] == "paper" and meta["preset_fields"]["keep_largest_component"] is True
    assert meta["seed"] == 7 and meta["support_scan"] == "1" and meta["query_scans"] == ["2", "3"]
    assert meta["label_map"] == LABELS and meta["normalization"] == "dataset"
    assert {"torch", "numpy", "protosam", "python"} <= set(meta["versions"])
    assert len(results["slices"]) == len(slices) and len(results["scans"]) == len(scans) == 8
    paper_mean = results["mean_over_organs"]["paper"]["dice_2d"]
    assert paper_mean == pytest.approx(np.mean([float(summary[("paper", o)]["dice_2d"]) for o in LABELS]), abs=1e-6)


def test_pictures_exist_with_sane_size_and_overlays(evaluation):
    _, out, _ = evaluation
    meta = json.loads((out / "results.json").read_text())["meta"]
    pictures = sorted(meta["pictures"])
    assert pictures == sorted([
        "pictures/paper_spleen_scan2.png", "pictures/paper_right_kidney_scan2.png",
        "pictures/paper_dice_spleen.png", "pictures/paper_dice_right_kidney.png",
        "pictures/realistic_spleen_scan2.png", "pictures/realistic_right_kidney_scan2.png",
        "pictures/realistic_dice_spleen.png", "pictures/realistic_dice_right_kidney.png"])
    for name in pictures:
        with Image.open(out / name) as picture:
            width, height = picture.size
            assert 600 <= width <= 2000 and 300 <= height <= 2000, name
            rgb = np.asarray(picture.convert("RGB")).astype(int)
        if "dice" not in name:
            # Support mask and ground truth are green; the (random-model) result is red.
            green = (rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2])) > 80
            red = (rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 80
            assert green.sum() > 100, name
            assert red.sum() > 100, name


def test_evaluate_reports_usage_errors(tmp_path, model_args):
    code, _ = run_cli(["evaluate", "--out", str(tmp_path), *model_args])
    assert code == 1
    code, _ = run_cli(["evaluate", "--data", str(tmp_path), "--out", str(tmp_path), *model_args])
    assert code == 1  # no scans there


def test_polyp_mode_on_real_2d_images(sample, model_args, tmp_path):
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.image)))
    atlas = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.labels)))
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for k in (80, 84, 88):
        Image.fromarray(image[k].astype(np.uint8)).save(tmp_path / "images" / f"case{k}.png")
        Image.fromarray(((atlas[k] == 77) * 255).astype(np.uint8)).save(tmp_path / "masks" / f"case{k}.png")
    out = tmp_path / "out"
    code, stdout = run_cli(["evaluate", "--polyp-images", str(tmp_path / "images"), "--polyp-masks",
                         str(tmp_path / "masks"), "--seed", "3", "--name", "colin", "--out", str(out), *model_args])
    assert code == 0, stdout
    names = ["case80", "case84", "case88"]
    support = names[random.Random(3).randrange(3)]
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["support_scan"] == support and meta["seed"] == 3
    rows = csv_rows(out / "per_scan.csv")
    assert sorted(r["scan_id"] for r in rows) == sorted(n for n in names if n != support)
    summary = csv_rows(out / "summary.csv")[0]
    assert float(summary["dice_2d"]) == pytest.approx(np.mean([float(r["dice_2d_mean"]) for r in rows]), abs=1e-6)
    assert "Dice, mean over images" in stdout and "colin" in stdout
    assert (out / "pictures" / "polyp_colin.png").is_file()


def test_demo_end_to_end(sample, model_args, tmp_path):
    out = tmp_path / "demo"
    code, stdout = run_cli(["demo", "--out", str(out), "--structures", "Thalamus_L", "--slices", "85:87",
                         "--no-sample-download", *model_args])
    assert code == 0, stdout
    segmentation = sitk.ReadImage(str(out / "demo_segmentation.nii.gz"))
    colin = sitk.ReadImage(str(sample.image))
    assert segmentation.GetSize() == colin.GetSize() and segmentation.GetOrigin() == colin.GetOrigin()
    assert segmentation.GetDirection() == colin.GetDirection()
    labels = sitk.GetArrayFromImage(segmentation)
    assert set(np.unique(labels).tolist()) <= {0, 1}
    assert not labels[:85].any() and not labels[88:].any()  # only the chosen slices
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.labels))) == 77
    results = json.loads((out / "demo_results.json").read_text())
    assert results["support_slices"] == {"Thalamus_L": 86}  # slices 85..87 all hold it: middle
    # The painted support slice is kept as painted.
    np.testing.assert_array_equal(labels[86] == 1, truth[86])
    assert results["dice_3d"]["Thalamus_L"] == pytest.approx(_dice(labels[85:88] == 1, truth[85:88]), abs=1e-6)
    assert "Thalamus_L: support slice 86" in stdout
    for name in ("overview_Thalamus_L.png", "slices_Thalamus_L.png"):
        with Image.open(out / "pictures" / name) as picture:
            assert min(picture.size) >= 300
