"""Devices on every platform, Apple's MPS included, tested here without a Mac: torch's own
availability functions are replaced by stand-ins, and MPS's errors and warnings by their exact
texts (PyTorch's MPS allocator raises a RuntimeError "MPS backend out of memory (...)"; with
PYTORCH_ENABLE_MPS_FALLBACK=1 it warns once per operator run on the CPU)."""

import logging
import sys
import warnings

import numpy as np
import pytest
import torch

from protosam import engine as engineModule
from protosam.errors import InputError
from protosam.serving import worker_process

MPS_OOM = ("MPS backend out of memory (MPS allocated: 17.88 GB, other allocations: 1.20 GB, max allowed: 18.13 GB). "
           "Tried to allocate 256.00 MB on private pool.")
MPS_FALLBACK = ("The operator 'aten::upsample_bicubic2d.out' is not currently supported on the MPS backend and will "
                "fall back to run on the CPU. This may have performance implications.")


@pytest.fixture
def machine(monkeypatch):
    """Stand-ins for torch's availability checks: set cuda / mps to what a machine has."""
    state = {"cuda": False, "mps": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["cuda"])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: state["mps"])
    return state


def test_auto_picks_cuda_then_mps_then_cpu(machine):
    assert str(engineModule.resolve_device("auto")) == "cpu"
    machine["mps"] = True  # an Apple silicon Mac
    assert str(engineModule.resolve_device("auto")) == "mps"
    assert [d["name"] for d in engineModule.available_devices()] == ["mps", "cpu"]
    machine["cuda"] = True
    assert str(engineModule.resolve_device("auto")) == "cuda"


def test_an_explicit_mps_without_an_apple_gpu_is_refused(machine):
    with pytest.raises(InputError, match="no usable Apple GPU"):
        engineModule.resolve_device("mps")
    machine["mps"] = True
    assert str(engineModule.resolve_device("mps")) == "mps"


def test_only_gpu_out_of_memory_errors_count_as_such():
    assert engineModule.is_out_of_memory(RuntimeError(MPS_OOM))
    assert engineModule.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert not engineModule.is_out_of_memory(RuntimeError("shape mismatch"))


def test_mps_out_of_memory_falls_back_like_cudas(tinyOptions):
    from ProtoSAMSlicerLib.models import engineCacheForDevice

    engine = engineCacheForDevice("cpu").get(tinyOptions.models, tinyOptions.preset, "cpu",
                                             weightsHome=tinyOptions.weightsHome)
    images = engine.to_model_input(np.random.default_rng(0).random((2, 40, 40)).astype(np.float32))
    expected = engine.encode(images)
    real = engine._encode_batch
    failures = []

    def encodeBatch(batch):
        if not failures:  # the first (2-slice) batch does not fit, as on a Mac with too little memory
            failures.append(batch.shape[0])
            raise RuntimeError(MPS_OOM)
        return real(batch)

    engine.batch_size = 2
    engine._encode_batch = encodeBatch
    try:
        torch.testing.assert_close(engine.encode(images), expected)
        assert failures == [2] and engine.batch_size == 1  # halved, then went on
        engine.device = torch.device("mps")  # one slice at a time still too much: the CPU takes over
        engine._recover_from_out_of_memory(RuntimeError(MPS_OOM))
        assert engine.device.type == "cpu"
        with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not swallowed
            engine._encode_batch = lambda batch: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
            engine.encode(images)
    finally:
        del engine._encode_batch
        engine.batch_size = 1


def test_the_worker_logs_which_operators_fell_back_to_the_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="protosam"), warnings.catch_warnings():  # restores showwarning
        warnings.simplefilter("always")
        worker_process.log_mps_fallbacks()
        warnings.warn(MPS_FALLBACK, UserWarning)
    assert "MPS fallback: operator aten::upsample_bicubic2d.out runs on the CPU" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
def test_the_worker_is_launched_with_the_mps_fallback_enabled(monkeypatch):
    from ProtoSAMSlicerLib.worker_client import WorkerClient

    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    client = WorkerClient("mps-environment")
    try:
        pid = client.health().pid
        with open(f"/proc/{pid}/environ", "rb") as stream:
            environment = dict(item.split(b"=", 1) for item in stream.read().split(b"\0") if b"=" in item)
        assert environment[b"PYTORCH_ENABLE_MPS_FALLBACK"] == b"1"
    finally:
        client.shutdown()
