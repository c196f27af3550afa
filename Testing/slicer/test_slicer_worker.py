"""Device workers: progress, cancel, errors, queueing, on the worker process (worker_client),
the one compute path of the Slicer code; the deprecated thread worker's own checks (worker)."""

import dataclasses
import os
import threading
import time

import numpy as np
import pytest

from ProtoSAMSlicerLib import worker_client
from ProtoSAMSlicerLib.jobs import JobHandle, JobState
from ProtoSAMSlicerLib.worker import Worker
from ProtoSAMSlicerLib.worker_client import RequestFunction
from protosam import VolumeResult
from protosam.serving import protocol
from protosam.errors import CancelledError, InputError


def engineSpec(models):
    """tinyOptions' engine (same cache budget): the worker keeps the one engine the other tests load."""
    return dataclasses.asdict(protocol.EngineSpec(models=dataclasses.asdict(models), device="cpu",
                                                  cache_bytes=256 * 1024 * 1024))


def sliceJob(models, nSlices, *, badMask=False):
    """A segment_volume job of ``nSlices`` slices on the tiny ``models`` on the CPU (one progress
    unit per slice, cancel checked per slice); ``badMask``: a support mask of the wrong shape (the
    engine refuses it)."""
    rng = np.random.default_rng(nSlices)
    volume = rng.normal(0, 20, (nSlices, 16, 16)).astype(np.float32)
    volume[:, 4:12, 4:12] += 300
    mask = np.zeros((nSlices, 16, 16) if not badMask else (nSlices, 8, 8), np.uint8)
    mask[0, 4:12, 4:12] = 1
    request = protocol.JobSubmit(
        id=protocol.new_id(), operation="segment_volume", engine=engineSpec(models),
        kwargs=dict(query_volume=volume, support_volume=None, support_masks={"box": mask}, axis=0,
                    support_slices=[0], auto_extent=False))
    return RequestFunction(request, decodeResult=lambda value: VolumeResult(**value))


def test_progress_is_monotonic_complete_and_delivered_on_polling_thread(cpuWorker, tinyModels):
    seen, threads = [], set()

    def onProgress(job, done, total):
        seen.append((done, total))
        threads.add(threading.get_ident())

    finished = []
    job = cpuWorker.submit(sliceJob(tinyModels, 3), name="three", onProgress=onProgress,
                           onFinished=lambda j: finished.append(threading.get_ident()))
    cpuWorker.runUntilFinished(job, timeout=120)
    assert job.state is JobState.SUCCEEDED, job.errorTraceback
    assert sorted(job.resultOrRaise().masks) == ["box"]
    assert seen and seen == sorted(seen) and seen[-1][0] == seen[-1][1] > 0
    assert threads == {threading.get_ident()} and finished == [threading.get_ident()]
    assert cpuWorker.pid not in (None, os.getpid())  # the work itself ran in the worker process
    assert job.progress == seen[-1] and job.remainingSeconds() == pytest.approx(0.0)
    assert cpuWorker.pendingJobs == []


def test_progress_checks_catch_engine_bugs():
    # The deprecated thread worker checks the progress its plain functions report (the worker
    # process's jobs are the engine's own operations).
    worker = Worker("test-worker")

    def backwards(progress, cancel):
        progress(3, 5)
        progress(2, 5)
    try:
        job = worker.runUntilFinished(worker.submit(backwards), timeout=10)
    finally:
        worker.shutdown(timeout=5)
    assert job.state is JobState.FAILED and "backwards" in str(job.error)


def test_cancel_stops_within_one_slice(cpuWorker, tinyModels):
    job = cpuWorker.submit(sliceJob(tinyModels, 10), name="long")
    while job.progress[0] < 1 and not job.finished:
        cpuWorker.poll()
        time.sleep(0.002)
    job.cancel()
    cpuWorker.runUntilFinished(job, timeout=120)
    assert job.state is JobState.CANCELLED
    details = job.details  # what the worker saw: slices done when Cancel arrived, and at the stop
    assert details["done_at_stop"] - details["done_at_cancel"] <= 1 and details["done_at_stop"] < 10
    with pytest.raises(CancelledError, match="(?i)cancelled"):
        job.resultOrRaise()
    assert job.result is None


