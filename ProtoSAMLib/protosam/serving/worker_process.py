"""The persistent ProtoSAM worker process: ``python -m protosam worker --connect HOST:PORT``.

Started by a client (the Slicer module, see ProtoSAMSlicerLib/worker_client.py) with the
client's own Python. It connects back to the client's socket on 127.0.0.1, proves with a
per-start random token (read from stdin, never on the command line) that it is the process the
client started, and then serves :mod:`protosam.serving.protocol` messages until the connection closes:
jobs run one at a time on the main thread (models stay loaded on that thread between jobs, so
cuDNN plans and embedding caches survive), while a reader thread answers health, cancel and
release requests at once. The worker exits when the connection or its stdin closes, so it never
outlives the process that started it.

Nothing here knows about Slicer. :func:`run_job` is also what the in-process thread worker
calls, so both paths compute with the same code.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from . import protocol
from ..errors import CancelledError, InputError
from ..heap import return_free_heap

logger = logging.getLogger(__name__)

__all__ = ["Engines", "run_job", "main", "OPERATIONS"]

ProgressFunction = Callable[[int, int], None]
#: Progress messages are sent at most this often (downloads report every chunk).
PROGRESS_INTERVAL_S = 0.05


class Engines:
    """The engines loaded in this process: one per device, rebuilt when models, preset, precision,
    propagation, weights folder or cache size change (big models do not fit twice in GPU memory)."""

    def __init__(self):
        self._engines: Dict[str, Any] = {}
        self._keys: Dict[str, tuple] = {}
        self._lock = threading.Lock()

    def get(self, spec: Dict[str, Any]):
        from ..engine import Engine, ModelSelection

        spec = protocol.EngineSpec(**spec)
        models = ModelSelection(**spec.models)
        key = (models, spec.preset, spec.precision, spec.device, spec.weights_home, spec.cache_bytes, spec.propagation)
        # Only the job thread builds engines; the lock guards the tables against the control
        # thread (health, release), which must not wait for a model load.
        with self._lock:
            if self._keys.get(spec.device) == key:
                return self._engines[spec.device]
            self._engines.pop(spec.device, None)  # release the previous models first
            self._keys.pop(spec.device, None)
        logger.info("Loading ProtoSAM models %s + %s on %s", models.dinov2, models.sam, spec.device)
        engine = Engine(models, preset=spec.preset, device=spec.device, download=spec.download,
                        weights_home=spec.weights_home, cache_bytes=spec.cache_bytes, precision=spec.precision,
                        propagation=spec.propagation)
        with self._lock:
            self._engines[spec.device], self._keys[spec.device] = engine, key
        return engine

    def cache_bytes(self) -> int:
        with self._lock:
            return sum(engine.cache.nbytes for engine in self._engines.values())

    def describe(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [{"device": device, "dinov2": engine.models.dinov2, "sam": engine.models.sam,
                     "input_size": engine.models.input_size, "preset": engine.preset.name,
                     "precision": engine.precision,
                     "cache_bytes": engine.cache.nbytes, "cache_max_bytes": engine.cache.max_bytes}
                    for device, engine in self._engines.items()]

    def release(self, models: bool = False) -> None:
        """Drop every encoder-output cache (and the engines themselves with ``models``)."""
        with self._lock:
            for engine in self._engines.values():
                engine.cache.clear()
            if models:
                self._engines.clear()
                self._keys.clear()
        _return_memory_to_the_system()


def _return_memory_to_the_system() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return_free_heap()  # glibc keeps freed heap pages; give them back so the RSS really drops


def resident_bytes() -> Optional[int]:
    """Resident memory of this process in bytes (Linux, Windows), else None."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/self/statm") as stream:
                return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        if sys.platform == "win32":
            import ctypes
            from ctypes import wintypes

            class Counters(ctypes.Structure):
                _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                    (name, ctypes.c_size_t) for name in (
                        "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                        "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]

            counters = Counters()
            counters.cb = ctypes.sizeof(Counters)
            process = ctypes.windll.kernel32.GetCurrentProcess()
            if ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
                return int(counters.WorkingSetSize)
    except (OSError, ValueError, AttributeError):
        pass
    return None


