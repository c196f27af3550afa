"""The command line end to end on real data (Colin27 + AAL) with tiny models, and its errors."""
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import blob_slice
from protosam.cli import main

SLAB = slice(26, 34)  # axial slices of the shrunk Colin27 used here


@pytest.fixture(scope="module")
def colin_case(colin27, tmp_path_factory):
    """An 8-slice, 3 mm Colin27 slab with two AAL structures, as NIfTI files on disk."""
    folder = tmp_path_factory.mktemp("colin")
    image_path, labels_path = colin27
    image = sitk.Shrink(sitk.ReadImage(str(image_path)), [3, 3, 3])
    labels = sitk.Shrink(sitk.ReadImage(str(labels_path)), [3, 3, 3])
    size = list(image.GetSize())
    image = sitk.RegionOfInterest(image, [size[0], size[1], SLAB.stop - SLAB.start], [0, 0, SLAB.start])
    labels = sitk.RegionOfInterest(labels, [size[0], size[1], SLAB.stop - SLAB.start], [0, 0, SLAB.start])
    array = sitk.GetArrayFromImage(labels)
    values, counts = np.unique(array[array > 0], return_counts=True)
    chosen = [int(v) for v in values[np.argsort(counts)[-2:]]]
    kept = np.where(np.isin(array, chosen), array, 0).astype(np.uint8)
    kept_image = sitk.GetImageFromArray(kept)
    kept_image.CopyInformation(labels)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(kept_image, str(folder / "labels.nii.gz"))
    return folder, chosen


def _model_args(models, preset="default"):
    return [
        "--dinov2", models.dinov2, "--dinov2-checkpoint", models.dinov2_checkpoint,
        "--sam", models.sam, "--sam-checkpoint", models.sam_checkpoint,
        "--input-size", str(models.input_size), "--device", "cpu", "--preset", preset,
    ]


def test_segment_writes_labels_with_the_query_geometry(colin_case, tiny_models, tmp_path, capsys):
    folder, chosen = colin_case
    for output in (tmp_path / "out.nii.gz",):
        code = main([
            "segment", "--image", str(folder / "image.nii.gz"), "--support-mask", str(folder / "labels.nii.gz"),
            "--output", str(output), "--modality", "mri", "--report", str(tmp_path / "report"), *_model_args(tiny_models),
        ])
        assert code == 0, capsys.readouterr().err
        query = sitk.ReadImage(str(folder / "image.nii.gz"))
        result = sitk.ReadImage(str(output))
        assert result.GetSize() == query.GetSize()
        assert result.GetSpacing() == pytest.approx(query.GetSpacing())
        assert result.GetOrigin() == pytest.approx(query.GetOrigin())
        assert result.GetDirection() == pytest.approx(query.GetDirection())
        labels = sitk.GetArrayFromImage(result)
        support = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
        assert set(np.unique(labels)) <= {0, *chosen}
        for label in chosen:
            # Propagation within one volume keeps the painted (largest) slice exactly as painted,
            # whatever the other label's propagation put there.
            k = int(np.argmax((support == label).sum(axis=(1, 2))))
            np.testing.assert_array_equal(labels[k] == label, support[k] == label)
        assert list(tmp_path.glob(".*part*")) == []
        pictures = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
        assert pictures == sorted([f"overview_{l}.png" for l in chosen] + [f"slices_{l}.png" for l in chosen])
    assert "wrote" in capsys.readouterr().out


