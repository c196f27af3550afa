"""`evaluate` and `demo` check their output folders with the one WritePlan, before any model loads."""
import pytest

import protosam.cli.common as common
import protosam.evaluation.sample_data as sample_data
from protosam.cli import main


@pytest.fixture
def no_engine(monkeypatch):
    def refuse(args):
        raise AssertionError("the models were loaded before the output paths were checked")

    monkeypatch.setattr(common, "engine_from_args", refuse)


def _files(folder):
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("case", ["out_is_data", "out_is_label_map_file", "out_is_polyp_masks"])
def test_evaluate_refuses_an_output_folder_that_is_an_input(tmp_path, no_engine, capsys, case):
    data = tmp_path / "data"
    data.mkdir()
    (data / "image_1.nii.gz").write_bytes(b"scan")
    (tmp_path / "labels.json").write_text('{"liver": 6}')
    (tmp_path / "masks").mkdir()
    argv, expect = {
        "out_is_data": (["--data", str(data), "--out", str(tmp_path / "data" / "." )], "the folder of --data"),
        "out_is_label_map_file": (["--data", str(data), "--label-map", str(tmp_path / "labels.json"),
                                   "--out", str(tmp_path / "labels.json")], "is a file, not a folder"),
        "out_is_polyp_masks": (["--polyp-images", str(data), "--polyp-masks", str(tmp_path / "masks"),
                                "--out", str(tmp_path / "sub" / ".." / "masks")], "the folder of --polyp-masks"),
    }[case]
    before = _files(tmp_path)
    assert main(["evaluate", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("protosam: error: --out") and expect in err, err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("option", ["--out", "--write-pseudo-dataset"])
def test_demo_refuses_the_sample_folder_as_its_output(tmp_path, no_engine, monkeypatch, capsys, option):
    sample = sample_data.SampleFiles(tmp_path / "colin27.nii.gz", tmp_path / "aal.nii.gz", tmp_path / "aal.nii.txt",
                                     "test copy")
    for path in (sample.image, sample.labels, sample.names):
        path.write_bytes(b"sample")
    monkeypatch.setattr(sample_data, "get_sample", lambda **options: sample)
    before = _files(tmp_path)
    assert main(["demo", option, str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"protosam: error: {option}" in err and "the folder of the sample folder" in err, err
    assert _files(tmp_path) == before


def test_ray_interrupt_reports_the_computing_rows_with_their_time_and_attempts():
    import collections
    import time
    from pathlib import Path

    from protosam.cohorts.batch import BatchJob
    from protosam.cohorts.ray_cluster import _Scheduler, _Task, _Worker

    scheduler = object.__new__(_Scheduler)
    reported = []
    scheduler.report = reported.append
    jobs = [BatchJob(row, Path(f"{row}.nii.gz"), Path(f"out{row}.nii.gz"), Path("m.nii.gz")) for row in (1, 2, 3)]
    computing = _Task(jobs[0], {}, losses=1, submitted=time.perf_counter() - 2.0)
    waiting = _Task(jobs[1], {}, submitted=time.perf_counter())
    scheduler.workers = [_Worker(None, None, {"pid": 1}, in_flight=collections.deque([(computing, None), (waiting, None)])),
                         _Worker(None, None, {"pid": 2})]
    scheduler.interrupted()
    assert [(o.job.row, o.status, o.attempts) for o in reported] == [(1, "interrupted", 2)]
    assert reported[0].seconds >= 2.0
