"""The example bank (protosam.examples): the teach-once loop, pooling, "similar", the feature
cache, and the index under a killed writer and two writers at once (real processes)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest

from protosam import Engine, InputError, Session, segment_volume
from protosam.examples import ExampleBank, add_session_slices
from protosam.propagation import SupportExample, _prepare_structure, pool_prototypes

SIZE = 48


def _volume(slices, seed, centre=(24, 24)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(100.0, 10.0, (slices, SIZE, SIZE)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    for k in range(slices):
        radius = 10 - 5 * abs(k / max(slices - 1, 1) - 0.5)
        truth[k] = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    volume += 60.0 * truth
    return volume, truth


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models, preset="default", device="cpu")


def _count_encoded(engine, monkeypatch):
    counts = {"slices": 0}
    encode = engine.encode

    def counting(images):
        counts["slices"] += images.shape[0]
        return encode(images)

    monkeypatch.setattr(engine, "encode", counting)
    return counts


def test_teach_once_loop_bank_alone_equals_the_same_supports_given_explicitly(engine, tmp_path, one_thread):
    volume_a, truth_a = _volume(7, seed=1)
    painted = np.zeros_like(truth_a)
    painted[3] = truth_a[3]
    session = Session(engine, volume_a, modality="mri", cache_bytes=2**26, auto_extent=False)
    session.start({"organ": painted})
    session.correct("organ", 1, [[24, 24]], [1])  # a click ...
    session.add_support("organ", 5, truth_a[5])  # ... and a repainted slice
    assert session.fixed_slices("organ") == [1, 3, 5]
    assert session.mask("organ")[1].any()

    bank = ExampleBank(tmp_path / "bank")
    added = add_session_slices(bank, session, "organ", "liver", terminology="SCT^10200004^Liver")
    assert [e.slice_index for e in added] == [1, 3, 5] and bank.structures() == {"liver": 3}
    assert {e.volume_hash for e in added} == {bank.volume_hash(session.volume)}
    index_text = (tmp_path / "bank" / "index.json").read_text()
    assert json.loads(index_text)["version"] == 1 and str(tmp_path) not in index_text

    volume_b, _ = _volume(9, seed=2)
    from_bank = segment_volume(engine, volume_b, None, {}, axis=0, modality="mri", auto_extent=False,
                               examples={"liver": bank.supports("liver", axis=0, engine=engine)})
    explicit = segment_volume(engine, volume_b, volume_a, {"liver": session.mask("organ")}, axis=0, modality="mri",
                              support_slices={"liver": [1, 3, 5]}, auto_extent=False)
    assert from_bank.masks["liver"].any()
    np.testing.assert_array_equal(from_bank.masks["liver"], explicit.masks["liver"])
    assert from_bank.processed_slices == explicit.processed_slices

    # The same in a correction session on B, opened by the worker from a wire message (arrays).
    import threading
    from dataclasses import asdict

    from protosam.serving import protocol
    from protosam.serving.worker_process import Engines, WorkerSessions

    from engine_helpers import cpu_engine_spec

    message = protocol.SessionOpen(
        id="open", session_id="b", engine=cpu_engine_spec(engine.models), volume=protocol.Image(volume_b),
        structures={}, options={"axis": 0, "modality": "mri", "auto_extent": False},
        examples={"liver": [asdict(e) for e in bank.supports("liver", axis=0, engine=engine)]})
    sessions = WorkerSessions(Engines())
    opened = sessions.job(protocol.decode(protocol.encode(message)), lambda done, total: None, threading.Event())
    np.testing.assert_array_equal(opened["masks"]["liver"], explicit.masks["liver"])
    assert opened["fixed_slices"] == {"liver": []}


def test_examples_that_share_a_seed_are_pooled_into_its_prototypes(engine):
    volume, truth = _volume(5, seed=3)
    examples = [SupportExample(volume[2] / 100.0, truth[2], 2, 5), SupportExample(volume[3] / 100.0, truth[3], 3, 7)]
    query = np.zeros((9, SIZE, SIZE), np.float32)
    structure = _prepare_structure(engine, "x", None, None, None, False, query.shape, (0, 8), "nearest", examples)
    assert structure.seeds == [4]  # 2/4 and 3/6 of the way: both seed slice 4 of 9
    shots = [engine.support_prototypes(np.asarray(e.image, np.float32), e.mask.astype(bool)) for e in examples]
    pooled = pool_prototypes(shots)
    got = structure.prototypes_by_seed[4]
    assert got.foreground.shape[0] == pooled.foreground.shape[0] > shots[0].foreground.shape[0]
    np.testing.assert_allclose(got.foreground.numpy(), pooled.foreground.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.background.numpy(), pooled.background.numpy(), rtol=1e-5)


def test_similar_uses_the_examples_closest_to_each_query_slice(engine):
    images = [np.random.default_rng(seed).normal(size=(SIZE, SIZE)).astype(np.float32) for seed in range(3)]
    mask = np.zeros((SIZE, SIZE), bool)
    mask[10:30, 10:30] = True
    examples = [SupportExample(image, mask, k, 3) for k, image in enumerate(images)]
    query = np.zeros((3, SIZE, SIZE), np.float32)
    structure = _prepare_structure(engine, "x", None, None, None, False, query.shape, (0, 2), "similar", examples,
                                   similar_k=1)
    for k, image in enumerate(images):
        features = engine.encode(engine.to_model_input(image[None]))[0]
        chosen = structure.prototypes_for(0, features)  # slice 0's nearest seed would be example 0's
        own = structure.similar[k][1]
        assert chosen is own, k
    structure.similar_k = 3
    assert structure.prototypes_for(0, features).foreground.shape[0] == sum(
        p.foreground.shape[0] for _, p in structure.similar)
    with pytest.raises(InputError, match="similar_k"):
        _prepare_structure(engine, "x", None, None, None, False, query.shape, (0, 2), "similar", examples, similar_k=0)


def test_cached_features_make_examples_cost_no_encoder_work(engine, tmp_path, monkeypatch, one_thread):
    volume, truth = _volume(6, seed=4)
    bank = ExampleBank(tmp_path / "bank")
    bank.add_slices("organ", volume / 100.0, truth, range(6), axis=0)
    counts = _count_encoded(engine, monkeypatch)
    first = bank.supports("organ", axis=0, engine=engine)
    assert counts["slices"] == 6 and all(s.features is not None for s in first)
    setting_folders = list((tmp_path / "bank" / "features").iterdir())
    assert len(setting_folders) == 1 and len(list(setting_folders[0].glob("*.npy"))) == 6
    counts["slices"] = 0
    again = bank.supports("organ", axis=0, engine=engine)
    assert counts["slices"] == 0
    query, _ = _volume(8, seed=5)
    segment_volume(engine, query, None, {}, axis=0, modality="mri", examples={"organ": again})
    assert counts["slices"] == 8  # the query's slices only
    # Another encoder setting (input size) has its own cache.
    other = Engine(replace(engine.models, input_size=56), preset="default", device="cpu")
    bank.supports("organ", axis=0, engine=other)
    assert len(list((tmp_path / "bank" / "features").iterdir())) == 2
    # Removing an example removes its cached features.
    bank.remove([bank.list()[0].id])
    assert sorted(len(list(folder.glob("*.npy"))) for folder in (tmp_path / "bank" / "features").iterdir()) == [5, 5]


def test_bank_refuses_bad_input_and_other_folders(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="not an example bank"):
        ExampleBank(tmp_path / "data")
    bank = ExampleBank(tmp_path / "bank")
    image = np.ones((8, 8), np.float32)
    with pytest.raises(InputError, match="empty"):
        bank.add("a", image, np.zeros((8, 8)), slice_index=0, slice_count=3, volume_hash="h", axis=0)
    with pytest.raises(InputError, match="outside"):
        bank.add("a", image, np.ones((8, 8)), slice_index=3, slice_count=3, volume_hash="h", axis=0)
    with pytest.raises(InputError, match="axis"):
        bank.add("a", image, np.ones((8, 8)), slice_index=0, slice_count=3, volume_hash="h")
    with pytest.raises(InputError, match="No example with id"):
        bank.remove(["nope"])
    assert bank.list() == []
    index = json.loads((tmp_path / "bank" / "index.json").read_text())
    index["version"] = 99
    (tmp_path / "bank" / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="newer ProtoSAM"):
        ExampleBank(tmp_path / "bank").list()


def test_export_to_a_folder_and_a_zip(tmp_path):
    bank = ExampleBank(tmp_path / "bank")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    for name in ("liver", "spleen", "liver"):
        bank.add(name, np.random.default_rng(0).normal(size=(8, 8)), mask, slice_index=1, slice_count=4,
                 volume_hash="h", plane="axial")
    copy = ExampleBank(bank.export(tmp_path / "copy", structures=["liver"]))
    assert copy.structures() == {"liver": 2}
    image, got = copy.arrays(copy.list()[0])
    np.testing.assert_array_equal(image, bank.arrays(bank.list()[0])[0])
    import zipfile

    archive = bank.export(tmp_path / "bank.zip")
    with zipfile.ZipFile(archive) as opened:
        assert json.loads(opened.read("index.json"))["examples"] == json.loads((tmp_path / "bank" / "index.json")
                                                                               .read_text())["examples"]
        assert len([n for n in opened.namelist() if n.endswith(".npz")]) == 3
    with pytest.raises(InputError, match="already exists"):
        bank.export(tmp_path / "copy")


_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from protosam.examples import bank as bank_module
    folder, name, count, stall = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "stall"
    bank = bank_module.ExampleBank(folder)
    if sys.argv[4] == "together":  # start adding when every writer is ready (imports done), at once
        import os
        open(f"{folder}/../ready-{name}", "w").close()
        while not os.path.exists(f"{folder}/../go"):
            time.sleep(0.001)
    if stall:  # publish nothing: stop for good just before the index is written, lock held
        def stop(self, index):
            open(folder + "/../stalled", "w").close()
            time.sleep(600)
        bank_module.ExampleBank._write_index = stop
    mask = np.zeros((64, 64), np.uint8); mask[10:20, 10:20] = 1
    for number in range(count):
        bank.add(name, np.full((64, 64), number, np.float32), mask, slice_index=number, slice_count=count,
                 volume_hash=name, axis=0)
""")


