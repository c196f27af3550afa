"""Every engine-side user path with a SAM 2 refiner (the tiny test-only SAM 2, random weights in
the official format): `protosam segment`, `protosam batch`, a Session with corrections, and a
real `protosam serve` process over HTTP. One small case each; the masks mean nothing, the
paths must work and agree with the engine run in this process."""
import csv
import threading

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from required_modules import require_module

require_module("sam2", "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 (see .ci/run)")

from engine_helpers import (  # noqa: E402,F401 (one_torch_thread: autouse fixture)
    bearer, box_volume, cpu_engine_spec, one_torch_thread, segment_volume_request)
from protosam import Engine, catalogue  # noqa: E402
from protosam.cli import main  # noqa: E402
from protosam.models.sam2_refiner import Sam2Refiner  # noqa: E402
from protosam.serving import protocol  # noqa: E402
from protosam.serving.client import ServerConnection, forward_job, forwarding_request, session_request  # noqa: E402
from protosam.session import Session, engine_session_cache_bytes  # noqa: E402
from protosam.testing import start_server, write_tiny_sam2_checkpoint  # noqa: E402



@pytest.fixture(scope="module")
def sam2_models(tmp_path_factory):
    return write_tiny_sam2_checkpoint(tmp_path_factory.mktemp("tiny_sam2"), input_size=56)


