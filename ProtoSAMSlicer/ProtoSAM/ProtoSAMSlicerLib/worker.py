"""Where ProtoSAM jobs run (no Qt, no MRML): the device workers and the in-process thread worker.

``workerForDevice(device)`` is what the module, the effect and ``ProtoSAMLogic`` use: the client
of a persistent worker PROCESS (worker_client.WorkerClient), because inside the Slicer
application a Python thread only advances while the main thread runs Python (the GIL trap,
see worker_client.py). ``Worker`` below is the in-process alternative: one persistent thread
that runs job functions, kept for headless scripts and tests (``threadWorkerForDevice``).
Both take the same job functions (``worker_client.RequestFunction``) and return handles with
the same interface (progress, remainingSeconds(), cancel(), finished, resultOrRaise()).

Why persistent: PyTorch/cuDNN cache kernels and plans per thread (and per process), and a new
thread per run was measured ~10x slower on its first call, so models stay loaded and run on
the same thread for the lifetime of the Slicer session.

Contract for thread job functions: they receive only numpy arrays and plain Python values, and
they never touch Qt or MRML (neither is thread-safe). They are called as
``function(progress, cancelEvent)`` where ``progress(done, total)`` reports work units (slices)
and ``cancelEvent`` is a ``threading.Event`` they must check at least once per unit.

Events (started, progress, finished) are queued by the worker thread and delivered on the
thread that calls ``Worker.poll()``: the Slicer GUI calls it from a QTimer, synchronous callers
from ``Worker.runUntilFinished``. Callbacks therefore run on the main thread and may update the
GUI or MRML.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import queue
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from protosam.errors import CancelledError

if TYPE_CHECKING:  # pragma: no cover
    from .worker_client import WorkerClient

logger = logging.getLogger(__name__)

ProgressFunction = Callable[[int, int], None]
JobFunction = Callable[[ProgressFunction, threading.Event], Any]

#: How long synchronous waits block between two polls (seconds): short enough to keep a GUI
#: responsive when ``idle`` processes events, long enough not to spin.
DEFAULT_POLL_INTERVAL_S = 0.03


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclasses.dataclass(frozen=True)
class JobEvent:
    """Something that happened to a job. kind: "started", "progress" or "finished"."""

    job: "Job"
    kind: str
    done: int = 0
    total: int = 0


class JobHandle:
    """What a caller holds of a queued job, on either worker (the thread Worker's Job, the
    worker process's worker_client.ProcessJob): identity, callbacks, cancel, final state.

    ``state``, ``result``, ``error`` are final once ``finished`` is True. ``progress`` is the
    latest (done, total) delivered by ``poll``.
    """

    _ids = itertools.count(1)  # each subclass numbers its own jobs

    def __init__(self, function, name: str, cancelEvent: Optional[threading.Event], onProgress, onFinished):
        self.id = next(type(self)._ids)
        self.name = name
        self.function = function
        self.cancelEvent = cancelEvent if cancelEvent is not None else threading.Event()
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.state = JobState.QUEUED
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.errorTraceback = ""
        self.progress = (0, 0)
        self.startedAt: Optional[float] = None
        self.finishedAt: Optional[float] = None
        self._finishDelivered = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.name!r} {self.state.value}>"

    def cancel(self) -> None:
        """Ask the job to stop: a queued job never starts, a running one stops at its next check."""
        self.cancelEvent.set()

    @property
    def cancelRequested(self) -> bool:
        return self.cancelEvent.is_set()

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def resultOrRaise(self) -> Any:
        """The job's result on the calling thread; re-raises its error or CancelledError."""
        if not self.finished:
            raise RuntimeError(f"{self!r} has not finished yet")
        if self.state is JobState.FAILED:
            raise self.error
        if self.state is JobState.CANCELLED:
            raise self._cancelledError()
        return self.result

    def _cancelledError(self) -> CancelledError:
        return CancelledError(f"'{self.name}' was cancelled; nothing was changed.")

    def remainingSeconds(self, now: Optional[float] = None) -> Optional[float]:
        """Estimated time left from the average time per unit so far, or None if unknown."""
        done, total = self.progress
        if self.startedAt is None or done <= 0 or total <= 0:
            return None
        elapsed = (now if now is not None else time.monotonic()) - self.startedAt
        return max(0.0, elapsed / done * (total - done))


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


class JobRunner:
    """What the thread worker and the worker process share: a blocking wait on one job that
    delivers its events (callbacks included) on the calling thread."""

    def poll(self):
        raise NotImplementedError

    def _waitBetweenPolls(self, job: JobHandle, seconds: float) -> None:
        raise NotImplementedError

    def runUntilFinished(self, job: JobHandle, timeout: Optional[float] = None,
                         interval: float = DEFAULT_POLL_INTERVAL_S,
                         idle: Optional[Callable[[], None]] = None) -> JobHandle:
        """Poll until ``job``'s 'finished' event has been delivered (callbacks included).

        idle: called between polls (e.g. ``slicer.app.processEvents``) to keep a GUI alive.
        Raises TimeoutError after ``timeout`` seconds (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if job._finishDelivered:
                return job
            if idle is not None:
                idle()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{job!r} did not finish within {timeout} s")
            self._waitBetweenPolls(job, interval)


class Worker(JobRunner):
    """A persistent daemon thread executing jobs one at a time, in submission order."""

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
_processWorkers: Dict[str, "WorkerClient"] = {}
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


def threadWorkerForDevice(device: str) -> Worker:
    """The session-wide in-process thread worker of a device (headless scripts and tests only:
    inside the Slicer application a Python thread starves, see worker_client.py)."""
    _checkDevice(device)
    with _workersLock:
        worker = _workers.get(device)
        if worker is None:
            worker = _workers[device] = Worker(name=f"ProtoSAM-{device}")
        return worker


def workerForDevice(device: str) -> "WorkerClient":
    """The session-wide worker process client of a device ("cpu", "cuda", "cuda:1", "mps"),
    created on first use; its process starts with the first job."""
    from .worker_client import WorkerClient

    _checkDevice(device)
    with _workersLock:
        client = _processWorkers.get(device)
        if client is None:
            client = _processWorkers[device] = WorkerClient(name=f"ProtoSAM-{device}")
        return client


def _checkDevice(device: str) -> None:
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be a non-empty string, got {device!r}")


def shutdownAllWorkers(timeout: Optional[float] = 5.0) -> None:
    """Stop every device worker, threads and processes (called when Slicer exits or the
    module is reloaded)."""
    with _workersLock:
        workers = list(_workers.values()) + list(_processWorkers.values())
        _workers.clear()
        _processWorkers.clear()
    for worker in workers:
        worker.shutdown(timeout)
