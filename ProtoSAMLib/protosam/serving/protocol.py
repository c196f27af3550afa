"""The ProtoSAM worker protocol: every message between a client (the Slicer module) and a
compute side (the local worker process today, a ProtoSAM server over HTTP later), defined once.

Messages are dataclasses. Their fields hold plain JSON values (str, int, float, bool, None,
lists, str-keyed dicts) and numpy arrays anywhere inside them; an :class:`Image` wraps an array
with its geometry (a 4x4 IJK-to-physical matrix, e.g. IJK-to-RAS). :func:`encode` turns a
message into one self-delimiting byte string that works over a socket stream and as an HTTP
body alike::

    b"PSAM" | u32 version | u64 header length | u64 blob length     (24 bytes, little endian)
    header: UTF-8 JSON {"type": ..., "fields": {...}, "arrays": [{dtype, shape, offset, nbytes,
            ijk_to_physical?} or {dtype, shape, file, ijk_to_physical?}, ...]}
    blobs:  the raw C-order bytes of the inline arrays, back to back

Inside ``fields`` an array is ``{"$array": index}`` into the header's array table. Arrays either
travel inline (HTTP, tests) or, for the local worker, as ``.npy`` files in a transfer folder
both sides can read (memory-mapped on write and read, removed by the client afterwards): a 1 GB
volume is then not copied through a pipe. Decoding a file reference is refused unless the
decoder names the folder it trusts, so a server can never be made to read arbitrary files.

Errors: anything malformed raises :class:`ProtocolError` with what was wrong.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import numpy as np

from ..errors import ProtoSAMError

__all__ = [
    "PROTOCOL_VERSION", "ProtocolError", "NotSupportedError", "WorkerCrashedError", "Image", "Message",
    "Hello", "JobSubmit", "JobProgress", "JobCancel", "JobResult", "ErrorReply", "HealthRequest", "Health",
    "ReleaseCaches", "ModelsStatusRequest", "ModelsStatus", "DevicesRequest", "Devices", "SessionOpen", "SessionAddSupport",
    "SessionCorrect", "SessionUndoClick", "SessionClearClicks", "SessionUpdate", "SessionClose", "SessionBox",
    "SessionScribble", "SessionLasso", "SessionUndo", "SessionSetNegatives", "MAX_GESTURE_POINTS", "LogRecord", "Shutdown",
    "EngineSpec",
    "encode", "decode", "read_prefix", "PREFIX_SIZE", "new_id", "error_from_reply", "ERROR_TYPES",
]

PROTOCOL_VERSION = 1
MAGIC = b"PSAM"
_PREFIX = struct.Struct("<4sIQQ")
PREFIX_SIZE = _PREFIX.size
#: A header is metadata only (arrays are blobs or files): anything bigger is not a message.
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Caps that bound the work and memory of decoding before anything is allocated (a server
#: decodes messages from the network): nesting of the JSON header, arrays per message,
#: dimensions per array. Numbers must be finite and integers within int64.
MAX_JSON_DEPTH = 64
MAX_ARRAYS = 4096
MAX_DIMENSIONS = 32
_INT64 = 2 ** 63
#: Array dtypes a message may carry (no object or structured dtypes: nothing executable).
ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in (
    np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
    np.float16, np.float32, np.float64))


class ProtocolError(ProtoSAMError):
    """A message could not be encoded or decoded (malformed, truncated, wrong version...)."""


class NotSupportedError(ProtoSAMError):
    """The other side understood the message but does not implement the operation."""


class WorkerCrashedError(ProtoSAMError):
    """The compute side stopped (killed, crashed, out of memory, connection lost) during a job."""


@dataclasses.dataclass
class Image:
    """An array with its geometry: ``ijk_to_physical`` is a 4x4 float matrix mapping
    (i, j, k, 1) to physical coordinates (e.g. RAS, mm), or None when unknown. The array is
    in KJI order for 3-D volumes (numpy order of Slicer's ``arrayFromVolume``)."""

    array: np.ndarray
    ijk_to_physical: Optional[np.ndarray] = None


@dataclasses.dataclass
class EngineSpec:
    """Which engine runs a job (plain values; ``models`` holds ModelSelection's fields)."""

    models: Dict[str, Any]
    preset: str = "default"
    device: str = "cpu"
    weights_home: Optional[str] = None
    download: bool = False
    cache_bytes: int = 0
    #: The encoders' precision (protosam.precision.PRECISIONS): "auto", "fp32", "bf16", "fp16".
    precision: str = "auto"
    #: How volumes are walked (protosam.catalogue.PROPAGATION_MODES): "per-slice" or "memory"
    #: (SAM 2 refiners; the engine refuses it for another refiner).
    propagation: str = "per-slice"


@dataclasses.dataclass
class Message:
    """Base class; ``TYPE`` is the wire name."""

    TYPE = ""


def new_id() -> str:
    """A fresh, unguessable message/job id."""
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------- messages
@dataclasses.dataclass
class Hello(Message):
    """First message of a worker on a new connection; ``token`` proves it was started by us."""

    TYPE = "hello"
    token: str
    pid: int
    protocol_version: int = PROTOCOL_VERSION
    protosam_version: str = ""
    python: str = ""


@dataclasses.dataclass
class JobSubmit(Message):
    """Run ``operation`` with ``kwargs`` (JSON values and arrays) on the engine ``engine``.

    Operations: ``"segment_volume"`` (kwargs are :func:`protosam.segment_volume`'s, arrays
    included, minus ``engine``/``progress``/``cancel``, plus ``return_evidence``: true to have
    the reply carry ``slice_evidence`` too, for a session adopting the result) and ``"download_weights"`` (kwargs:
    ``models``, ``weights_home``, ``base_url``, ``registry`` (list of WeightsEntry dicts or
    None)). ``engine`` is None for operations without one.
    """

    TYPE = "job_submit"
    id: str
    operation: str
    kwargs: Dict[str, Any]
    engine: Optional[Dict[str, Any]] = None
    name: str = ""


@dataclasses.dataclass
class JobProgress(Message):
    TYPE = "job_progress"
    id: str
    done: int
    total: int


@dataclasses.dataclass
class JobCancel(Message):
    """Stop job ``id`` cooperatively (at its next slice; a queued job never starts)."""

    TYPE = "job_cancel"
    id: str


@dataclasses.dataclass
class JobResult(Message):
    """The value a job returned (for segment_volume: masks, support_slices, processed_slices,
    seconds, as in :class:`protosam.VolumeResult`)."""

    TYPE = "job_result"
    id: str
    value: Any


@dataclasses.dataclass
class ErrorReply(Message):
    """A job or request ``id`` failed. ``error_type``: the engine's error class name
    (see :data:`ERROR_TYPES`); ``details``: extra JSON facts (e.g. where a cancel stopped)."""

    TYPE = "error"
    id: str
    error_type: str
    message: str
    traceback: str = ""
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class HealthRequest(Message):
    TYPE = "health_request"
    id: str


@dataclasses.dataclass
class Health(Message):
    """State of the compute side: memory (``rss_bytes``: resident memory of the process, None
    where unknown; ``cache_bytes``: encoder outputs held by all engine caches; ``gpu_bytes``:
    GPU memory allocated by torch), loaded engines and the running job."""

    TYPE = "health"
    id: str
    pid: int
    rss_bytes: Optional[int]
    cache_bytes: int
    gpu_bytes: int
    engines: List[Dict[str, Any]]
    running_job: Optional[str]
    queued_jobs: int
    uptime_s: float
    protocol_version: int = PROTOCOL_VERSION


@dataclasses.dataclass
class ReleaseCaches(Message):
    """Drop encoder-output caches (and the loaded models too when ``models``); the reply is
    a :class:`Health` taken afterwards."""

    TYPE = "release_caches"
    id: str
    models: bool = False


@dataclasses.dataclass
class ModelsStatusRequest(Message):
    """Which weights ``models`` needs and whether they are ready in ``weights_home``."""

    TYPE = "models_status_request"
    id: str
    models: Dict[str, Any]
    weights_home: Optional[str] = None


@dataclasses.dataclass
class ModelsStatus(Message):
    """``weights``: per model {model, family, status, path, url, size}; ``loaded``: engines in memory."""

    TYPE = "models_status"
    id: str
    weights: List[Dict[str, Any]]
    loaded: List[Dict[str, Any]]


@dataclasses.dataclass
class DevicesRequest(Message):
    """Which compute devices the worker's torch can use (the Slicer process never imports torch)."""

    TYPE = "devices_request"
    id: str


@dataclasses.dataclass
class Devices(Message):
    """``devices``: [{"name": "cuda:0" | "mps" | "cpu", "type": "cuda" | "mps" | "cpu", "label": text}],
    best first; ``auto``: what the device "auto" resolves to there (CUDA, then MPS, then CPU)."""

    TYPE = "devices"
    id: str
    devices: List[Dict[str, Any]]
    auto: str


# Sessions (corrections issue): defined here so that both transports share them; a worker
# that does not implement them answers ErrorReply(error_type="NotSupportedError").
@dataclasses.dataclass
class SessionOpen(Message):
    """Open a correction session on ``volume`` (an Image with geometry) for ``structures``
    (structure key -> support Image mask on ``support_volume``, or on ``volume`` when None).

    ``options``: ``axis``, ``modality``, ``support_mode``, ``support_slices``, ``slice_range``,
    ``auto_extent``, ``cache_bytes``, ``exclusive`` (see protosam.session.Session; exclusive
    sessions give each voxel to at most one structure). With ``adopt`` true the
    structures are results already propagated by a job on this worker (``fixed_slices``: key ->
    painted slices): nothing is propagated, and the session shares the engine's cache, so that
    job's encodings serve the clicks; the option ``slice_evidence`` (key -> the job's
    ``slice_evidence`` array) gives the session the job's review scores to rescore after
    corrections. When such a run's support came from another volume,
    ``support_volume`` is that volume, ``support_masks`` (key -> mask on it) and the option
    ``support_slices`` (key -> slices) its support: the adopted structures keep it at every
    update. ``examples`` (key -> list of :class:`protosam.propagation.SupportExample` fields:
    ``image``, ``mask`` arrays, ``slice_index``, ``slice_count``, optional ``features``) are
    supports from an example bank, sent as arrays (a server never opens a path it is given); a
    key may have examples and no structure mask. Reply: ``masks`` and ``fixed_slices`` per
    structure, and their review scores (``slice_confidence``, ``structure_confidence``,
    ``volume_confidence``, as a job's; protosam.session.Session.confidence)."""

    TYPE = "session_open"
    id: str
    session_id: str
    engine: Dict[str, Any]
    volume: Any
    structures: Dict[str, Any]
    support_volume: Any = None
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    support_masks: Optional[Dict[str, Any]] = None
    examples: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class SliceRequest(Message):
    """What every request on one slice of a correction session names: the session, the
    structure, and slice ``slice_index`` along ``axis`` (fields shared by the slice messages)."""

    id: str
    session_id: str
    structure: str
    axis: int
    slice_index: int


@dataclasses.dataclass
class SessionAddSupport(SliceRequest):
    """Make slice ``slice_index`` (along ``axis``) with ``mask`` [H, W] a support of ``structure``."""

    TYPE = "session_add_support"
    mask: Any


@dataclasses.dataclass
class SessionCorrect(SliceRequest):
    """Click corrections on one slice: ``points`` [[x, y], ...] in the slice's pixel frame
    (column, row), ``labels`` 1 = positive, 0 = negative. Reply: the slice's new mask.

    A slice whose SAM embedding the session holds is answered at once, without progress. A
    slice without one (never encoded, or evicted) is encoded first, as a job in turn with the
    others: :class:`JobProgress` ``(0, 1)`` with this request's ``id`` says the encoding has
    started, ``(1, 1)`` that it is done, then the reply follows (a client shows "encoding")."""

    TYPE = "session_correct"
    points: List[List[float]]
    labels: List[int]


@dataclasses.dataclass
class SessionUndoClick(SliceRequest):
    """Remove the last click of slice ``slice_index``. Reply: the slice's mask and clicks."""

    TYPE = "session_undo_click"


@dataclasses.dataclass
class SessionClearClicks(SliceRequest):
    """Remove every click of slice ``slice_index`` (its mask before them comes back)."""

    TYPE = "session_clear_clicks"


#: Most points a scribble or a lasso may carry (a hand-drawn stroke has hundreds): bounds the
#: header and the rasterisation work a message can ask for.
MAX_GESTURE_POINTS = 10_000
#: Largest scribble radius, in voxels.
MAX_SCRIBBLE_RADIUS = 1000.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _finite_numbers(values: Any, count: int, where: str) -> List[float]:
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if (not isinstance(values, (list, tuple)) or len(values) != count or not all(_is_number(v) for v in values)
            or not all(math.isfinite(float(v)) for v in values)):
        raise ProtocolError(f"{where} must be {count} finite numbers, got {str(values)[:80]}")
    return [float(v) for v in values]


def _gesture_points(message: Message, what: str) -> None:
    points = message.points  # type: ignore[attr-defined]
    if isinstance(points, np.ndarray):
        points = points.tolist()
    if not isinstance(points, (list, tuple)) or not points:
        raise ProtocolError(f"'{message.TYPE}': points must be a non-empty list of [x, y] voxel positions")
    if len(points) > MAX_GESTURE_POINTS:
        raise ProtocolError(f"'{message.TYPE}': a {what} of {len(points)} points is more than the {MAX_GESTURE_POINTS} a "
                            f"message may carry; simplify the {what}")
    message.points = [_finite_numbers(p, 2, f"'{message.TYPE}' point {i}")  # type: ignore[attr-defined]
                      for i, p in enumerate(points)]
    if not isinstance(message.positive, (bool, np.bool_)):  # type: ignore[attr-defined]
        raise ProtocolError(f"'{message.TYPE}': positive must be true or false, got {message.positive!r}")  # type: ignore
    message.positive = bool(message.positive)  # type: ignore[attr-defined]


def _slice_target(message: Message) -> None:
    for name in ("axis", "slice_index"):
        value = getattr(message, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise ProtocolError(f"'{message.TYPE}': {name} must be an integer, got {value!r}")
        setattr(message, name, int(value))


@dataclasses.dataclass
class SessionBox(SliceRequest):
    """A box dragged on slice ``slice_index``: ``box`` ``[x0, y0, x1, y1]`` in the slice's pixel
    frame (column, row; inclusive, any corner order; see protosam.session.Session.box). Every
    refiner takes it (MedSAM too). Reply: as a click's (``mask``, ``slice_index``, ``clicks``,
    ``corrections``); a slice without a SAM embedding is encoded first, with progress, as for
    :class:`SessionCorrect`."""

    TYPE = "session_box"
    box: List[float]

    def __post_init__(self):
        _slice_target(self)
        self.box = _finite_numbers(self.box, 4, f"'{self.TYPE}': box")


@dataclasses.dataclass
class SessionScribble(SliceRequest):
    """A scribble (open polyline) on slice ``slice_index``: ``points`` [[x, y], ...] in drawing
    order (1 to :data:`MAX_GESTURE_POINTS`), ``positive`` adds, false removes, ``radius`` widens
    it (voxels). Refused (InputError) by box-only refiners (MedSAM). Reply and encoding progress
    as for :class:`SessionCorrect`."""

    TYPE = "session_scribble"
    points: List[List[float]]
    positive: bool
    radius: float = 0.0

    def __post_init__(self):
        _slice_target(self)
        _gesture_points(self, "scribble")
        radius = _finite_numbers([self.radius], 1, f"'{self.TYPE}': radius")[0]
        if not 0 <= radius <= MAX_SCRIBBLE_RADIUS:
            raise ProtocolError(f"'{self.TYPE}': radius must be between 0 and {MAX_SCRIBBLE_RADIUS:g} voxels, "
                                f"got {radius:g}")
        self.radius = radius


@dataclasses.dataclass
class SessionLasso(SliceRequest):
    """A lasso (closed polygon) on slice ``slice_index``: ``points`` its vertices [[x, y], ...]
    (at least 3, checked by the session; at most :data:`MAX_GESTURE_POINTS`); ``positive`` adds
    the enclosed voxels, false removes them. No decoding (every refiner, no encoding): answered
    at once. Reply as for :class:`SessionCorrect`."""

    TYPE = "session_lasso"
    points: List[List[float]]
    positive: bool

    def __post_init__(self):
        _slice_target(self)
        _gesture_points(self, "lasso")


@dataclasses.dataclass
class SessionUndo(SliceRequest):
    """Take back the last correction of slice ``slice_index`` (a click, box, scribble or lasso).
    Reply as for :class:`SessionCorrect`. (:class:`SessionUndoClick` does the same.)"""

    TYPE = "session_undo"


@dataclasses.dataclass
class SessionSetNegatives(Message):
    """"Other segments as not this": ``negatives`` a uint8 (or bool) volume of the session's
    volume's shape and order, nonzero where ``structure`` is not (e.g. the other segments), or
    None to drop the option; used from the next :class:`SessionUpdate` (see
    protosam.session.Session.set_negatives). Reply: ``{"negatives": true | false}`` (whether any
    are set)."""

    TYPE = "session_set_negatives"
    id: str
    session_id: str
    structure: str
    negatives: Any = None

    def __post_init__(self):
        if self.negatives is None:
            return
        array = self.negatives.array if isinstance(self.negatives, Image) else self.negatives
        if not isinstance(array, np.ndarray) or array.dtype not in (np.uint8, np.bool_) or array.ndim != 3:
            described = (f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray)
                         else type(array).__name__)
            raise ProtocolError(f"'{self.TYPE}': negatives must be a 3-D uint8 volume or none, got {described}")


@dataclasses.dataclass
class SessionUpdate(Message):
    """Re-run ``structure`` over the volume from the session's cached encodings (a job:
    progress and a JobResult follow). Reply: ``mask`` and ``fixed_slices``; an exclusive
    session adds ``masks`` (every structure's mask: the others may have won or given back
    voxels); every structure's review scores, rescored (``slice_confidence``,
    ``structure_confidence``, ``volume_confidence``)."""

    TYPE = "session_update"
    id: str
    session_id: str
    structure: str


@dataclasses.dataclass
class SessionClose(Message):
    TYPE = "session_close"
    id: str
    session_id: str


@dataclasses.dataclass
class LogRecord(Message):
    """A log line of the compute side, re-logged by the client (``level``: logging's number)."""

    TYPE = "log"
    level: int
    name: str
    message: str


@dataclasses.dataclass
class Shutdown(Message):
    """Ask the worker to exit after cancelling its jobs."""

    TYPE = "shutdown"


MESSAGE_TYPES: Dict[str, Type[Message]] = {cls.TYPE: cls for cls in (
    Hello, JobSubmit, JobProgress, JobCancel, JobResult, ErrorReply, HealthRequest, Health, ReleaseCaches,
    ModelsStatusRequest, ModelsStatus, DevicesRequest, Devices, SessionOpen, SessionAddSupport, SessionCorrect, SessionUndoClick,
    SessionClearClicks, SessionUpdate, SessionClose, SessionBox, SessionScribble, SessionLasso, SessionUndo,
    SessionSetNegatives, LogRecord, Shutdown)}
SESSION_TYPES = (SessionOpen, SessionAddSupport, SessionCorrect, SessionUndoClick, SessionClearClicks, SessionUpdate,
                 SessionClose, SessionBox, SessionScribble, SessionLasso, SessionUndo, SessionSetNegatives)
#: Session messages that correct one slice and whose reply is that slice's mask and corrections, with the
#: structure's review scores as the correction left them (protosam.session.Session.confidence).
SESSION_SLICE_TYPES = (SessionAddSupport, SessionCorrect, SessionUndoClick, SessionClearClicks, SessionBox,
                       SessionScribble, SessionLasso, SessionUndo)


# ----------------------------------------------------------------------------- errors
def _error_types() -> Dict[str, Type[BaseException]]:
    from .. import errors

    table: Dict[str, Type[BaseException]] = {
        name: getattr(errors, name) for name in ("ProtoSAMError", "InputError", "CheckpointError",
                                                 "WeightsUnavailableError", "IntegrityError", "CancelledError")}
    table.update({cls.__name__: cls for cls in (ProtocolError, NotSupportedError, WorkerCrashedError)})
    table.update({cls.__name__: cls for cls in (ValueError, TypeError, KeyError, FileNotFoundError, OSError,
                                                MemoryError, RuntimeError)})
    return table


#: Error class names that cross the protocol as themselves; others arrive as ProtoSAMError.
ERROR_TYPES = _error_types()


def error_from_reply(reply: ErrorReply) -> BaseException:
    """The exception an ErrorReply stands for (its own class when known, else ProtoSAMError)."""
    cls = ERROR_TYPES.get(reply.error_type)
    if cls is None:
        return ProtoSAMError(f"{reply.error_type}: {reply.message}")
    if cls is MemoryError:
        return ProtoSAMError(f"The ProtoSAM worker ran out of memory ({reply.message or 'MemoryError'}). Close other "
                             "programs, choose smaller models or a smaller input size, and try again.")
    error = cls(reply.message)
    error.details = dict(reply.details)  # type: ignore[attr-defined]
    return error


def reply_for_exception(message_id: str, error: BaseException, traceback_text: str = "",
                        details: Optional[Dict[str, Any]] = None) -> ErrorReply:
    """The ErrorReply for an exception raised while handling message ``message_id``."""
    name = type(error).__name__
    if name not in ERROR_TYPES:  # report the nearest known base class
        name = next((cls.__name__ for cls in type(error).__mro__ if cls.__name__ in ERROR_TYPES), name)
    text = str(error)
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    return ErrorReply(id=message_id, error_type=name, message=text, traceback=traceback_text, details=details or {})


# ----------------------------------------------------------------------------- encoding
class _ArrayTable:
    def __init__(self, file_dir: Optional[Path], file_threshold: int):
        self.entries: List[Dict[str, Any]] = []
        self.blobs: List[memoryview] = []
        self.offset = 0
        self.file_dir = file_dir
        self.file_threshold = file_threshold

    def add(self, array: np.ndarray, ijk_to_physical) -> Dict[str, int]:
        array = np.asarray(array)
        if array.dtype.str not in ALLOWED_DTYPES and array.dtype != np.bool_:
            raise ProtocolError(f"arrays of dtype {array.dtype} cannot be sent; use a numeric dtype")
        entry: Dict[str, Any] = {"dtype": array.dtype.str, "shape": list(array.shape)}
        if ijk_to_physical is not None:
            matrix = np.asarray(ijk_to_physical, dtype=np.float64)
            if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
                raise ProtocolError(f"ijk_to_physical must be a finite 4x4 matrix, got shape {matrix.shape}")
            entry["ijk_to_physical"] = matrix.tolist()
        if self.file_dir is not None and array.nbytes >= self.file_threshold:
            path = self.file_dir / f"array-{new_id()}.npy"
            mapped = np.lib.format.open_memmap(str(path), mode="w+", dtype=array.dtype, shape=array.shape)
            mapped[...] = array
            mapped.flush()
            del mapped  # unmapped before the other side reads it (Windows cannot share it otherwise)
            entry["file"] = str(path)
        else:
            data = np.ascontiguousarray(array)
            entry["offset"], entry["nbytes"] = self.offset, data.nbytes
            self.blobs.append(memoryview(data).cast("B") if data.nbytes else memoryview(b""))
            self.offset += data.nbytes
        self.entries.append(entry)
        return {"$array": len(self.entries) - 1}


def _to_json(value: Any, table: _ArrayTable, where: str) -> Any:
    if isinstance(value, Image):
        return table.add(value.array, value.ijk_to_physical)
    if isinstance(value, np.ndarray):
        return table.add(value, None)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ProtocolError(f"{where} is {value}: not representable in a message")
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, table, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{where} has the key {key!r}: message mappings need string keys")
            if key == "$array":
                raise ProtocolError(f"{where} uses the reserved key '$array'")
            out[key] = _to_json(v, table, f"{where}.{key}")
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_json({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, table, where)
    raise ProtocolError(f"{where} is a {type(value).__name__}, which a message cannot carry")


def encode(message: Message, *, file_dir: Optional[os.PathLike] = None, file_threshold: int = 64 * 1024) -> bytes:
    """The bytes of ``message``. With ``file_dir``, arrays of at least ``file_threshold`` bytes
    are written to ``.npy`` files in that folder and referenced by path (local worker only)."""
    if not isinstance(message, Message) or message.TYPE not in MESSAGE_TYPES:
        raise ProtocolError(f"not a protocol message: {message!r}")
    table = _ArrayTable(Path(file_dir) if file_dir is not None else None, file_threshold)
    fields = {f.name: _to_json(getattr(message, f.name), table, f.name) for f in dataclasses.fields(message)}
    header = json.dumps({"type": message.TYPE, "fields": fields, "arrays": table.entries},
                        separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}; send data as arrays")
    parts = [_PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(header), table.offset), header]
    parts.extend(table.blobs)
    return b"".join(parts)


def read_prefix(prefix: bytes) -> Tuple[int, int]:
    """(header length, blob length) from the first :data:`PREFIX_SIZE` bytes of a message."""
    if len(prefix) < PREFIX_SIZE:
        raise ProtocolError(f"truncated message: {len(prefix)} of {PREFIX_SIZE} prefix bytes")
    magic, version, header_length, blob_length = _PREFIX.unpack(prefix[:PREFIX_SIZE])
    if magic != MAGIC:
        raise ProtocolError(f"not a ProtoSAM message (starts with {magic!r}, expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION}); "
                            "update ProtoSAM on both sides")
    if header_length > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {header_length} bytes exceeds {MAX_HEADER_BYTES}")
    return header_length, blob_length


def _load_array(entry: Any, index: int, blobs: memoryview, file_dir: Optional[Path]) -> Any:
    if not isinstance(entry, dict):
        raise ProtocolError(f"array {index} is not described by an object")
    raw_shape = entry.get("shape")
    if (not isinstance(raw_shape, list) or len(raw_shape) > MAX_DIMENSIONS
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in raw_shape)):
        raise ProtocolError(f"array {index} needs a shape: a list of at most {MAX_DIMENSIONS} integers")
    if not isinstance(entry.get("dtype"), str) or len(entry["dtype"]) > 8:
        raise ProtocolError(f"array {index} has no valid dtype")
    try:
        dtype = np.dtype(entry["dtype"])
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"array {index} has no valid dtype: {error}") from None
    shape = tuple(raw_shape)
    if dtype.str not in ALLOWED_DTYPES and dtype != np.bool_:
        raise ProtocolError(f"array {index} has the refused dtype {entry['dtype']!r}")
    if any(n < 0 for n in shape):
        raise ProtocolError(f"array {index} has a negative dimension {shape}")
    expected = math.prod(shape) * dtype.itemsize  # Python integers: no overflow, checked before any allocation
    if "file" in entry:
        if file_dir is None:
            raise ProtocolError(f"array {index} refers to a file, which this side does not accept")
        path = Path(entry["file"]).resolve()
        if path.parent != file_dir:
            raise ProtocolError(f"array {index} refers to {path}, outside the transfer folder {file_dir}")
        try:
            mapped = np.load(str(path), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ProtocolError(f"array {index} cannot be read from {path}: {error}") from None
        if mapped.dtype != dtype or mapped.shape != shape:
            raise ProtocolError(f"array {index} in {path} is {mapped.dtype} {mapped.shape}, not {dtype} {shape}")
        array = np.array(mapped)  # own memory: the file can be removed (and unmapped on Windows) at once
        del mapped
    else:
        offset, nbytes = entry.get("offset"), entry.get("nbytes")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (offset, nbytes)):
            raise ProtocolError(f"array {index} has neither a file nor a valid offset/nbytes")
        if nbytes != expected:
            raise ProtocolError(f"array {index} declares {nbytes} bytes but {dtype} {shape} needs {expected}")
        if offset < 0 or offset + nbytes > len(blobs):
            raise ProtocolError(f"array {index} lies outside the message's {len(blobs)} blob bytes (truncated?)")
        array = np.frombuffer(blobs[offset:offset + nbytes], dtype=dtype).reshape(shape).copy()
    geometry = entry.get("ijk_to_physical")
    if geometry is None:
        return array
    if (not isinstance(geometry, list) or len(geometry) != 4
            or not all(isinstance(row, list) and len(row) == 4 for row in geometry)):
        raise ProtocolError(f"array {index} has an ijk_to_physical that is not 4x4")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for row in geometry for v in row):
        raise ProtocolError(f"array {index} has an ijk_to_physical with non-numbers")
    return Image(array, np.asarray(geometry, dtype=np.float64))


