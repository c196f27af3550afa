"""``protosam batch`` end to end: Colin27 slabs, tiny models, locally and on a local Ray instance."""
import csv
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import one_torch_thread  # noqa: F401 (autouse fixture: local runs compute as 1-CPU Ray workers)
from protosam.cohorts.batch import SIDECAR_SUFFIX, read_manifest
from protosam.cli import main
from protosam.errors import InputError, ProtoSAMError
from required_modules import require_module

RAY_INSTALL = "pip install -e 'ProtoSAMLib[ray]' (in ProtoSAMLib[test])"

SUPPORT_SLAB = (28, 32)  # axial slices of the 3 mm Colin27 the support example is cut from
TARGET_SLABS = ((27, 31), (29, 33), (30, 34))


def _slab(image, first, last):
    size = list(image.GetSize())
    return sitk.RegionOfInterest(image, [size[0], size[1], last - first], [0, 0, first])


@pytest.fixture(scope="module")
def cohort(colin27, tmp_path_factory):
    """Support example + 3 target slabs of Colin27 (3 mm, 4 slices), and two broken inputs."""
    folder = tmp_path_factory.mktemp("cohort")
    image = sitk.Shrink(sitk.ReadImage(str(colin27[0])), [3, 3, 3])
    atlas = sitk.Shrink(sitk.ReadImage(str(colin27[1])), [3, 3, 3])
    labels = _slab(atlas, *SUPPORT_SLAB)
    array = sitk.GetArrayFromImage(labels)
    values, counts = np.unique(array[array > 0], return_counts=True)
    chosen = [int(v) for v in values[np.argsort(counts)[-2:]]]
    kept = sitk.GetImageFromArray(np.where(np.isin(array, chosen), array, 0).astype(np.uint8))
    kept.CopyInformation(labels)
    sitk.WriteImage(_slab(image, *SUPPORT_SLAB), str(folder / "support.nii.gz"))
    sitk.WriteImage(kept, str(folder / "support_labels.nii.gz"))
    for index, slab in enumerate(TARGET_SLABS):
        sitk.WriteImage(_slab(image, *slab), str(folder / f"target_{index}.nii.gz"))
    # A target the engine refuses on the worker (NaN voxels; NRRD keeps them, NIfTI does not)
    # and a support mask on another grid than the support image.
    broken = sitk.GetArrayFromImage(_slab(image, *TARGET_SLABS[0])).astype(np.float32)
    broken[2, 10, 10] = np.nan
    nan_image = sitk.GetImageFromArray(broken)
    nan_image.CopyInformation(_slab(image, *TARGET_SLABS[0]))
    sitk.WriteImage(nan_image, str(folder / "nan_target.nrrd"))
    sitk.WriteImage(_slab(atlas, 26, 29), str(folder / "wrong_size_labels.nii.gz"))
    return folder, chosen


def _model_args(models):
    return [
        "--dinov2", models.dinov2, "--dinov2-checkpoint", models.dinov2_checkpoint,
        "--sam", models.sam, "--sam-checkpoint", models.sam_checkpoint,
        "--input-size", str(models.input_size), "--device", "cpu", "--modality", "mri",
    ]


def _manifest(path, rows):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "output", "support_mask"])
        writer.writerows(rows)
    return path


def _batch(manifest, folder, models, *extra, summary=None):
    code = main([
        "batch", "--manifest", str(manifest), "--support-image", str(folder / "support.nii.gz"),
        "--support-mask", str(folder / "support_labels.nii.gz"), *_model_args(models), *extra,
        *(["--summary", str(summary)] if summary else []),
    ])
    with open(summary or manifest.with_name(f"{manifest.stem}.summary.csv"), newline="") as stream:
        return code, {int(row["row"]): row for row in csv.DictReader(stream)}


