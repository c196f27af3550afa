"""The command line end to end on real data (Colin27 + AAL) with tiny models, and its errors."""
import os
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


@pytest.fixture(scope="module")
def short_colin_case(colin_case, tmp_path_factory):
    """The middle 4 slices of ``colin_case`` (for tests of what is written, not of propagation):
    folder with image.nii.gz and labels.nii.gz, and the labels painted on them."""
    source, _ = colin_case
    folder = tmp_path_factory.mktemp("short_colin")
    for name in ("image.nii.gz", "labels.nii.gz"):
        image = sitk.ReadImage(str(source / name))
        size = list(image.GetSize())
        sitk.WriteImage(sitk.RegionOfInterest(image, [size[0], size[1], 4], [0, 0, 2]), str(folder / name))
    painted = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
    labels = sorted(int(v) for v in np.unique(painted[painted > 0]))
    assert labels, "no label painted on the middle slices"
    return folder, labels


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
        ("review_json_is_an_input", "would destroy your input"),
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
    elif case == "review_json_is_an_input":
        extra = ["--review-json", str(labels_path)]
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


# --- Checks made before any model is loaded (files, output place, labels) -----------------------

NO_MODELS = ["--dinov2-checkpoint", "/nonexistent/dinov2.pth", "--sam-checkpoint", "/nonexistent/sam.pth",
             "--no-download", "--device", "cpu"]  # a check that comes too late fails on these instead