def _writer(tmp_path, folder, name, count, mode="run"):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    return subprocess.Popen([sys.executable, str(script), str(folder), name, str(count), mode], env=dict(os.environ))


def test_a_writer_killed_mid_add_leaves_the_index_valid(tmp_path):
    folder = tmp_path / "bank"
    bank = ExampleBank(folder)
    mask = np.ones((4, 4), np.uint8)
    kept = bank.add("kept", np.zeros((4, 4)), mask, slice_index=0, slice_count=1, volume_hash="h", axis=0)
    writer = _writer(tmp_path, folder, "lost", 1, "stall")
    deadline = time.monotonic() + 120
    while not (tmp_path / "stalled").exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer never reached the index write"
        time.sleep(0.05)
    assert len(list((folder / "examples").glob("*.npz"))) == 2  # its example file is written ...
    os.kill(writer.pid, signal.SIGKILL)  # ... and it dies holding the lock, before publishing
    writer.wait()
    reopened = ExampleBank(folder)
    assert [e.id for e in reopened.list()] == [kept.id]
    reopened.add("after", np.zeros((4, 4)), mask, slice_index=0, slice_count=1, volume_hash="h", axis=0)  # lock free
    assert reopened.structures() == {"kept": 1, "after": 1}
    assert len(list((folder / "examples").glob("*.npz"))) == 2  # the dead writer's file was tidied away
    assert not [p for p in folder.rglob(".writing-*")]