# ----------------------------------------------------------------------------- operations
def _segment_volume(engines: Engines, request: protocol.JobSubmit, progress: ProgressFunction,
                    cancel: threading.Event) -> Dict[str, Any]:
    from ..propagation import segment_volume

    if request.engine is None:
        raise InputError("segment_volume needs an engine specification")
    engine = engines.get(request.engine)
    if cancel.is_set():
        raise CancelledError("Cancelled before the run started; nothing was written.")
    kwargs = dict(request.kwargs)
    for name in ("engine", "progress", "cancel"):
        if name in kwargs:
            raise InputError(f"segment_volume keyword '{name}' is set by the worker, not by the request")
    # Not segment_volume's: whether the reply carries slice_evidence (asked for by clients that
    # adopt the result in a session; others rebuild a VolumeResult of the fields they know).
    return_evidence = bool(kwargs.pop("return_evidence", False))
    result = segment_volume(engine, progress=progress, cancel=cancel, **kwargs)
    # Every field of VolumeResult, so the client rebuilds it whole (axis and plane included).
    return {field.name: (dict(value) if isinstance(value, dict) else value)
            for field in dataclasses.fields(result) for value in [getattr(result, field.name)]
            if field.name != "slice_evidence" or return_evidence}


def _download_weights(engines: Engines, request: protocol.JobSubmit, progress: ProgressFunction,
                      cancel: threading.Event) -> List[str]:
    """Download the missing official weights of ``models``; progress in bytes over all files."""
    from .. import weights
    from ..engine import ModelSelection

    kwargs = request.kwargs
    models = ModelSelection(**kwargs["models"])
    home = kwargs.get("weights_home")
    registry = None
    if kwargs.get("registry") is not None:
        registry = {entry["name"]: weights.WeightsEntry(**entry) for entry in kwargs["registry"]}
    table = weights.REGISTRY if registry is None else registry
    missing = []
    for name, checkpoint in ((models.dinov2, models.dinov2_checkpoint), (models.sam, models.sam_checkpoint)):
        if checkpoint:
            if not Path(checkpoint).expanduser().is_file():
                raise FileNotFoundError(f"The checkpoint file {checkpoint} does not exist; choose an existing file or "
                                        "clear the custom path to use the official weights.")
            continue
        entry = table.get(name)
        if entry is not None and weights.cache_status(entry, home) not in ("verified", "present"):
            missing.append(entry)  # a local-only entry fails in download() with what to do instead
    total = sum(entry.size or 0 for entry in missing)
    finished, paths = 0, []
    for entry in missing:
        if cancel.is_set():
            raise CancelledError("Download cancelled; it resumes where it stopped next time.")

        def file_progress(done, _total, offset=finished):
            progress(min(offset + int(done), total), total)

        paths.append(str(weights.download(entry, home, progress=file_progress, cancel=cancel,
                                          registry=registry, base_url=kwargs.get("base_url"))))
        finished += entry.size or 0
    progress(total, total)
    return paths


def _forward_to_server(engines: Engines, request: protocol.JobSubmit, progress: ProgressFunction,
                       cancel: threading.Event) -> Any:
    """Relay a job to a ProtoSAM server over HTTP (``protosam serve``; see server_client)."""
    from .client import forward_job

    return forward_job(request, progress, cancel)


#: operation name -> function(engines, JobSubmit, progress, cancel) -> JSON value with arrays
OPERATIONS = {"segment_volume": _segment_volume, "download_weights": _download_weights,
              "forward_to_server": _forward_to_server}


def run_job(engines: Engines, request: protocol.JobSubmit, progress: ProgressFunction,
            cancel: threading.Event) -> Any:
    """Run one job in this process (worker process main thread, or the in-process thread worker)."""
    operation = OPERATIONS.get(request.operation)
    if operation is None:
        raise protocol.NotSupportedError(f"Operation {request.operation!r} is not supported by this worker "
                                         f"(ProtoSAM {__version__}); known: {', '.join(sorted(OPERATIONS))}.")
    return operation(engines, request, progress, cancel)


def models_status(request: protocol.ModelsStatusRequest, engines: Engines) -> protocol.ModelsStatus:
    from .. import weights

    statuses = []
    selection = request.models
    for family, name, checkpoint in (("dinov2", selection.get("dinov2"), selection.get("dinov2_checkpoint")),
                                     ("sam", selection.get("sam"), selection.get("sam_checkpoint"))):
        if checkpoint:
            path = Path(checkpoint).expanduser()
            statuses.append({"model": name, "family": family, "status": "custom" if path.is_file() else "custom missing",
                             "path": str(path), "url": "", "size": None})
        elif name in weights.REGISTRY:
            entry = weights.REGISTRY[name]
            statuses.append({"model": name, "family": family, "status": weights.cache_status(entry, request.weights_home),
                             "path": str(weights.cache_path(entry, request.weights_home)), "url": entry.url,
                             "size": entry.size})
        else:
            statuses.append({"model": name, "family": family, "status": "unknown", "path": "", "url": "", "size": None})
    return protocol.ModelsStatus(id=request.id, weights=statuses, loaded=engines.describe())


