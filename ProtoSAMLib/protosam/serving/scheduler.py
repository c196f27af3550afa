"""The ProtoSAM server's job scheduler: the queue and the job threads of a server (one device),
per-user limits, caches and correction sessions. Thread-safe; knows nothing of HTTP
(:mod:`protosam.serving.server` puts it behind the API).

Scheduling (fair share between users): the device computes for one job at a time, but jobs of
different users take turns at slice granularity, round-robin by user, so that one user's short
job does not wait behind another user's 200-slice run. Each started job runs on its own thread
with the unchanged job code (:func:`~protosam.serving.worker_process.run_job`, or the session
handler); only the thread holding the *turn* computes. A job gives the turn up at each progress
callback (a slice boundary: propagation reports progress once per slice) and waits there until
the turn comes back; the turn goes to the next user in the ring of users with work (their
started job, or else their oldest queued job, which is started then). Within one user jobs run
in submission order, one at a time, so there is at most one job thread per user with work (and
a user's queued and running jobs stay bounded by ``max_jobs_per_user``). A job alone keeps the
turn without any thread switch. Because a job's computation runs on one thread, uninterrupted
between its slices, with the same engine calls on the same inputs in the same order, its result
is bit for bit what it would be alone; only its wall time changes. A job cancelled while
waiting for its turn gets the next turn, so it stops within one slice of the running job.
Everything else (submit, progress, cancel, health, clicks) is answered at once. A user's
encoder-output cache is their own (the models are shared; each user's jobs run on a view of the
engine with that user's cache).
"""
import asyncio
import collections
import copy
import dataclasses
import hmac
import logging
import os
import secrets
import threading
import time
import traceback
from typing import Any, Deque, Dict, Optional, Tuple

import numpy as np

from . import protocol
from ..errors import CancelledError, InputError, ProtoSAMError

logger = logging.getLogger(__name__)

__all__ = ["ServerError", "ServerConfig", "JobScheduler", "REMOTE_OPERATIONS", "MAX_WAIT_S"]

#: Operations a remote user may run (never downloads to server paths or forwarding to other servers).
REMOTE_OPERATIONS = ("segment_volume",)
#: Longest long-poll a client may ask for (seconds).
MAX_WAIT_S = 30.0


class ServerError(ProtoSAMError):
    """A request the server refuses; ``status`` is the HTTP status of the JSON error reply."""

    def __init__(self, status: int, message: str, error_type: str = "InputError"):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


@dataclasses.dataclass
class ServerConfig:
    """What the server runs and accepts. ``models``: ModelSelection fields of the served models
    (checkpoint paths are the server's); ``tokens``: token -> user name."""

    models: Dict[str, Any]
    tokens: Dict[str, str]
    device: str = "auto"
    weights_home: Optional[str] = None
    download: bool = True
    max_request_bytes: int = 1024 * 1024 * 1024
    # Holds a 64-slice ViT-B volume at 672 px (encodings ~0.72 GB, see protosam.session) with
    # its volume and masks, so a user's clicks on such a volume never wait for a re-encoding.
    cache_bytes_per_user: int = 1024 * 1024 * 1024
    max_jobs_per_user: int = 4
    result_ttl_s: float = 600.0
    max_sessions_per_user: int = 4
    session_idle_s: float = 1800.0
    #: What a request's precision "auto" means on this server (protosam serve --precision).
    precision: str = "auto"


# ----------------------------------------------------------------------------- jobs
class _Job:
    """A queued job: a ``job_submit``, or a long session operation (``session_open``,
    ``session_update``) run by the user's :class:`~protosam.serving.worker_process.WorkerSessions`."""

    def __init__(self, user: str, job_id: str, request: protocol.Message, cache_bytes: int):
        self.id = job_id
        self.user = user
        self.cache_bytes = cache_bytes  # this user's encoder cache bound for the job
        self.request: Optional[protocol.Message] = request
        self.cancel = threading.Event()
        self.state = "queued"  # queued -> running -> finished
        self.done = 0
        self.total = 0
        self.done_at_cancel: Optional[int] = None
        #: bytes a session open will hold once it runs (its volume and masks), counted in the
        #: user's budget from the moment it is queued
        self.session_bytes = 0
        self.reply: Optional[bytes] = None  # encoded JobResult / ErrorReply once finished
        self.finished_at: Optional[float] = None
        self.submitted_at = time.monotonic()
        #: (event loop, asyncio.Event) of long-polls waiting for this job to change
        self.waiters: set = set()

    def notify(self) -> None:
        """Wake the long-polls (called under the scheduler's lock, from any thread)."""
        for loop, event in list(self.waiters):
            loop.call_soon_threadsafe(event.set)