def _labels(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _mtimes(paths):
    return [os.stat(p).st_mtime_ns for p in paths]


def _keep_only(source, target, label):
    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayFromImage(image)
    kept = sitk.GetImageFromArray(np.where(array == label, array, 0).astype(array.dtype))
    kept.CopyInformation(image)
    sitk.WriteImage(kept, str(target))


@pytest.fixture(scope="module")
def local_run(cohort, tiny_models, tmp_path_factory):
    """A local batch of the 3 targets (row 2 with its own copy of the support mask) and 2 bad rows."""
    folder, _ = cohort
    run = tmp_path_factory.mktemp("local_run")
    shutil.copy(folder / "support_labels.nii.gz", run / "row2_labels.nii.gz")
    manifest = _manifest(run / "jobs.csv", [
        [folder / "target_0.nii.gz", "out/case_0.nii.gz", ""],  # relative paths: beside the manifest
        [folder / "target_1.nii.gz", "out/case_1.nii.gz", "row2_labels.nii.gz"],
        [folder / "target_2.nii.gz", "out/case_2.nii.gz", ""],
        [folder / "absent.nii.gz", "out/absent.nii.gz", ""],
        [folder / "target_0.nii.gz", "out/wrong.nii.gz", folder / "wrong_size_labels.nii.gz"],
    ])
    code, summary = _batch(manifest, folder, tiny_models)
    outputs = [run / "out" / f"case_{i}.nii.gz" for i in range(3)]
    return run, code, summary, {index: _labels(path) for index, path in enumerate(outputs)}


def test_local_batch_matches_segment_resumes_and_reports_bad_rows(cohort, tiny_models, local_run, tmp_path):
    folder, chosen = cohort
    run, code, summary, _ = local_run
    assert code == 1
    assert [summary[r]["status"] for r in range(1, 6)] == ["done", "done", "done", "failed", "failed"]
    assert "does not exist" in summary[4]["error"]
    assert "do not share one voxel grid" in summary[5]["error"]
    assert not (run / "out" / "wrong.nii.gz").exists() and not (run / "out" / "absent.nii.gz").exists()
    assert list((run / "out").glob(".*part*")) == []
    # An output is exactly what `protosam segment` writes for its target; the summary counts its voxels.
    single = tmp_path / "single.nii.gz"
    assert main([
        "segment", "--image", str(folder / "target_0.nii.gz"), "--support-image", str(folder / "support.nii.gz"),
        "--support-mask", str(folder / "support_labels.nii.gz"), "--output", str(single), *_model_args(tiny_models),
        "--review-json", str(tmp_path / "review.json"),
    ]) == 0
    np.testing.assert_array_equal(_labels(run / "out" / "case_0.nii.gz"), _labels(single))
    for index in range(3):
        output = run / "out" / f"case_{index}.nii.gz"
        for label in chosen:
            assert int(summary[index + 1][f"voxels_{label}"]) == int((_labels(output) == label).sum())
        assert output.with_name(output.name + SIDECAR_SUFFIX).is_file()
    # The confidence columns: the volume's (its least confident label's) and each label's, in
    # [0, 1]; empty for failed rows. segment's --review-json gives the same numbers for row 1.
    review = json.loads((tmp_path / "review.json").read_text())
    assert float(summary[1]["confidence"]) == review["volume"]
    for row in range(1, 4):
        per_label = [float(summary[row][f"confidence_{label}"]) for label in chosen]
        assert all(0 <= value <= 1 for value in per_label) and float(summary[row]["confidence"]) == min(per_label)
    assert summary[4]["confidence"] == summary[5][f"confidence_{chosen[0]}"] == ""
    assert [entry["score"] for entry in review["slices"]] == sorted(entry["score"] for entry in review["slices"])
    assert review["slice_axis"] == "k" and review["plane"] == "axial"
    # The cohort's least confident slices, least confident first, from the done rows only.
    with open(run / "jobs.summary.review.csv", newline="") as stream:
        queue = list(csv.DictReader(stream))
    assert queue and len(queue) <= 20 and list(queue[0]) == ["row", "image", "label", "plane", "slice_axis", "slice",
                                                             "score"]
    assert [float(item["score"]) for item in queue] == sorted(float(item["score"]) for item in queue)
    assert {int(item["row"]) for item in queue} <= {1, 2, 3}
    first_row = [(item["label"], int(item["slice"]), float(item["score"])) for item in queue if item["row"] == "1"]
    assert first_row == [(e["structure"], e["slice"], e["score"]) for e in review["slices"]][:len(first_row)]
    confidence = {row: summary[row]["confidence"] for row in range(1, 4)}

    # A copy of the finished cohort elsewhere, run again: every finished output is skipped, untouched.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    manifest = copy / "jobs.csv"
    outputs = [copy / "out" / f"case_{i}.nii.gz" for i in range(3)]
    before = _mtimes(outputs)
    code, summary = _batch(manifest, folder, tiny_models, "--review", "2")
    assert [summary[r]["status"] for r in range(1, 6)] == ["skipped"] * 3 + ["failed"] * 2
    assert _mtimes(outputs) == before
    assert {row: summary[row]["confidence"] for row in range(1, 4)} == confidence  # kept in the sidecars
    with open(copy / "jobs.summary.review.csv", newline="") as stream:
        assert [(item["row"], item["label"], item["slice"]) for item in csv.DictReader(stream)] == \
            [(item["row"], item["label"], item["slice"]) for item in queue[:2]]

    # Row 2's own support mask changes: only row 2 is redone, with the new mask.
    _keep_only(folder / "support_labels.nii.gz", copy / "row2_labels.nii.gz", chosen[0])
    code, summary = _batch(manifest, folder, tiny_models)
    assert [summary[r]["status"] for r in range(1, 4)] == ["skipped", "done", "skipped"]
    assert set(np.unique(_labels(outputs[1]))) <= {0, chosen[0]}
    assert _mtimes([outputs[0], outputs[2]]) == [before[0], before[2]]

    # A changed option changes every row's parameters: all are redone.
    code, summary = _batch(manifest, folder, tiny_models, "--labels", str(chosen[0]), summary=tmp_path / "s" / "run.csv")
    assert [summary[r]["status"] for r in range(1, 4)] == ["done"] * 3
    for output in outputs:
        assert set(np.unique(_labels(output))) <= {0, chosen[0]}


def test_manifest_errors_say_what_to_fix(tmp_path):
    bad_column = tmp_path / "bad.csv"
    bad_column.write_text("image,output,mask\na.nii.gz,b.nii.gz,c.nii.gz\n")
    with pytest.raises(InputError, match="columns image,output"):
        read_manifest(bad_column, support_mask="m.nii.gz")
    twice = tmp_path / "twice.csv"
    twice.write_text("image,output\na.nii.gz,out.nii.gz\nb.nii.gz,out.nii.gz\n")
    with pytest.raises(InputError, match="Rows 1 and 2 .* both write"):
        read_manifest(twice, support_mask="m.nii.gz")
    with pytest.raises(InputError, match="no support mask"):
        read_manifest(twice)
    jobs = read_manifest(_manifest(tmp_path / "ok.csv", [["a.nii.gz", "o.nii.gz", "m2.nii.gz"]]), support_mask="m.nii.gz")
    assert jobs[0].image == tmp_path / "a.nii.gz" and jobs[0].support_mask == tmp_path / "m2.nii.gz"
    assert jobs[0].support_image is None


def test_interrupted_batch_says_what_was_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a batch: the summary is written and the message says finished volumes are
    kept (the generic 'no output was written' of single-volume commands would be false)."""
    import protosam.cohorts.batch as batch

    for name in ("a.nii.gz", "m.nii.gz"):
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(tmp_path / name))
    manifest = _manifest(tmp_path / "jobs.csv", [["a.nii.gz", "out.nii.gz", "m.nii.gz"]])

    def interrupted(pending, args, report):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "run_local", interrupted)
    code = main(["batch", "--manifest", str(manifest), "--support-mask", str(tmp_path / "m.nii.gz")])
    err = capsys.readouterr().err
    assert code == 130
    assert "finished volumes are kept" in err and "no output was written" not in err
    with open(batch.default_summary_path(manifest)) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["not run"] and "stopped before" in rows[0]["error"]


def test_ray_missing_gives_install_advice(monkeypatch):
    from protosam.cohorts.ray_cluster import import_ray

    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ProtoSAMError, match=r"ProtoSAMLib\[ray\]"):
        import_ray()


def test_unreachable_ray_cluster_gives_advice(monkeypatch):
    from argparse import Namespace

    from protosam.cohorts.ray_cluster import run_on_ray

    ray = require_module("ray", RAY_INSTALL)

    def no_cluster(**_):
        raise ConnectionError("Could not find any running Ray instance.")

    # Ray's own answer to `--ray auto` without a cluster, without depending on this machine's state.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ProtoSAMError, match="ray start --head"):
        run_on_ray([], Namespace(ray="auto"), lambda outcome: None)


class _Cluster:
    """What :func:`protosam.cohorts.ray_cluster._plan_workers` reads of Ray: the nodes' resources."""

    def __init__(self, *resources):
        self.resources = resources

    def nodes(self):
        return [{"Alive": True, "Resources": dict(r)} for r in self.resources] + [{"Alive": False, "Resources": {"GPU": 8}}]


def test_ray_workers_one_per_gpu_or_per_n_cpus():
    from argparse import Namespace

    from protosam.cohorts.ray_cluster import _plan_workers

    def plan(cluster, device="auto", cpus=None, wanted=100):
        return _plan_workers(cluster, Namespace(device=device, ray_cpus_per_worker=cpus), wanted)

    gpu_cluster = _Cluster({"CPU": 16, "GPU": 4}, {"CPU": 2, "GPU": 2}, {"CPU": 32})
    assert plan(gpu_cluster) == (6, 1, {"num_gpus": 1, "num_cpus": 1}, "cuda")
    assert plan(gpu_cluster, cpus=2) == (5, 2, {"num_gpus": 1, "num_cpus": 2}, "cuda")  # the 2-CPU node fits one
    assert plan(gpu_cluster, wanted=3)[0] == 3  # never more actors than volumes
    assert plan(gpu_cluster, device="cpu") == (12, 4, {"num_cpus": 4}, "cpu")
    cpu_cluster = _Cluster({"CPU": 2}, {"CPU": 3})
    assert plan(cpu_cluster) == (1, 3, {"num_cpus": 3}, "cpu")
    assert plan(cpu_cluster, cpus=1) == (5, 1, {"num_cpus": 1}, "cpu")
    with pytest.raises(InputError, match="no GPU"):
        plan(cpu_cluster, device="cuda")
    with pytest.raises(InputError, match="lower --ray-cpus-per-worker"):
        plan(cpu_cluster, cpus=8)


# ----------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance (2 CPUs) for the whole test session: starting Ray is slow."""
    ray = require_module("ray", RAY_INSTALL)

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


class _WorkerKiller(threading.Thread):
    """Kills (SIGKILL) the first Ray batch worker process seen segmenting a volume."""

    TITLE = b"ray::BatchWorker.segment"

    def __init__(self):
        super().__init__(daemon=True)
        self.killed = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and not self.killed:
            for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as stream:
                        title = stream.read()
                except OSError:
                    continue
                if title.startswith(self.TITLE):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                    return
            time.sleep(0.01)


def test_ray_batch_matches_local_retries_a_killed_worker_and_resumes(ray_instance, cohort, tiny_models, local_run, tmp_path):
    folder, chosen = cohort
    reference = local_run[3]
    shutil.copy(folder / "support_labels.nii.gz", tmp_path / "row2_labels.nii.gz")
    targets = [folder / f"target_{i}.nii.gz" for i in range(3)]
    outputs = [tmp_path / "ray" / f"case_{i}.nii.gz" for i in range(3)]
    manifest = _manifest(tmp_path / "jobs.csv", [
        [targets[0], outputs[0], ""], [targets[1], outputs[1], "row2_labels.nii.gz"], [targets[2], outputs[2], ""],
        [folder / "nan_target.nrrd", tmp_path / "ray" / "nan.nii.gz", ""],
        [folder / "absent.nii.gz", tmp_path / "ray" / "absent.nii.gz", ""],
    ])
    killer = _WorkerKiller()
    killer.start()
    started = time.perf_counter()
    try:
        code, summary = _batch(manifest, folder, tiny_models, "--ray", "--ray-cpus-per-worker", "1")
    finally:
        killer.stop.set()
        killer.join()
    print(f"ray batch with one killed worker: {time.perf_counter() - started:.1f} s")
    assert code == 1
    assert len(killer.killed) == 1, "no worker was seen computing a volume"
    assert [summary[r]["status"] for r in range(1, 6)] == ["done"] * 3 + ["failed"] * 2
    assert sorted(int(summary[r]["attempts"]) for r in range(1, 4)) == [1, 1, 2]
    assert "NaN" in summary[4]["error"] and "does not exist" in summary[5]["error"]
    # Identical, not close: the local reference ran the same code on the same CPU with the same
    # thread count (1, as each worker has 1 CPU), on the same arrays, so every float agrees.
    for index, output in enumerate(outputs):
        np.testing.assert_array_equal(_labels(output), reference[index])
        assert sitk.ReadImage(str(output)).GetOrigin() == pytest.approx(sitk.ReadImage(str(targets[index])).GetOrigin())
        # The confidence came back from the Ray worker: the same numbers as the local run's.
        assert summary[index + 1]["confidence"] == local_run[2][index + 1]["confidence"] != ""

    # Re-run on Ray: row 1 is skipped; row 2 (its support mask changed) and row 3 (its output
    # was modified) are redone.
    before = _mtimes(outputs)
    _keep_only(folder / "support_labels.nii.gz", tmp_path / "row2_labels.nii.gz", chosen[1])
    outputs[2].write_bytes(b"not a label map")
    started = time.perf_counter()
    code, summary = _batch(manifest, folder, tiny_models, "--ray", "--ray-cpus-per-worker", "1")
    print(f"ray re-run of 2 volumes: {time.perf_counter() - started:.1f} s")
    assert [summary[r]["status"] for r in range(1, 4)] == ["skipped", "done", "done"]
    assert _mtimes([outputs[0]]) == [before[0]]
    assert set(np.unique(_labels(outputs[1]))) <= {0, chosen[1]}
    np.testing.assert_array_equal(_labels(outputs[2]), reference[2])


def _bank_batch(manifest, bank, models, *extra):
    code = main(["batch", "--manifest", str(manifest), "--examples", str(bank), *_model_args(models), *extra])
    with open(manifest.with_name(f"{manifest.stem}.summary.csv"), newline="") as stream:
        return code, {int(row["row"]): row for row in csv.DictReader(stream)}


def _bank_rows(path, folder, out):
    """Row 1 from the bank alone (no support mask); row 2 from the bank and its support together."""
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "output", "support_image", "support_mask"])
        writer.writerow([folder / "target_0.nii.gz", out / "bank_alone.nii.gz", "", ""])
        writer.writerow([folder / "target_1.nii.gz", out / "bank_and_support.nii.gz", folder / "support.nii.gz",
                         folder / "support_labels.nii.gz"])
    return path, [out / "bank_alone.nii.gz", out / "bank_and_support.nii.gz"]


