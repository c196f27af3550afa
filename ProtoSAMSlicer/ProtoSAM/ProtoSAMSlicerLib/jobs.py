"""What a job is, on the worker process and on the (deprecated) thread worker alike: states,
events, the handle a caller holds, and the blocking wait that delivers a job's events on the
calling thread (no Qt, no MRML).

The one module both ``worker_client`` (the worker process, the compute path of the module and
the effect) and ``worker`` (the deprecated in-process thread) build on; it imports neither.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import threading
import time
from typing import Any, Callable, Optional

from protosam.errors import CancelledError

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

    job: "JobHandle"
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
