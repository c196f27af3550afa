"""Client of the persistent ProtoSAM worker process (no Qt, no MRML, no Python threads).

Why a process: inside Slicer the main thread keeps the GIL while it waits in the Qt event
loop (PythonQt runs without thread support), so a Python worker thread advances only while
Slicer happens to run Python: inference and downloads crawl. The worker process
(:mod:`protosam.serving.worker_process`, started with Slicer's own ``PythonSlicer``) computes freely,
keeps models and encoder caches loaded between runs, and can be killed when it does not stop.

Everything here is driven from ``WorkerClient.poll()``, called by the GUI from a QTimer (or by
``runUntilFinished`` in scripts): the socket is non-blocking, so ``poll`` only reads what has
arrived and returns at once. Events (progress, finished) are delivered from ``poll`` on the
calling thread (jobs.JobRunner), so callbacks may touch MRML and the GUI.

Transport: a TCP socket on 127.0.0.1 that this client listens on; the worker connects back and
sends the per-start random token it read from its stdin. Sockets have non-blocking reads with
the same API on Windows, macOS and Linux (pipes do not), and the worker's stdin doubles as a
lifeline: when this process dies, even by ``kill -9``, the worker sees EOF and exits. Arrays go
through ``.npy`` files in a private temporary folder, removed as soon as each side has read them.
"""

from __future__ import annotations

import atexit
import collections
import hmac
import itertools
import logging
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

import numpy as np

from protosam.serving import protocol
from protosam.errors import CancelledError, ProtoSAMError

from .jobs import DEFAULT_POLL_INTERVAL_S, JobHandle, JobRunner, JobState

logger = logging.getLogger(__name__)
workerLogger = logging.getLogger("ProtoSAM.worker")

#: Seconds a worker may take from launch to its hello (it connects before importing torch).
DEFAULT_START_TIMEOUT_S = 60.0
#: Seconds a running job may take to stop after Cancel before the worker is killed.
DEFAULT_CANCEL_GRACE_S = 5.0
#: Seconds a request (a session open or update, an on-demand encoding) may go without any message
#: from the worker before the client gives up and sends JobCancel: the limit counts inactivity,
#: not the total time, so a long update that keeps reporting progress (a 64-slice ViT-B update
#: takes ~780 s on two CPU cores) is never cut off. docs/slicer.md says this number.
DEFAULT_REQUEST_INACTIVITY_S = 600.0
#: A connection to the client's socket gets this long to send its hello; the bytes a hello may
#: take (it carries a token, a pid and versions: never a blob).
HELLO_TIMEOUT_S = 10.0
MAX_HELLO_BYTES = 4096
LOG_TAIL_LINES = 25

_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
              "from protosam.serving.worker_process import main; sys.exit(main())")


class WorkerStartError(ProtoSAMError):
    """The worker process could not be started; the message has the command line and log tail."""


def workerPythonExecutable() -> str:
    """The Python that runs the worker: Slicer's ``PythonSlicer`` inside Slicer, else this Python.

    ``PROTOSAM_WORKER_PYTHON`` overrides it (troubleshooting, custom installs).
    """
    override = os.environ.get("PROTOSAM_WORKER_PYTHON")
    if override:
        return override
    name = "PythonSlicer.exe" if sys.platform == "win32" else "PythonSlicer"
    besideExecutable = Path(sys.executable).with_name(name)
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):  # inside the Slicer application
        found = shutil.which("PythonSlicer") or (str(besideExecutable) if besideExecutable.exists() else None)
        if found:
            return found
    return sys.executable


def temporaryFolder() -> Path:
    """Where transfer folders and worker logs go: Slicer's own temporary folder
    (``slicer.app.temporaryPath``, which users move to a large disk) inside the application,
    else the system's temporary folder."""
    slicerModule = sys.modules.get("slicer")
    app = getattr(slicerModule, "app", None) if slicerModule is not None else None
    path = getattr(app, "temporaryPath", None) if app is not None else None
    return Path(str(path)) if path else Path(tempfile.gettempdir())


def enginePackageParent() -> str:
    """The folder that holds the ``protosam`` package (put first on the worker's sys.path)."""
    return str(Path(protocol.__file__).resolve().parents[1])


