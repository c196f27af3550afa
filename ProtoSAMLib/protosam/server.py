"""The ProtoSAM server: ``protosam serve`` runs the worker protocol over HTTP for many users.

One GPU machine serves Slicer workstations without one. Requests and replies are the worker
process's messages (:mod:`protosam.protocol`: JSON header + inline array blobs) as
``application/octet-stream`` bodies; jobs run with the worker's own code
(:func:`protosam.worker_process.run_job` and :class:`~protosam.worker_process.Engines`), so a
job gives what a local run on the same device and preset gives.

API (every path except ``/health`` needs ``Authorization: Bearer <token>``, else 401):

================================  ==========================================================
``GET  /health``                  ``{"status": "ok"}`` (no authentication, no details)
``POST /v1/jobs``                 body: a ``job_submit``, ``session_open`` or ``session_update``
                                  message -> 202 ``{"id": job id}``
``GET  /v1/jobs/{id}?done=N``     waits up to ``wait`` s for progress beyond N, then answers
                                  one message: ``job_progress``, ``job_result`` or ``error``
``POST /v1/jobs/{id}/cancel``     cooperative cancel (a queued job never starts)
``DELETE /v1/jobs/{id}``          cancel if needed and forget the job and its result
``POST /v1/requests``             ``health_request`` / ``release_caches`` /
                                  ``models_status_request`` -> the reply message;
                                  ``session_correct`` / ``session_undo_click`` /
                                  ``session_clear_clicks`` / ``session_add_support`` /
                                  ``session_close`` -> a ``job_result`` (at once, see below)
``GET  /openapi.json``            the API description
================================  ==========================================================

Scheduling: one job-runner thread per server (one device): jobs run one at a time in
submission order, whoever submitted them; everything else (submit, progress, cancel) is
answered at once by the event loop. Users are isolated: a job is visible only to the token
that submitted it (others get 404, so ids cannot be probed), and encoder-output caches are
per user (the models are shared; each user's jobs run on a view of the engine with that
user's own cache), bounded by ``--cache-mb-per-user``.

Correction sessions (:mod:`protosam.session`, served by the worker's own
:class:`~protosam.worker_process.WorkerSessions`, one per user): the client names a session
by the ``session_id`` of its ``session_open`` (with ``adopt``, a result of the user's own job
on this server, whose encodings are in the user's cache). Opening and updating are jobs (the
job endpoints above: progress, cancel); a click, undo, clear, painted slice or close is
answered at once, beside the job-runner thread (see :meth:`JobScheduler.session_request`): 200
with a ``job_result`` (``mask`` of the slice, ``slice_index``, ``clicks``; close:
``closed``); 404 for an unknown session (closed, expired, released, or another user's); 409
while the session's update runs. Per user: at most ``--max-sessions-per-user`` sessions (429
beyond), their volumes, masks and encodings within ``--cache-mb-per-user`` (413 for a session
that cannot fit), closed after ``--session-idle-minutes`` without use; ``release_caches`` closes
the user's sessions too.

Errors are JSON ``{"error_type": ..., "message": ...}`` with a 4xx/5xx status (the fields of
the protocol's ErrorReply); a failing job answers an ``error`` message. Nothing is written to
disk except the generated token file (see :func:`load_tokens`); logs carry user names, short
job ids and timings, never tokens or image data.
"""
# No "from __future__ import annotations": FastAPI reads the endpoint annotations (Request)
# at runtime, and they are local to create_app.
import argparse
import asyncio
import collections
import copy
import dataclasses
import hmac
import ipaddress
import logging
import os
import re
import secrets
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Deque, Dict, Optional, Sequence, Tuple

import numpy as np

from . import __version__, protocol
from .errors import CancelledError, InputError, ProtoSAMError

logger = logging.getLogger(__name__)

__all__ = ["ServerConfig", "JobScheduler", "create_app", "load_tokens", "build_parser", "cli_serve",
           "DEFAULT_PORT", "HEALTH_PATH", "TOKEN_FILE_NAME"]

DEFAULT_PORT = 8765
HEALTH_PATH = "/health"
TOKEN_FILE_NAME = "server_token"
#: Operations a remote user may run (never downloads to server paths or forwarding to other servers).
REMOTE_OPERATIONS = ("segment_volume",)
#: Longest long-poll a client may ask for (seconds).
MAX_WAIT_S = 30.0
_USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_TOKEN_LENGTH = 16


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


# ----------------------------------------------------------------------------- tokens
def _token_file_path(home: Optional[str] = None) -> Path:
    from .weights import home_dir

    return home_dir(home) / TOKEN_FILE_NAME