@pytest.fixture
def small_case(tmp_path):
    """A small MRI-like int16 volume with thousands of distinct values and its 2-label map."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(0, 4000, (8, 24, 24)).astype(np.int16))
    image.SetSpacing((0.9, 0.9, 3.0))
    labels = np.zeros((8, 24, 24), np.uint8)
    labels[2:6, 5:12, 5:12] = 1
    labels[3:5, 14:20, 14:20] = 2
    _write(labels, tmp_path / "labels.nii.gz", like=image)
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "support.nii.gz"))
    return tmp_path


def _case_argv(folder, case):
    """(argv, fragments the error must contain, files that must stay unchanged) for one bad call."""
    image, labels, support = folder / "image.nii.gz", folder / "labels.nii.gz", folder / "support.nii.gz"
    argv = {"--image": image, "--support-mask": labels, "--output": folder / "seg.nii.gz"}
    expect = ["destroy your input"]
    if case == "output_is_image":
        argv["--output"] = image
        expect += ["--image"]
    elif case == "output_is_mask":
        argv["--output"] = labels
        expect += ["--support-mask"]
    elif case == "output_is_support_image":
        argv["--support-image"] = support
        argv["--output"] = support
        expect += ["--support-image"]
    elif case == "relative_spelling":
        argv["--image"] = "image.nii.gz"  # run from `folder`
        argv["--output"] = image
        expect += ["--image"]
    elif case == "dotdot_spelling":
        (folder / "sub").mkdir()
        argv["--output"] = folder / "sub" / ".." / "labels.nii.gz"
        expect += ["--support-mask"]
    elif case == "symlink":
        os.symlink(image, folder / "link.nii.gz")
        argv["--output"] = folder / "link.nii.gz"
        expect += ["--image"]
    elif case == "hard_link":
        os.link(labels, folder / "hard.nii.gz")
        argv["--output"] = folder / "hard.nii.gz"
        expect += ["--support-mask"]
    elif case == "data_file_of_a_header":
        # scan.mhd names other.zraw; --output other.mhd would write other.zraw over it.
        sitk.WriteImage(sitk.ReadImage(str(image)), str(folder / "other.mhd"), useCompression=True)
        (folder / "other.mhd").rename(folder / "scan.mhd")
        argv["--image"] = folder / "scan.mhd"
        argv["--output"] = folder / "other.mhd"
        expect += ["other.zraw", "--image"]
    elif case == "output_is_a_directory":
        argv["--output"] = folder
        expect = ["--output", "is a directory"]
    elif case == "output_folder_missing":
        argv["--output"] = folder / "missing" / "seg.nii.gz"
        expect = ["--output", "does not exist", "create"]
    elif case == "output_format":
        argv["--output"] = folder / "seg.png"
        expect = ["--output", "format", ".nii.gz"]
    elif case == "output_format_upper_case":  # ITK's NIfTI writer fails on it, after the whole run
        argv["--output"] = folder / "seg.NII.GZ"
        expect = ["--output", "format", ".nii.gz"]
    elif case == "input_is_a_directory":
        argv["--image"] = folder
        expect = ["--image", "is a directory"]
    elif case == "report_is_a_file":
        argv["--report"] = labels
        expect = ["--report", "not a folder"]
    elif case == "swapped":
        argv["--image"], argv["--support-mask"] = labels, image
        expect = ["--support-mask", "distinct values", "did you swap --image and --support-mask"]
    elif case == "mask_is_an_image":
        argv["--support-image"] = support
        argv["--support-mask"] = support
        argv["--output"] = folder / "seg.nii.gz"
        expect = ["--support-mask", "looks like an image", "--labels"]
    elif case == "float_mask_is_an_image":
        reference = sitk.ReadImage(str(image))
        _write(sitk.GetArrayFromImage(reference) / 7.0, folder / "float.nii.gz", like=reference)
        argv["--image"], argv["--support-mask"] = labels, folder / "float.nii.gz"
        expect = ["--support-mask", "not whole numbers", "did you swap"]
    elif case == "label_above_65535":
        big = sitk.GetArrayFromImage(sitk.ReadImage(str(labels))).astype(np.uint32) * 40000
        _write(big, folder / "big.nrrd", like=sitk.ReadImage(str(image)))
        argv["--support-mask"] = folder / "big.nrrd"
        expect = ["80000", "65535"]
    elif case == "nan_image":  # found by reading, before the models (was: after them, as "query volume")
        reference = sitk.ReadImage(str(image))
        array = sitk.GetArrayFromImage(reference).astype(np.float32)
        array[3, 4, 4] = np.nan
        _write(array, folder / "nan.mha", like=reference)  # ITK's NIfTI reader drops NaNs
        argv["--image"] = folder / "nan.mha"
        expect = ["--image", str(folder / "nan.mha"), "1 NaN"]
    elif case == "support_slice_outside":
        argv["--support-slice"] = "3,8"
        expect = ["--support-slice 8", "outside", "0..7"]
    elif case == "support_slice_not_painted":
        argv["--support-slice"] = "2"  # label 1 is painted on slices 2-5, label 2 on 3-4
        expect = ["Label 2", "not painted on support slice(s) 2", "3, 4"]
    elif case == "many_absent_labels":  # the message lists 10 of them, not a 129 kB line
        argv["--labels"] = ",".join(str(v) for v in range(1, 20001))
        expect = ["Label(s) 3, 4, 5", "and 19,988 more"]
    else:
        raise AssertionError(case)
    kept = [image, labels, support, folder / "scan.mhd", folder / "other.zraw"]
    args = ["segment"]
    for option, value in argv.items():
        args += [option, str(value)]
    return args + NO_MODELS, expect, kept


EARLY_CASES = [
    "output_is_image", "output_is_mask", "output_is_support_image", "relative_spelling", "dotdot_spelling",
    "symlink", "hard_link", "data_file_of_a_header", "output_is_a_directory", "output_folder_missing",
    "output_format", "output_format_upper_case", "input_is_a_directory", "report_is_a_file", "swapped", "mask_is_an_image",
    "float_mask_is_an_image", "label_above_65535", "nan_image", "support_slice_outside", "support_slice_not_painted",
    "many_absent_labels",
]


@pytest.mark.parametrize("case", EARLY_CASES)
def test_bad_arguments_are_refused_before_the_models_and_inputs_are_kept(small_case, case, capsys, monkeypatch):
    monkeypatch.chdir(small_case)
    argv, expect, kept = _case_argv(small_case, case)
    before = {path: path.read_bytes() for path in kept if path.is_file()}
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("protosam: error:"), err
    for fragment in expect:
        assert fragment in err, (fragment, err)
    assert {path: path.read_bytes() for path in kept if path.is_file()} == before
    assert not (small_case / "seg.nii.gz").exists() and not list(small_case.glob(".*part*"))
    assert max(len(line) for line in err.splitlines()) < 1000, "an error line lists too much"


def test_checks_run_without_importing_torch(small_case):
    """Every early error comes before torch is imported (importing it takes seconds), so bad input
    is refused at once. The guarantee is "torch not imported", checked exactly; how long the checks
    take depends on the machine and its load, so no time is asserted (it was flaky under load)."""
    cases = [_case_argv(small_case, case)[:2] for case in EARLY_CASES]
    script = (
        "import contextlib, io, json, sys\n"
        "from protosam.cli import main\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        "    out.append([code, err.getvalue(), 'torch' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    import json

    completed = subprocess.run([sys.executable, "-c", script, json.dumps([argv for argv, _ in cases])],
                               capture_output=True, text=True, timeout=300, cwd=small_case)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)
    assert len(results) == len(EARLY_CASES)
    for case, (argv, expect), (code, err, torch_imported) in zip(EARLY_CASES, cases, results):
        assert code == 1 and all(fragment in err for fragment in expect), (case, err)
        assert not torch_imported, f"{case}: torch was imported before the error"


def test_many_values_pass_when_labels_are_picked(small_case, capsys):
    """An atlas with more labels than the bound is fine once --labels picks some: the run goes on
    to the models (and stops there, at the missing checkpoint)."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case / "image.nii.gz"))).astype(np.uint16)
    _write(labels, small_case / "atlas.nii.gz", like=sitk.ReadImage(str(small_case / "image.nii.gz")))
    picked = int(labels[4, 10, 10])
    code = main(["segment", "--image", str(small_case / "image.nii.gz"),
                 "--support-mask", str(small_case / "atlas.nii.gz"), "--labels", str(picked),
                 "--output", str(small_case / "seg.nii.gz"), *NO_MODELS])
    err = capsys.readouterr().err
    assert code == 1 and "not found" in err and "/nonexistent/" in err, err


