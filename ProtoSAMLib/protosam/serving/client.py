"""Client of a ProtoSAM server (``protosam serve``) for the local worker process.

The Slicer module never talks HTTP itself: for "Compute on: ProtoSAM server" it sends its
local worker process a ``forward_to_server`` job (:func:`forwarding_request`), and the worker
relays it with :func:`forward_job` (submit, long-poll progress, cancel, result), so every
network transfer happens in the worker process, never on a thread of Slicer's process, and
the Slicer side (preview, Accept, undo, cancel) is the same as for a local run.

Standard library only (``urllib``): Slicer's Python has no HTTP client package installed.
"""
from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Optional, Tuple

from . import protocol
from ..errors import CancelledError, InputError, ProtoSAMError

logger = logging.getLogger(__name__)

__all__ = ["ServerConnection", "is_loopback_host", "forwarding_request", "forwarding_session_request", "forward_job", "session_request",
           "FORWARD_OPERATION"]

FORWARD_OPERATION = "forward_to_server"
#: Long-poll length: also how soon a cancel reaches the server (seconds).
POLL_WAIT_S = 0.5
#: Connection failures tolerated in a row while a job runs before it is declared lost.
POLL_RETRIES = 3


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would resend the token (``Authorization``) to wherever
    it points, another host or plain HTTP. The 3xx then reaches the caller as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


#: The one opener of every server request (no redirects; proxies from the environment as urllib's default).
_OPENER = urllib.request.build_opener(_NoRedirects)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): traffic that never leaves this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerConnection:
    """HTTP(S) requests to one server with its token. Errors: :class:`protocol.WorkerCrashedError`
    when the server cannot be reached, the server's own error class (from its JSON error) else.

    ``http://`` to a host other than this machine is refused unless ``allow_unencrypted`` (the
    token and the images would cross the network in clear): then a warning is logged at each
    connection. Redirects are never followed (the token would go along): a 3xx is an error
    that names where it pointed."""

    def __init__(self, url: str, token: str, timeout: float = 60.0, allow_unencrypted: bool = False):
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc or not parsed.hostname:
            raise InputError(f"The ProtoSAM server URL must look like https://host:8765, not {url!r}.")
        if not token:
            raise InputError("Enter the ProtoSAM server's token (printed by 'protosam serve' at its first start).")
        self.url = url.strip().rstrip("/")
        self.unencrypted = parsed.scheme == "http" and not is_loopback_host(parsed.hostname)
        if self.unencrypted:
            if not allow_unencrypted:
                raise InputError(
                    f"Refusing plain http:// to {parsed.hostname}: your token and images would cross the network "
                    "unencrypted. Use the server's https:// address, or, on a network you trust, tick 'Allow "
                    "unencrypted connection' in ProtoSAM's server settings (allow_unencrypted=True).")
            logger.warning("Unencrypted connection to the ProtoSAM server at %s: the token and images travel in clear "
                           "(allowed by the user).", self.url)
        self._token = token
        self.timeout = timeout

    def __repr__(self) -> str:  # never the token
        return f"ServerConnection({self.url!r})"

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                timeout: Optional[float] = None) -> Tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self._token}"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with _OPENER.open(request, timeout=timeout or self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            raise self._error_from_http(error) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, OSError) as error:
            reason = getattr(error, "reason", error)
            raise protocol.WorkerCrashedError(f"Cannot reach the ProtoSAM server at {self.url} ({reason}).") from None

    def _error_from_http(self, error: urllib.error.HTTPError) -> BaseException:
        try:
            content = json.loads(error.read().decode("utf-8"))
            error_type, message = str(content["error_type"]), str(content["message"])
        except (ValueError, KeyError, TypeError, OSError):
            error_type, message = "ProtoSAMError", f"HTTP {error.code} {error.reason}"
        if 300 <= error.code < 400:
            where = error.headers.get("Location", "?") if error.headers is not None else "?"
            return InputError(f"The ProtoSAM server at {self.url} answered with a redirect (HTTP {error.code}) to "
                              f"{where}. ProtoSAM does not follow redirects (your token would be sent there): enter "
                              "the server's final https:// address.")
        if error.code == 401:
            return InputError(f"The ProtoSAM server at {self.url} refused the token: check the token in ProtoSAM's "
                              "'Compute on' settings (the server prints it at its first start).")
        if error.code == 404 and error_type == "HTTPError":
            return ProtoSAMError(f"{self.url} does not look like a ProtoSAM server (HTTP 404); check the URL.")
        return protocol.error_from_reply(protocol.ErrorReply(id="", error_type=error_type,
                                                             message=f"ProtoSAM server: {message}"))