def _from_json(value: Any, arrays: List[Any]) -> Any:
    if isinstance(value, dict):
        if "$array" in value:
            index = value["$array"]
            if len(value) != 1 or not isinstance(index, int) or not 0 <= index < len(arrays):
                raise ProtocolError(f"bad array reference {value!r}")
            return arrays[index]
        return {k: _from_json(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, arrays) for v in value]
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a message may carry")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _check_values(value: Any) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and integers outside int64 (iterative: no
    recursion on hostile input; one pass, run only once the array count is known to be small)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"message header is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, int) and not isinstance(item, bool) and not -_INT64 <= item < _INT64:
            raise ProtocolError(f"message header is not valid JSON: the integer {str(item)[:40]} is out of range "
                                "(int64)")


def decode(data: bytes, *, file_dir: Optional[os.PathLike] = None, max_header_bytes: int = MAX_HEADER_BYTES) -> Message:
    """The message in ``data`` (exactly one encoded message). ``file_dir``: the one folder
    whose ``.npy`` files may be referenced (None: file references are refused).
    ``max_header_bytes``: the largest JSON header accepted (a server passes a smaller one).

    Hostile input gets a :class:`ProtocolError`, after bounded work: the header's size, depth,
    numbers (finite, int64) and array count are checked, and each array's byte count (shape
    product in Python integers) is checked against the blobs, before any array is allocated."""
    view = memoryview(data)
    header_length, blob_length = read_prefix(bytes(view[:PREFIX_SIZE]))
    if header_length > max_header_bytes:
        raise ProtocolError(f"message header of {header_length} bytes exceeds {max_header_bytes}")
    if len(view) != PREFIX_SIZE + header_length + blob_length:
        raise ProtocolError(f"message is {len(view)} bytes, but its prefix announces "
                            f"{PREFIX_SIZE + header_length + blob_length}")
    try:
        # Integers are parsed by json's C code (Python's int-digits limit bounds their size) and
        # range-checked below, after the array count: a per-integer hook cost seconds of CPU on
        # a header of 200,000 arrays.
        header = json.loads(bytes(view[PREFIX_SIZE:PREFIX_SIZE + header_length]).decode("utf-8"),
                            parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ProtocolError(f"message header is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as error:
        if "integer string conversion" in str(error):  # Python's int-digits limit
            raise ProtocolError("message header is not valid JSON: an integer is out of range (int64)") from None
        raise ProtocolError(f"message header is not valid JSON: {error}") from None
    if isinstance(header, dict) and isinstance(header.get("arrays"), list) and len(header["arrays"]) > MAX_ARRAYS:
        raise ProtocolError(f"message carries {len(header['arrays'])} arrays, more than {MAX_ARRAYS}")
    _check_values(header)
    if not isinstance(header, dict) or not isinstance(header.get("fields"), dict):
        raise ProtocolError("message header must be an object with 'type', 'fields' and 'arrays'")
    cls = MESSAGE_TYPES.get(header.get("type"))
    if cls is None:
        raise ProtocolError(f"unknown message type {header.get('type')!r}; known: {', '.join(sorted(MESSAGE_TYPES))}")
    entries = header.get("arrays", [])
    if not isinstance(entries, list):
        raise ProtocolError("message 'arrays' must be a list")
    if len(entries) > MAX_ARRAYS:
        raise ProtocolError(f"message carries {len(entries)} arrays, more than {MAX_ARRAYS}")
    folder = Path(file_dir).resolve() if file_dir is not None else None
    blobs = view[PREFIX_SIZE + header_length:]
    arrays = [_load_array(entry, i, blobs, folder) for i, entry in enumerate(entries)]
    fields = header["fields"]
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}  # type: ignore[misc]
    unknown, missing = set(fields) - names, required - set(fields)
    if unknown or missing:
        raise ProtocolError(f"'{cls.TYPE}' message: " + "; ".join(
            part for part in (f"unknown field(s) {sorted(unknown)}" if unknown else "",
                              f"missing field(s) {sorted(missing)}" if missing else "") if part))
    return cls(**{name: _from_json(value, arrays) for name, value in fields.items()})


def array_files(message_bytes: bytes) -> List[str]:
    """Paths of the array files an encoded message refers to (to remove them afterwards)."""
    header_length, _ = read_prefix(message_bytes[:PREFIX_SIZE])
    header = json.loads(bytes(message_bytes[PREFIX_SIZE:PREFIX_SIZE + header_length]).decode("utf-8"))
    return [entry["file"] for entry in header.get("arrays", []) if isinstance(entry, dict) and "file" in entry]