def test_an_output_differing_from_an_input_in_case_only_is_another_file_here(short_colin_case, tiny_models, tmp_path,
                                                                           capsys):
    """On a case-sensitive file system (as here) IMAGE.nii.gz is not image.nii.gz: it is written,
    and the input is kept. (On a case-folding one, samefile() makes it the input: refused.)"""
    folder, chosen = short_colin_case
    work = tmp_path / "case"
    work.mkdir()
    image = work / "image.nii.gz"
    image.write_bytes((folder / "image.nii.gz").read_bytes())
    upper = work / "IMAGE.nii.gz"
    if upper.exists():  # case-folding file system: must be refused as the input itself
        code = main(["segment", "--image", str(image), "--support-mask", str(folder / "labels.nii.gz"),
                     "--output", str(upper), *NO_MODELS])
        assert code == 1 and "destroy your input" in capsys.readouterr().err
        return
    before = image.read_bytes()
    code = main(["segment", "--image", str(image), "--support-mask", str(folder / "labels.nii.gz"),
                 "--labels", str(chosen[0]), "--output", str(upper), "--modality", "mri", *_model_args(tiny_models)])
    assert code == 0, capsys.readouterr().err
    assert image.read_bytes() == before
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(upper))))) <= {0, chosen[0]}


def test_ctrl_c_while_writing_the_report_keeps_the_label_map_and_says_so(short_colin_case, tiny_models, tmp_path,
                                                                        capsys, monkeypatch):
    """The label map is written first; a Ctrl-C during the pictures leaves no half picture and
    the message says the label map exists. Files get the umask's mode, pictures too."""
    from matplotlib.figure import Figure

    folder, chosen = short_colin_case
    real_savefig = Figure.savefig
    calls = []

    def interrupted_savefig(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second picture: half written, then Ctrl-C
            with open(path, "wb") as handle:
                handle.write(b"\x89PNG half")
            raise KeyboardInterrupt
        return real_savefig(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", interrupted_savefig)
    output, report = tmp_path / "seg.nii.gz", tmp_path / "report"
    previous = os.umask(0o027)
    try:
        code = main(["segment", "--image", str(folder / "image.nii.gz"),
                     "--support-mask", str(folder / "labels.nii.gz"), "--output", str(output),
                     "--report", str(report), "--modality", "mri", *_model_args(tiny_models)])
    finally:
        os.umask(previous)
    err = capsys.readouterr().err
    assert code == 130
    assert "no output was written" not in err and f"{output} was written" in err and "incomplete" in err
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(output))))) <= {0, *chosen}
    pictures = list(report.iterdir())
    assert len(pictures) == 1 and pictures[0].name.endswith(".png"), pictures  # the first, complete; no half one
    for path in (output, pictures[0]):
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert not list(tmp_path.glob(".*")) and not list(report.glob(".*"))


