"""The ProtoSAM server: ``protosam serve`` runs the worker protocol over HTTP for many users.

One GPU machine serves Slicer workstations without one. Requests and replies are the worker
process's messages (:mod:`protosam.serving.protocol`: JSON header + inline array blobs) as
``application/octet-stream`` bodies; jobs run with the worker's own code
(:func:`protosam.serving.worker_process.run_job` and :class:`~protosam.serving.worker_process.Engines`), so a
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
                                  ``session_correct`` / ``session_box`` /
                                  ``session_scribble`` / ``session_lasso`` /
                                  ``session_undo`` / ``session_undo_click`` /
                                  ``session_clear_clicks`` / ``session_add_support`` /
                                  ``session_set_negatives`` /
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
:class:`~protosam.serving.worker_process.WorkerSessions`, one per user): the client names a session
by the ``session_id`` of its ``session_open`` (with ``adopt``, a result of the user's own job
on this server, whose encodings are in the user's cache). Opening and updating are jobs (the
job endpoints above: progress, cancel); a click, box, scribble, lasso, undo, clear, painted
slice, negatives or close is answered at once, beside the job-runner thread (see
:meth:`JobScheduler.session_request`): 200 with a ``job_result`` (``mask`` of the slice,
``slice_index``, ``clicks``, ``corrections``; negatives: ``negatives``; close: ``closed``);
404 for an unknown session (closed, expired, released, or another user's); 409
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
import functools
import logging
from typing import Dict, Optional

from .. import __version__
from . import protocol
from .scheduler import MAX_WAIT_S, JobScheduler, ServerError
from .tokens import TokenTable

logger = logging.getLogger(__name__)

__all__ = ["create_app", "ConnectionLimits", "guarded_protocol_class", "DEFAULT_PORT", "HEALTH_PATH"]

DEFAULT_PORT = 8765
HEALTH_PATH = "/health"
#: The largest JSON header of a request (its metadata: arrays travel as blobs); the protocol's
#: own cap (16 MiB) is for the local worker's replies.
MAX_REQUEST_HEADER_BYTES = 1024 * 1024


# ----------------------------------------------------------------------------- connection limits
class ConnectionLimits:
    """Limits on connections, enforced by :func:`guarded_protocol_class` (a subclass of
    uvicorn's h11 protocol, which parses HTTP): a connection that has not sent a complete
    request head within ``header_timeout`` s of opening (or of its last answer) is closed; a
    request body slower than ``min_body_rate`` bytes/s on average once ``body_grace`` s have
    passed is cut; at most ``per_address`` open connections per client address (further ones
    are closed at once). Counters live on the event loop's thread (no lock needed)."""

    def __init__(self, header_timeout: float = 10.0, min_body_rate: float = 64 * 1024, body_grace: float = 10.0,
                 per_address: int = 32):
        self.header_timeout = header_timeout
        self.min_body_rate = min_body_rate
        self.body_grace = body_grace
        self.per_address = per_address
        self.open: Dict[str, int] = {}
        self.closed = {"per_address": 0, "header_timeout": 0, "slow_body": 0}

    def acquire(self, address: Optional[str]) -> bool:
        if address is None:
            return True
        if self.open.get(address, 0) >= self.per_address:
            self.closed["per_address"] += 1
            return False
        self.open[address] = self.open.get(address, 0) + 1
        return True

    def release(self, address: Optional[str]) -> None:
        if address is not None and address in self.open:
            self.open[address] -= 1
            if not self.open[address]:
                del self.open[address]


def guarded_protocol_class(limits: ConnectionLimits):
    """uvicorn's ``H11Protocol`` with :class:`ConnectionLimits` (pass it as ``uvicorn.run(http=...)``).
    h11 still parses everything; this only watches the connection's state (``conn.their_state``)
    and the time, and closes the transport."""
    import time

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._address = self.client[0] if self.client else None
            self._timer = None
            self._body_started: Optional[float] = None
            self._body_bytes = 0
            self._counted = limits.acquire(self._address)
            if not self._counted:
                transport.abort()
                return
            self._arm(limits.header_timeout, self._head_too_slow)

        def _arm(self, delay: float, callback) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(delay, callback)

        def _close(self, reason: str) -> None:
            limits.closed[reason] += 1
            if not self.transport.is_closing():
                self.transport.close()

        def _head_too_slow(self) -> None:
            self._timer = None
            if self.conn.their_state is h11.IDLE:  # no complete request head yet
                self._close("header_timeout")

        def _check_body_rate(self) -> None:
            self._timer = None
            if self.conn.their_state is not h11.SEND_BODY or self._body_started is None:
                return
            elapsed = time.monotonic() - self._body_started
            if elapsed >= limits.body_grace and self._body_bytes < limits.min_body_rate * elapsed:
                self._close("slow_body")
            else:
                self._arm(1.0, self._check_body_rate)

        def data_received(self, data: bytes) -> None:
            before = self.conn.their_state
            super().data_received(data)
            if not self._counted:
                return
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                if before is not h11.SEND_BODY:  # the head just completed: the body's clock starts
                    self._body_started, self._body_bytes = time.monotonic(), 0
                    self._arm(1.0, self._check_body_rate)
                else:
                    self._body_bytes += len(data)
            elif state is not h11.IDLE and self._timer is not None and before is h11.IDLE:
                self._timer.cancel()  # a complete request without body
                self._timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._counted and not self.transport.is_closing():
                self._body_started = None
                self._arm(limits.header_timeout, self._head_too_slow)

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._counted:
                self._counted = False
                limits.release(self._address)
            super().connection_lost(exc)

    return GuardedH11Protocol


def _json_error(status: int, error_type: str, message: str, headers: Optional[Dict[str, str]] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error_type": error_type, "message": message}, headers=headers)


class _Guard:
    """ASGI middleware in front of everything: the token check (401 for every path but the
    health path, before any body is read) and the Content-Length limit (413)."""

    def __init__(self, app, tokens: TokenTable, max_request_bytes: int, scheduler: Optional[JobScheduler] = None,
                 max_active: int = 128):
        self.app = app
        self.tokens = tokens
        self.max_request_bytes = max_request_bytes
        self.scheduler = scheduler
        #: authenticated requests in the app at once (503 beyond); idle and unauthenticated
        #: connections never count here, so they cannot take this capacity
        self.max_active = max_active
        self.active = 0

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
            if self.active >= self.max_active:
                return await _json_error(503, "ProtoSAMError", "The server is answering too many requests at once; "
                                         "try again in a moment.", {"Retry-After": "1"})(scope, receive, send)
            self.active += 1
            try:
                return await self._checked(scope, receive, send, headers)
            finally:
                self.active -= 1
        return await self._checked(scope, receive, send, headers)

    async def _checked(self, scope, receive, send, headers):
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_request_bytes
            except ValueError:
                return await _json_error(400, "ProtocolError", "Invalid Content-Length header.")(scope, receive, send)
            if too_big:
                return await self._too_big(scope, receive, send)
        if self.scheduler is None or scope["method"] not in ("POST", "PUT", "PATCH") or scope["path"] == HEALTH_PATH:
            return await self.app(scope, receive, send)
        return await self._admitted(scope, receive, send, int(length) if length is not None else 0)

    async def _admitted(self, scope, receive, send, declared: int):
        """Admit the body from the token and Content-Length before reading it (429: too many
        jobs counting those uploading; 413: the user's bodies in flight over budget), count it
        while it uploads, and give its bytes back when the request is answered."""
        user = scope["state"]["user"]
        is_job = scope["method"] == "POST" and scope["path"] == "/v1/jobs"
        try:
            self.scheduler.admit_upload(user, declared, is_job)
        except ServerError as error:
            return await _json_error(error.status, error.error_type, str(error),
                                     {"Connection": "close"})(scope, receive, send)
        counted = declared
        scheduler = self.scheduler

        async def counting_receive():
            nonlocal counted
            message = await receive()
            if declared == 0 and message.get("type") == "http.request":
                size = len(message.get("body", b""))
                scheduler.add_upload_bytes(user, size)  # ServerError: answered as a 413 by the app
                counted += size
            return message

        try:
            return await self.app(scope, counting_receive, send)
        finally:
            scheduler.end_upload(user, counted, is_job)

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


def create_app(scheduler: JobScheduler, max_active_requests: int = 128):
    """The FastAPI application (public docs routes off; the schema only behind the token)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="ProtoSAM server", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  description="ProtoSAM worker protocol over HTTP; see protosam.serving.server.")
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
        return await run_in_threadpool(functools.partial(protocol.decode, max_header_bytes=MAX_REQUEST_HEADER_BYTES),
                                       body)

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

    return _Guard(app, TokenTable(scheduler.config.tokens), limit, scheduler, max_active_requests)
