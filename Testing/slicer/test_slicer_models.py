"""Model manager: choices, weights status, offline instructions, downloads in the worker process."""

import functools
import hashlib
import http.server
import threading

import pytest

from ProtoSAMSlicerLib import models
from ProtoSAMSlicerLib.jobs import JobState
from protosam import ModelSelection
from protosam.errors import WeightsUnavailableError
from protosam.weights import WeightsEntry


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def entry(name, family, payload, base):
    return WeightsEntry(name=name, family=family, architecture=name, file_name=f"{name}.pth",
                        url=f"{base}/{name}.pth", size=len(payload), sha256=hashlib.sha256(payload).hexdigest())


def test_choices_are_known_architectures_and_selection_is_validated():
    selection = models.modelSelection("dinov2_vitl14", "vit_h", samCheckpoint="  ", inputSize=518)
    assert selection == models.ModelSelection(dinov2="dinov2_vitl14", sam="vit_h", input_size=518)
    for name, _ in models.DINOV2_CHOICES:
        models.modelSelection(dinov2=name)
    for name, _ in models.SAM_CHOICES:
        models.modelSelection(sam=name)
    with pytest.raises(ValueError, match="Unknown SAM"):
        models.modelSelection(sam="vit_x")


def test_status_download_with_progress_and_verified_cache(server, tmp_path, cpuWorker):
    served, base = server
    dino, sam = b"d" * 300_000, b"s" * 200_000
    (served / "d1.pth").write_bytes(dino)
    (served / "s1.pth").write_bytes(sam)
    registry = {"d1": entry("d1", "dinov2", dino, base), "s1": entry("s1", "sam", sam, base)}
    home = str(tmp_path / "home")
    selection = ModelSelection(dinov2="d1", sam="s1")
    statuses = models.weightsStatus(selection, home, registry)
    assert [s.status for s in statuses] == ["missing", "missing"]
    text = models.offlineInstructions(statuses)
    assert f"{base}/d1.pth" in text and str(tmp_path / "home" / "weights" / "s1.pth") in text

    worker = cpuWorker
    progress = []
    job = worker.submit(models.downloadWeightsFunction(selection, home, registry=registry),
                        onProgress=lambda j, done, total: progress.append((done, total)))
    worker.runUntilFinished(job, timeout=60)
    assert job.state is JobState.SUCCEEDED, job.errorTraceback
    assert progress[-1] == (500_000, 500_000)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert [s.status for s in models.weightsStatus(selection, home, registry)] == ["verified", "verified"]
    assert models.offlineInstructions(models.weightsStatus(selection, home, registry)).startswith("All model")


def test_wrong_file_on_server_is_refused_and_custom_paths(server, tmp_path, cpuWorker):
    served, base = server
    (served / "d2.pth").write_bytes(b"tampered" * 1000)
    registry = {"d2": entry("d2", "dinov2", b"original" * 1000, base)}
    custom = tmp_path / "fine_tuned_medsam.pth"
    custom.write_bytes(b"x")
    selection = ModelSelection(dinov2="d2", sam="medsam_vit_b", sam_checkpoint=str(custom))
    statuses = models.weightsStatus(selection, str(tmp_path / "home"), registry)
    assert [s.status for s in statuses] == ["missing", "custom"]
    worker = cpuWorker
    job = worker.runUntilFinished(worker.submit(
        models.downloadWeightsFunction(selection, str(tmp_path / "home"), registry=registry)), timeout=60)
    assert job.state is JobState.FAILED and "not the published" in str(job.error)
    assert not (tmp_path / "home" / "weights" / "d2.pth").exists()
    missingCustom = ModelSelection(dinov2="d2", sam="vit_b", sam_checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.downloadWeightsFunction(missingCustom, str(tmp_path / "home"), registry=registry)


def test_unreachable_server_gives_offline_instructions(tmp_path, cpuWorker):
    registry = {"d3": WeightsEntry(name="d3", family="dinov2", architecture="d3", file_name="d3.pth",
                                   url="http://127.0.0.1:9/d3.pth", size=10, sha256="0" * 64)}
    worker = cpuWorker
    job = worker.runUntilFinished(worker.submit(models.downloadWeightsFunction(
        ModelSelection(dinov2="d3", sam="vit_b", sam_checkpoint=__file__), str(tmp_path), registry=registry)),
        timeout=60)
    assert job.state is JobState.FAILED and isinstance(job.error, WeightsUnavailableError)
    assert "http://127.0.0.1:9/d3.pth" in str(job.error)


def test_engine_cache_reuses_engine_per_key(tinyModels):
    cache = models.EngineCache()
    first = cache.get(tinyModels, "default", "cpu")
    assert cache.get(tinyModels, "default", "cpu") is first
    assert cache.get(tinyModels, "paper", "cpu") is not first
    assert models.engineCacheForDevice("cpu-x") is models.engineCacheForDevice("cpu-x")