class _UserEngines:
    """What :func:`run_job` needs (``get(spec)``) for one user: the server's shared engine,
    seen through a shallow copy that holds this user's own encoder cache, so that one user's
    volumes never produce another user's cache hits."""

    def __init__(self, shared, cache):
        self.shared = shared
        self.cache = cache

    def get(self, spec: Dict[str, Any]):
        view = copy.copy(self.shared.get(spec))
        view.cache = self.cache
        return view


class JobScheduler:
    """Queue and job threads of a server (fair turns on one device); thread-safe; knows nothing about HTTP."""

    def __init__(self, config: ServerConfig):
        from ..cache import EmbeddingCache
        from .worker_process import Engines

        self.config = config
        self.engines = Engines()
        self._cache_type = EmbeddingCache
        self._caches: Dict[str, Any] = {}
        self._sessions: Dict[str, Any] = {}  # user -> WorkerSessions
        self._click_lane = threading.Lock()
        self._jobs: Dict[str, _Job] = {}
        self._queue: Deque[_Job] = collections.deque()  # not started yet, in submission order
        #: user -> that user's started, unfinished job (at most one per user; each has a thread)
        self._running: Dict[str, _Job] = {}
        #: users with a running or queued job, in round-robin order (stale entries are dropped
        #: when the turn passes them)
        self._ring: Deque[str] = collections.deque()
        #: the job whose thread may compute now (None: the device is idle)
        self._turn: Optional[_Job] = None
        self._dispatching = False  # set by start(): before it, every job stays queued
        #: user -> [job submissions being uploaded, bytes being uploaded] (see admit_upload)
        self._uploads: Dict[str, list] = {}
        self._lock = threading.Condition()
        self._stopping = False
        self.started = time.monotonic()
        self._reaper = threading.Thread(target=self._expire_sessions_forever, name="protosam-sessions", daemon=True)

    def start(self) -> None:
        self._reaper.start()
        with self._lock:
            self._dispatching = True
            if self._turn is None:
                self._grant_locked(self._next_turn_locked(None))

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._jobs.values():
                job.cancel.set()
            self._lock.notify_all()

    # -- requests (event loop) --------------------------------------------------------------
    def engine_spec(self, requested: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The engine a remote job runs on: the server's models, device and weights; the
        client chooses the preset, the precision ("auto": the server's) and (up to its budget)
        the cache size."""
        if not isinstance(requested, dict):
            raise ServerError(400, "A segment_volume job needs an 'engine' specification.")
        try:
            spec = protocol.EngineSpec(**requested)
        except TypeError as error:
            raise ServerError(400, f"Invalid engine specification: {error}") from None
        served = self.config.models
        asked = spec.models if isinstance(spec.models, dict) else {}
        for field in ("dinov2", "sam", "input_size"):
            if field in asked and asked[field] != served.get(field):
                raise ServerError(400, (
                    f"This ProtoSAM server runs {served.get('dinov2')} + {served.get('sam')} at input size "
                    f"{served.get('input_size')}; the request asks for {field}={asked[field]!r}. Select the server's "
                    "models in ProtoSAM's settings, or start the server with the models you want."))
        if not isinstance(spec.cache_bytes, int) or spec.cache_bytes < 0:
            raise ServerError(400, "engine.cache_bytes must be a non-negative integer")
        return dataclasses.asdict(protocol.EngineSpec(
            models=dict(served), preset=str(spec.preset), device=self.config.device,
            weights_home=self.config.weights_home, download=self.config.download, cache_bytes=0,
            precision=self._precision_for(spec), propagation=self._propagation_for(spec, served)))

    @staticmethod
    def _propagation_for(spec: protocol.EngineSpec, served) -> str:
        """The request's propagation, checked against the served refiner (memory: SAM 2 only)."""
        from ..catalogue import propagation_problem

        problem = propagation_problem(str(spec.propagation), str(served.get("sam")))
        if problem:
            raise ServerError(400, problem)
        return str(spec.propagation)

    def _precision_for(self, spec: protocol.EngineSpec) -> str:
        """The request's precision, checked against its preset and this server's device type;
        "auto" becomes the server's own choice unless the preset pins one (paper: fp32)."""
        from ..precision import check_precision_for_device, check_precision_for_preset
        from ..presets import PRESETS

        preset = PRESETS.get(str(spec.preset))
        try:
            check_precision_for_device(spec.precision, self.config.device.split(":")[0])
            if preset is not None:
                check_precision_for_preset(spec.precision, preset)
        except InputError as error:
            raise ServerError(400, f"This ProtoSAM server runs on {self.config.device}: {error}") from None
        if spec.precision == "auto" and (preset is None or preset.precision == "auto"):
            return self.config.precision
        return spec.precision

    def submit(self, user: str, request: protocol.JobSubmit) -> _Job:
        if request.operation not in REMOTE_OPERATIONS:
            raise ServerError(400, f"Operation {request.operation!r} is not available on a ProtoSAM server; "
                                   f"it runs: {', '.join(REMOTE_OPERATIONS)}.", "NotSupportedError")
        engine = self.engine_spec(request.engine)
        cache_bytes = min(int(request.engine.get("cache_bytes") or 0), self.config.cache_bytes_per_user)
        job_id = secrets.token_urlsafe(24)
        job_request = protocol.JobSubmit(id=job_id, operation=request.operation,
                                         kwargs=request.kwargs, engine=engine, name=request.name)
        return self._enqueue(_Job(user, job_id, job_request, cache_bytes))

    def _enqueue(self, job: _Job, admit=None) -> _Job:
        """Queue ``job``; ``admit()`` (called under the lock) may refuse it with a ServerError."""
        with self._lock:
            self._forget_expired()
            if self._stopping:
                raise ServerError(503, "The server is shutting down.", "ProtoSAMError")
            held = sum(1 for other in self._jobs.values() if other.user == job.user)
            if held >= self.config.max_jobs_per_user:
                raise ServerError(429, f"You already have {held} jobs on this server (the limit is "
                                       f"{self.config.max_jobs_per_user}); wait for them or cancel one.", "ProtoSAMError")
            if admit is not None:
                admit()
            self._jobs[job.id] = job
            self._queue.append(job)
            if job.user not in self._ring:
                self._ring.append(job.user)
            queued, running = len(self._queue), len(self._running)
            if self._turn is None and self._dispatching:  # the device is idle: start it now
                self._grant_locked(self._next_turn_locked(None))
            self._lock.notify_all()
        logger.info("Job %s of %s queued (%s; %d queued, %d running).", job.id[:8], job.user, job.request.TYPE,
                    queued, running)
        return job

    # -- uploads (before a body is read) ------------------------------------------------------
    def upload_budget(self) -> int:
        """Bytes one user may have uploading at once (bodies being received, not yet decoded)."""
        return max(self.config.max_request_bytes, 1)

    def admit_upload(self, user: str, nbytes: int, is_job: bool) -> None:
        """Admit a request body of ``nbytes`` (its Content-Length, 0 when unknown) before it is
        read, or refuse it: 429 when ``is_job`` and the user's jobs plus the submissions still
        uploading reach --max-jobs-per-user; 413 when the user's bodies in flight would exceed
        :meth:`upload_budget`. Pair every admission with :meth:`end_upload`."""
        with self._lock:
            if self._stopping:
                raise ServerError(503, "The server is shutting down.", "ProtoSAMError")
            counts = self._uploads.setdefault(user, [0, 0])
            if is_job:
                self._forget_expired()
                held = sum(1 for other in self._jobs.values() if other.user == user) + counts[0]
                if held >= self.config.max_jobs_per_user:
                    raise ServerError(429, f"You already have {held} jobs on this server, counting those still "
                                           f"uploading (the limit is {self.config.max_jobs_per_user}); wait for them "
                                           "or cancel one.", "ProtoSAMError")
            if counts[1] + nbytes > self.upload_budget():
                raise ServerError(413, f"Your uploads in progress would exceed {self.upload_budget() / 2**20:.0f} MiB "
                                       "(--max-request-mb, per user); wait for them to finish.", "InputError")
            counts[0] += int(is_job)
            counts[1] += nbytes

    def add_upload_bytes(self, user: str, nbytes: int) -> None:
        """Count ``nbytes`` more of a body without Content-Length (chunked); 413 beyond the budget."""
        with self._lock:
            counts = self._uploads.setdefault(user, [0, 0])
            if counts[1] + nbytes > self.upload_budget():
                raise ServerError(413, f"Your uploads in progress exceed {self.upload_budget() / 2**20:.0f} MiB "
                                       "(--max-request-mb, per user).", "InputError")
            counts[1] += nbytes

    def end_upload(self, user: str, nbytes: int, is_job: bool) -> None:
        with self._lock:
            counts = self._uploads.get(user)
            if counts is not None:
                counts[0] -= int(is_job)
                counts[1] -= nbytes
                if counts == [0, 0]:
                    del self._uploads[user]

    # -- correction sessions ------------------------------------------------------------------
    # A user's sessions live in that user's WorkerSessions (the worker process's own handler),
    # on views of the shared engine that hold the user's cache: every session's encodings count
    # in the user's --cache-mb-per-user budget, and a session adopting a job's result finds that
    # job's encodings there. The budget also pays for the sessions' volumes and masks: the
    # encoder cache is bounded by the budget minus those arrays (see _fit_cache).
    #
    # Scheduling: opening and updating run over the whole volume, so they are jobs (queue,
    # progress, cancel). A click (correct, undo, clear, painted slice, close) decodes one slice
    # (encoding it first if evicted): it does not wait for a turn of the running jobs, where
    # another user's 200-slice run may be, but runs at once on a thread of the request pool,
    # in one "click lane" (a lock): PyTorch inference on the shared models from two threads is
    # safe (inference mode, no module state changes), and the lane bounds the extra device
    # memory to one click at a time beside the job holding the turn; a click takes well under a second,
    # so clicks of several users queue only briefly. What is not thread-safe is guarded: the
    # caches have their own lock, the session tables this scheduler's lock, and each session
    # its own lock; a click on a session whose update is running is refused at once (409)
    # instead of holding the lane for the whole update.
    def _user_sessions(self, user: str):
        from .worker_process import WorkerSessions

        with self._lock:
            sessions = self._sessions.get(user)
            if sessions is None:
                cache = self._user_cache_locked(user, self._free_budget_locked(user, None))
                sessions = self._sessions[user] = WorkerSessions(_UserEngines(self.engines, cache), shared_cache=True)
            return sessions

    def _free_budget_locked(self, user: str, sessions) -> int:
        held = sessions.array_bytes() if sessions is not None else 0
        return max(0, self.config.cache_bytes_per_user - held)

    def _fit_cache(self, user: str, requested: Optional[int] = None) -> None:
        """Bound the user's encoder cache: the budget minus the sessions' arrays while sessions
        are open (they need their encodings), else what the job asks within the budget."""
        with self._lock:
            sessions = self._sessions.get(user)
            bound = self._free_budget_locked(user, sessions)
            if requested is not None and (sessions is None or not len(sessions)):
                bound = min(bound, requested)
            self._user_cache_locked(user, bound)

    def submit_session_job(self, user: str, message: protocol.Message) -> _Job:
        """Queue a ``session_open`` or ``session_update`` of ``user``."""
        sessions = self._user_sessions(user)
        if isinstance(message, protocol.SessionUpdate):
            if message.session_id not in sessions:
                raise self._no_session()
            return self._enqueue(_Job(user, secrets.token_urlsafe(24), message, 0))
        message = dataclasses.replace(message, engine=self.engine_spec(message.engine))
        volume = message.volume.array if isinstance(message.volume, protocol.Image) else np.asarray(message.volume)
        needed = volume.size * 4 + volume.size * len(message.structures)  # float32 volume + uint8 masks
        limit = self.config.max_sessions_per_user

        job = _Job(user, secrets.token_urlsafe(24), message, 0)
        job.session_bytes = needed

        def admit():
            pending = [other for other in self._jobs.values() if other.user == user and other.state != "finished"
                       and isinstance(other.request, protocol.SessionOpen)]
            opening = {other.request.session_id for other in pending}
            # Queued (and running, not yet registered) opens count: their arrays are in memory already.
            pending_bytes = sum(other.session_bytes for other in pending if other.request.session_id not in sessions)
            held = len(sessions) + len(opening - {message.session_id})
            if message.session_id not in sessions and message.session_id not in opening and held >= limit:
                raise ServerError(429, (
                    f"You have {held} correction sessions open on this server (the limit is {limit}, "
                    "--max-sessions-per-user): close one (Apply or Cancel a ProtoSAM preview) or wait until idle ones "
                    f"expire ({self.config.session_idle_s / 60:g} min without a click)."), "ProtoSAMError")
            if sessions.array_bytes() + pending_bytes + needed > self.config.cache_bytes_per_user:
                raise ServerError(413, (
                    f"This correction session needs {needed / 2**20:.1f} MiB for its volume and masks, more than is "
                    f"left of your {self.config.cache_bytes_per_user / 2**20:.0f} MiB on this server "
                    "(--cache-mb-per-user): close other sessions, crop the volume, or ask the administrator to raise "
                    "the budget."), "InputError")

        return self._enqueue(job, admit)

    @staticmethod
    def _no_session() -> ServerError:
        return ServerError(404, "No such correction session (it was closed, expired after being idle, was released "
                                "with your caches, or belongs to another user): propagate again.", "KeyError")

    def session_request(self, user: str, message: protocol.Message) -> protocol.JobResult:
        """Answer a click, box, scribble, lasso, undo, clear, painted slice, negatives or close at once
        (on the caller's thread)."""
        from .worker_process import SessionBusyError

        with self._lock:
            sessions = self._sessions.get(user)
        if sessions is None or message.session_id not in sessions:
            raise self._no_session()
        try:
            if isinstance(message, protocol.SessionClose):
                value = sessions.small_request(message)
            else:
                with self._click_lane:
                    value = sessions.small_request(message, wait=False)
        except SessionBusyError as error:
            raise ServerError(409, str(error), "ProtoSAMError") from None
        except (InputError, ValueError) as error:
            if message.session_id not in sessions:  # closed meanwhile (expired, released)
                raise self._no_session() from None
            raise ServerError(400, str(error), type(error).__name__ if type(error).__name__ in protocol.ERROR_TYPES
                              else "InputError") from None
        if isinstance(message, protocol.SessionClose):
            self._fit_cache(user)
            logger.info("Correction session of %s closed.", user)
        return protocol.JobResult(id=message.id, value=value)

    def _expire_sessions_forever(self) -> None:
        period = min(max(self.config.session_idle_s / 4, 0.2), 30.0)
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._lock.wait(period)
                if self._stopping:
                    return
                users = list(self._sessions.items())
            for user, sessions in users:
                expired = sessions.expire(self.config.session_idle_s)
                if expired:
                    self._fit_cache(user)
                    logger.info("%d idle correction session(s) of %s expired.", len(expired), user)

    def find(self, user: str, job_id: str) -> _Job:
        """The user's job; 404 for unknown ids and for other users' jobs alike."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or not hmac.compare_digest(job.user.encode(), user.encode()):
            raise ServerError(404, "No such job (it finished and was fetched, expired, or belongs to another user).",
                              "KeyError")
        return job

    def cancel(self, user: str, job_id: str) -> _Job:
        job = self.find(user, job_id)
        with self._lock:
            state = job.state
            if state == "queued":
                self._queue.remove(job)
                self._finish(job, protocol.ErrorReply(id=job.id, error_type="CancelledError",
                                                      message="Cancelled before it started; nothing was written."))
            elif state == "running" and not job.cancel.is_set():
                job.done_at_cancel = job.done
                job.cancel.set()
        if state != "finished":
            logger.info("Job %s of %s: cancel requested while %s.", job.id[:8], user, state)
        return job

    def forget(self, user: str, job_id: str) -> None:
        job = self.cancel(user, job_id)
        with self._lock:
            self._jobs.pop(job.id, None)

    def snapshot(self, job: _Job) -> Tuple[str, int, int, Optional[bytes]]:
        with self._lock:
            return job.state, job.done, job.total, job.reply

    async def wait_for_change(self, job: _Job, done: int, timeout: float) -> None:
        """Return once ``job`` has progressed beyond ``done`` or finished, or after ``timeout`` s
        (an asyncio wait: a long-poll holds no thread)."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            if job.reply is not None or job.done != done:
                return
            job.waiters.add(waiter)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                job.waiters.discard(waiter)

    def health(self, user: str, message_id: str) -> protocol.Health:
        import torch

        from .worker_process import resident_bytes

        with self._lock:
            running = self._running[user].id if user in self._running else None
            queued = sum(1 for job in self._queue if job.user == user)
            cache = self._caches.get(user)
        gpu = int(torch.cuda.memory_allocated()) if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
        return protocol.Health(id=message_id, pid=os.getpid(), rss_bytes=resident_bytes(),
                               cache_bytes=cache.nbytes if cache is not None else 0, gpu_bytes=gpu,
                               engines=self.engines.describe(), running_job=running, queued_jobs=queued,
                               uptime_s=time.monotonic() - self.started)

    def release(self, user: str) -> None:
        """Drop the user's caches and close the user's correction sessions (their encodings are
        in that cache; a running update of the user finishes first)."""
        with self._lock:
            cache = self._caches.pop(user, None)
            sessions = self._sessions.pop(user, None)
        if sessions is not None:
            sessions.close_all()
        if cache is not None:
            cache.clear()

    # -- job threads --------------------------------------------------------------------------
    def _forget_expired(self) -> None:
        now = time.monotonic()
        for job_id in [job.id for job in self._jobs.values()
                       if job.finished_at is not None and now - job.finished_at > self.config.result_ttl_s]:
            del self._jobs[job_id]

    def _finish(self, job: _Job, reply: protocol.Message) -> None:
        """Under the lock: store the encoded reply and wake the waiting long-polls."""
        try:
            job.reply = protocol.encode(reply)
        except Exception as error:  # e.g. a value a message cannot carry
            job.reply = protocol.encode(protocol.reply_for_exception(job.id, error))
        job.state = "finished"
        job.finished_at = time.monotonic()
        job.request = None  # the input arrays are not needed any more
        job.notify()
        self._lock.notify_all()

    def _user_cache_locked(self, user: str, max_bytes: int):
        """The user's one encoder cache, bounded by ``max_bytes`` (resized in place: the
        user's sessions keep using it)."""
        cache = self._caches.get(user)
        if cache is None:
            cache = self._caches[user] = self._cache_type(max_bytes)
        elif cache.max_bytes != max_bytes:
            cache.resize(max_bytes)
        return cache

    # -- turns: fair share of the device between users ----------------------------------------
    def _next_turn_locked(self, current: Optional[_Job]) -> Optional[_Job]:
        """Under the lock: the job to compute next after ``current`` (the job giving up its turn,
        or None), starting a queued job if it is that job's user's turn. A started job whose
        cancel is set comes first (it stops within a slice); otherwise the next user in the
        ring after ``current``'s user (moved to the back: it had its slice) with a started job,
        or else with a queued one (their oldest). None when nothing can run."""
        for job in self._running.values():
            if job is not current and job.cancel.is_set():
                return job
        if current is not None and current.user in self._ring:
            self._ring.remove(current.user)
            self._ring.append(current.user)
        for _ in range(len(self._ring)):
            user = self._ring[0]
            job = self._running.get(user)
            if job is None and not self._stopping:
                job = next((queued for queued in self._queue if queued.user == user), None)
                if job is not None:
                    self._queue.remove(job)
                    self._start_locked(job)
            if job is not None:
                return job
            self._ring.popleft()  # no work left: out of the ring until the user submits again
        return None

    def _grant_locked(self, job: Optional[_Job]) -> None:
        self._turn = job
        self._lock.notify_all()

    def _start_locked(self, job: _Job) -> None:
        job.state = "running"
        self._running[job.user] = job
        threading.Thread(target=self._run_job, args=(job,), name=f"protosam-job-{job.user}", daemon=True).start()

    def _wait_for_turn_locked(self, job: _Job) -> None:
        while self._turn is not job:
            self._lock.wait()

    def _take_turns(self, job: _Job) -> None:
        """At a slice boundary of ``job`` (which holds the turn): let the next user's job run a
        slice, and return when it is ``job``'s turn again (at once when nobody else waits)."""
        if job.cancel.is_set():  # cancelled (or the server stopping): keep the turn, it ends within a slice
            return
        with self._lock:
            following = self._next_turn_locked(job)
            if following is None or following is job:
                return
            self._grant_locked(following)
            self._wait_for_turn_locked(job)

    def _run_job(self, job: _Job) -> None:
        """A job's thread: run it in its turns, store its reply, hand the turn on."""
        reply: Optional[protocol.Message] = None
        try:
            with self._lock:
                self._wait_for_turn_locked(job)
            try:
                reply = self._execute(job)
            except BaseException as error:  # a job thread never leaves the turn held
                reply = protocol.reply_for_exception(job.id, error, traceback.format_exc())
        finally:
            with self._lock:
                self._running.pop(job.user, None)
                if reply is not None and job.id in self._jobs:
                    self._finish(job, reply)
                self._grant_locked(self._next_turn_locked(job))
        if reply is None:
            return
        state = "cancelled" if reply.TYPE == "error" and reply.error_type == "CancelledError" else reply.TYPE
        logger.info("Job %s of %s finished (%s) after %.1f s.", job.id[:8], job.user,
                    state if reply.TYPE != "error" else f"{state}: {reply.error_type}",
                    time.monotonic() - job.submitted_at)

    def _session_job(self, job: _Job, progress) -> Dict[str, Any]:
        """A session open or update, with the user's one session handler (the worker's code).
        A cancel that comes after the last slice keeps the finished result (the session's
        state already holds it, and the client's must match it)."""
        sessions = self._user_sessions(job.user)
        if isinstance(job.request, protocol.SessionUpdate) and job.request.session_id not in sessions:
            raise InputError("The correction session was closed before its update started: propagate again.")
        self._fit_cache(job.user)
        value = sessions.job(job.request, progress, job.cancel)
        with self._lock:
            released = self._sessions.get(job.user) is not sessions
        if released:  # the user released their caches meanwhile: keep nothing
            sessions.close_all()
            raise CancelledError("Your caches and sessions on the server were released during this run; "
                                 "nothing was kept.")
        self._fit_cache(job.user)
        return value

    def _execute(self, job: _Job) -> protocol.Message:
        from .worker_process import _return_memory_to_the_system, run_job

        def progress(done: int, total: int) -> None:
            with self._lock:
                job.done, job.total = int(done), int(total)
                job.notify()
            self._take_turns(job)  # a slice boundary: another user's job may run its slice

        try:
            if isinstance(job.request, protocol.JobSubmit):
                self._fit_cache(job.user, job.cache_bytes)
                with self._lock:
                    engines = _UserEngines(self.engines, self._caches[job.user])
                value = run_job(engines, job.request, progress, job.cancel)
            else:
                return protocol.JobResult(id=job.id, value=self._session_job(job, progress))
            if job.cancel.is_set():
                raise CancelledError("Cancelled by the user; nothing was written.")
            return protocol.JobResult(id=job.id, value=value)
        except CancelledError as error:
            return protocol.reply_for_exception(job.id, error, details={
                "done_at_cancel": job.done_at_cancel, "done_at_stop": job.done})
        except MemoryError as error:
            self.release(job.user)
            _return_memory_to_the_system()
            return protocol.reply_for_exception(job.id, error)
        except Exception as error:
            logger.info("Job %s of %s failed: %s", job.id[:8], job.user, type(error).__name__)
            return protocol.reply_for_exception(job.id, error, traceback.format_exc())