def test_engine_exception_reaches_main_side_with_traceback(cpuWorker, tinyModels):
    job = cpuWorker.submit(sliceJob(tinyModels, 2, badMask=True), name="fails")
    cpuWorker.runUntilFinished(job, timeout=120)
    assert job.state is JobState.FAILED
    with pytest.raises(InputError):
        job.resultOrRaise()
    assert "segment_volume" in job.errorTraceback
    assert job.progress == (0, 0)  # refused before the first slice


def test_two_jobs_queued_both_finish_in_order_on_one_persistent_thread(cpuWorker, tinyModels):
    order = []
    first = cpuWorker.submit(sliceJob(tinyModels, 2), name="first", onFinished=lambda j: order.append(j.name))
    pid = cpuWorker.pid
    second = cpuWorker.submit(sliceJob(tinyModels, 2), name="second", onFinished=lambda j: order.append(j.name))
    assert len(cpuWorker.pendingJobs) == 2
    cpuWorker.runUntilFinished(second, timeout=120)
    cpuWorker.poll()
    assert order == ["first", "second"]
    assert first.resultOrRaise().processed_slices and second.resultOrRaise().processed_slices
    assert cpuWorker.pid == pid  # one persistent worker process ran both
    assert first.finishedAt <= second.startedAt


def test_cancelled_queued_job_never_runs(cpuWorker, tinyModels):
    blocker = cpuWorker.submit(sliceJob(tinyModels, 2), name="blocker")
    queued = cpuWorker.submit(sliceJob(tinyModels, 2), name="queued")
    queued.cancel()
    cpuWorker.runUntilFinished(queued, timeout=120)
    cpuWorker.runUntilFinished(blocker, timeout=120)
    assert blocker.state is JobState.SUCCEEDED
    assert queued.state is JobState.CANCELLED and queued.startedAt is None and queued.progress == (0, 0)


def test_cancel_after_last_slice_still_discards_result(cpuWorker, tinyModels):
    cpuWorker.runUntilFinished(cpuWorker.submit(sliceJob(tinyModels, 1)), timeout=120)  # started, models loaded
    job = cpuWorker.submit(sliceJob(tinyModels, 1))
    time.sleep(2.0)  # the worker finishes; its result waits, unread, until the next poll
    job.cancel()  # the user pressed Cancel while the last slice was finishing
    cpuWorker.runUntilFinished(job, timeout=120)
    assert job.state is JobState.CANCELLED and job.result is None
    assert job.error is None  # discarded on arrival: the worker had finished, not stopped it


def test_remaining_time_estimate():
    job = JobHandle(None, "eta", None, None, None)
    assert job.remainingSeconds() is None
    job.startedAt = 100.0
    job.progress = (4, 10)
    assert job.remainingSeconds(now=108.0) == pytest.approx(12.0)


def test_run_until_finished_times_out_and_idle_is_called(cpuWorker, tinyModels):
    job = cpuWorker.submit(sliceJob(tinyModels, 2))
    idles = []
    with pytest.raises(TimeoutError):
        cpuWorker.runUntilFinished(job, timeout=0.01, idle=lambda: idles.append(1))
    assert idles
    cpuWorker.runUntilFinished(job, timeout=120)
    assert job.state is JobState.SUCCEEDED


def test_one_persistent_worker_per_device_and_shutdown():
    cpu = worker_client.workerForDevice("cpu-test")
    assert worker_client.workerForDevice("cpu-test") is cpu
    assert worker_client.workerForDevice("cuda-test") is not cpu
    assert cpu.pid is None  # started lazily: creating a client starts nothing
    assert cpu.health().pid == cpu.pid not in (None, os.getpid())
    process = cpu._process
    worker_client.shutdownAllWorkers()
    assert process.poll() is not None and cpu.pid is None
    assert worker_client.workerForDevice("cpu-test") is not cpu
    worker_client.shutdownAllWorkers()
    with pytest.raises(ValueError):
        worker_client.workerForDevice("")
