"""DEPRECATED: the in-process thread worker (``ProtoSAMLogic(workerKind="thread")``); removed in
the next release.

The Slicer code computes in the worker process only (worker_client.WorkerClient, reached
through ``worker_client.workerForDevice``): inside the Slicer application a Python thread only
advances while the main thread runs Python (the GIL trap, see worker_client.py), so a thread
worker is a path users must never take. A headless script that wants no worker process calls
the engine API instead (``protosam.segment_volume``, ``protosam.Session``), which is what it is for.

``Worker`` runs the same jobs as the worker process (``worker_client.RequestFunction``, run here
through ``protosam.serving.worker_process.run_job``) or plain functions called as
``function(progress, cancelEvent)``, on one persistent daemon thread, and returns handles with
the jobs.JobHandle interface. Events are queued by the thread and delivered by ``poll()`` on
the calling thread. This module builds on jobs and worker_client; neither imports it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional

from protosam.errors import CancelledError

from .jobs import (DEFAULT_POLL_INTERVAL_S, FINAL_STATES, JobEvent, JobFunction, JobHandle, JobRunner, JobState,
                   ProgressFunction)
from .worker_client import RequestFunction, shutdownAllWorkers as shutdownProcessWorkers, workerForDevice

# The names this module had before jobs.py and worker_client's registry took them: still here
# for scripts that imported them from it, until the module goes.
__all__ = ["DEFAULT_POLL_INTERVAL_S", "FINAL_STATES", "Job", "JobEvent", "JobFunction", "JobHandle", "JobRunner",
           "JobState", "ProgressFunction", "Worker", "localEngines", "runRequest", "shutdownAllWorkers",
           "shutdownThreadWorkers", "threadWorkerForDevice", "workerForDevice"]

logger = logging.getLogger(__name__)


class Job(JobHandle):
    """A unit of work queued on a Worker's thread. Create through ``Worker.submit``."""

    _ids = itertools.count(1)

    def __init__(self, function: JobFunction, name: str, cancelEvent: Optional[threading.Event],
                 onProgress, onFinished):
        super().__init__(function, name, cancelEvent, onProgress, onFinished)
        self.threadIdent: Optional[int] = None
        self._threadDone = threading.Event()

    @property
    def finished(self) -> bool:
        """True once the worker thread is done with the job (events may still be undelivered)."""
        return self._threadDone.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the worker thread is done with the job; False on timeout."""
        return self._threadDone.wait(timeout)


class Worker(JobRunner):
    """A persistent daemon thread executing jobs one at a time, in submission order (deprecated)."""

    def __init__(self, name: str = "ProtoSAM-worker"):
        self.name = name
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._events: "queue.Queue[JobEvent]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._pending: List[Job] = []

    # -- main thread API -------------------------------------------------------------------
    def submit(self, function: JobFunction, *, name: str = "job",
               cancelEvent: Optional[threading.Event] = None,
               onProgress: Optional[Callable[[Job, int, int], None]] = None,
               onFinished: Optional[Callable[[Job], None]] = None) -> Job:
        """Queue ``function(progress, cancelEvent)``; callbacks are called from ``poll``."""
        if isinstance(function, RequestFunction):
            request = function
            function = lambda progress, cancel: runRequest(request, progress, cancel)  # noqa: E731
        if not callable(function):
            raise ValueError(f"function must be callable, got {function!r}")
        job = Job(function, name, cancelEvent, onProgress, onFinished)
        with self._lock:
            self._pending.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put(job)
        logger.debug("queued %r on %s", job, self.name)
        return job

    @property
    def pendingJobs(self) -> List[Job]:
        """Jobs submitted whose 'finished' event has not been delivered by poll yet."""
        with self._lock:
            return list(self._pending)

    def poll(self) -> List[JobEvent]:
        """Deliver queued events on the calling thread; returns them in order."""
        delivered = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            job = event.job
            if event.kind == "progress":
                job.progress = (event.done, event.total)
                if job.onProgress is not None:
                    job.onProgress(job, event.done, event.total)
            elif event.kind == "finished":
                job._finishDelivered = True
                with self._lock:
                    if job in self._pending:
                        self._pending.remove(job)
                callback, job.onFinished, job.onProgress = job.onFinished, None, None
                if callback is not None:  # dropped first: closures may hold large arrays
                    callback(job)
            delivered.append(event)
        return delivered

    def _waitBetweenPolls(self, job: Job, seconds: float) -> None:
        job._threadDone.wait(seconds)  # wakes at once when the job's thread ends

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Cancel pending jobs and stop the thread after the running job returns."""
        for job in self.pendingJobs:
            job.cancel()
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join(timeout)

    def releaseCaches(self, models: bool = False) -> None:
        """Drop the encoder caches (and models) of this process's thread workers."""
        if _localEngines is not None:
            _localEngines.release(models=models)

    @property
    def threadIdent(self) -> Optional[int]:
        thread = self._thread
        return thread.ident if thread is not None else None

    # -- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._execute(job)

    def _execute(self, job: Job) -> None:
        job.threadIdent = threading.get_ident()
        if job.cancelEvent.is_set():
            job.state = JobState.CANCELLED
            self._finish(job)
            return
        job.state = JobState.RUNNING
        job.startedAt = time.monotonic()
        self._events.put(JobEvent(job, "started"))
        lastDone = [-1]

        def progress(done: int, total: int) -> None:
            done, total = int(done), int(total)
            if total < 0 or not 0 <= done <= max(total, 0):
                raise ValueError(f"progress({done}, {total}) out of range")
            if done < lastDone[0]:
                raise ValueError(f"progress went backwards: {done} after {lastDone[0]}")
            lastDone[0] = done
            self._events.put(JobEvent(job, "progress", done, total))

        try:
            job.result = job.function(progress, job.cancelEvent)
            # A cancel that arrives after the last unit still means "I do not want this".
            job.state = JobState.CANCELLED if job.cancelEvent.is_set() else JobState.SUCCEEDED
        except CancelledError as error:
            job.state = JobState.CANCELLED
            job.error = error
        except Exception as error:  # carried to the main thread, re-raised by resultOrRaise
            job.state = JobState.FAILED
            job.error = error
            job.errorTraceback = traceback.format_exc()
            logger.debug("%r failed:\n%s", job, job.errorTraceback)
        if job.state is not JobState.SUCCEEDED:
            job.result = None
        self._finish(job)

    def _finish(self, job: Job) -> None:
        job.finishedAt = time.monotonic()
        job.function = None  # drop references to the job's arrays
        self._events.put(JobEvent(job, "finished"))
        job._threadDone.set()