def _cached_features(bank):
    """setting folder name -> {example id: features} of a bank's feature cache."""
    return {setting.name: {path.stem: np.load(path) for path in setting.glob("*.npy")}
            for setting in (bank / "features").iterdir()} if (bank / "features").is_dir() else {}


def test_ray_batch_from_an_example_bank_equals_local_and_sends_the_banks_features(ray_instance, cohort, tiny_models,
                                                                                  tmp_path):
    """``batch --examples`` on Ray: rows from the bank alone and from bank + support give the
    local run's masks; a worker encodes the uncached examples once (a worker lost while asked
    to is replaced) and the driver caches them in the bank under the key a local run uses; the workers then use the bank's cached features
    as sent (tampered ones change Ray's masks: no worker encoded them again)."""
    folder, chosen = cohort
    bank = tmp_path / "bank"
    assert main(["examples", "add", str(bank), "--image", str(folder / "support.nii.gz"), "--label-map",
                 str(folder / "support_labels.nii.gz"), "--modality", "mri"]) == 0
    local_bank = tmp_path / "local_bank"
    shutil.copytree(bank, local_bank)
    count = len(json.loads((bank / "index.json").read_text())["examples"])
    assert count >= 4

    # First run (nothing cached): the first worker ready is dead when asked to encode the
    # examples (killed after it loaded its models): it is replaced, the row goes to another worker.
    from protosam.cli import build_parser
    from protosam.cohorts.batch import run_batch
    from protosam.cohorts.ray_cluster import _Scheduler

    manifest, ray_outputs = _bank_rows(tmp_path / "ray.csv", folder, tmp_path / "ray")
    args = build_parser().parse_args(["batch", "--manifest", str(manifest), "--examples", str(bank),
                                      *_model_args(tiny_models), "--ray", "--ray-cpus-per-worker", "1"])
    lost = []

    def run_killing_the_first_worker(pending, args, report):
        scheduler = _Scheduler(ray_instance, args, pending, report)
        try:
            first = scheduler.workers[0]
            first.info = ray_instance.get(first.start_ref)
            first.feature_setting = first.info.pop("feature_setting")
            ray_instance.kill(first.handle, no_restart=True)
            replacements = scheduler.replacements_left
            scheduler.run()
            lost.append(replacements - scheduler.replacements_left)
        finally:
            scheduler.close()

    started = time.perf_counter()
    outcomes = run_batch(args, run_remote=run_killing_the_first_worker)
    print(f"ray batch from the bank, one worker lost: {time.perf_counter() - started:.1f} s")
    assert [o.status for o in outcomes] == ["done", "done"] and lost == [1]
    with open(manifest.with_name(f"{manifest.stem}.summary.csv"), newline="") as stream:
        summary = {int(row["row"]): row for row in csv.DictReader(stream)}
    cached = _cached_features(bank)
    assert len(cached) == 1 and len(next(iter(cached.values()))) == count  # encoded once, kept in the bank

    manifest, local_outputs = _bank_rows(tmp_path / "local.csv", folder, tmp_path / "local")
    code, local_summary = _bank_batch(manifest, local_bank, tiny_models)
    assert code == 0
    for ray_output, local_output in zip(ray_outputs, local_outputs):
        assert set(np.unique(_labels(local_output))) - {0}
        np.testing.assert_array_equal(_labels(ray_output), _labels(local_output))
    assert [summary[r]["confidence"] for r in (1, 2)] == [local_summary[r]["confidence"] for r in (1, 2)]
    local_cached = _cached_features(local_bank)
    assert local_cached.keys() == cached.keys()  # the same setting key on the workers and here
    (setting,) = cached
    for example, features in cached[setting].items():
        np.testing.assert_allclose(features, local_cached[setting][example], rtol=1e-5, atol=1e-6)

    # Tampered cached features (negated) change Ray's masks: the actors used the bank's features
    # as sent, none encoded the examples again, and the driver left the cache as it was.
    for path in (bank / "features" / setting).glob("*.npy"):
        np.save(path, -np.load(path))
    manifest, tampered = _bank_rows(tmp_path / "tampered.csv", folder, tmp_path / "tampered")
    code, _ = _bank_batch(manifest, bank, tiny_models, "--ray", "--ray-cpus-per-worker", "1")
    assert code == 0
    assert not np.array_equal(_labels(tampered[0]), _labels(ray_outputs[0]))
    for example, features in _cached_features(bank)[setting].items():
        np.testing.assert_array_equal(features, -cached[setting][example])