def parse_tokens_file(path: os.PathLike) -> Dict[str, str]:
    """``name:token`` per line (``#`` comments and blank lines ignored) -> {token: name}."""
    tokens: Dict[str, str] = {}
    names = set()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"Cannot read the tokens file {path}: {error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not separator or not _USER_NAME.match(name):
            raise InputError(f"{path}, line {number}: expected 'name:token' with a name of letters, digits, "
                             "'_', '.', '@' or '-'")
        if len(token) < MIN_TOKEN_LENGTH:
            raise InputError(f"{path}, line {number}: the token of '{name}' is shorter than {MIN_TOKEN_LENGTH} "
                             "characters; generate one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
        if name in names or token in tokens:
            raise InputError(f"{path}, line {number}: user '{name}' or its token appears twice")
        names.add(name)
        tokens[token] = name
    if not tokens:
        raise InputError(f"The tokens file {path} names no user; add lines 'name:token'.")
    return tokens


def load_tokens(token: Optional[str], tokens_file: Optional[str], home: Optional[str] = None,
                announce=print) -> Dict[str, str]:
    """The server's users, {token: name}.

    ``--token``: one user "user". ``--tokens FILE``: see :func:`parse_tokens_file`. Neither:
    the token stored in ``$PROTOSAM_HOME/server_token`` (mode 0600), generated and printed
    (with ``announce``, never logged) on the first start, reused on the next.
    """
    if token is not None and tokens_file is not None:
        raise InputError("Give either --token or --tokens, not both.")
    if token is not None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise InputError(f"--token must be at least {MIN_TOKEN_LENGTH} characters long.")
        return {token: "user"}
    if tokens_file is not None:
        return parse_tokens_file(tokens_file)
    path = _token_file_path(home)
    if path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if len(stored) < MIN_TOKEN_LENGTH:
            raise InputError(f"The stored token in {path} is too short; delete the file to generate a new one.")
        announce(f"ProtoSAM server: using the token stored in {path}")
        return {stored: "user"}
    path.parent.mkdir(parents=True, exist_ok=True)
    generated = secrets.token_urlsafe(32)
    descriptor = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(generated + "\n")
    announce(f"ProtoSAM server: generated an access token, stored in {path} (readable by you only):\n"
             f"    {generated}\nEnter it with the server URL in Slicer (ProtoSAM > Compute on > ProtoSAM server).")
    return {generated: "user"}


class TokenTable:
    """Constant-time token checks (``hmac.compare_digest`` against every known token)."""

    def __init__(self, tokens: Dict[str, str]):
        self._tokens = [(token.encode("utf-8"), name) for token, name in tokens.items()]

    def user_for(self, authorization: Optional[bytes]) -> Optional[str]:
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return None
        offered = authorization[7:].strip()
        user = None
        for token, name in self._tokens:  # no early exit: timing does not tell which token matched
            if hmac.compare_digest(offered, token):
                user = name
        return user


# ----------------------------------------------------------------------------- jobs
class _Job:
    """A queued job: a ``job_submit``, or a long session operation (``session_open``,
    ``session_update``) run by the user's :class:`~protosam.worker_process.WorkerSessions`."""

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
    """Queue and runner thread of a server; thread-safe; knows nothing about HTTP."""

    def __init__(self, config: ServerConfig):
        from .cache import EmbeddingCache
        from .worker_process import Engines

        self.config = config
        self.engines = Engines()
        self._cache_type = EmbeddingCache
        self._caches: Dict[str, Any] = {}
        self._sessions: Dict[str, Any] = {}  # user -> WorkerSessions
        self._click_lane = threading.Lock()
        self._jobs: Dict[str, _Job] = {}
        self._queue: Deque[_Job] = collections.deque()
        self._running: Optional[_Job] = None
        self._lock = threading.Condition()
        self._stopping = False
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run_forever, name="protosam-jobs", daemon=True)
        self._reaper = threading.Thread(target=self._expire_sessions_forever, name="protosam-sessions", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._reaper.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._jobs.values():
                job.cancel.set()
            self._lock.notify_all()

    # -- requests (event loop) --------------------------------------------------------------
    def engine_spec(self, requested: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The engine a remote job runs on: the server's models, device and weights; the
        client chooses the preset and (up to its budget) the cache size."""
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
            weights_home=self.config.weights_home, download=self.config.download, cache_bytes=0))

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
            self._lock.notify_all()
        logger.info("Job %s of %s queued (%s, %d ahead).", job.id[:8], job.user, job.request.TYPE, len(self._queue) - 1)
        return job

    # -- correction sessions ------------------------------------------------------------------
    # A user's sessions live in that user's WorkerSessions (the worker process's own handler),
    # on views of the shared engine that hold the user's cache: every session's encodings count
    # in the user's --cache-mb-per-user budget, and a session adopting a job's result finds that
    # job's encodings there. The budget also pays for the sessions' volumes and masks: the
    # encoder cache is bounded by the budget minus those arrays (see _fit_cache).
    #
    # Scheduling: opening and updating run over the whole volume, so they are jobs (queue,
    # progress, cancel). A click (correct, undo, clear, painted slice, close) decodes one slice
    # (encoding it first if evicted): it does not wait behind the job-runner thread, where
    # another user's 200-slice run may be, but runs at once on a thread of the request pool,
    # in one "click lane" (a lock): PyTorch inference on the shared models from two threads is
    # safe (inference mode, no module state changes), and the lane bounds the extra device
    # memory to one click at a time beside the running job; a click takes well under a second,
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

        def admit():
            opening = {job.request.session_id for job in self._jobs.values()
                       if job.user == user and job.state != "finished" and isinstance(job.request, protocol.SessionOpen)}
            held = len(sessions) + len(opening - {message.session_id})
            if message.session_id not in sessions and message.session_id not in opening and held >= limit:
                raise ServerError(429, (
                    f"You have {held} correction sessions open on this server (the limit is {limit}, "
                    "--max-sessions-per-user): close one (Apply or Cancel a ProtoSAM preview) or wait until idle ones "
                    f"expire ({self.config.session_idle_s / 60:g} min without a click)."), "ProtoSAMError")
            if sessions.array_bytes() + needed > self.config.cache_bytes_per_user:
                raise ServerError(413, (
                    f"This correction session needs {needed / 2**20:.0f} MiB for its volume and masks, more than is "
                    f"left of your {self.config.cache_bytes_per_user / 2**20:.0f} MiB on this server "
                    "(--cache-mb-per-user): close other sessions, crop the volume, or ask the administrator to raise "
                    "the budget."), "InputError")

        return self._enqueue(_Job(user, secrets.token_urlsafe(24), message, 0), admit)

    @staticmethod
    def _no_session() -> ServerError:
        return ServerError(404, "No such correction session (it was closed, expired after being idle, was released "
                                "with your caches, or belongs to another user): propagate again.", "KeyError")

    def session_request(self, user: str, message: protocol.Message) -> protocol.JobResult:
        """Answer a click, undo, clear, painted slice or close at once (on the caller's thread)."""
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
            running = self._running.id if self._running is not None and self._running.user == user else None
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

    # -- runner thread ------------------------------------------------------------------------
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

    def _run_forever(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                job.state = "running"
                self._running = job
            try:
                reply = self._execute(job)
            except BaseException as error:  # the runner never dies for one job
                reply = protocol.reply_for_exception(job.id, error, traceback.format_exc())
            with self._lock:
                self._running = None
                if job.id in self._jobs:
                    self._finish(job, reply)
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


# ----------------------------------------------------------------------------- HTTP
def _json_error(status: int, error_type: str, message: str, headers: Optional[Dict[str, str]] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error_type": error_type, "message": message}, headers=headers)


class _Guard:
    """ASGI middleware in front of everything: the token check (401 for every path but the
    health path, before any body is read) and the Content-Length limit (413)."""

    def __init__(self, app, tokens: TokenTable, max_request_bytes: int):
        self.app = app
        self.tokens = tokens
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # the API has none
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope["path"] != HEALTH_PATH:
            user = self.tokens.user_for(headers.get(b"authorization"))
            if user is None:
                response = _json_error(401, "AuthenticationError", "A valid token is required: send the header "
                                       "'Authorization: Bearer <token>' (the token the server printed at its first "
                                       "start, or yours from its tokens file).", {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
            scope.setdefault("state", {})["user"] = user
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_request_bytes
            except ValueError:
                return await _json_error(400, "ProtocolError", "Invalid Content-Length header.")(scope, receive, send)
            if too_big:
                return await self._too_big(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _too_big(self, scope, receive, send):
        response = _json_error(413, "InputError", (
            f"The request is larger than this server accepts ({self.max_request_bytes // (1024 * 1024)} MiB, the "
            "server's --max-request-mb). Crop the volume to the region of interest, or ask the administrator to "
            "raise the limit."), {"Connection": "close"})
        return await response(scope, receive, send)


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` (no Content-Length needed)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServerError(413, f"The request is larger than this server accepts ({limit // (1024 * 1024)} MiB, "
                                   "--max-request-mb).")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(scheduler: JobScheduler):
    """The FastAPI application (public docs routes off; the schema only behind the token)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="ProtoSAM server", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  description="ProtoSAM worker protocol over HTTP; see protosam.server.")
    limit = scheduler.config.max_request_bytes
    octets = "application/octet-stream"

    @app.exception_handler(ServerError)
    async def on_server_error(request, error: ServerError):
        return _json_error(error.status, error.error_type, str(error))

    @app.exception_handler(protocol.ProtocolError)
    async def on_protocol_error(request, error):
        return _json_error(400, "ProtocolError", f"Malformed ProtoSAM message: {error}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, error):
        return _json_error(error.status_code, "HTTPError", str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, error):
        return _json_error(422, "InputError", f"Invalid request parameters: {error.errors()}")

    @app.exception_handler(Exception)
    async def on_unexpected(request, error):
        logger.error("Unexpected %s while answering %s %s", type(error).__name__, request.method, request.url.path)
        return _json_error(500, "ProtoSAMError", "Internal server error; the server keeps running.")

    def user_of(request: Request) -> str:
        return request.scope["state"]["user"]

    async def read_message(request: Request) -> protocol.Message:
        body = await _read_body(request, limit)
        # Inline arrays only: file references are refused (no trusted folder on a server).
        return await run_in_threadpool(protocol.decode, body)

    @app.get(HEALTH_PATH)
    async def health():
        return {"status": "ok", "protocol_version": protocol.PROTOCOL_VERSION}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.post("/v1/jobs", status_code=202)
    async def submit_job(request: Request):
        """Body: an encoded ``job_submit``, ``session_open`` or ``session_update``; returns the job's id."""
        message = await read_message(request)
        if isinstance(message, (protocol.SessionOpen, protocol.SessionUpdate)):
            job = await run_in_threadpool(scheduler.submit_session_job, user_of(request), message)
            return {"id": job.id}
        if isinstance(message, protocol.SESSION_TYPES):
            raise ServerError(400, f"'{message.TYPE}' is answered at once: POST it to /v1/requests.", "ProtocolError")
        if not isinstance(message, protocol.JobSubmit):
            raise ServerError(400, f"Expected a 'job_submit' message, got '{message.TYPE}'.", "ProtocolError")
        job = scheduler.submit(user_of(request), message)
        return {"id": job.id}

    @app.get("/v1/jobs/{job_id}")
    async def job_events(request: Request, job_id: str, done: int = -1, wait: float = 0.0):
        """One encoded message: the result or error once finished, else progress (waiting up to
        ``wait`` s for progress beyond ``done``)."""
        job = scheduler.find(user_of(request), job_id)
        await scheduler.wait_for_change(job, done, min(max(wait, 0.0), MAX_WAIT_S))
        state, job_done, total, reply = scheduler.snapshot(job)
        if reply is not None:
            return Response(content=reply, media_type=octets)
        return Response(content=protocol.encode(protocol.JobProgress(id=job.id, done=job_done, total=total)),
                        media_type=octets, headers={"X-ProtoSAM-Job-State": state})

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202)
    async def cancel_job(request: Request, job_id: str):
        job = scheduler.cancel(user_of(request), job_id)
        return {"id": job.id, "state": job.state}

    @app.delete("/v1/jobs/{job_id}", status_code=204)
    async def forget_job(request: Request, job_id: str):
        scheduler.forget(user_of(request), job_id)
        return Response(status_code=204)

    @app.post("/v1/requests")
    async def control(request: Request):
        """Body: ``health_request``, ``release_caches`` or ``models_status_request``; the reply message."""
        message = await read_message(request)
        user = user_of(request)
        if isinstance(message, protocol.HealthRequest):
            reply: protocol.Message = await run_in_threadpool(scheduler.health, user, message.id)
        elif isinstance(message, protocol.ReleaseCaches):
            # This user's caches and sessions only; the shared models stay loaded.
            await run_in_threadpool(scheduler.release, user)
            reply = await run_in_threadpool(scheduler.health, user, message.id)
        elif isinstance(message, protocol.ModelsStatusRequest):
            from .worker_process import models_status

            served = protocol.ModelsStatusRequest(id=message.id, models=scheduler.config.models,
                                                  weights_home=scheduler.config.weights_home)
            reply = await run_in_threadpool(models_status, served, scheduler.engines)
        elif isinstance(message, (protocol.SessionOpen, protocol.SessionUpdate)):
            raise ServerError(400, f"'{message.TYPE}' runs as a job: POST it to /v1/jobs.", "ProtocolError")
        elif isinstance(message, protocol.SESSION_TYPES):
            reply = await run_in_threadpool(scheduler.session_request, user, message)
        else:
            raise ServerError(400, f"'{message.TYPE}' is not a request this server answers.", "ProtocolError")
        return Response(content=protocol.encode(reply), media_type=octets)

    return _Guard(app, TokenTable(scheduler.config.tokens), limit)


# ----------------------------------------------------------------------------- command line
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    from .cli_common import add_model_options

    parser = parser or argparse.ArgumentParser(prog="protosam serve", description=__doc__.split("\n\n")[0])
    net = parser.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only); "
                     "another address needs --ssl-certfile/--ssl-keyfile or --insecure")
    net.add_argument("--port", type=int, default=DEFAULT_PORT)
    tokens = net.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=None, help="the one user's token (visible in the process list: prefer "
                        "--tokens); default: a token generated at the first start and stored in "
                        f"$PROTOSAM_HOME/{TOKEN_FILE_NAME}")
    tokens.add_argument("--tokens", default=None, metavar="FILE", help="one 'name:token' line per user")
    net.add_argument("--ssl-certfile", default=None, metavar="PEM", help="TLS certificate (serve HTTPS)")
    net.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="TLS private key")
    net.add_argument("--insecure", action="store_true",
                     help="allow plain HTTP on a non-loopback address (tokens and images travel unencrypted)")
    net.add_argument("--max-request-mb", type=float, default=1024.0, help="largest request body (413 beyond)")
    net.add_argument("--cache-mb-per-user", type=float, default=1024.0,
                     help="encoder outputs, plus the volumes and masks of correction sessions, each user may hold on "
                     "the server (the default holds a 64-slice ViT-B volume at 672 px)")
    net.add_argument("--max-jobs-per-user", type=int, default=4, help="queued, running and unfetched jobs per user")
    net.add_argument("--max-sessions-per-user", type=int, default=4,
                     help="open click-correction sessions per user (each holds a volume; 429 beyond)")
    net.add_argument("--session-idle-minutes", type=float, default=30.0,
                     help="a correction session unused this long is closed and its memory freed")
    net.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default torch's); the same count as a local run gives the same bits")
    net.add_argument("--access-log", action="store_true", help="log every request line (paths hold job ids)")
    add_model_options(parser)
    return parser


def _served_models(args) -> Dict[str, Any]:
    return {"dinov2": args.dinov2, "dinov2_checkpoint": args.dinov2_checkpoint, "sam": args.sam,
            "sam_checkpoint": args.sam_checkpoint, "input_size": args.input_size}


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.preset != "default" or args.cca is not None or args.batch_size is not None:
        raise InputError("protosam serve takes no --preset, --cca or --batch-size: each request brings its preset, "
                         "and the engine batches slices as it does locally.")
    if not is_loopback(args.host):
        if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
            raise InputError("TLS needs both --ssl-certfile and --ssl-keyfile.")
        if not args.ssl_certfile and not args.insecure:
            raise InputError(
                f"Refusing to serve plain HTTP on {args.host}: tokens and images would cross the network unencrypted. "
                "Give --ssl-certfile and --ssl-keyfile, or keep --host 127.0.0.1 behind a TLS reverse proxy, or add "
                "--insecure on a network you trust.")
        if not args.ssl_certfile:
            print(f"WARNING: serving plain HTTP on {args.host} (--insecure): tokens and images travel unencrypted.",
                  file=sys.stderr)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    tokens = load_tokens(args.token, args.tokens, args.weights_home, announce=lambda text: print(text, flush=True))
    from .engine import resolve_device

    config = ServerConfig(models=_served_models(args), tokens=tokens, device=str(resolve_device(args.device)),
                          weights_home=args.weights_home, download=not args.no_download,
                          max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                          cache_bytes_per_user=int(args.cache_mb_per_user * 1024 * 1024),
                          max_jobs_per_user=args.max_jobs_per_user,
                          max_sessions_per_user=args.max_sessions_per_user,
                          session_idle_s=args.session_idle_minutes * 60.0)
    scheduler = JobScheduler(config)
    scheduler.start()
    app = create_app(scheduler)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"ProtoSAM server {__version__}: {scheme}://{args.host}:{args.port} on {config.device}, "
          f"{len(set(tokens.values()))} user(s), models {args.dinov2} + {args.sam}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                    ssl_keyfile=args.ssl_keyfile, access_log=args.access_log, log_level="info",
                    limit_concurrency=256, timeout_graceful_shutdown=5)
    finally:
        scheduler.stop()
    return 0


def cli_serve(args: argparse.Namespace) -> int:
    """``protosam serve`` (the CLI configured warnings only; the server logs its jobs)."""
    logging.getLogger("protosam").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli_serve(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