_workers: Dict[str, Worker] = {}
_workersLock = threading.Lock()
_localEngines = None


def localEngines():
    """The engines of this process's thread workers (``protosam.serving.worker_process.Engines``)."""
    global _localEngines
    with _workersLock:
        if _localEngines is None:
            from protosam.serving.worker_process import Engines

            _localEngines = Engines()
        return _localEngines


def runRequest(function: RequestFunction, progress: ProgressFunction, cancel: threading.Event):
    """Run a worker-process job on the calling thread, on this process's engines."""
    from protosam.serving.worker_process import run_job

    return function.decodeResult(run_job(localEngines(), function.workerRequest, progress, cancel))


def threadWorkerForDevice(device: str) -> Worker:
    """The session-wide in-process thread worker of a device (deprecated, see the module's
    docstring: inside the Slicer application a Python thread starves)."""
    _checkDevice(device)
    with _workersLock:
        worker = _workers.get(device)
        if worker is None:
            worker = _workers[device] = Worker(name=f"ProtoSAM-{device}")
        return worker


def _checkDevice(device: str) -> None:
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be a non-empty string, got {device!r}")


def shutdownThreadWorkers(timeout: Optional[float] = 5.0) -> None:
    """Stop every thread worker of this process."""
    with _workersLock:
        workers = list(_workers.values())
        _workers.clear()
    for worker in workers:
        worker.shutdown(timeout)


def shutdownAllWorkers(timeout: Optional[float] = 5.0) -> None:
    """Stop every device worker, threads and processes."""
    shutdownThreadWorkers(timeout)
    shutdownProcessWorkers(timeout)