def devices(request: protocol.DevicesRequest) -> protocol.Devices:
    """The devices this worker's torch can use and what "auto" picks (CUDA, MPS, CPU)."""
    from ..engine import available_devices, resolve_device

    return protocol.Devices(id=request.id, devices=available_devices(), auto=str(resolve_device("auto")))


#: The start of the warning PyTorch gives once per operator when PYTORCH_ENABLE_MPS_FALLBACK=1
#: runs it on the CPU (aten/src/ATen/mps/MPSFallback.mm): "The operator 'aten::...' is not
#: currently supported on the MPS backend and will fall back to run on the CPU. ..."
MPS_FALLBACK_WARNING = "is not currently supported on the MPS backend and will fall back to run on the CPU"


def log_mps_fallbacks() -> None:
    """Log each operator MPS runs on the CPU (PyTorch warns once per operator) in the worker's
    log and the client's, where users look when a Mac is slower than expected."""
    import warnings

    previous = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if MPS_FALLBACK_WARNING in text:
            operator = text.split("'")[1] if text.count("'") >= 2 else text
            logger.warning("MPS fallback: operator %s runs on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1).", operator)
            return
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


# ----------------------------------------------------------------------------- sessions
class SessionBusyError(InputError):
    """A click arrived while the session runs a long operation (an update) and the caller
    asked not to wait for it."""