def test_two_writers_at_once_lose_nothing(tmp_path):
    folder = tmp_path / "bank"
    ExampleBank(folder)
    writers = [_writer(tmp_path, folder, name, 15, "together") for name in ("left", "right")]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{name}").exists() for name in ("left", "right")):
        assert all(w.poll() is None for w in writers) and time.monotonic() < deadline, "a writer never got ready"
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both add at once, each example its own locked change of the index
    for writer in writers:
        assert writer.wait(timeout=300) == 0
    bank = ExampleBank(folder)
    assert bank.structures() == {"left": 15, "right": 15} or bank.structures() == {"right": 15, "left": 15}
    assert len({e.id for e in bank.list()}) == 30
    for example in bank.list():
        image, _ = bank.arrays(example)
        assert image[0, 0] == example.slice_index


# ----------------------------------------------------------------------------- the command line
def _nifti(array, path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))  # [k, j, i]: k is the coarse axis, so the plane is axial
    sitk.WriteImage(image, str(path))
    return str(path)


def _read(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_command_line_add_list_segment_from_the_bank_remove_export(tiny_models, tmp_path, capsys, one_thread):
    from protosam.cli import main

    models = ["--dinov2", tiny_models.dinov2, "--dinov2-checkpoint", tiny_models.dinov2_checkpoint, "--sam",
              tiny_models.sam, "--sam-checkpoint", tiny_models.sam_checkpoint, "--input-size",
              str(tiny_models.input_size), "--device", "cpu", "--no-download"]
    volume_a, truth_a = _volume(7, seed=6)
    labels_a = np.zeros_like(truth_a)
    labels_a[[1, 3, 5]] = truth_a[[1, 3, 5]]
    image_a, label_map = _nifti(volume_a, tmp_path / "a.nii.gz"), _nifti(labels_a, tmp_path / "a_labels.nii.gz")
    image_b = _nifti(_volume(9, seed=7)[0], tmp_path / "b.nii.gz")
    bank = str(tmp_path / "bank")

    assert main(["examples", "add", bank, "--image", image_a, "--label-map", label_map, "--names", "liver"]) == 0
    assert main(["examples", "list", bank]) == 0
    assert "liver: 3 example(s)" in capsys.readouterr().out
    assert main(["examples", "list", bank, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["slice_index"] for e in listed] == [1, 3, 5] and {e["plane"] for e in listed} == {"axial"}

    # B from the bank alone equals B from the same three slices given explicitly.
    assert main(["segment", "--image", image_b, "--examples", bank, "--output", str(tmp_path / "bank.nii.gz")]
                + models) == 0
    assert main(["segment", "--image", image_b, "--support-image", image_a, "--support-mask", label_map,
                 "--support-slice", "1,3,5", "--output", str(tmp_path / "explicit.nii.gz")] + models) == 0
    from_bank = _read(tmp_path / "bank.nii.gz")
    assert from_bank.any()
    np.testing.assert_array_equal(from_bank, _read(tmp_path / "explicit.nii.gz"))
    # batch: a row with no support mask runs from the bank alone (as segment did); a row with one
    # uses both; a second run skips both rows (resume).
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"image,output,support_image,support_mask\n{image_b},{tmp_path / 'rows' / 'b.nii.gz'},,\n"
                        f"{image_b},{tmp_path / 'rows' / 'b2.nii.gz'},{image_a},{label_map}\n")
    batch = ["batch", "--manifest", str(manifest), "--examples", bank, "--structures", "liver=1"] + models
    assert main(batch) == 0
    assert "2 done" in capsys.readouterr().out
    np.testing.assert_array_equal(_read(tmp_path / "rows" / "b.nii.gz"), from_bank)
    assert _read(tmp_path / "rows" / "b2.nii.gz").any()
    assert main(batch) == 0
    assert "2 skipped" in capsys.readouterr().out
    # Both together: the support mask's label 1 and the bank's structure named "liver" as label 1.
    assert main(["segment", "--image", image_b, "--support-image", image_a, "--support-mask", label_map,
                 "--examples", bank, "--structures", "liver=1", "--support-mode", "similar",
                 "--output", str(tmp_path / "both.nii.gz")] + models) == 0
    assert "3 bank example(s) of 'liver'" in capsys.readouterr().out

    # What may not be written, and what is missing, is refused before any work.
    assert main(["segment", "--image", image_b, "--output", str(tmp_path / "x.nii.gz")] + models) == 1
    assert main(["segment", "--image", image_b, "--examples", bank, "--output", bank + "/x.nii.gz"] + models) == 1
    assert main(["examples", "add", image_a, "--image", image_a, "--label-map", label_map]) == 1
    assert main(["examples", "add", str(tmp_path), "--image", image_a, "--label-map", label_map]) == 1
    assert main(["examples", "add", bank, "--image", image_a, "--label-map", label_map, "--slices", "0"]) == 1
    assert "not painted on slice(s) [0]" in capsys.readouterr().err

    assert main(["examples", "export", bank, str(tmp_path / "shared.zip")]) == 0
    assert main(["examples", "export", bank, str(tmp_path / "shared")]) == 0
    assert ExampleBank(tmp_path / "shared").structures() == {"liver": 3}
    assert main(["examples", "remove", bank, "--structure", "liver"]) == 0
    assert ExampleBank(bank).structures() == {}


# ----------------------------------------------------------------------------- worker and server
def test_examples_travel_as_arrays_to_the_server_and_its_worker(tiny_models, tmp_path, one_thread):
    """A bank run over real HTTP (the server's worker process runs it) equals the same run here;
    an example that names a path instead of carrying arrays is refused, never opened."""
    import threading

    import httpx

    from protosam.serving import protocol
    from protosam.serving.worker_process import Engines, run_job
    from protosam.testing import start_server

    from engine_helpers import bearer, cpu_engine_spec

    volume_a, truth_a = _volume(7, seed=8)
    bank = ExampleBank(tmp_path / "bank")
    bank.add_slices("liver", volume_a / 100.0, truth_a, [2, 4], axis=0)
    engine = Engine(tiny_models, preset="default", device="cpu")
    examples = {"liver": bank.supports("liver", axis=0, engine=engine)}
    query, _ = _volume(9, seed=9)

    def request(examples):
        kwargs = dict(query_volume=query, support_volume=None, support_masks={}, axis=0, modality="mri",
                      examples=examples)
        return protocol.JobSubmit(id=protocol.new_id(), operation="segment_volume", kwargs=kwargs,
                                  engine=cpu_engine_spec(tiny_models))

    wire = protocol.decode(protocol.encode(request(examples)))  # what a worker receives: arrays and numbers
    local = run_job(Engines(), wire, lambda done, total: None, threading.Event())
    assert local["masks"]["liver"].any()
    server = start_server(tiny_models, tmp_path / "server")
    try:
        def run(job):
            response = httpx.post(server.url + "/v1/jobs", content=protocol.encode(job), headers=bearer(server))
            assert response.status_code == 202, response.text
            job_id, done = response.json()["id"], -1
            while True:
                reply = httpx.get(f"{server.url}/v1/jobs/{job_id}", params={"done": done, "wait": 1},
                                  headers=bearer(server), timeout=40)
                message = protocol.decode(reply.content)
                if not isinstance(message, protocol.JobProgress):
                    return message
                done = message.done

        result = run(request(examples))
        assert isinstance(result, protocol.JobResult), result
        np.testing.assert_array_equal(result.value["masks"]["liver"], local["masks"]["liver"])
        secret = tmp_path / "secret.npy"
        np.save(secret, np.ones((SIZE, SIZE), np.float32))
        named = [{"image": str(secret), "mask": truth_a[2], "slice_index": 2, "slice_count": 7}]
        refused = run(request({"liver": named}))
        assert isinstance(refused, protocol.ErrorReply) and "must be an array" in refused.message
    finally:
        server.stop()


def test_a_session_rebound_to_other_models_encodes_its_examples_again(engine, tmp_path, one_thread):
    volume_a, truth_a = _volume(5, seed=10)
    bank = ExampleBank(tmp_path / "bank")
    bank.add_slices("liver", volume_a / 100.0, truth_a, [2], axis=0)
    query, _ = _volume(5, seed=11)
    session = Session(engine, query, modality="mri", auto_extent=False)
    session.start({}, examples={"liver": bank.supports("liver", axis=0, engine=engine)})
    other = Engine(replace(engine.models, input_size=56), preset="default", device="cpu")
    assert session.rebind(engine=other)
    fresh = Session(other, query, modality="mri", auto_extent=False).start(
        {}, examples={"liver": bank.supports("liver", axis=0)})
    np.testing.assert_array_equal(session.update("liver"), fresh["liver"])