@pytest.fixture(scope="module")
def engine(sam2_models):
    return Engine(sam2_models, device="cpu", download=False)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The box volume as NIfTI files: image, and its middle slice painted (label 1)."""
    folder = tmp_path_factory.mktemp("sam2_case")
    volume, mask = box_volume(slices=5, size=32)
    for array, name in ((volume, "image.nii.gz"), (mask, "labels.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(folder / name))
    return folder, volume, mask


def _model_args(models):
    return ["--dinov2", models.dinov2, "--dinov2-checkpoint", models.dinov2_checkpoint, "--sam", models.sam,
            "--sam-checkpoint", models.sam_checkpoint, "--input-size", str(models.input_size), "--device", "cpu",
            "--no-download"]


def _labels(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_engine_runs_sam2_and_sizes_the_session_cache_for_it(engine, sam2_models):
    assert isinstance(engine.refiner, Sam2Refiner) and not engine.refiner.medsam
    # The session's default budget holds 64 slices of the refiner's own features.
    from protosam.models.dinov2 import get_dinov2_architecture

    per_slice = catalogue.refiner_cache_bytes_per_slice(catalogue.TINY_SAM2)
    channels = get_dinov2_architecture(sam2_models.dinov2).embed_dim
    grid = 32  # the engine's smallest ALPNet grid (56 px gives 4 x 4, upsampled to 32 x 32)
    assert engine_session_cache_bytes(engine) == 64 * (4 * channels * grid * grid + per_slice)
    assert engine.refiner.embed(torch.zeros(1, 3, 1024, 1024)).numel() * 4 == per_slice
    volume, _ = box_volume(slices=3, size=32)
    assert Session(engine, volume).cache.max_bytes == engine_session_cache_bytes(engine)


def test_segment_and_batch_commands_with_sam2(case, sam2_models, tmp_path, capsys):
    folder, _, mask = case
    single = tmp_path / "single.nii.gz"
    assert main(["segment", "--image", str(folder / "image.nii.gz"), "--support-mask", str(folder / "labels.nii.gz"),
                 "--output", str(single), *_model_args(sam2_models)]) == 0, capsys.readouterr().err
    labels = _labels(single)
    np.testing.assert_array_equal(labels[2], mask[2])  # the painted slice is kept as painted
    assert labels.any(axis=(1, 2)).sum() >= 1

    manifest = tmp_path / "jobs.csv"
    with open(manifest, "w", newline="") as stream:
        csv.writer(stream).writerows([["image", "output"], [folder / "image.nii.gz", "out/case.nii.gz"]])
    assert main(["batch", "--manifest", str(manifest), "--support-image", str(folder / "image.nii.gz"),
                 "--support-mask", str(folder / "labels.nii.gz"), *_model_args(sam2_models)]) == 0
    # The batch row is what `protosam segment` wrote with the support from another file (same volume).
    other = tmp_path / "other.nii.gz"
    assert main(["segment", "--image", str(folder / "image.nii.gz"), "--support-image", str(folder / "image.nii.gz"),
                 "--support-mask", str(folder / "labels.nii.gz"), "--output", str(other), *_model_args(sam2_models)]) == 0
    np.testing.assert_array_equal(_labels(tmp_path / "out" / "case.nii.gz"), _labels(other))


def test_session_corrections_with_sam2(engine):
    volume, mask = box_volume(slices=5, size=32)
    session = Session(engine, volume)
    first = session.start({"1": mask})["1"]
    np.testing.assert_array_equal(first[2], mask[2])
    before = first[1].copy()
    clicked = session.correct("1", 1, [[16, 16]], [1])
    assert session.clicks("1", 1) == [(16.0, 16.0, 1)]
    boxed = session.box("1", 3, [6, 6, 26, 26])
    assert boxed.shape == (32, 32) and clicked.shape == before.shape
    np.testing.assert_array_equal(session.undo_click("1", 1), before)
    assert session.clicks("1", 1) == []
    painted = np.zeros((32, 32), np.uint8)
    painted[8:24, 8:24] = 1
    np.testing.assert_array_equal(session.add_support("1", 4, painted), painted)
    updated = session.update("1")
    np.testing.assert_array_equal(updated[4], painted)
    assert 1 not in session.fixed_slices("1") and {3, 4} <= set(session.fixed_slices("1"))
    session.close()


def test_server_job_and_session_with_sam2(sam2_models, tmp_path, engine):
    live = start_server(sam2_models, tmp_path / "server")
    try:
        volume, mask = box_volume(slices=5, size=32)
        request = segment_volume_request(sam2_models, volume, mask)
        value = forward_job(forwarding_request(request, live.url, live.tokens["alice"]), lambda d, t: None,
                            threading.Event())
        # The server's worker ran the same engine code as this process (one thread both sides).
        local = Session(engine, volume).start({"1": mask})["1"]
        np.testing.assert_array_equal(value["masks"]["1"], local)
        # Memory mode travels in the engine spec (the server checks it against its refiner).
        request.engine["propagation"] = "memory"
        memory = forward_job(forwarding_request(request, live.url, live.tokens["alice"]), lambda d, t: None,
                             threading.Event())
        memory_engine = Engine(sam2_models, device="cpu", download=False, propagation="memory")
        np.testing.assert_array_equal(memory["masks"]["1"], Session(memory_engine, volume).start({"1": mask})["1"])
        assert not np.array_equal(memory["masks"]["1"], value["masks"]["1"])  # it did walk with memory
        opened = protocol.SessionOpen(
            id=protocol.new_id(), session_id=protocol.new_id(), engine=cpu_engine_spec(sam2_models),
            volume=protocol.Image(volume), structures={"1": value["masks"]["1"]},
            options={"axis": 0, "adopt": True, "fixed_slices": {"1": value["support_slices"]["1"]}})
        connection = ServerConnection(live.url, live.tokens["alice"])
        session_request(connection, opened)
        clicked = session_request(connection, protocol.SessionCorrect(
            id=protocol.new_id(), session_id=opened.session_id, structure="1", axis=0, slice_index=1,
            points=[[16, 16]], labels=[1]))
        assert clicked["clicks"] == [[16.0, 16.0, 1]] and clicked["mask"].shape == (32, 32)
        response = httpx.post(live.url + "/v1/requests", headers=bearer(live, "alice"), timeout=60,
                              content=protocol.encode(protocol.SessionClose(id="c", session_id=opened.session_id)))
        assert response.status_code == 200
    finally:
        live.stop()


def test_the_catalogue_knows_each_dinov2_encoders_feature_channels():
    """Slicer sizes the worker's cache from the catalogue without torch: its channel counts must
    be the architectures' own."""
    from protosam import catalogue
    from protosam.models.dinov2 import get_dinov2_architecture

    for model in catalogue.models_of("dinov2"):
        assert model.feature_channels == get_dinov2_architecture(model.name).embed_dim, model.name
    with pytest.raises(ValueError, match="not a DINOv2 encoder"):
        catalogue.encoder_cache_bytes_per_slice("vit_b", "vit_b")