class WorkerSessions:
    """The correction sessions (protosam.session) held by this process, by ``session_id``: the
    volume's encodings stay here, so a click or an update is a small request.

    The one session handler of the worker process and of the server (one instance per user
    there). ``engines``: anything with ``get(spec)`` (:class:`Engines`, or the server's per-user
    view). ``shared_cache``: every session keeps its encodings in its engine's cache (the
    server's per-user cache, bounded by the user's budget), not only adopting ones; the
    ``cache_bytes`` option is then ignored.
    """

    def __init__(self, engines, shared_cache: bool = False):
        self.engines = engines
        self.shared_cache = shared_cache
        self._sessions: Dict[str, Any] = {}
        self._last_used: Dict[str, float] = {}
        self._busy: Dict[str, int] = {}  # session id -> operations in progress (never expired then)
        self._lock = threading.Lock()

    def get(self, session_id: str):
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise InputError(f"No correction session '{session_id}' in this worker (closed, or the worker restarted): "
                             "propagate again.")
        return session

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    @contextlib.contextmanager
    def _using(self, session_id: str):
        session = self.get(session_id)
        with self._lock:
            self._busy[session_id] = self._busy.get(session_id, 0) + 1
        try:
            yield session
        finally:
            with self._lock:
                self._busy[session_id] -= 1
                if not self._busy[session_id]:
                    del self._busy[session_id]
                self._last_used[session_id] = time.monotonic()

    def job(self, message: protocol.Message, progress: ProgressFunction, cancel: threading.Event) -> Dict[str, Any]:
        if isinstance(message, protocol.SessionOpen):
            return self._open(message, progress, cancel)
        if isinstance(message, _ENCODING_TYPES):  # a click, box or scribble on a slice to encode first
            progress(0, 1)
            value = self.small_request(message)
            progress(1, 1)
            return value
        with self._using(message.session_id) as session:
            mask = session.update(message.structure, progress=progress, cancel=cancel)
            reply = {"mask": mask, "fixed_slices": session.fixed_slices(message.structure)}
            if session.exclusive_structures:  # the other structures may win or give back voxels
                reply["masks"] = session.masks()
            reply.update(session.confidence())  # every slice scored again from the new evidence
            return reply

    def _open(self, message: protocol.SessionOpen, progress, cancel) -> Dict[str, Any]:
        from ..session import Session

        engine = self.engines.get(message.engine)
        options = dict(message.options)
        allowed = {"axis", "modality", "support_mode", "support_slices", "slice_range", "auto_extent", "cache_bytes",
                   "adopt", "fixed_slices", "exclusive", "similar_k", "slice_evidence"}
        unknown = set(options) - allowed
        if unknown:
            raise InputError(f"Unknown session option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}.")
        volume = _array(message.volume)
        support_volume = None if message.support_volume is None else _array(message.support_volume)
        self.close(message.session_id)
        range_ = options.get("slice_range")
        adopt = bool(options.get("adopt", False))
        session = Session(
            engine, volume, axis=int(options.get("axis", 0)), modality=options.get("modality", "auto"),
            cache_bytes=None if adopt or self.shared_cache else options.get("cache_bytes", "auto"),
            support_mode=options.get("support_mode", "nearest"), similar_k=options.get("similar_k", 3),
            slice_range=None if range_ is None else tuple(range_), auto_extent=options.get("auto_extent"),
            exclusive=bool(options.get("exclusive", False)))
        if adopt:
            fixed = options.get("fixed_slices") or {}
            evidence = options.get("slice_evidence") or {}  # the job's VolumeResult.slice_evidence
            support_masks = message.support_masks or {}
            support_slices = options.get("support_slices") or {}
            for key, mask in message.structures.items():
                external = {}
                if support_volume is not None and key in support_masks:
                    external = dict(support_volume=support_volume, support_mask=_array(support_masks[key]),
                                    support_slices=support_slices.get(key))
                session.adopt(key, _array(mask), fixed.get(key, []), examples=(message.examples or {}).get(key),
                              evidence=evidence.get(key), **external)
            masks = session.masks(list(message.structures))
        else:
            try:
                masks = session.start({key: _array(mask) for key, mask in message.structures.items()},
                                      support_volume=support_volume, support_slices=options.get("support_slices"),
                                      progress=progress, cancel=cancel, examples=message.examples)
            except BaseException:
                session.close()  # a failed or cancelled open keeps nothing
                raise
        with self._lock:
            self._sessions[message.session_id] = session
            self._last_used[message.session_id] = time.monotonic()
        return {"masks": masks, "fixed_slices": {key: session.fixed_slices(key) for key in masks},
                **session.confidence(list(masks))}

    def needs_encoding(self, message: protocol.Message) -> bool:
        """A click, box or scribble on a slice whose SAM embedding its session does not hold (a
        job, with progress). Lassos never decode; an undo that re-decodes the clicks left (its
        embedding evicted meanwhile) encodes at once, without progress, as before."""
        if not isinstance(message, _ENCODING_TYPES):
            return False
        with self._lock:
            session = self._sessions.get(message.session_id)
        # An unknown session or a slice outside the volume is refused at once by small_request;
        # so are clicks and scribbles for a box-only refiner (MedSAM).
        count = session.volume.shape[0] if session is not None else 0
        if session is None or not 0 <= message.slice_index < count or message.axis != session.axis:
            return False
        if session.engine.refiner.medsam and not isinstance(message, protocol.SessionBox):
            return False
        return not session.has_sam_embedding(message.slice_index)

    def small_request(self, message: protocol.Message, wait: bool = True) -> Dict[str, Any]:
        """A click, box, scribble, lasso, undo, clear, painted slice, negatives or close. ``wait=False``: raise
        :class:`SessionBusyError` at once instead of waiting for the session's running update."""
        if isinstance(message, protocol.SessionClose):
            with self._lock:
                in_use = message.session_id in self._busy
            if in_use and not wait:  # closing waits for the session's lock, which the update holds
                raise SessionBusyError("This correction session is updating the volume: close it when the update "
                                       "has finished.")
            return {"closed": self.close(message.session_id)}
        with self._using(message.session_id) as session, session.exclusive(wait) as held:
            if not held:
                raise SessionBusyError("This correction session is updating the volume: click again when the update "
                                       "has finished.")
            if isinstance(message, protocol.SessionSetNegatives):
                negatives = None if message.negatives is None else _array(message.negatives)
                session.set_negatives(message.structure, negatives)
                return {"negatives": session.structures[message.structure].negatives is not None}
            if not isinstance(message, protocol.SESSION_SLICE_TYPES):
                raise protocol.ProtocolError(f"'{message.TYPE}' is not a small session request")
            return self._slice_request(session, message)

    def _slice_request(self, session, message: protocol.Message) -> Dict[str, Any]:
        """Reply: the slice's ``mask``, ``slice_index``, ``clicks`` ([x, y, label], not the points
        sampled along scribbles), ``corrections`` (kinds an undo takes back, oldest first),
        ``fixed_slices`` (the structure's, as the correction left them) and
        the structure's review scores as the correction left them (``slice_confidence``,
        ``structure_confidence``: the structure's alone; ``volume_confidence``; see
        :meth:`protosam.session.Session.confidence`)."""
        if message.axis != session.axis:
            raise InputError(f"This session propagates along axis {session.axis}, not {message.axis}: "
                             "correct slices of the view it was propagated in.")
        if isinstance(message, protocol.SessionAddSupport):
            mask = session.add_support(message.structure, message.slice_index, _array(message.mask))
        elif isinstance(message, (protocol.SessionUndoClick, protocol.SessionUndo)):
            mask = session.undo(message.structure, message.slice_index)
        elif isinstance(message, protocol.SessionClearClicks):
            mask = session.clear_clicks(message.structure, message.slice_index)
        elif isinstance(message, protocol.SessionBox):
            mask = session.box(message.structure, message.slice_index, message.box)
        elif isinstance(message, protocol.SessionScribble):
            mask = session.scribble(message.structure, message.slice_index, message.points, message.positive,
                                    radius=message.radius)
        elif isinstance(message, protocol.SessionLasso):
            mask = session.lasso(message.structure, message.slice_index, message.points, message.positive)
        else:
            mask = session.correct(message.structure, message.slice_index, message.points, message.labels)
        return {"mask": mask, "slice_index": message.slice_index,
                "clicks": [list(c) for c in session.clicks(message.structure, message.slice_index)],
                "corrections": session.corrections(message.structure, message.slice_index),
                # The user-confirmed slices as the correction left them (an undo may give one back).
                "fixed_slices": session.fixed_slices(message.structure),
                **session.confidence([message.structure])}

    def close(self, session_id: str) -> bool:
        """Close a session and free its encodings; False when there was none."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            self._last_used.pop(session_id, None)
        if session is None:
            return False
        session.close()
        _return_memory_to_the_system()
        return True

    def expire(self, idle_seconds: float) -> List[str]:
        """Close the sessions unused for more than ``idle_seconds`` (never one in use); their ids."""
        now = time.monotonic()
        with self._lock:
            idle = [key for key, used in self._last_used.items()
                    if now - used > idle_seconds and key not in self._busy]
        return [key for key in idle if self.close(key)]

    def array_bytes(self) -> int:
        """Bytes of what the sessions hold besides encodings (``Session.array_bytes``: volumes,
        masks, kept probabilities, prompt masks, corrections' before-states, examples ...)."""
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(session.array_bytes() for session in sessions)

    def cache_bytes(self) -> int:
        """Bytes of the sessions' own caches (an adopted session's is its engine's, counted there)."""
        with self._lock:
            return sum(session.cache.nbytes for session in self._sessions.values()
                       if session.cache is not session.engine.cache)

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
            self._last_used.clear()
        for session in sessions:
            session.close()


#: Session messages that decode the slice with SAM (encoded first, as a job, when not cached).
_ENCODING_TYPES = (protocol.SessionCorrect, protocol.SessionBox, protocol.SessionScribble)


def _array(value) -> np.ndarray:
    return value.array if isinstance(value, protocol.Image) else np.asarray(value)


# ----------------------------------------------------------------------------- serving
class _Channel:
    """Blocking message I/O on a connected socket; sends are serialised by a lock."""

    def __init__(self, sock: socket.socket, transfer_dir: Optional[Path]):
        self.sock = sock
        self.transfer_dir = transfer_dir
        self._send_lock = threading.Lock()

    def send(self, message: protocol.Message) -> None:
        data = protocol.encode(message, file_dir=self.transfer_dir)
        with self._send_lock:
            self.sock.sendall(data)

    def _read_exactly(self, count: int) -> bytes:
        chunks, left = [], count
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("connection closed")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> bytes:
        prefix = self._read_exactly(protocol.PREFIX_SIZE)
        header_length, blob_length = protocol.read_prefix(prefix)
        return prefix + self._read_exactly(header_length + blob_length)


class _ForwardingHandler(logging.Handler):
    """Sends this process's log records to the client, which logs them in its own log."""

    def __init__(self, channel: _Channel):
        super().__init__(logging.INFO)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.send(protocol.LogRecord(level=record.levelno, name=record.name, message=self.format(record)))
        except Exception:  # the log must never break a job (e.g. connection already closed)
            pass


class _RunningJob:
    def __init__(self, request: protocol.JobSubmit):
        self.request = request
        self.cancel = threading.Event()
        self.done = 0
        self.done_at_cancel: Optional[int] = None


class WorkerService:
    """Serves one client connection until it closes or a Shutdown arrives."""

    def __init__(self, channel: _Channel):
        self.channel = channel
        self.engines = Engines()
        self.sessions = WorkerSessions(self.engines)
        self.jobs: "queue.Queue[Optional[protocol.Message]]" = queue.Queue()
        self.cancelled: set = set()
        self.running: Optional[_RunningJob] = None
        self.started = time.monotonic()
        self._lock = threading.Lock()

    # -- reader thread: control messages are answered at once, even while a job runs ---------
    def read_forever(self) -> None:
        while True:
            try:
                data = self.channel.receive()
            except (EOFError, OSError):
                logger.info("Client connection closed: the worker exits.")
                os._exit(0)  # the client is gone: nothing left to save, do not wait for the job
            except protocol.ProtocolError as error:  # framing lost: the stream cannot be resynchronised
                logger.error("Unreadable message from the client (%s): the worker exits.", error)
                os._exit(3)
            try:
                message = protocol.decode(data, file_dir=self.channel.transfer_dir)
            except protocol.ProtocolError as error:
                self._reply(protocol.reply_for_exception("", error))
                continue
            try:
                self.handle(message)
            except Exception as error:  # one bad request must not stop the worker
                self._reply(protocol.reply_for_exception(getattr(message, "id", ""), error, traceback.format_exc()))

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.JobSubmit):
            self.jobs.put(message)
        elif isinstance(message, protocol.JobCancel):
            with self._lock:
                running = self.running
                if running is not None and running.request.id == message.id:
                    if running.done_at_cancel is None:
                        running.done_at_cancel = running.done
                    running.cancel.set()
                else:
                    self.cancelled.add(message.id)
        elif isinstance(message, protocol.HealthRequest):
            self._reply(self.health(message.id))
        elif isinstance(message, protocol.ReleaseCaches):
            before = self.engines.cache_bytes() + self.sessions.cache_bytes()
            self.sessions.close_all()  # a session's encodings are caches too (scene closed)
            self.engines.release(models=message.models)
            logger.info("Released %d bytes of encoder caches%s.", before, " and the models" if message.models else "")
            self._reply(self.health(message.id))
        elif isinstance(message, protocol.ModelsStatusRequest):
            self._reply(models_status(message, self.engines))
        elif isinstance(message, protocol.DevicesRequest):
            self._reply(devices(message))
        elif (isinstance(message, (protocol.SessionOpen, protocol.SessionUpdate))
              or self.sessions.needs_encoding(message)):
            self.jobs.put(message)  # propagation or encoding: a job, with progress and cancel
        elif isinstance(message, protocol.SESSION_TYPES):
            # A click, a painted slice or a close is small: answered at once on this thread, never
            # waiting for the session's running update (that would stall cancel and health
            # requests behind it): a busy reply (SessionBusyError) instead.
            try:
                value = self.sessions.small_request(message, wait=False)
                self._reply(protocol.JobResult(id=message.id, value=value))
            except Exception as error:
                self._reply(protocol.reply_for_exception(message.id, error, traceback.format_exc()))
        elif isinstance(message, protocol.Shutdown):
            with self._lock:
                if self.running is not None:
                    self.running.cancel.set()
            self.jobs.put(None)
        else:
            raise protocol.ProtocolError(f"a worker does not accept '{message.TYPE}' messages")

    def health(self, message_id: str) -> protocol.Health:
        torch = sys.modules.get("torch")
        gpu = 0
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            gpu = int(torch.cuda.memory_allocated())
        with self._lock:
            running = self.running.request.id if self.running is not None else None
        return protocol.Health(id=message_id, pid=os.getpid(), rss_bytes=resident_bytes(),
                               cache_bytes=self.engines.cache_bytes() + self.sessions.cache_bytes(), gpu_bytes=gpu, engines=self.engines.describe(),
                               running_job=running, queued_jobs=self.jobs.qsize(),
                               uptime_s=time.monotonic() - self.started)

    def _reply(self, message: protocol.Message) -> None:
        try:
            self.channel.send(message)
        except OSError:
            os._exit(0)  # client gone

    # -- main thread: jobs, one at a time ---------------------------------------------------
    def run_jobs(self) -> None:
        while True:
            request = self.jobs.get()
            if request is None:
                return
            with self._lock:
                if request.id in self.cancelled:
                    self.cancelled.discard(request.id)
                    self._reply(protocol.ErrorReply(id=request.id, error_type="CancelledError",
                                                    message="Cancelled before it started; nothing was written."))
                    continue
                job = self.running = _RunningJob(request)
            try:
                reply = self._execute(job)
            finally:
                with self._lock:
                    self.running = None
            self._reply(reply)  # after clearing: a health request right after the reply sees no job

    def _execute(self, job: _RunningJob) -> protocol.Message:
        request = job.request
        last_sent = [0.0]

        def progress(done: int, total: int) -> None:
            job.done = int(done)
            now = time.monotonic()
            if done >= total or now - last_sent[0] >= PROGRESS_INTERVAL_S:
                last_sent[0] = now
                self._reply(protocol.JobProgress(id=request.id, done=int(done), total=int(total)))

        try:
            if isinstance(request, protocol.JobSubmit):
                value = run_job(self.engines, request, progress, job.cancel)
            else:
                value = self.sessions.job(request, progress, job.cancel)
            if job.cancel.is_set():
                raise CancelledError("Cancelled by the user; nothing was written.")
            reply: protocol.Message = protocol.JobResult(id=request.id, value=value)
        except CancelledError as error:
            reply = protocol.reply_for_exception(request.id, error, details={
                "done_at_cancel": job.done_at_cancel, "done_at_stop": job.done})
        except MemoryError as error:  # the job's arrays are gone by now: give the memory back
            _return_memory_to_the_system()
            reply = protocol.reply_for_exception(request.id, error, traceback.format_exc())
        except Exception as error:  # reported to the client, which raises it to its caller
            reply = protocol.reply_for_exception(request.id, error, traceback.format_exc())
            logger.debug("Job %s failed:\n%s", request.id, reply.traceback)
        return reply