def test_slices_command_writes_the_contract_npz(tiny_models, tmp_path):
    support, mask = blob_slice(112, center=(56, 56), radius=20)
    queries = np.stack([blob_slice(112, center=(50 + 5 * i, 60), radius=18, seed=i)[0] for i in range(3)])
    np.save(tmp_path / "S.npy", support)
    np.save(tmp_path / "M.npy", mask)
    np.save(tmp_path / "Q.npy", queries)
    out = tmp_path / "R.npz"
    code = main([
        "slices", "--support-image", str(tmp_path / "S.npy"), "--support-mask", str(tmp_path / "M.npy"),
        "--queries", str(tmp_path / "Q.npy"), "--out", str(out), *_model_args(tiny_models, "paper"),
    ])
    assert code == 0
    result = np.load(out)
    assert result["coarse_prob"].shape == (3, 112, 112) and result["coarse_prob"].dtype == np.float32
    assert result["coarse_mask"].dtype == result["mask"].dtype == np.uint8
    n = result["num_components"]
    assert result["boxes"].shape[:2] == (3, max(n.max(), 0))
    for q in range(3):
        boxes = result["boxes"][q, : n[q]]
        assert np.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all() and boxes.max() <= 1023
        assert (result["point_labels"][q, : n[q]] == 1).all()

    coarse_out = tmp_path / "coarse.npz"
    main([
        "slices", "--support-image", str(tmp_path / "S.npy"), "--support-mask", str(tmp_path / "M.npy"),
        "--queries", str(tmp_path / "Q.npy"), "--out", str(coarse_out), "--coarse-only", *_model_args(tiny_models, "paper"),
    ])
    coarse = np.load(coarse_out)
    np.testing.assert_array_equal(coarse["mask"], coarse["coarse_mask"])
    np.testing.assert_allclose(coarse["coarse_prob"], result["coarse_prob"])


def _write(array, path, like=None, spacing=None):
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_mask", "empty"),
        ("absent_label", "do not occur"),
        ("geometry", "do not share one voxel grid"),
        ("two_d", "2-D"),
        ("four_d", "4-D"),
        ("nan", "NaN"),
        ("missing_checkpoint", "not found"),
        ("truncated_checkpoint", "truncated"),
        ("wrong_architecture", "does not fit"),
    ],
)
def test_segment_errors_are_clear_exit_1_and_leave_no_output(colin_case, tiny_models, tmp_path, capsys, case, message):
    folder, chosen = colin_case
    image_path, labels_path = folder / "image.nii.gz", folder / "labels.nii.gz"
    image = sitk.ReadImage(str(image_path))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    args = _model_args(tiny_models)
    extra = []
    if case == "empty_mask":
        labels_path = _write(np.zeros_like(labels), tmp_path / "empty.nii.gz", like=image)
    elif case == "absent_label":
        extra = ["--labels", "250"]
    elif case == "geometry":
        labels_path = _write(labels, tmp_path / "other.nii.gz", spacing=(1.0, 1.0, 1.0))
    elif case == "two_d":
        image_path = _write(sitk.GetArrayFromImage(image)[0], tmp_path / "flat.nii.gz")
    elif case == "four_d":
        volume = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
        sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(tmp_path / "series.nii.gz"))
        image_path = tmp_path / "series.nii.gz"
    elif case == "nan":
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array[3, 10, 10] = np.nan
        image_path = _write(array, tmp_path / "nan.mha", like=image)  # ITK's NIfTI reader drops NaNs
    elif case == "missing_checkpoint":
        args[args.index("--sam-checkpoint") + 1] = str(tmp_path / "nowhere.pth")
    elif case == "truncated_checkpoint":
        data = open(tiny_models.sam_checkpoint, "rb").read()
        (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
        args[args.index("--sam-checkpoint") + 1] = str(tmp_path / "cut.pth")
    elif case == "wrong_architecture":
        args[args.index("--dinov2-checkpoint") + 1] = tiny_models.sam_checkpoint
    output = tmp_path / "out" / "seg.nii.gz"
    output.parent.mkdir()
    code = main(["segment", "--image", str(image_path), "--support-mask", str(labels_path), "--output", str(output), *extra, *args])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and err.startswith("protosam: error:")
    assert list(output.parent.iterdir()) == []


def test_console_entry_point_runs(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "protosam", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0
    for command in ("slices", "segment", "weights", "evaluate", "demo"):
        assert command in completed.stdout
    bad = subprocess.run([sys.executable, "-m", "protosam", "segment"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "required" in bad.stderr