# --- Paths a batch may write, checked before anything runs ---------------------------------------

@pytest.fixture
def small_cohort(tmp_path, monkeypatch):
    """Tiny volumes on disk and an engine that must not be built: every check here comes first."""
    import protosam.cohorts.batch as batch

    def no_engine(args):
        raise AssertionError("the models were loaded before the paths were checked")

    monkeypatch.setattr(batch, "engine_from_args", no_engine)
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(0, 4000, (6, 12, 12)).astype(np.int16))
    labels = np.zeros((6, 12, 12), np.uint8)
    labels[1:5, 3:8, 3:8] = 1
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        sitk.WriteImage(image, str(tmp_path / name))
    sitk.WriteImage(mask, str(tmp_path / "m.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "scan.nhdr"))  # header + scan.raw
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(folder):
    return {path.name: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("case", ["row_image", "support_mask", "manifest", "symlink", "hard_link", "dotdot",
                                  "data_file_of_a_header", "a_row_output"])
def test_a_summary_that_is_an_input_is_refused_before_anything_runs(small_cohort, case, capsys):
    folder = small_cohort
    manifest = _manifest(folder / "jobs.csv", [["a.nii.gz", "out/a_seg.nii.gz", ""],
                                              ["scan.nhdr", "out/scan_seg.nii.gz", ""]])
    (folder / "sub").mkdir()
    summary, expect = {
        "row_image": (folder / "a.nii.gz", "the image of row 1"),
        "support_mask": (folder / "m.nii.gz", "--support-mask"),
        "manifest": (manifest, "--manifest"),
        "symlink": (folder / "link.csv", "the image of row 1"),
        "hard_link": (folder / "hard.csv", "--support-mask"),
        "dotdot": ("./sub/../a.nii.gz", "the image of row 1"),
        "data_file_of_a_header": (folder / "scan.raw", "the image of row 2"),
        "a_row_output": (folder / "out" / "a_seg.nii.gz", "both write"),
    }[case]
    if case == "symlink":
        os.symlink(folder / "a.nii.gz", summary)
    elif case == "hard_link":
        os.link(folder / "m.nii.gz", summary)
    before = _files(folder)
    code = main(["batch", "--manifest", str(manifest), "--support-mask", "m.nii.gz", "--summary", str(summary)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("protosam: error: --summary") and expect in err, err
    assert _files(folder) == before and not (folder / "out").exists()


def test_an_output_that_is_another_rows_input_is_refused_before_anything_runs(small_cohort, capsys):
    """a -> b, b -> c: row 1 would replace b by a label map and row 2 segment that label map."""
    folder = small_cohort
    manifest = _manifest(folder / "jobs.csv", [["a.nii.gz", "b.nii.gz", ""], ["b.nii.gz", "c.nii.gz", ""]])
    before = _files(folder)
    code = main(["batch", "--manifest", str(manifest), "--support-mask", "m.nii.gz"])
    err = capsys.readouterr().err
    assert code == 1 and "the output of row 1" in err and "the image of row 2" in err and "destroy your input" in err
    assert _files(folder) == before  # no summary either: nothing ran

    # The support image of the command, written by a row through another spelling.
    manifest = _manifest(folder / "jobs.csv", [["a.nii.gz", "./sub/../c.nii.gz", ""]])
    (folder / "sub").mkdir()
    code = main(["batch", "--manifest", str(manifest), "--support-image", "c.nii.gz", "--support-mask", "m.nii.gz"])
    err = capsys.readouterr().err
    assert code == 1 and "the output of row 1" in err and "--support-image" in err
    assert (folder / "c.nii.gz").read_bytes() == before["c.nii.gz"]


def test_support_slice_takes_segments_grammar_and_is_checked_before_the_models(small_cohort, capsys):
    folder = small_cohort
    from protosam.cli import build_parser

    common = ["batch", "--manifest", "jobs.csv", "--support-mask", "m.nii.gz", "--support-slice"]
    assert build_parser().parse_args(common + ["1,3"]).support_slice == [1, 3]
    assert build_parser().parse_args(common + ["painted"]).support_slice == "painted"
    manifest = _manifest(folder / "jobs.csv", [["a.nii.gz", "out/a.nii.gz", ""], ["b.nii.gz", "out/b.nii.gz", ""]])
    code = main(["batch", "--manifest", str(manifest), "--support-mask", "m.nii.gz", "--support-slice", "0,9"])
    assert code == 1
    with open(folder / "jobs.summary.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert "--support-slice 9 is outside" in rows[0]["error"], rows[0]["error"]


def test_a_nan_image_fails_its_row_before_the_models_and_names_the_file(small_cohort, capsys):
    folder = small_cohort
    reference = sitk.ReadImage(str(folder / "a.nii.gz"))
    array = sitk.GetArrayFromImage(reference).astype(np.float32)
    array[2, 3, 3] = np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(reference)
    sitk.WriteImage(nan, str(folder / "nan.nrrd"))
    manifest = _manifest(folder / "jobs.csv", [["nan.nrrd", "out/nan.nii.gz", ""]])
    assert main(["batch", "--manifest", str(manifest), "--support-mask", "m.nii.gz"]) == 1
    with open(folder / "jobs.summary.csv", newline="") as stream:
        row = next(csv.DictReader(stream))
    assert row["status"] == "failed" and "nan.nrrd contains 1 NaN" in row["error"], row["error"]


def test_an_interrupt_records_the_running_row_and_marks_the_rest_not_run(small_cohort, monkeypatch, capsys):
    import protosam.cohorts.batch as batch
    from protosam.propagation import VolumeResult

    folder = small_cohort
    manifest = _manifest(folder / "jobs.csv", [[name, f"out/{name}", ""] for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz")])
    monkeypatch.setattr(batch, "engine_from_args", lambda args: type("Engine", (), {"device": "cpu"})())
    calls = []

    def propagate(engine, inputs, **options):
        calls.append(options)
        if len(calls) == 2:
            time.sleep(0.3)
            raise KeyboardInterrupt
        return np.zeros(inputs.query.shape, np.uint8), VolumeResult({}, {}, {}, 0.0)  # nothing found

    monkeypatch.setattr(batch, "propagate_labels", propagate)
    code = main(["batch", "--manifest", str(manifest), "--support-mask", "m.nii.gz"])
    assert code == 130
    with open(folder / "jobs.summary.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["status"] for row in rows] == ["done", "interrupted", "not run"]
    assert float(rows[1]["seconds"]) >= 0.3 and rows[1]["attempts"] == "1"
    assert "interrupted" in capsys.readouterr().err


def _write_detached(image, header):
    """``image`` as an uncompressed detached header + raw data file (NRRD .nhdr or MetaImage .mhd)."""
    sitk.WriteImage(image, str(header), useCompression=False)
    return header.with_suffix(".raw")


def test_resume_hashes_the_data_files_behind_headers(cohort, tiny_models, tmp_path):
    """Inputs, supports and outputs as .nhdr/.mhd + .raw: a changed data file redoes the row."""
    folder, _ = cohort
    target = _write_detached(sitk.ReadImage(str(folder / "target_0.nii.gz")), tmp_path / "target.nhdr")
    support = _write_detached(sitk.ReadImage(str(folder / "support.nii.gz")), tmp_path / "support.mhd")
    mask = _write_detached(sitk.ReadImage(str(folder / "support_labels.nii.gz")), tmp_path / "mask.mhd")
    manifest = _manifest(tmp_path / "jobs.csv", [["target.nhdr", "out/seg.nhdr", ""]])

    def run():
        code = main(["batch", "--manifest", str(manifest), "--support-image", str(tmp_path / "support.mhd"),
                     "--support-mask", str(tmp_path / "mask.mhd"), "--support-slice", "painted",
                     *_model_args(tiny_models)])
        with open(tmp_path / "jobs.summary.csv", newline="") as stream:
            row = next(csv.DictReader(stream))
        return code, row["status"]

    def change_voxels(data_file):
        data = bytearray(data_file.read_bytes())
        data[len(data) // 2: len(data) // 2 + 1000] = bytes(1000)
        data_file.write_bytes(bytes(data))

    assert run() == (0, "done")
    assert run() == (0, "skipped")
    change_voxels(target)  # the scan's data, behind an unchanged header
    assert run() == (0, "done")
    change_voxels(support)
    assert run() == (0, "done")
    mask.write_bytes(mask.read_bytes()[::-1])  # the same values in another order
    assert run() == (0, "done")
    assert run() == (0, "skipped")
    written = tmp_path / "out" / "seg.raw.gz"
    assert written.is_file()
    written.unlink()  # the output's data file is gone
    assert run() == (0, "done")
    assert written.is_file()
    written.write_bytes(b"corrupt")
    assert run() == (0, "done")


# --- --exclusive ------------------------------------------------------------------------------------

def test_exclusive_batch_rows_equal_segment_exclusive_locally_and_in_the_ray_worker(cohort, tiny_models, tmp_path):
    """Each row propagates its labels exclusively (``protosam segment --exclusive``'s output), the
    option is part of the row's parameters (a run without it redoes the row), and a Ray row's
    arguments carry it to the actor's body (the same function a Ray worker runs, called here
    without starting Ray)."""
    import collections
    import json
    from argparse import Namespace

    from protosam.cli import build_parser
    from protosam.cohorts.batch import RunParameters, SupportReader, read_manifest
    from protosam.cohorts.ray_cluster import MODEL_OPTIONS, BatchWorker, _Scheduler, _Task

    folder, _ = cohort
    target = folder / "target_0.nii.gz"
    manifest = _manifest(tmp_path / "jobs.csv", [[target, "out/case_0.nii.gz", ""]])
    output = tmp_path / "out" / "case_0.nii.gz"
    code, summary = _batch(manifest, folder, tiny_models, "--exclusive")
    assert code == 0 and summary[1]["status"] == "done"
    sidecar = json.loads(output.with_name(output.name + SIDECAR_SUFFIX).read_text())
    assert sidecar["parameters"]["exclusive"] is True
    exclusive = _labels(output)
    segmented = {}
    for name, extra in (("exclusive", ["--exclusive"]), ("plain", [])):
        path = tmp_path / f"{name}.nii.gz"
        assert main(["segment", "--image", str(target), "--support-image", str(folder / "support.nii.gz"),
                     "--support-mask", str(folder / "support_labels.nii.gz"), "--output", str(path),
                     *_model_args(tiny_models), *extra]) == 0
        segmented[name] = _labels(path)
    np.testing.assert_array_equal(exclusive, segmented["exclusive"])
    assert not np.array_equal(segmented["exclusive"], segmented["plain"]), "the labels do not overlap here"

    code, summary = _batch(manifest, folder, tiny_models)  # without --exclusive: another output
    assert summary[1]["status"] == "done"
    np.testing.assert_array_equal(_labels(output), segmented["plain"])

    args = build_parser().parse_args([
        "batch", "--manifest", str(manifest), "--support-image", str(folder / "support.nii.gz"),
        "--support-mask", str(folder / "support_labels.nii.gz"), *_model_args(tiny_models), "--exclusive"])
    (job,) = read_manifest(args.manifest, support_image=args.support_image, support_mask=args.support_mask)
    scheduler = object.__new__(_Scheduler)  # only its row preparation, with ray.put as the identity
    scheduler.ray, scheduler.args, scheduler.reader = Namespace(put=lambda value: value), args, SupportReader()
    scheduler.support_refs, scheduler.report, scheduler.bank = collections.OrderedDict(), None, None
    task = _Task(job, RunParameters(args).for_job(job))
    assert scheduler._prepare(task) and task.arguments[-1] is True
    worker = BatchWorker({name: getattr(args, name) for name in MODEL_OPTIONS}, 1)
    worker.start()
    labelmap, _, _ = worker.segment(*task.arguments)
    np.testing.assert_array_equal(labelmap, segmented["exclusive"])


def test_the_review_file_orders_the_cohort_and_leaves_out_unreadable_entries(tmp_path):
    """write_review on outcomes as sidecars give them back: least confident first across rows,
    ties by row, at most N; failed rows and hand-edited entries are left out."""
    from protosam.cohorts.batch import BatchJob, JobOutcome, write_review

    def outcome(row, status, slices):
        job = BatchJob(row, tmp_path / f"{row}.nii.gz", tmp_path / f"out{row}.nii.gz", tmp_path / "m.nii.gz")
        return JobOutcome(job, status, confidence={"plane": "axial", "slice_axis": "k", "slices": slices})

    outcomes = [outcome(1, "done", [{"structure": "3", "slice": 4, "score": 0.5}, {"structure": "1", "slice": 2}]),
                outcome(2, "skipped", [{"structure": "1", "slice": 7, "score": 0.5},
                                       {"structure": "1", "slice": 1, "score": 0.25}]),
                outcome(3, "failed", [{"structure": "1", "slice": 0, "score": 0.0}])]
    write_review(tmp_path / "r.csv", outcomes, count=2)
    with open(tmp_path / "r.csv", newline="") as stream:
        rows = [(r["row"], r["label"], r["slice"], r["score"], r["slice_axis"]) for r in csv.DictReader(stream)]
    assert rows == [("2", "1", "1", "0.2500", "k"), ("1", "3", "4", "0.5000", "k")]