def _exit_when_stdin_closes() -> None:
    """The client holds our stdin open; EOF means it died (even by kill -9): exit too.

    Reads with ``os.read``: a daemon thread blocked in ``sys.stdin.buffer.read`` holds the buffer's
    lock, and a normal exit (Shutdown) then aborts with "could not acquire lock for <stdin> at
    interpreter shutdown" (SIGABRT), so a clean stop looked like a crash and kept its log."""
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass
    except (OSError, ValueError):
        pass
    os._exit(0)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="protosam worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connect", required=True, metavar="HOST:PORT",
                        help="the client's socket (127.0.0.1); the token is read from the first line of stdin")
    parser.add_argument("--transfer-dir", default=None, metavar="DIR",
                        help="folder of the .npy array files exchanged with the client")
    return parser


def serve(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        print("protosam worker: no token on stdin; this command is started by ProtoSAM clients", file=sys.stderr)
        return 2
    host, _, port = args.connect.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.settimeout(None)
    transfer_dir = Path(args.transfer_dir).resolve() if args.transfer_dir else None
    channel = _Channel(sock, transfer_dir)
    channel.send(protocol.Hello(token=token, pid=os.getpid(), protosam_version=__version__,
                                python=sys.version.split()[0]))
    logging.getLogger("protosam").addHandler(_ForwardingHandler(channel))
    log_mps_fallbacks()
    if os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") == "1" and sys.platform == "darwin":
        logger.info("PYTORCH_ENABLE_MPS_FALLBACK=1: operators without an MPS kernel run on the CPU (logged below).")
    service = WorkerService(channel)
    threading.Thread(target=_exit_when_stdin_closes, name="stdin-watch", daemon=True).start()
    threading.Thread(target=service.read_forever, name="control", daemon=True).start()
    logger.info("ProtoSAM worker %d ready (Python %s)", os.getpid(), sys.version.split()[0])
    service.run_jobs()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(build_parser().parse_args(argv))


def cli_serve(args: argparse.Namespace) -> int:
    """``protosam worker``: the CLI configured logging for warnings only; the worker logs more."""
    logging.getLogger("protosam").setLevel(logging.INFO)
    return serve(args)


if __name__ == "__main__":  # pragma: no cover - started as a process
    sys.exit(main())
