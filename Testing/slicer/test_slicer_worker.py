"""Background worker: progress, cancel, errors, queueing (ProtoSAMSlicerLib.worker)."""

import threading
import time

import pytest

from ProtoSAMSlicerLib import worker as workerModule
from ProtoSAMSlicerLib.worker import JobState, Worker
from protosam.errors import CancelledError


def sliceLoop(nSlices, seconds=0.0, counter=None, failAt=None):
    """A job shaped like the engine's volume loop: one unit per slice, cancel checked per slice."""
    def function(progress, cancel):
        for index in range(nSlices):
            if cancel.is_set():
                raise CancelledError("cancelled")
            if failAt is not None and index == failAt:
                raise ValueError(f"engine failed on slice {index}")
            time.sleep(seconds)
            if counter is not None:
                counter.append(index)
            progress(index + 1, nSlices)
        return f"{nSlices} slices"
    return function


@pytest.fixture
def worker():
    w = Worker("test-worker")
    yield w
    w.shutdown(timeout=5)


def test_progress_is_monotonic_complete_and_delivered_on_polling_thread(worker):
    seen, threads = [], set()

    def onProgress(job, done, total):
        seen.append((done, total))
        threads.add(threading.get_ident())

    finished = []
    job = worker.submit(sliceLoop(12), name="twelve", onProgress=onProgress,
                        onFinished=lambda j: finished.append(threading.get_ident()))
    worker.runUntilFinished(job, timeout=10)
    assert job.state is JobState.SUCCEEDED and job.resultOrRaise() == "12 slices"
    assert seen == [(n, 12) for n in range(1, 13)]
    assert threads == {threading.get_ident()} and finished == [threading.get_ident()]
    assert job.threadIdent != threading.get_ident()  # the work itself ran on the worker thread
    assert job.progress == (12, 12) and job.remainingSeconds() == pytest.approx(0.0)
    assert worker.pendingJobs == []


def test_progress_checks_catch_engine_bugs(worker):
    def backwards(progress, cancel):
        progress(3, 5)
        progress(2, 5)
    job = worker.runUntilFinished(worker.submit(backwards), timeout=10)
    assert job.state is JobState.FAILED and "backwards" in str(job.error)


def test_cancel_stops_within_one_slice(worker):
    counter = []
    job = worker.submit(sliceLoop(200, seconds=0.01, counter=counter), name="long")
    while job.progress[0] < 3:
        worker.poll()
        time.sleep(0.002)
    doneAtCancel = len(counter)
    job.cancel()
    worker.runUntilFinished(job, timeout=10)
    assert job.state is JobState.CANCELLED
    assert len(counter) <= doneAtCancel + 1
    with pytest.raises(CancelledError, match="cancelled"):
        job.resultOrRaise()
    assert job.result is None


def test_engine_exception_reaches_main_side_with_traceback(worker):
    job = worker.submit(sliceLoop(5, failAt=2), name="fails")
    worker.runUntilFinished(job, timeout=10)
    assert job.state is JobState.FAILED
    with pytest.raises(ValueError, match="engine failed on slice 2"):
        job.resultOrRaise()
    assert "sliceLoop" in job.errorTraceback or "function" in job.errorTraceback
    assert job.progress == (2, 5)  # what had been done before the failure was reported


def test_two_jobs_queued_both_finish_in_order_on_one_persistent_thread(worker):
    order = []
    first = worker.submit(sliceLoop(5, 0.005), name="first", onFinished=lambda j: order.append(j.name))
    second = worker.submit(sliceLoop(3, 0.005), name="second", onFinished=lambda j: order.append(j.name))
    assert len(worker.pendingJobs) == 2
    worker.runUntilFinished(second, timeout=10)
    worker.poll()
    assert order == ["first", "second"]
    assert first.resultOrRaise() == "5 slices" and second.resultOrRaise() == "3 slices"
    assert first.threadIdent == second.threadIdent == worker.threadIdent
    assert first.finishedAt <= second.startedAt


def test_cancelled_queued_job_never_runs(worker):
    gate = threading.Event()
    blocker = worker.submit(lambda progress, cancel: gate.wait(5), name="blocker")
    ran = []
    queued = worker.submit(lambda progress, cancel: ran.append(1), name="queued")
    queued.cancel()
    gate.set()
    worker.runUntilFinished(queued, timeout=10)
    assert blocker.state is JobState.SUCCEEDED
    assert queued.state is JobState.CANCELLED and ran == []


def test_cancel_after_last_slice_still_discards_result(worker):
    def function(progress, cancel):
        progress(1, 1)
        cancel.set()  # the user pressed Cancel while the last slice was finishing
        return "complete"
    job = worker.runUntilFinished(worker.submit(function), timeout=10)
    assert job.state is JobState.CANCELLED and job.result is None


def test_remaining_time_estimate():
    job = workerModule.Job(lambda p, c: None, "eta", None, None, None)
    assert job.remainingSeconds() is None
    job.startedAt = 100.0
    job.progress = (4, 10)
    assert job.remainingSeconds(now=108.0) == pytest.approx(12.0)


def test_run_until_finished_times_out_and_idle_is_called(worker):
    gate = threading.Event()
    job = worker.submit(lambda progress, cancel: gate.wait(5))
    idles = []
    with pytest.raises(TimeoutError):
        worker.runUntilFinished(job, timeout=0.1, idle=lambda: idles.append(1))
    assert idles
    gate.set()
    worker.runUntilFinished(job, timeout=5)
    assert job.state is JobState.SUCCEEDED


def test_one_persistent_worker_per_device_and_shutdown():
    cpu = workerModule.threadWorkerForDevice("cpu-test")
    assert workerModule.threadWorkerForDevice("cpu-test") is cpu
    assert workerModule.threadWorkerForDevice("cuda-test") is not cpu
    job = cpu.runUntilFinished(cpu.submit(lambda p, c: threading.current_thread().name), timeout=5)
    assert job.result == "ProtoSAM-cpu-test"
    thread = cpu._thread
    # The GUI's device workers are processes (started lazily: creating a client starts nothing).
    process = workerModule.workerForDevice("cpu-test")
    assert workerModule.workerForDevice("cpu-test") is process and process.pid is None
    workerModule.shutdownAllWorkers()
    assert not thread.is_alive()
    assert workerModule.threadWorkerForDevice("cpu-test") is not cpu
    assert workerModule.workerForDevice("cpu-test") is not process
    workerModule.shutdownAllWorkers()
    with pytest.raises(ValueError):
        workerModule.threadWorkerForDevice("")
    with pytest.raises(ValueError):
        workerModule.workerForDevice("")