def test_slices_refuses_an_output_that_is_an_input_before_loading_models(tmp_path, capsys):
    support, mask = blob_slice(112, center=(56, 56), radius=20)
    np.save(tmp_path / "S.npy", support)
    np.save(tmp_path / "M.npy", mask)
    np.save(tmp_path / "Q.npy", support[None])
    before = (tmp_path / "Q.npy").read_bytes()
    code = main(["slices", "--support-image", str(tmp_path / "S.npy"), "--support-mask", str(tmp_path / "M.npy"),
                 "--queries", str(tmp_path / "Q.npy"), "--out", str(tmp_path / "." / "Q.npy"), *NO_MODELS])
    err = capsys.readouterr().err
    assert code == 1 and "--queries" in err and "destroy your input" in err, err
    assert (tmp_path / "Q.npy").read_bytes() == before
    code = main(["slices", "--support-image", str(tmp_path), "--support-mask", str(tmp_path / "M.npy"),
                 "--queries", str(tmp_path / "Q.npy"), "--out", str(tmp_path / "R.npz"), *NO_MODELS])
    assert code == 1 and "--support-image" in capsys.readouterr().err


def test_segment_with_every_painted_slice_as_support_pooled(colin_case, tiny_models, tmp_path, capsys):
    """--support-slice painted --support-mode all: every painted slice of each label is a
    support (printed), kept exactly as painted, and the masks are those of segment_volume with
    the same supports pooled (the CLI adds nothing but the label map)."""
    from protosam import Engine, segment_volume

    folder, chosen = colin_case
    output = tmp_path / "out.nii.gz"
    code = main([
        "segment", "--image", str(folder / "image.nii.gz"), "--support-mask", str(folder / "labels.nii.gz"),
        "--output", str(output), "--modality", "mri", "--support-slice", "painted", "--support-mode", "all",
        *_model_args(tiny_models),
    ])
    out = capsys.readouterr().out
    assert code == 0
    support = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    engine = Engine(tiny_models, preset="default", device="cpu")
    for label in chosen:
        painted = [k for k in range(support.shape[0]) if (support[k] == label).any()]
        assert len(painted) > 1
        assert f"(support slice {painted})" in out
        for k in painted:
            np.testing.assert_array_equal(labels[k] == label, support[k] == label)
    direct = segment_volume(engine, image, None, {l: support == l for l in chosen}, axis=0, modality="mri",
                            support_slices={l: [k for k in range(support.shape[0]) if (support[k] == l).any()] for l in chosen},
                            support_mode="all")
    expected = np.zeros_like(labels)
    for label in reversed(chosen):
        expected[direct.masks[label] > 0] = label
    for label in chosen:
        for k in direct.support_slices[label]:
            expected[k][support[k] == label] = label
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("value", ["twelve", "3,-1", ","])
def test_support_slice_values_are_checked(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--image", "a.nii", "--support-mask", "b.nii", "--output", "c.nii", "--support-slice", value])
    assert exit_info.value.code == 2
    assert "'painted' or slice indices like 12,30,41" in capsys.readouterr().err


def test_segment_exclusive_reaches_segment_volume(monkeypatch):
    """``--exclusive`` is parsed and propagate_labels hands it to segment_volume (the rule
    itself is tested on segment_volume in test_exclusive_negatives.py)."""
    from protosam import propagation
    from protosam.cli import build_parser, common

    assert build_parser().parse_args(["segment", "--image", "a", "--support-mask", "b", "--output", "c",
                                      "--exclusive"]).exclusive is True
    assert build_parser().parse_args(["segment", "--image", "a", "--support-mask", "b", "--output", "c"]).exclusive is False
    seen = {}

    def fake_segment_volume(engine, query, support, masks, **options):
        seen.update(options)
        return propagation.VolumeResult({k: np.asarray(m, np.uint8) for k, m in masks.items()},
                                        {k: [0] for k in masks}, {k: [0] for k in masks}, 0.0)

    monkeypatch.setattr(propagation, "segment_volume", fake_segment_volume)
    labelmap = np.zeros((2, 3, 3), np.uint8)
    labelmap[0, 1, 1] = 1
    inputs = common.SegmentInputs(query=np.zeros((2, 3, 3), np.float32), support=None, labelmap=labelmap, labels=[1],
                                  geometry={"query_ijk_to_ras": np.eye(4), "support_ijk_to_ras": None, "plane": "axial"})
    common.propagate_labels(None, inputs, exclusive=True)
    assert seen["exclusive"] is True