def logTail(path: Optional[Path], lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return "(no log)"
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        return f"(log unreadable: {error})"
    return "\n".join(text[-lines:]) or "(log is empty)"


class RequestFunction:
    """A job for the worker process: ``workerRequest`` is the protocol.JobSubmit it receives.

    decodeResult: turns the job's JSON/array value into what callers expect (e.g. VolumeResult).
    """

    def __init__(self, request: protocol.JobSubmit, decodeResult: Callable[[Any], Any] = lambda value: value):
        self.workerRequest = request
        self.decodeResult = decodeResult


class ProcessJob(JobHandle):
    """Handle of a job run by the worker process (the jobs.JobHandle interface).

    ``details`` holds what the worker reported with an error (e.g. ``done_at_cancel`` /
    ``done_at_stop`` slices for a cancel).
    """

    _ids = itertools.count(1)

    def __init__(self, function: RequestFunction, name: str, cancelEvent: Optional[threading.Event],
                 onProgress, onFinished):
        super().__init__(function, name, cancelEvent, onProgress, onFinished)
        self.requestId = function.workerRequest.id
        self.details: Dict[str, Any] = {}
        self.cancelSentAt: Optional[float] = None
        self.files: List[str] = []

    def _cancelledError(self) -> CancelledError:
        # The worker's own reason (e.g. "cancelled after slice 3") when it gave one.
        return self.error if isinstance(self.error, CancelledError) else super()._cancelledError()


class _Candidate:
    """A connection to the client's socket whose hello has not been checked yet."""

    def __init__(self, sock: socket.socket, since: float):
        self.sock, self.since = sock, since
        self.buffer = bytearray()

    def readHello(self) -> Optional[protocol.Hello]:
        """The hello once it has arrived whole; raises ProtocolError as soon as the bytes cannot be
        one (a prefix announcing more than a hello takes, a blob, a field of the wrong type), so
        nothing a stranger claims is buffered."""
        while len(self.buffer) <= MAX_HELLO_BYTES:
            try:
                chunk = self.sock.recv(MAX_HELLO_BYTES + 1 - len(self.buffer))
            except BlockingIOError:
                break
            if not chunk:
                raise EOFError("closed before its hello")
            self.buffer += chunk
        if len(self.buffer) < protocol.PREFIX_SIZE:
            return None
        headerLength, blobLength = protocol.read_prefix(bytes(self.buffer[:protocol.PREFIX_SIZE]))
        total = protocol.PREFIX_SIZE + headerLength + blobLength
        if blobLength or total > MAX_HELLO_BYTES:
            raise protocol.ProtocolError(f"a hello is at most {MAX_HELLO_BYTES} bytes without arrays; this one announces "
                                         f"{headerLength} header and {blobLength} blob bytes")
        if len(self.buffer) < total:
            return None
        message = protocol.decode(bytes(self.buffer[:total]))
        del self.buffer[:total]
        if not isinstance(message, protocol.Hello):
            raise protocol.ProtocolError(f"expected a hello, got '{message.TYPE}'")
        if (not isinstance(message.token, str) or type(message.pid) is not int or message.pid <= 0
                or not isinstance(message.protocol_version, int)):
            raise protocol.ProtocolError("a hello needs a string token and a positive integer pid")
        return message


class _PendingRequest:
    def __init__(self, message: protocol.Message, progress: Optional[Callable[[int, int], None]] = None):
        self.message = message
        self.progress = progress
        self.reply: Optional[protocol.Message] = None
        self.error: Optional[BaseException] = None
        self.sent = False
        self.files: List[str] = []  # transfer files of the request: removed when it ends
        self.lastActivity = time.monotonic()  # the last message about this request (send, progress)

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None


_clients: "weakref.WeakSet[WorkerClient]" = weakref.WeakSet()


class WorkerClient(JobRunner):
    """One persistent worker process, started lazily on the first job, restarted after a crash.

    Jobs run one at a time in submission order. python: the worker's Python (default
    :func:`workerPythonExecutable`). cancelGraceSeconds: how long a cancelled job may run on
    before the worker is killed (and started again by the next job; models then reload).
    """

    def __init__(self, name: str = "ProtoSAM-worker", *, python: Optional[str] = None,
                 startTimeout: float = DEFAULT_START_TIMEOUT_S, cancelGraceSeconds: float = DEFAULT_CANCEL_GRACE_S):
        self.name = name
        self.python = python
        self.startTimeout = startTimeout
        self.cancelGraceSeconds = cancelGraceSeconds
        self.starts = 0
        self.logPath: Optional[Path] = None
        self.commandLine: List[str] = []
        self._process: Optional[subprocess.Popen] = None
        self._logFile = None
        self._listener: Optional[socket.socket] = None
        self._candidates: List[_Candidate] = []  # accepted, hello not yet verified
        self._sock: Optional[socket.socket] = None
        self._buffer = bytearray()
        self._token = ""
        self._transferDir: Optional[Path] = None
        self._startedAt = 0.0
        self._workerPid: Optional[int] = None
        self._queue: Deque[ProcessJob] = collections.deque()
        self._current: Optional[ProcessJob] = None
        self._requests: Dict[str, _PendingRequest] = {}
        self._events: Deque[Callable[[], None]] = collections.deque()
        self._pendingJobs: List[ProcessJob] = []
        _clients.add(self)

    # ------------------------------------------------------------------ public API (main thread)
    @property
    def pid(self) -> Optional[int]:
        """Process id of the running worker, or None."""
        return self._process.pid if self._process is not None else None

    @property
    def ready(self) -> bool:
        return self._sock is not None

    @property
    def pendingJobs(self) -> List[ProcessJob]:
        return list(self._pendingJobs)

    def submit(self, function, *, name: str = "job", cancelEvent: Optional[threading.Event] = None,
               onProgress: Optional[Callable[[ProcessJob, int, int], None]] = None,
               onFinished: Optional[Callable[[ProcessJob], None]] = None) -> ProcessJob:
        """Queue a RequestFunction (anything with a ``workerRequest`` protocol.JobSubmit)."""
        if not isinstance(getattr(function, "workerRequest", None), protocol.JobSubmit):
            raise TypeError("the worker process runs protocol requests (RequestFunction), not Python functions; "
                            f"got {function!r}")
        job = ProcessJob(function, name, cancelEvent, onProgress, onFinished)
        self._queue.append(job)
        self._pendingJobs.append(job)
        self._pump()
        return job

    def poll(self) -> int:
        """Read what the worker sent, start/kill/restart it as needed, and deliver events
        (progress and finished callbacks) on this thread. Never blocks. Returns the number
        of events delivered."""
        self._pump()
        delivered = 0
        while self._events:
            self._events.popleft()()
            delivered += 1
        return delivered

    def request(self, message: protocol.Message, timeout: float = 30.0, *,
                idle: Optional[Callable[[], None]] = None,
                progress: Optional[Callable[[int, int], None]] = None,
                cancel: Optional[threading.Event] = None) -> protocol.Message:
        """Send a request (health, release, models status, session operations) and wait for its
        reply. Starts the worker if it is not running. ``idle()`` is called between polls (the
        GUI passes ``slicer.app.processEvents`` so Slicer stays responsive while a session update
        or an on-demand encoding runs in the worker); ``progress(done, total)`` receives the
        worker's progress messages for this request. Setting ``cancel`` (e.g. from a Cancel
        button handled during ``idle``) asks the worker to stop a request it runs as a job (a
        session update); the request then raises CancelledError.

        ``timeout`` counts inactivity: seconds without any message about this request (its
        progress resets the clock; a worker start counts as activity). When it expires the client
        sends JobCancel, so the worker stops the request instead of computing on and blocking
        every later one, and raises TimeoutError."""
        pending = _PendingRequest(message, progress)
        self._requests[message.id] = pending
        cancelSent = False
        try:
            while not pending.done:
                if not pending.sent:
                    pending.lastActivity = time.monotonic()  # still starting the worker (own start timeout)
                self.poll()
                if pending.done:
                    break
                if cancel is not None and cancel.is_set() and not cancelSent and pending.sent:
                    self._send(protocol.JobCancel(id=message.id))
                    cancelSent = True
                if time.monotonic() - pending.lastActivity > timeout:
                    if pending.sent and not cancelSent and self._sock is not None:
                        self._send(protocol.JobCancel(id=message.id))
                    raise TimeoutError(f"the ProtoSAM worker sent nothing about '{message.TYPE}' for {timeout:.0f} s: "
                                       "it was asked to stop (see 'Troubleshooting' in docs/slicer.md)")
                self._wait(DEFAULT_POLL_INTERVAL_S)
                if idle is not None:
                    idle()
        finally:
            self._requests.pop(message.id, None)
            for path in pending.files:  # the worker has read them (or never will): see docs/slicer.md
                _removeFile(path)
            pending.files = []
        if pending.error is not None:
            raise pending.error
        return pending.reply

    def health(self, timeout: float = 30.0) -> protocol.Health:
        """The worker's memory, caches and loaded engines (starts the worker if needed)."""
        return self.request(protocol.HealthRequest(id=protocol.new_id()), timeout)

    def releaseCaches(self, models: bool = False) -> None:
        """Ask a running worker to drop its encoder caches (and models); does not wait.
        Nothing to do when no worker runs."""
        if self._sock is None:
            return
        message = protocol.ReleaseCaches(id=protocol.new_id(), models=models)
        self._send(message)

    def shutdown(self, timeout: Optional[float] = 5.0) -> None:
        """Cancel queued jobs, ask the worker to exit, kill it after ``timeout`` seconds."""
        for job in list(self._queue):
            self._finishJob(job, JobState.CANCELLED, error=CancelledError("ProtoSAM was closed; nothing was written."))
        self._queue.clear()
        process = self._process
        if process is None:
            self._cleanup(removeLog=True)
            return
        if self._sock is not None:
            try:
                self._send(protocol.Shutdown())
            except ProtoSAMError:
                pass
        try:
            if process.stdin is not None:
                process.stdin.close()  # the worker also exits on stdin EOF
        except OSError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._killProcesses()
            process.wait(5)
        current = self._current
        if current is not None:
            self._finishJob(current, JobState.CANCELLED,
                            error=CancelledError("ProtoSAM was closed; the run was cancelled and nothing was written."))
        self._cleanup(removeLog=process.returncode == 0)

    def kill(self) -> None:
        """Kill the worker at once (its current job fails; the next job starts a new worker).

        The worker counts as gone when this returns: its socket's end of file can reach us later
        than its exit (loopback TCP delivers the close asynchronously), and a request sent in
        between must start a new worker, not fail on the old one's late end of file."""
        if self._process is None:
            return
        self._workerLost("it was killed on request", kill=True)

    def _killProcesses(self) -> None:
        """Kill the worker's interpreter and the process we started. Inside Slicer that process is
        the CTK launcher ``PythonSlicer``, whose child is the real interpreter: killing the launcher
        alone leaves the worker (and its GPU memory) behind. The interpreter's pid comes with its
        hello; it is killed only while the launcher still runs (then it is still the launcher's
        child, not a reused pid)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        workerPid = self._workerPid
        if workerPid is not None and workerPid != process.pid:
            _killPid(workerPid)
        try:
            process.kill()
        except OSError:
            pass

    # ------------------------------------------------------------------ internals
    def _waitBetweenPolls(self, job: ProcessJob, seconds: float) -> None:
        self._wait(seconds)

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when the worker sends something."""
        sockets = [s for s in (self._sock, self._listener) if s is not None]
        sockets += [candidate.sock for candidate in self._candidates]
        if sockets:
            select.select(sockets, [], [], seconds)
        else:
            time.sleep(seconds)

    def _busy(self) -> bool:
        return bool(self._queue or self._current is not None or self._requests)

    def _pump(self) -> None:
        for job in [job for job in self._queue if job.cancelRequested]:  # never sent: nothing to stop
            self._queue.remove(job)
            self._finishJob(job, JobState.CANCELLED)
        if self._process is None:
            if not self._busy():
                return
            try:
                self._start()
            except WorkerStartError as error:
                self._failEverything(error)
                return
        if self._sock is None:
            self._advanceStart()
            if self._sock is None:
                return
        self._readAvailable()
        if self._sock is None:
            return
        self._checkCancels()
        if self._sock is not None and self._current is None:
            self._sendNextJob()
        if self._sock is not None and self._requests:
            for pending in list(self._requests.values()):
                if not pending.sent and self._sock is not None:
                    pending.sent = True
                    pending.lastActivity = time.monotonic()
                    try:
                        data = protocol.encode(pending.message, file_dir=self._transferDir)
                    except Exception as error:  # something a message cannot carry: fail this request only
                        pending.error = error
                        continue
                    pending.files = protocol.array_files(data)
                    self._sendBytes(data)

    def _start(self) -> None:
        self.starts += 1
        try:
            self._launch()
        except OSError as error:  # e.g. an unwritable temporary folder: one clear error, nothing left behind
            self._cleanup(removeLog=False)
            raise WorkerStartError(self._startFailureText(f"it could not be launched ({error})")) from error
        logger.info("Starting the ProtoSAM worker process (pid %d, log %s): %s", self._process.pid, self.logPath,
                    subprocess.list2cmdline(self.commandLine))

    def _launch(self) -> None:
        self.commandLine = []
        self.logPath = None
        self._workerPid = None
        folder = temporaryFolder()
        removeStaleTransferFolders(folder)
        # A private folder (mkdtemp: 0700, a fresh name, never a link) under Slicer's temporary
        # folder holds the transfer files and the log: no other local user can read them or plant
        # links in it, and no folder made by another user is reused (docs/slicer.md, Troubleshooting).
        self._transferDir = Path(tempfile.mkdtemp(prefix=f"{TRANSFER_PREFIX}{os.getpid()}-", dir=str(folder)))
        self.logPath = self._transferDir / f"worker-{os.getpid()}-{self.starts}.log"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        self._logFile = os.fdopen(os.open(str(self.logPath), flags, 0o600), "wb")
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.setblocking(False)
        port = self._listener.getsockname()[1]
        self._token = secrets.token_hex(32)
        python = self.python or workerPythonExecutable()
        self.commandLine = [python, "-c", _BOOTSTRAP, enginePackageParent(), "--connect", f"127.0.0.1:{port}",
                            "--transfer-dir", str(self._transferDir)]
        # MPS (Apple GPUs): operations without an MPS kernel run on the CPU instead of failing; the
        # worker logs which ones did. A value the user set is kept.
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        environment.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
        creationFlags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        self._process = subprocess.Popen(self.commandLine, stdin=subprocess.PIPE, stdout=self._logFile,
                                         stderr=subprocess.STDOUT, env=environment, cwd=str(self._transferDir),
                                         creationflags=creationFlags)
        try:  # the token never appears on a command line (visible to other users)
            self._process.stdin.write((self._token + "\n").encode("ascii"))
            self._process.stdin.flush()
        except OSError:
            pass  # it died already: reported by _advanceStart with its log
        self._startedAt = time.monotonic()

    def _startFailureText(self, what: str) -> str:
        return (f"The ProtoSAM worker process could not start: {what}.\nCommand line: "
                f"{subprocess.list2cmdline(self.commandLine)}\nLog file {self.logPath}, last lines:\n{logTail(self.logPath)}"
                "\nCheck that ProtoSAM's Python packages are installed for this Python (see docs/slicer.md, 'Troubleshooting').")

    def _advanceStart(self) -> None:
        """Accept every connection to the socket and check each one's hello on its own: a silent
        or wrong connection (another local user can read the port on the worker's command line)
        is dropped when it misbehaves or after HELLO_TIMEOUT_S and never delays the real worker."""
        process = self._process
        now = time.monotonic()
        while self._listener is not None:
            try:
                readable, _, _ = select.select([self._listener], [], [], 0)
                if not readable:
                    break
                connection, _ = self._listener.accept()
            except OSError:
                break
            connection.setblocking(False)
            self._candidates.append(_Candidate(connection, now))
        for candidate in list(self._candidates):
            try:
                hello = candidate.readHello()
            except (OSError, EOFError, protocol.ProtocolError) as error:
                logger.warning("Dropped a connection to the ProtoSAM worker socket: %s", error)
                self._dropCandidate(candidate)
                continue
            if hello is None:
                if now - candidate.since > HELLO_TIMEOUT_S:
                    logger.warning("Dropped a connection to the ProtoSAM worker socket: no hello within %.0f s.",
                                   HELLO_TIMEOUT_S)
                    self._dropCandidate(candidate)
                continue
            if not hmac.compare_digest(hello.token.encode("utf-8"), self._token.encode("utf-8")):
                logger.warning("Refused a connection to the ProtoSAM worker socket with a wrong token.")
                self._dropCandidate(candidate)
                continue
            self._candidates.remove(candidate)
            for other in list(self._candidates):
                self._dropCandidate(other)
            self._sock, self._buffer = candidate.sock, candidate.buffer
            self._listener.close()
            self._listener = None
            self._workerPid = hello.pid
            logger.info("ProtoSAM worker %d ready (protocol %d, ProtoSAM %s, Python %s)", hello.pid,
                        hello.protocol_version, hello.protosam_version, hello.python)
            return
        if process.poll() is not None:
            error = WorkerStartError(self._startFailureText(f"it exited with code {process.returncode}"))
            self._cleanup(removeLog=False)
            self._failEverything(error)
        elif time.monotonic() - self._startedAt > self.startTimeout:
            self._killProcesses()
            process.wait(5)
            error = WorkerStartError(self._startFailureText(f"it did not connect within {self.startTimeout:.0f} s"))
            self._cleanup(removeLog=False)
            self._failEverything(error)

    def _dropCandidate(self, candidate: "_Candidate") -> None:
        if candidate in self._candidates:
            self._candidates.remove(candidate)
        try:
            candidate.sock.close()
        except OSError:
            pass

    def _takeMessage(self) -> Optional[bytes]:
        if len(self._buffer) < protocol.PREFIX_SIZE:
            return None
        headerLength, blobLength = protocol.read_prefix(bytes(self._buffer[:protocol.PREFIX_SIZE]))
        total = protocol.PREFIX_SIZE + headerLength + blobLength
        if len(self._buffer) < total:
            return None
        data = bytes(self._buffer[:total])
        del self._buffer[:total]
        return data

    def _readAvailable(self) -> None:
        closed = False
        while True:
            try:
                chunk = self._sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            self._buffer += chunk
        while self._sock is not None:
            try:
                data = self._takeMessage()
            except protocol.ProtocolError as error:
                self._workerLost(f"it sent an unreadable message ({error})", kill=True)
                return
            if data is None:
                break
            self._handle(data)
        if closed and self._sock is not None:
            self._workerLost("it closed the connection")

    def _handle(self, data: bytes) -> None:
        try:
            message = protocol.decode(data, file_dir=self._transferDir)
        except protocol.ProtocolError as error:
            logger.error("Unreadable message from the ProtoSAM worker: %s", error)
            return
        finally:
            try:
                files = protocol.array_files(data)
            except (protocol.ProtocolError, ValueError):
                files = []
            for path in files:
                _removeFile(path)
        if isinstance(message, protocol.LogRecord):
            workerLogger.log(message.level, "[worker %s] %s", self._workerPid, message.message)
            return
        identifier = getattr(message, "id", "")
        current = self._current
        if current is not None and identifier == current.requestId:
            if isinstance(message, protocol.JobProgress):
                if not current.cancelRequested:  # after Cancel the bar stops where the user pressed it
                    current.progress = (message.done, message.total)
                    self._events.append(lambda job=current, m=message: self._deliverProgress(job, m.done, m.total))
            elif isinstance(message, protocol.JobResult):
                self._current = None
                if current.cancelRequested:  # cancel came after the last slice: still "I do not want this"
                    self._finishJob(current, JobState.CANCELLED)
                else:
                    try:
                        result = current.function.decodeResult(message.value)
                    except Exception as error:  # a malformed value is a failure, reported like one
                        self._finishJob(current, JobState.FAILED, error=error)
                    else:
                        self._finishJob(current, JobState.SUCCEEDED, result=result)
            elif isinstance(message, protocol.ErrorReply):
                self._current = None
                error = protocol.error_from_reply(message)
                state = JobState.CANCELLED if isinstance(error, CancelledError) else JobState.FAILED
                self._finishJob(current, state, error=error, traceback=message.traceback, details=message.details)
            return
        pending = self._requests.get(identifier)
        if pending is not None:
            pending.lastActivity = time.monotonic()
            if isinstance(message, protocol.JobProgress):  # a session update's progress: wait on
                if pending.progress is not None:
                    pending.progress(message.done, message.total)
                return
            if isinstance(message, protocol.ErrorReply):
                pending.error = protocol.error_from_reply(message)
            else:
                pending.reply = message
            return
        if isinstance(message, protocol.ErrorReply):
            logger.warning("ProtoSAM worker: %s: %s", message.error_type, message.message)
        elif isinstance(message, protocol.Health):  # reply to a fire-and-forget release
            logger.info("ProtoSAM worker caches released: %d bytes cached, %s bytes resident.", message.cache_bytes,
                        message.rss_bytes)

    def _deliverProgress(self, job: ProcessJob, done: int, total: int) -> None:
        if job.onProgress is not None and not job._finishDelivered:
            job.onProgress(job, done, total)

    def _checkCancels(self) -> None:
        current = self._current
        if current is None or not current.cancelRequested:
            return
        now = time.monotonic()
        if current.cancelSentAt is None:
            current.cancelSentAt = now
            self._send(protocol.JobCancel(id=current.requestId))
        elif now - current.cancelSentAt > self.cancelGraceSeconds:
            logger.warning("The ProtoSAM worker did not stop within %.0f s of Cancel: killing it (it restarts with "
                           "the next run; models are loaded again).", self.cancelGraceSeconds)
            self._workerLost("it did not stop after Cancel", kill=True)

    def _sendNextJob(self) -> None:
        while self._queue and self._sock is not None and self._current is None:
            job = self._queue.popleft()
            try:
                data = protocol.encode(job.function.workerRequest, file_dir=self._transferDir)
            except Exception as error:  # e.g. something a message cannot carry: fail this job only
                self._finishJob(job, JobState.FAILED, error=error)
                continue
            job.files = protocol.array_files(data)
            job.state = JobState.RUNNING
            job.startedAt = time.monotonic()
            self._current = job
            self._sendBytes(data)

    def _send(self, message: protocol.Message) -> None:
        self._sendBytes(protocol.encode(message, file_dir=self._transferDir))

    def _sendBytes(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        try:  # headers are small and the worker reads on a dedicated thread: this does not wait long
            sock.settimeout(30.0)
            sock.sendall(data)
            sock.setblocking(False)
        except OSError as error:
            self._workerLost(f"sending to it failed ({error})", kill=True)

    def _exitDescription(self) -> str:
        process = self._process
        if process is None:
            return "unknown exit status"
        try:
            code = process.wait(2.0)
        except subprocess.TimeoutExpired:
            return "still running"
        if code < 0:
            import signal

            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (on Linux often the out-of-memory killer)" if name == "SIGKILL" else ""
            return f"killed by {name}{hint}"
        if code == 1 and CTK_ABNORMAL_EXIT in logTail(self.logPath):
            # The CTK launcher (PythonSlicer) exits with 1 when its interpreter dies of a signal.
            return ("the worker's interpreter was killed or crashed (on Linux often the out-of-memory killer; "
                    "PythonSlicer exited with code 1)")
        return f"exit code {code}"

    def _workerLost(self, reason: str, kill: bool = False) -> None:
        """The worker is gone (or must go): fail or cancel its job, clean up, restart on demand."""
        if kill:
            self._killProcesses()
        status = self._exitDescription()
        current, self._current = self._current, None
        tail = logTail(self.logPath)
        logger.warning("The ProtoSAM worker process stopped: %s (%s). Log %s", reason, status, self.logPath)
        if current is not None:
            if current.cancelRequested:
                self._finishJob(current, JobState.CANCELLED, error=CancelledError(
                    f"'{current.name}' did not stop within {self.cancelGraceSeconds:.0f} s of Cancel, so the ProtoSAM "
                    "worker was stopped; nothing was written. The next run starts a new worker (models load again)."))
            else:
                self._finishJob(current, JobState.FAILED, error=protocol.WorkerCrashedError(
                    f"The ProtoSAM worker process stopped unexpectedly during '{current.name}' ({status}). Nothing was "
                    "written and your segments are unchanged. Out of memory is the usual cause: choose smaller models "
                    "or close other programs. The next run starts a new worker.\n"
                    f"Worker log {self.logPath}, last lines:\n{tail}"))
        for pending in self._requests.values():
            if not pending.done:
                pending.error = protocol.WorkerCrashedError(f"The ProtoSAM worker process stopped ({status}).")
        self._cleanup(removeLog=False)

    def _failEverything(self, error: BaseException) -> None:
        for job in list(self._queue):
            self._finishJob(job, JobState.FAILED, error=error)
        self._queue.clear()
        for pending in self._requests.values():
            if not pending.done:
                pending.error = error

    def _finishJob(self, job: ProcessJob, state: JobState, *, result: Any = None, error: Optional[BaseException] = None,
                   traceback: str = "", details: Optional[Dict[str, Any]] = None) -> None:
        job.state = state
        job.result = result if state is JobState.SUCCEEDED else None
        job.error = error
        job.errorTraceback = traceback
        job.details = dict(details or {})
        job.finishedAt = time.monotonic()
        for path in job.files:
            _removeFile(path)
        job.files = []
        job.function = None  # drop references to the job's arrays
        self._events.append(lambda: self._deliverFinished(job))

    def _deliverFinished(self, job: ProcessJob) -> None:
        job._finishDelivered = True
        if job in self._pendingJobs:
            self._pendingJobs.remove(job)
        callback, job.onFinished, job.onProgress = job.onFinished, None, None
        if callback is not None:
            callback(job)

    def _cleanup(self, removeLog: bool) -> None:
        for sock in [self._sock, self._listener] + [candidate.sock for candidate in self._candidates]:
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._sock = self._listener = None
        self._candidates = []
        self._buffer.clear()
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                self._process = process
                self._killProcesses()
                self._process = None
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        if self._logFile is not None:
            self._logFile.close()
            self._logFile = None
        if self._transferDir is not None:
            keep = None if removeLog or self.logPath is None else self.logPath
            if keep is not None and keep.parent == self._transferDir and keep.exists():
                # The log of a failed worker stays for the user to read (its path is in the error);
                # the transfer files go now, the folder when Slicer next starts a worker after exit.
                for path in self._transferDir.iterdir():
                    if path != keep:
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else _removeFile(str(path))
            else:
                shutil.rmtree(self._transferDir, ignore_errors=True)
            self._transferDir = None


TRANSFER_PREFIX = "protosam-worker-"
#: What CTK's launcher prints (stderr, so into the worker log) when the interpreter it started
#: crashed or was killed (ctkAppLauncherPrivate::applicationFinished, then exit(EXIT_FAILURE)).
CTK_ABNORMAL_EXIT = "exit abnormally - Report the problem."


def _killPid(pid: int) -> None:
    """Kill one process by pid (TerminateProcess on Windows, SIGKILL elsewhere); gone is fine."""
    import signal

    try:
        os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    except OSError:
        pass


def removeStaleTransferFolders(folder: Optional[Path] = None) -> None:
    """Remove transfer folders left by a client process that died without cleaning up (a Slicer
    crash): they may hold copies of volumes and the worker's log. The folder name carries the
    client's pid. ``folder``: where to look (default :func:`temporaryFolder`)."""
    for folder in Path(folder or temporaryFolder()).glob(TRANSFER_PREFIX + "*-*"):
        pid = folder.name[len(TRANSFER_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _processExists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _processExists(pid: int) -> bool:
    if sys.platform == "win32":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        ctypes.windll.kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _removeFile(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


@atexit.register
def _shutdownAtExit() -> None:
    for client in list(_clients):
        try:
            client.shutdown(timeout=2.0)
        except Exception:  # interpreter exit: best effort only
            pass


_processWorkers: Dict[str, WorkerClient] = {}
_processWorkersLock = threading.Lock()


def workerForDevice(device: str) -> WorkerClient:
    """The session-wide worker process client of a device ("cpu", "cuda", "cuda:1", "mps"),
    created on first use; its process starts with the first job."""
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be a non-empty string, got {device!r}")
    with _processWorkersLock:
        client = _processWorkers.get(device)
        if client is None:
            client = _processWorkers[device] = WorkerClient(name=f"ProtoSAM-{device}")
        return client


_devices: Optional[protocol.Devices] = None
#: Seconds to wait for the device list: the first answer imports torch in the worker.
DEVICES_TIMEOUT_S = 180.0


def knownDevices() -> Optional[protocol.Devices]:
    """The device list a worker gave this session, or None before one answered."""
    return _devices


def availableDevices(timeout: float = DEVICES_TIMEOUT_S, idle: Optional[Callable[[], None]] = None) -> protocol.Devices:
    """The devices the worker process's torch can use and what "auto" picks there (CUDA, MPS,
    CPU), asked once per Slicer session: Slicer's own process never imports torch. A running
    worker answers; else the worker started to ask becomes the worker of the device "auto" picked."""
    global _devices
    if _devices is not None:
        return _devices
    with _processWorkersLock:
        running = [client for client in _processWorkers.values() if client.ready]
    client = running[0] if running else workerForDevice("auto")
    reply = client.request(protocol.DevicesRequest(id=protocol.new_id()), timeout, idle=idle)
    with _processWorkersLock:
        _processWorkers.setdefault(reply.auto, client)  # one process (and one copy of the models) for both names
    _devices = reply
    return reply


def shutdownAllWorkers(timeout: Optional[float] = 5.0) -> None:
    """Stop every device's worker process (called when Slicer exits or the module is reloaded)."""
    with _processWorkersLock:
        clients = list(_processWorkers.values())
        _processWorkers.clear()
    for client in clients:
        client.shutdown(timeout)


def _points(points_xy) -> List[List[float]]:
    return [[float(x), float(y)] for x, y in np.asarray(points_xy, dtype=float).reshape(-1, 2)]


class WorkerSession:
    """A correction session (protosam.session.Session) held by the worker process: every call
    is one small request; the volume's encodings stay in the worker. Same method names as
    Session for what the effect and the module use.

    ``structures``: structure key -> the preview mask this session adopts (a run of the same
    worker and engine: its encodings are in that engine's cache), in ``volume``'s order with
    ``axis`` the slicing axis; ``fixedSlices``: key -> slices painted by the user. When the run's
    support came from another volume: ``supportVolume`` (same order and axis), ``supportMasks``
    (key -> mask on it) and ``supportSlices`` (key -> slices), kept at every update; so are
    ``examples`` (key -> the run's example-bank supports, as arrays: protocol.SessionOpen)."""

    def __init__(self, client: "WorkerClient", engineSpec: Dict[str, Any], volume, axis: int,
                 structures: Dict[str, Any], fixedSlices: Dict[str, List[int]], options: Dict[str, Any], *,
                 supportVolume=None, supportMasks: Optional[Dict[str, Any]] = None,
                 supportSlices: Optional[Dict[str, List[int]]] = None, timeout: float = DEFAULT_REQUEST_INACTIVITY_S,
                 idle: Optional[Callable[[], None]] = None, examples: Optional[Dict[str, List[dict]]] = None):
        self.client, self.axis, self.timeout, self.idle = client, int(axis), timeout, idle
        self.sessionId = protocol.new_id()
        options = dict(options, axis=self.axis, adopt=True,
                       fixed_slices={key: [int(k) for k in fixedSlices.get(key, [])] for key in structures})
        if supportVolume is not None:
            options["support_slices"] = {key: [int(k) for k in value] for key, value in (supportSlices or {}).items()}
        value = self._call(protocol.SessionOpen(
            id=protocol.new_id(), session_id=self.sessionId, engine=engineSpec, volume=protocol.Image(volume),
            structures=dict(structures), options=options,
            support_volume=None if supportVolume is None else protocol.Image(supportVolume),
            support_masks=None if supportVolume is None else dict(supportMasks or {}),
            examples=dict(examples) if examples else None))
        self._masks = {key: np.asarray(value["masks"][key]) for key in structures}
        self._clicks: Dict[Any, List] = {}
        self._corrections: Dict[Any, List[str]] = {}
        # The review scores and user-confirmed slices as the worker's last reply left them.
        self._fixed = {key: self._fixedOf(value, key, fixedSlices.get(key, [])) for key in structures}
        self._sliceConfidence: Dict[Any, np.ndarray] = {}
        self._structureConfidence: Dict[Any, float] = {}
        self._volumeConfidence: Optional[float] = None
        self._takeConfidence(value)

    @staticmethod
    def _fixedOf(value: Dict[str, Any], key, default) -> List[int]:
        fixed = value.get("fixed_slices")
        if isinstance(fixed, dict):
            fixed = fixed.get(key, default)
        return [int(k) for k in (default if fixed is None else fixed)]

    def _takeConfidence(self, value: Dict[str, Any]) -> None:
        """Keep the scores a reply carries (a worker older than rescoring sends none: kept as they were)."""
        for key, scores in (value.get("slice_confidence") or {}).items():
            self._sliceConfidence[key] = np.asarray(scores, np.float32)
        self._structureConfidence.update({key: float(v) for key, v in (value.get("structure_confidence") or {}).items()})
        if value.get("volume_confidence") is not None:
            self._volumeConfidence = float(value["volume_confidence"])

    def confidence(self) -> Dict[str, Any]:
        """The review scores of the session's structures as the last replies left them, as
        protosam.session.Session.confidence gives them: ``slice_confidence`` (key -> [N] float32
        along the session's axis, NaN: no score), ``structure_confidence``, ``volume_confidence``."""
        return {"slice_confidence": {key: value.copy() for key, value in self._sliceConfidence.items()},
                "structure_confidence": dict(self._structureConfidence), "volume_confidence": self._volumeConfidence}

    def fixed_slices(self, structure) -> List[int]:
        """The user-confirmed slices of ``structure`` (painted or corrected), as last replied."""
        return sorted(self._fixed.get(structure, []))

    def _call(self, message: protocol.Message, progress=None, cancel=None) -> Any:
        return self.client.request(message, timeout=self.timeout, idle=self.idle, progress=progress,
                                   cancel=cancel).value

    def _slice(self, structure, index: int, message: protocol.Message, progress=None):
        value = self._call(message, progress=progress)
        mask = np.asarray(value["mask"])
        volume = np.moveaxis(self._masks[structure], self.axis, 0)
        volume[index] = mask
        self._clicks[(structure, index)] = [tuple(c) for c in value["clicks"]]
        self._corrections[(structure, index)] = list(value.get("corrections", []))
        self._fixed[structure] = self._fixedOf(value, structure, self._fixed.get(structure, []))
        self._takeConfidence(value)
        return mask

    def _target(self, structure, index: int) -> Dict[str, Any]:
        return dict(id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis,
                    slice_index=int(index))

    def correct(self, structure, index: int, points, labels, progress=None):
        """Clicks on slice ``index``. ``progress(done, total)`` is called with (0, 1) and (1, 1)
        when the worker has to encode the slice first (see protocol.SessionCorrect)."""
        return self._slice(structure, index, protocol.SessionCorrect(
            id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis, slice_index=int(index),
            points=[[float(x), float(y)] for x, y in points], labels=[int(v) for v in labels]), progress=progress)

    def add_support(self, structure, index: int, mask):
        """A repainted slice ``index`` (``[H, W]`` in the session's frame) becomes fixed and a support."""
        return self._slice(structure, index, protocol.SessionAddSupport(
            id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis, slice_index=int(index),
            mask=np.ascontiguousarray(mask, dtype=np.uint8)))

    def undo_click(self, structure, index: int):
        return self._slice(structure, index, protocol.SessionUndoClick(
            id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis, slice_index=int(index)))

    def box(self, structure, index: int, box_xyxy, progress=None):
        """A box ``(x0, y0, x1, y1)`` dragged on slice ``index`` (see Session.box); ``progress``
        as for :meth:`correct`."""
        return self._slice(structure, index, protocol.SessionBox(
            **self._target(structure, index), box=[float(v) for v in np.asarray(box_xyxy, dtype=float).reshape(-1)]),
            progress=progress)

    def scribble(self, structure, index: int, points_xy, positive: bool, radius: float = 0.0, progress=None):
        """A scribble through ``points_xy`` on slice ``index`` (see Session.scribble; refused
        with InputError for MedSAM); ``progress`` as for :meth:`correct`."""
        return self._slice(structure, index, protocol.SessionScribble(
            **self._target(structure, index), points=_points(points_xy), positive=bool(positive), radius=float(radius)),
            progress=progress)

    def lasso(self, structure, index: int, polygon_xy, positive: bool):
        """A lasso with vertices ``polygon_xy`` on slice ``index`` (see Session.lasso)."""
        return self._slice(structure, index, protocol.SessionLasso(
            **self._target(structure, index), points=_points(polygon_xy), positive=bool(positive)))

    def undo(self, structure, index: int):
        """Take back slice ``index``'s last correction (click, box, scribble or lasso)."""
        return self._slice(structure, index, protocol.SessionUndo(**self._target(structure, index)))

    def set_negatives(self, structure, negatives) -> bool:
        """Voxels that are not ``structure`` (a volume in the session volume's order, e.g. the
        other segments), or None; used from the next :meth:`update`. True when any are set."""
        volume = None if negatives is None else np.ascontiguousarray(np.asarray(negatives) != 0, dtype=np.uint8)
        value = self._call(protocol.SessionSetNegatives(id=protocol.new_id(), session_id=self.sessionId,
                                                        structure=structure, negatives=volume))
        return bool(value["negatives"])

    setNegatives = set_negatives

    def corrections(self, structure, index: int) -> List[str]:
        """Kinds of slice ``index``'s corrections an undo takes back, oldest first (as last replied)."""
        return list(self._corrections.get((structure, index), []))

    def clear_clicks(self, structure, index: int):
        return self._slice(structure, index, protocol.SessionClearClicks(
            id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis, slice_index=int(index)))

    def update(self, structure, progress=None, cancel: Optional[threading.Event] = None):
        """Propagate ``structure`` again in the worker; ``cancel`` (set while waiting) stops it."""
        value = self._call(protocol.SessionUpdate(id=protocol.new_id(), session_id=self.sessionId, structure=structure),
                           progress=progress, cancel=cancel)
        self._masks[structure] = np.asarray(value["mask"])
        for key, mask in (value.get("masks") or {}).items():  # exclusive sessions: the others too
            if key in self._masks:
                self._masks[key] = np.asarray(mask)
        self._fixed[structure] = self._fixedOf(value, structure, self._fixed.get(structure, []))
        self._takeConfidence(value)
        return self._masks[structure]

    def clicks(self, structure, index: int):
        return list(self._clicks.get((structure, index), []))

    def mask(self, structure):
        return self._masks[structure]

    def close(self) -> None:
        try:
            self._call(protocol.SessionClose(id=protocol.new_id(), session_id=self.sessionId))
        except Exception as error:  # the worker may be gone (restarted, closed): nothing to free then
            logger.info("Closing the correction session: %s", error)