def forwarding_request(request: protocol.JobSubmit, url: str, token: str,
                       allow_unencrypted: bool = False) -> protocol.JobSubmit:
    """The job that makes a local worker run ``request`` on the server at ``url``
    (``allow_unencrypted``: see :class:`ServerConnection`).

    Checkpoint paths and the weights folder are dropped from the engine: they name files on
    this machine; the server runs the models it was started with (their names must match)."""
    ServerConnection(url, token, allow_unencrypted=allow_unencrypted)  # checks the URL and token now, on the caller's side
    engine = _server_engine(request.engine)
    return protocol.JobSubmit(id=request.id, operation=FORWARD_OPERATION, name=request.name, engine=None, kwargs={
        "server_url": url, "server_token": token, "allow_unencrypted": bool(allow_unencrypted),
        "job": {"operation": request.operation, "kwargs": request.kwargs, "engine": engine}})


def forward_job(request: protocol.JobSubmit, progress: Callable[[int, int], None],
                cancel: threading.Event) -> Any:
    """Run a ``forward_to_server`` job: submit it, relay progress and cancel, return the value.

    Raises the server's error for a failed job, CancelledError after a cancel, and
    WorkerCrashedError when the server stops answering mid-job (nothing is returned, so the
    caller writes nothing)."""
    kwargs = request.kwargs
    connection = ServerConnection(str(kwargs.get("server_url", "")), str(kwargs.get("server_token", "")),
                                  allow_unencrypted=kwargs.get("allow_unencrypted") is True)
    if "session" in kwargs:
        return session_request(connection, _session_message(kwargs["session"]), progress, cancel)
    job = kwargs.get("job")
    if not isinstance(job, dict):
        raise InputError("a forward_to_server job needs the job to forward")
    remote = protocol.JobSubmit(id=protocol.new_id(), operation=job.get("operation", ""), kwargs=job.get("kwargs", {}),
                                engine=job.get("engine"), name=request.name)
    if cancel.is_set():
        raise CancelledError("Cancelled before the run started; nothing was written.")
    return _run_remote_job(connection, remote, progress, cancel)


def _run_remote_job(connection: ServerConnection, message: protocol.Message, progress: Callable[[int, int], None],
                    cancel: threading.Event) -> Any:
    """Submit ``message`` to /v1/jobs, relay progress and cancel, return the result's value."""
    _, body = connection.request("POST", "/v1/jobs", protocol.encode(message))
    job_id = json.loads(body.decode("utf-8"))["id"]
    logger.info("Job submitted to the ProtoSAM server at %s.", connection.url)
    path = "/v1/jobs/" + urllib.parse.quote(job_id, safe="")
    done, total, cancel_sent, failures = -1, 0, False, 0
    try:
        while True:
            if cancel.is_set() and not cancel_sent:
                connection.request("POST", path + "/cancel", b"")
                cancel_sent = True
            try:
                _, body = connection.request("GET", f"{path}?done={done}&wait={POLL_WAIT_S}",
                                             timeout=POLL_WAIT_S + 30.0)
                failures = 0
            except protocol.WorkerCrashedError:
                failures += 1
                if failures > POLL_RETRIES:
                    raise
                time.sleep(1.0)
                continue
            message = protocol.decode(body)
            if isinstance(message, protocol.JobProgress):
                if message.done > done:
                    done, total = message.done, message.total
                    progress(message.done, message.total)
            elif isinstance(message, protocol.JobResult):
                if total > done:  # the last slices finished between two polls: show the bar full
                    progress(total, total)
                _forget(connection, path)
                return message.value
            elif isinstance(message, protocol.ErrorReply):
                _forget(connection, path)
                raise protocol.error_from_reply(message)
            else:
                raise protocol.ProtocolError(f"the server answered a job poll with '{message.TYPE}'")
    except protocol.WorkerCrashedError as error:
        raise protocol.WorkerCrashedError(
            f"The connection to the ProtoSAM server was lost during the run: {error} Nothing was written and your "
            "segments are unchanged. Check that the server is running and reachable, then run again.") from None


#: Session messages that run as server jobs (progress, cancel); the others are answered at once.
SESSION_JOB_TYPES = (protocol.SessionOpen, protocol.SessionUpdate)


def session_request(connection: ServerConnection, message: protocol.Message,
                    progress: Callable[[int, int], None] = lambda done, total: None,
                    cancel: Optional[threading.Event] = None) -> Any:
    """Run a correction-session message on the server; returns the reply's value (as the
    worker's WorkerSessions gives it). ``session_open`` / ``session_update`` run as jobs (progress,
    cooperative ``cancel``: CancelledError); clicks, painted slices and close are one request."""
    if not isinstance(message, protocol.SESSION_TYPES):
        raise TypeError(f"not a session message: {message!r}")
    if isinstance(message, SESSION_JOB_TYPES):
        if isinstance(message, protocol.SessionOpen):
            message = dataclasses.replace(message, engine=_server_engine(message.engine))
        return _run_remote_job(connection, message, progress, cancel or threading.Event())
    _, body = connection.request("POST", "/v1/requests", protocol.encode(message))
    reply = protocol.decode(body)
    if isinstance(reply, protocol.ErrorReply):
        raise protocol.error_from_reply(reply)
    if not isinstance(reply, protocol.JobResult):
        raise protocol.ProtocolError(f"the server answered '{message.TYPE}' with '{reply.TYPE}'")
    return reply.value


def forwarding_session_request(message: protocol.Message, url: str, token: str,
                               allow_unencrypted: bool = False) -> protocol.JobSubmit:
    """The job that makes a local worker relay a session message to the server at ``url``
    (:func:`forward_job` runs it with :func:`session_request`); the value is the server's."""
    ServerConnection(url, token, allow_unencrypted=allow_unencrypted)
    fields = {field.name: getattr(message, field.name) for field in dataclasses.fields(message)}
    return protocol.JobSubmit(id=message.id, operation=FORWARD_OPERATION, engine=None, name=message.TYPE, kwargs={
        "server_url": url, "server_token": token, "allow_unencrypted": bool(allow_unencrypted),
        "session": dict(fields, type=message.TYPE)})


def _session_message(value: Any) -> protocol.Message:
    if not isinstance(value, dict) or value.get("type") not in {cls.TYPE for cls in protocol.SESSION_TYPES}:
        raise InputError("a forwarded session request needs a session message")
    fields = dict(value)
    return protocol.MESSAGE_TYPES[fields.pop("type")](**fields)


def _server_engine(engine: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """An engine specification without what names files of this machine (see forwarding_request)."""
    engine = dict(engine or {})
    if "models" in engine:
        engine["models"] = {key: value for key, value in engine["models"].items()
                            if key not in ("dinov2_checkpoint", "sam_checkpoint")}
    engine.pop("weights_home", None)
    engine["download"] = False
    return engine


def _forget(connection: ServerConnection, path: str) -> None:
    try:
        connection.request("DELETE", path, timeout=10.0)
    except ProtoSAMError:  # the server drops finished jobs after a while anyway
        pass


def server_health(url: str, token: str, timeout: float = 10.0, allow_unencrypted: bool = False) -> Dict[str, Any]:
    """The server's health for this user (checks URL and token; used by "Test connection")."""
    connection = ServerConnection(url, token, timeout, allow_unencrypted=allow_unencrypted)
    _, body = connection.request("POST", "/v1/requests", protocol.encode(protocol.HealthRequest(id=protocol.new_id())))
    message = protocol.decode(body)
    if not isinstance(message, protocol.Health):
        raise protocol.ProtocolError(f"the server answered a health request with '{message.TYPE}'")
    return {"engines": message.engines, "queued_jobs": message.queued_jobs, "cache_bytes": message.cache_bytes,
            "gpu_bytes": message.gpu_bytes}
