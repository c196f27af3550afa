"""Headless ProtoSAM logic: MRML in, engine in the worker process, preview segmentation out.

``ProtoSAMLogic.process`` works the same from the module widget, the Segment Editor effect,
Python scripts and tests: ``waitForCompletion=True`` blocks (polling the worker) and returns
the result; ``False`` returns a PropagationJob at once and the caller polls ``logic.poll()``
(the GUI does from a QTimer). No Qt anywhere; MRML is read and written on the calling (main)
thread only, the worker receives numpy arrays. The engine runs in the persistent ProtoSAM worker
process (worker_client.py; never on a Python thread inside Slicer: the GIL trap). The in-process
thread of ``ProtoSAMLogic(workerKind="thread")`` is deprecated and removed in the next release: a
headless script that wants no worker process calls ``protosam.segment_volume`` / ``protosam.Session``.

Geometry: volumes and segments are read as KJI arrays and handed to the engine with their
ijkToWorld matrices and the slicing plane of the slice view (an oblique view is refused). The
engine brings them into its canonical order (``protosam.orientation``: the slice as Slicer's
slice view of that plane shows it), the same order the command line and the Python API use,
so one file gives one result whichever way it is stored or opened; results come back as KJI.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

import slicer
from protosam.serving import protocol
from protosam.errors import CancelledError, InputError
from protosam.orientation import plane_of_ijk_axis

from . import geometry, mrml_io, results
from .jobs import JobHandle, JobRunner
from .models import ModelSelection
from .worker_client import RequestFunction, availableDevices, workerForDevice

logger = logging.getLogger(__name__)

#: The warning of ``ProtoSAMLogic(workerKind="thread")``.
THREAD_WORKER_DEPRECATION = (
    'ProtoSAMLogic(workerKind="thread") is deprecated and will be removed in the next release: the '
    "Slicer code computes in the worker process (the default). For in-process work without a worker "
    "process, call the engine API: protosam.segment_volume or protosam.Session.")

SupportSlices = Union[None, int, Sequence[int], Mapping[str, Union[int, Sequence[int]]]]
AXIAL_NORMAL = (0.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ProcessOptions:
    """Engine settings of a run. ``device``: "auto", "cpu", "cuda", "cuda:1"...
    ``precision``: the encoders' "auto", "fp32", "bf16" or "fp16" (protosam.precision; on a
    server "auto" is the server's choice). ``propagation``: "per-slice" or "memory" (SAM 2's
    video predictor walks the volume; SAM 2 refiners only: protosam.catalogue.PROPAGATION_MODES).

    allowDownload: let the run download missing official weights (the GUI downloads them first
    through the model manager, with a progress dialog, and leaves this False).
    autoExtent: follow each structure outwards and stop once it is gone (None: preset's choice).
    cacheBytes: encoder-output cache kept between runs on the same volume (0: off).
    computeOn: "local" (this computer) or "server": the local worker process relays the run
    to the ProtoSAM server at ``serverUrl`` with ``serverToken`` (``protosam serve``; the server
    runs its own models, whose names must match ``models``; ``device`` is the server's).
    """

    models: ModelSelection = ModelSelection()
    preset: str = "default"
    device: str = "auto"
    modality: str = "auto"
    precision: str = "auto"
    propagation: str = "per-slice"
    autoExtent: Optional[bool] = None
    weightsHome: Optional[str] = None
    allowDownload: bool = False
    cacheBytes: int = 0
    computeOn: str = "local"
    serverUrl: str = ""
    serverToken: str = dataclasses.field(default="", repr=False)  # never in logs or reprs
    #: The user's explicit choice to allow plain http:// to a computer other than this one (token
    #: and images then cross the network unencrypted); without it such a URL is refused.
    serverAllowUnencrypted: bool = False
    #: Each voxel to at most one segment (protosam.segment_volume(exclusive=True)'s rule), in the
    #: run and in the preview's updates (its correction session is exclusive too).
    exclusive: bool = False


@dataclasses.dataclass
class PropagationResult:
    """A finished run. Masks are in ``previewSegmentationNode`` (segment IDs = support IDs).

    supportSlices / processedSlices: per support segment ID, slice indices along the slice axis
    of the support / target volume (IJK index along ``sliceAxis.ijkAxis``).
    """

    targetVolumeNode: object
    supportVolumeNode: object
    supportSegmentationNode: object
    previewSegmentationNode: object
    segmentIds: List[str]
    sliceAxis: geometry.SliceAxis
    supportSlices: Dict[str, List[int]]
    processedSlices: Dict[str, List[int]]
    seconds: float
    #: The run's settings (an update of the preview runs on the same engine).
    options: Optional[ProcessOptions] = None
    #: Inclusive IJK slice range along ``sliceAxis`` the run processed (None: all slices).
    sliceRange: Optional[Tuple[int, int]] = None
    #: Segment ID -> (K, J, I) uint8 mask the last run or update wrote into the preview: a
    #: slice where the preview now differs was repainted by the user (see repaintedSlices).
    writtenMasks: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    #: The correction session of this preview (openCorrectionSession), once an update opened it.
    corrections: object = dataclasses.field(default=None, repr=False, compare=False)
    #: The run's confidence (protosam.confidence; listed by review.py): segment ID -> [N]
    #: float32 per slice along ``sliceAxis`` (NaN: no score), per segment, and the volume's.
    #: Rescored after each correction and update of the preview (rescoreFromSession).
    sliceConfidence: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    segmentConfidence: Dict[str, float] = dataclasses.field(default_factory=dict)
    volumeConfidence: Optional[float] = None
    #: What the run's scores came from (VolumeResult.slice_evidence): segment ID -> [N, 3] float64
    #: along ``sliceAxis``; handed to the preview's correction session, which rescores from it.
    sliceEvidence: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    #: Segment ID -> user-confirmed slices (painted on this volume, corrected; IJK indices along
    #: ``sliceAxis``): they score 1 and are left out of the review queue.
    confirmedSlices: Dict[str, List[int]] = dataclasses.field(default_factory=dict)
    #: Example-bank supports of the run (segment ID -> SupportExample field mappings, bank.py),
    #: kept by the preview's correction session; ``paintedSupports`` False: the bank alone.
    examples: Dict[str, list] = dataclasses.field(default_factory=dict, repr=False)
    paintedSupports: bool = True
    #: Segment ID -> slices repainted by the user and sent with "Update preview" (bank.userSlices).
    correctedSlices: Dict[str, List[int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PreparedRun:
    """Arrays and geometry of one run, computed on the main thread (no MRML references inside;
    everything but the two SliceAxis records goes to the engine as plain values)."""

    query: np.ndarray  # KJI float32 copy of the target volume
    support: Optional[np.ndarray]  # KJI float32 copy, None when the support volume is the target
    masks: Dict[str, np.ndarray]  # support segment ID -> KJI uint8 on the support volume's grid
    queryIjkToWorld: np.ndarray  # (4, 4) float64
    supportIjkToWorld: Optional[np.ndarray]  # (4, 4) float64, None with the target as support
    plane: str  # "axial", "coronal" or "sagittal": the anatomical plane the view cuts
    supportSlices: Optional[Dict[str, List[int]]]  # IJK indices along supportAxis.ijkAxis
    sliceRange: Optional[Tuple[int, int]]  # inclusive IJK indices along targetAxis.ijkAxis
    targetAxis: geometry.SliceAxis
    supportAxis: geometry.SliceAxis
    #: segment ID -> example-bank supports (bank.examplesForSegments); the painted masks are not
    #: read when ``paintedSupports`` is False (propagation from the bank alone).
    examples: Dict[str, list] = dataclasses.field(default_factory=dict)
    paintedSupports: bool = True

    @property
    def segmentIds(self) -> List[str]:
        return list(self.masks) + [segmentId for segmentId in self.examples if segmentId not in self.masks]


class PropagationJob:
    """Handle of a run submitted with ``waitForCompletion=False``.

    ``result`` (PropagationResult) or ``error`` is set once ``finished``; ``progress`` is the
    latest (done, total). ``cancel()`` stops the run within one slice; nothing is written.
    """

    def __init__(self, logic: "ProtoSAMLogic", nodes: Sequence, segmentIds: Sequence[str]):
        self.logic = logic
        self.nodes = [n for n in nodes if n is not None]
        self.segmentIds = list(segmentIds)
        self.job: Optional[JobHandle] = None
        self.worker: Optional[JobRunner] = None
        self.result: Optional[PropagationResult] = None
        self.error: Optional[BaseException] = None
        self.finished = False
        self.cancelReason = ""
        self.cancelRequested = False  # also before a batch sends the job (processBatch)
        self.options: Optional[ProcessOptions] = None

    @property
    def progress(self) -> Tuple[int, int]:
        return self.job.progress if self.job is not None else (0, 0)

    def remainingSeconds(self) -> Optional[float]:
        return self.job.remainingSeconds() if self.job is not None else None

    def cancel(self, reason: str = "") -> None:
        if reason and not self.cancelReason:
            self.cancelReason = reason
        self.cancelRequested = True
        if self.job is not None:
            self.job.cancel()

    def involves(self, node) -> bool:
        return any(n is node for n in self.nodes)

    def resultOrRaise(self) -> PropagationResult:
        if not self.finished:
            raise RuntimeError("the run has not finished yet")
        if self.error is not None:
            raise self.error
        return self.result


def resolveDevice(device: str, idle: Optional[Callable[[], None]] = None) -> str:
    """"auto" -> what the worker process's torch picks (CUDA, then MPS, then CPU), asked once per
    Slicer session (Slicer's process never imports torch); other names are returned as they are
    and checked by the worker when it loads the models."""
    if not isinstance(device, str) or not device.strip():
        raise InputError(f"device must be 'auto' or a device name such as 'cuda', 'mps' or 'cpu', not {device!r}")
    device = device.strip()
    if device != "auto":
        return device
    return availableDevices(idle=idle).auto


def deviceChoices(devices: Optional[protocol.Devices] = None) -> List[Tuple[str, str]]:
    """(name, label) of the Device list: "auto" (with what it picks) and what the worker reports;
    before a worker has answered, the names it may report (the list fills in after the first run)."""
    from . import worker_client

    devices = devices or worker_client.knownDevices()
    if devices is None:
        import sys

        names = [("auto", "auto"), ("cuda", "GPU (CUDA)")]
        if sys.platform == "darwin":
            names.append(("mps", "Apple GPU (MPS)"))
        return names + [("cpu", "CPU")]
    labels = {device["name"]: device["label"] for device in devices.devices}
    auto = next((label for name, label in labels.items() if name.split(":")[0] == devices.auto), devices.auto)
    return [("auto", f"auto: {auto}")] + [(device["name"], device["label"]) for device in devices.devices]


@dataclasses.dataclass
class VolumeRunResult:
    """The fields of ``protosam.VolumeResult`` (propagation.py, which imports torch) as the worker
    sends them: ``masks``, ``support_slices``, ``processed_slices``, ``seconds``, ``axis``,
    ``support_axis``, ``plane``, and the confidence (``protosam.confidence``):
    ``slice_confidence`` (key -> [N] float32, NaN: no score), ``structure_confidence``,
    ``volume_confidence``; ``slice_evidence`` (key -> [N, 3]) when the job asked for it."""

    masks: Dict
    support_slices: Dict
    processed_slices: Dict
    seconds: float
    axis: int = 0
    support_axis: int = 0
    plane: str = ""
    slice_confidence: Dict = dataclasses.field(default_factory=dict)
    structure_confidence: Dict = dataclasses.field(default_factory=dict)
    volume_confidence: Optional[float] = None
    slice_evidence: Dict = dataclasses.field(default_factory=dict)  # only when the job asked (return_evidence)


def sliceViewGeometry(sliceNode) -> Tuple[np.ndarray, np.ndarray]:
    """(normal_World, point_World) of a vtkMRMLSliceNode: SliceToRAS columns 2 and 3."""
    matrix = sliceNode.GetSliceToRAS()
    normal = np.array([matrix.GetElement(r, 2) for r in range(3)])
    point = np.array([matrix.GetElement(r, 3) for r in range(3)])
    return normal, point


class ProtoSAMLogic:
    """Runs ProtoSAM on MRML nodes; works without the GUI (see module docstring)."""

    def __init__(self, worker=None, workerKind: str = "process"):
        """worker: a WorkerClient to run every job on (default: the device's worker process).
        workerKind: "process" (default). "thread" (an in-process thread) is deprecated and
        removed in the next release: for in-process work without a worker process, call the
        engine API (``protosam.segment_volume``, ``protosam.Session``)."""
        if workerKind not in ("process", "thread"):
            raise ValueError(f"workerKind must be 'process' or 'thread', not {workerKind!r}")
        if workerKind == "thread":
            warnings.warn(THREAD_WORKER_DEPRECATION, DeprecationWarning, stacklevel=2)
        self._worker = worker
        self.workerKind = workerKind
        self.activeJobs: List[PropagationJob] = []
        #: Called between polls while waiting (the GUI sets slicer.app.processEvents).
        self.idle: Optional[Callable[[], None]] = None
        self._observedScenes = {}
        self._usedWorkers: Dict[int, JobRunner] = {}

    # ------------------------------------------------------------------ preparation (main)
    def prepare(self, targetVolumeNode, supportSegmentationNode, segmentIds: Sequence[str], *,
                supportVolumeNode=None, sliceNormal_World=AXIAL_NORMAL, supportSlices: SupportSlices = None,
                sliceRange: Optional[Tuple[int, int]] = None, readVoxels: bool = True,
                examples: Optional[Dict[str, list]] = None, paintedSupports: bool = True) -> PreparedRun:
        """Read and check the inputs; everything the worker needs, as KJI arrays and plain values.

        readVoxels=False: check everything without copying the volumes (``query`` and
        ``support`` are None), as processBatch does for every volume before it runs any.
        examples: segment ID -> example-bank supports (bank.examplesForSegments); with them a
        segment may be empty. paintedSupports=False: the bank alone (segments not read)."""
        examples = {key: list(value) for key, value in (examples or {}).items() if value}
        if not paintedSupports:
            missing = [segmentId for segmentId in segmentIds if segmentId not in examples]
            if missing:
                raise InputError(f"No example-bank supports for segment(s) {', '.join(missing)}: add examples of them "
                                 "to the bank, or choose painted slices as supports.")
        if targetVolumeNode is None:
            raise InputError("Select the volume to segment.")
        if supportSegmentationNode is None:
            raise InputError("Select the segmentation that holds the painted support segment(s).")
        segmentIds = list(segmentIds)
        if not segmentIds:
            raise InputError("Select at least one support segment.")
        if supportVolumeNode is None:
            supportVolumeNode = self.defaultSupportVolume(supportSegmentationNode) or targetVolumeNode
        # From the bank alone no support volume is read: the examples carry their slices.
        sameVolume = supportVolumeNode is targetVolumeNode or not paintedSupports

        targetIjkToWorld = mrml_io.ijkToWorldMatrix(targetVolumeNode)
        targetAxis = geometry.sliceAxisFromNormal(sliceNormal_World, targetIjkToWorld)
        plane = plane_of_ijk_axis(targetIjkToWorld, targetAxis.ijkAxis)
        targetShape = mrml_io.volumeShapeKji(targetVolumeNode)
        # One float32 copy per volume. Always a copy: the worker must never read VTK memory that
        # the scene may change or free meanwhile.
        query = mrml_io.volumeArrayView(targetVolumeNode)  # checks the voxels (scalar, not empty)
        query = np.array(query, dtype=np.float32, order="C", copy=True) if readVoxels else None
        if sameVolume:
            supportAxis, supportIjkToWorld, supportShape, support = targetAxis, None, targetShape, None
        else:
            supportIjkToWorld = mrml_io.ijkToWorldMatrix(supportVolumeNode)
            supportAxis = geometry.sliceAxisFromNormal(sliceNormal_World, supportIjkToWorld)
            supportShape = mrml_io.volumeShapeKji(supportVolumeNode)
            support = mrml_io.volumeArrayView(supportVolumeNode)
            support = np.array(support, dtype=np.float32, order="C", copy=True) if readVoxels else None
            if plane_of_ijk_axis(supportIjkToWorld, supportAxis.ijkAxis) != plane:
                raise InputError(
                    f"The view cuts '{supportVolumeNode.GetName()}' and '{targetVolumeNode.GetName()}' along different "
                    "anatomical axes (one of them is rotated by about 45 degrees); resample one volume to the other's "
                    "orientation and try again.")

        masks = {}
        for segmentId in segmentIds:
            segment = supportSegmentationNode.GetSegmentation().GetSegment(segmentId)
            if segment is None:
                raise InputError(f"Segment '{segmentId}' is not in '{supportSegmentationNode.GetName()}'.")
            if not paintedSupports:
                continue
            mask = mrml_io.segmentToArray(supportSegmentationNode, segmentId, supportVolumeNode)
            if not mask.any() and segmentId in examples:  # painted nowhere: its bank examples alone
                continue
            if not mask.any():
                raise InputError(f"Segment '{segment.GetName()}' is empty on volume '{supportVolumeNode.GetName()}': "
                                 "paint the structure on at least one slice first.")
            masks[segmentId] = np.ascontiguousarray(mask)

        checkedSupport = None
        if supportSlices is not None:
            if not isinstance(supportSlices, Mapping):
                supportSlices = {segmentId: supportSlices for segmentId in segmentIds}
            checkedSupport = {}
            for segmentId, indices in supportSlices.items():
                if segmentId not in masks and segmentId in examples:  # not painted: no slice to choose
                    continue
                if segmentId not in masks:
                    raise ValueError(f"supportSlices names segment {segmentId!r}, which is not being propagated")
                indices = [indices] if np.isscalar(indices) else list(indices)
                size = supportShape[supportAxis.kjiAxis]
                for index in indices:
                    if not 0 <= int(index) < size:
                        raise InputError(f"Support slice {index} is outside '{supportVolumeNode.GetName()}' "
                                         f"(slices 0..{size - 1}).")
                checkedSupport[segmentId] = sorted(int(i) for i in indices)

        checkedRange = None
        if sliceRange is not None:
            # The module's spin boxes (parameter-node int connector) allow -2**31..2**31-1.
            if len(sliceRange) != 2 or any(not float(v).is_integer() for v in sliceRange):
                raise InputError(f"Slice range {sliceRange} must be two whole slice indices.")
            first, last = (int(v) for v in sliceRange)
            size = targetShape[targetAxis.kjiAxis]
            if min(first, last) < 0 or max(first, last) >= size:
                raise InputError(f"Slice range {sliceRange} is outside '{targetVolumeNode.GetName()}' "
                                 f"(slices 0..{size - 1}).")
            checkedRange = (min(first, last), max(first, last))

        return PreparedRun(query=query, support=support, masks=masks, queryIjkToWorld=targetIjkToWorld,
                           supportIjkToWorld=supportIjkToWorld, plane=plane, supportSlices=checkedSupport,
                           sliceRange=checkedRange, targetAxis=targetAxis, supportAxis=supportAxis,
                           examples=examples, paintedSupports=paintedSupports)

    @staticmethod
    def defaultSupportVolume(segmentationNode):
        """The volume a segmentation was painted on (its reference geometry volume), if known."""
        if segmentationNode is None:
            return None
        return segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())

    # ------------------------------------------------------------------ running
    def process(self, targetVolumeNode, supportSegmentationNode, segmentIds: Sequence[str], *,
                supportVolumeNode=None, sliceNormal_World=AXIAL_NORMAL, supportSlices: SupportSlices = None,
                sliceRange: Optional[Tuple[int, int]] = None, options: ProcessOptions = ProcessOptions(),
                waitForCompletion: bool = True,
                progressCallback: Optional[Callable[[int, int], None]] = None,
                cancelEvent: Optional[threading.Event] = None,
                onFinished: Optional[Callable[[PropagationJob], None]] = None,
                negatives: Optional[Dict[str, np.ndarray]] = None,
                examples: Optional[Dict[str, list]] = None, paintedSupports: bool = True):
        """Propagate support segments through a volume into a new preview segmentation.

        targetVolumeNode: volume to segment. supportSegmentationNode / segmentIds: the painted
        support segment(s). supportVolumeNode: volume they were painted on (default: the
        segmentation's reference volume, else the target). sliceNormal_World: slice view normal
        (default axial); oblique views are refused. supportSlices: slice index (or indices, or
        segment ID -> indices) along the support volume's slice axis; default the largest
        painted slice. sliceRange: inclusive target slice indices to process (default all).
        negatives: segment ID -> KJI mask of the target volume's voxels that are not that
        structure ("other segments as not this", protosam.segment_volume's ``negatives``).
        examples / paintedSupports: supports from an example bank (see ``prepare``; the module's
        "Supports: painted slices / example bank / both"), sent to the worker as arrays.

        Returns a PropagationResult (waitForCompletion=True; raises the run's error, or
        CancelledError) or a PropagationJob. progressCallback(done, total) and onFinished(job)
        are called on this thread, from ``poll``.
        """
        prepared = self.prepare(targetVolumeNode, supportSegmentationNode, segmentIds,
                                supportVolumeNode=supportVolumeNode, sliceNormal_World=sliceNormal_World,
                                supportSlices=supportSlices, sliceRange=sliceRange, examples=examples,
                                paintedSupports=paintedSupports)
        if supportVolumeNode is None:
            supportVolumeNode = self.defaultSupportVolume(supportSegmentationNode) or targetVolumeNode
        # A server run only needs a local worker to relay it: never the GPU one.
        device = "cpu" if _onServer(options) else resolveDevice(options.device, idle=self.idle)
        worker = self._workerFor(device)
        handle = PropagationJob(self, [targetVolumeNode, supportVolumeNode, supportSegmentationNode],
                                prepared.segmentIds)
        handle.options = options

        def onWorkerFinished(job: JobHandle) -> None:
            self._finish(handle, job, prepared, targetVolumeNode, supportVolumeNode, supportSegmentationNode)
            if onFinished is not None:
                onFinished(handle)

        handle.job = worker.submit(
            _engineJob(prepared, options, device, negatives), name=f"ProtoSAM {targetVolumeNode.GetName()}",
            cancelEvent=cancelEvent,
            onProgress=(lambda job, done, total: progressCallback(done, total)) if progressCallback else None,
            onFinished=onWorkerFinished)
        handle.worker = worker
        self._usedWorkers[id(worker)] = worker
        self.activeJobs.append(handle)
        self._observeScene(targetVolumeNode.GetScene())
        if not waitForCompletion:
            return handle
        worker.runUntilFinished(handle.job, idle=self.idle)
        return handle.resultOrRaise()

    def processBatch(self, targetVolumeNodes: Sequence, supportSegmentationNode, segmentIds: Sequence[str],
                     **kwargs) -> List:
        """``process`` for several volumes with the same support, run one after the other on one worker.

        Every volume is checked first, without copying its voxels: when one cannot be used,
        none runs. Then each volume is copied only when its job is sent, after the previous
        one has finished, so Slicer holds one volume's copy at a time, not N. A job cancelled
        before it was sent finishes with CancelledError (its ``onFinished`` is called).

        With waitForCompletion=True (default) returns PropagationResults in order and raises
        the first error after all runs have finished; otherwise returns PropagationJobs
        (``job.job`` and ``job.worker`` are None until the job is sent).
        """
        wait = kwargs.pop("waitForCompletion", True)
        onFinished = kwargs.pop("onFinished", None)
        if "supportVolumeNode" not in kwargs or kwargs["supportVolumeNode"] is None:
            kwargs["supportVolumeNode"] = self.defaultSupportVolume(supportSegmentationNode)
            if kwargs["supportVolumeNode"] is None and kwargs.get("paintedSupports", True):
                raise InputError("Batch runs need the support volume: select the volume the support was painted on.")
        if not targetVolumeNodes:
            raise InputError("Select at least one volume to segment.")
        checkKeys = ("supportVolumeNode", "sliceNormal_World", "supportSlices", "sliceRange", "examples",
                     "paintedSupports")
        checks = {key: kwargs[key] for key in checkKeys if key in kwargs}
        for volume in targetVolumeNodes:  # one volume cannot be used: run none of them
            self.prepare(volume, supportSegmentationNode, segmentIds, readVoxels=False, **checks)
        pending = []
        for volume in targetVolumeNodes:
            handle = PropagationJob(self, [volume, kwargs["supportVolumeNode"], supportSegmentationNode], segmentIds)
            handle.options = kwargs.get("options", ProcessOptions())
            pending.append((handle, volume))
        jobs = [handle for handle, _ in pending]
        self.activeJobs.extend(jobs)  # cancelAll and scene observation reach the jobs not sent yet

        def finish(handle: PropagationJob, result, error) -> None:
            handle.result, handle.error, handle.finished = result, error, True
            if handle in self.activeJobs:
                self.activeJobs.remove(handle)
            if onFinished is not None:
                onFinished(handle)

        def sendNext() -> None:
            while pending:
                handle, volume = pending.pop(0)
                if handle.cancelRequested:
                    finish(handle, None, CancelledError(handle.cancelReason or "Cancelled; nothing was written."))
                    continue

                def sent(job: PropagationJob, handle=handle) -> None:
                    error = job.error
                    if handle.cancelReason and isinstance(error, CancelledError):
                        error = CancelledError(handle.cancelReason)
                    finish(handle, job.result, error)
                    sendNext()

                try:  # the volume is copied now, when its job is sent
                    submitted = self.process(volume, supportSegmentationNode, segmentIds, waitForCompletion=False,
                                             onFinished=sent, **kwargs)
                except Exception as error:  # e.g. the volume was removed from the scene meanwhile
                    finish(handle, None, error)
                    continue
                handle.job, handle.worker, handle.nodes = submitted.job, submitted.worker, submitted.nodes
                self.activeJobs.remove(handle)  # ``submitted`` stands for it there until it finishes
                return

        sendNext()
        if not wait:
            return jobs
        for handle in jobs:
            while not handle.finished:
                handle.worker.runUntilFinished(handle.job, idle=self.idle)
        errors = [handle.error for handle in jobs if handle.error is not None]
        if errors:
            for handle in jobs:
                if handle.result is not None:
                    self.discard(handle.result)
            raise errors[0]
        return [handle.result for handle in jobs]

    def _workerFor(self, device: str):
        """The worker that runs jobs on ``device``: the one given to this logic, else the
        device's persistent worker process (or, deprecated, its in-process thread worker)."""
        if self._worker is not None:
            return self._worker
        if self.workerKind == "thread":
            from .worker import threadWorkerForDevice

            return threadWorkerForDevice(device)
        return workerForDevice(device)

    def poll(self) -> None:
        """Deliver progress and completion of queued runs (call from a QTimer in the GUI)."""
        for worker in list(self._usedWorkers.values()):
            worker.poll()

    def cancelAll(self, reason: str = "") -> None:
        for handle in list(self.activeJobs):
            handle.cancel(reason)

    def releaseWorkerCaches(self, models: bool = False) -> None:
        """Ask the workers this logic used to drop their encoder caches (scene closed: the
        volumes they came from are gone) and, with ``models``, the loaded models too."""
        for worker in list(self._usedWorkers.values()):
            worker.releaseCaches(models=models)

    # ------------------------------------------------------------------ results (main)
    def _finish(self, handle: PropagationJob, job: JobHandle, prepared: PreparedRun, targetVolumeNode,
                supportVolumeNode, supportSegmentationNode) -> None:
        try:
            engineResult = job.resultOrRaise()
            for node in handle.nodes:
                if node.GetScene() is None or not node.GetScene().IsNodePresent(node):
                    raise CancelledError(f"'{node.GetName()}' was removed from the scene during the run; "
                                         "nothing was written.")
            # The engine hands back KJI masks and IJK slice indices of the caller's own volumes.
            masks = dict(engineResult.masks)
            preview = results.createPreview(targetVolumeNode, supportSegmentationNode, masks)
            handle.result = PropagationResult(
                targetVolumeNode=targetVolumeNode, supportVolumeNode=supportVolumeNode,
                supportSegmentationNode=supportSegmentationNode, previewSegmentationNode=preview,
                segmentIds=list(masks), sliceAxis=prepared.targetAxis,
                supportSlices={k: sorted(v) for k, v in engineResult.support_slices.items()},
                processedSlices={k: sorted(v) for k, v in engineResult.processed_slices.items()},
                seconds=engineResult.seconds, options=handle.options, sliceRange=prepared.sliceRange,
                writtenMasks={k: np.array(v, dtype=np.uint8) for k, v in masks.items()},
                sliceConfidence={k: np.asarray(v, np.float32) for k, v in engineResult.slice_confidence.items()},
                segmentConfidence=dict(engineResult.structure_confidence),
                volumeConfidence=engineResult.volume_confidence, examples=dict(prepared.examples),
                paintedSupports=prepared.paintedSupports,
                sliceEvidence={k: np.asarray(v, np.float64) for k, v in engineResult.slice_evidence.items()},
                # Painted on this volume: user-confirmed, as the correction session's fixed slices
                # (openCorrectionSession; an external support's slices are another volume's).
                confirmedSlices={} if supportVolumeNode is not None and supportVolumeNode is not targetVolumeNode
                and prepared.paintedSupports else {k: sorted(v) for k, v in engineResult.support_slices.items()})
        except CancelledError as error:
            handle.error = CancelledError(handle.cancelReason) if handle.cancelReason else error
        except Exception as error:  # carried to the caller (raised by resultOrRaise)
            handle.error = error
        finally:
            handle.finished = True
            if handle in self.activeJobs:
                self.activeJobs.remove(handle)

    def accept(self, result: PropagationResult, destinationSegmentationNode=None,
               mode: str = results.ACCEPT_NEW, undo: Optional[results.AcceptUndo] = None) -> Dict[str, str]:
        """Copy a result into a segmentation (other segments untouched).

        destinationSegmentationNode: default the support segmentation when the target is the
        support volume, else a new segmentation named "<volume> ProtoSAM".
        undo: records the change so that ``undoAccept(undo)`` reverts it (scene undo is off by
        default in Slicer); pass the same record for every result of one user action.
        Returns support segment ID -> destination segment ID.
        """
        self.closeCorrections(result)
        created = False
        if destinationSegmentationNode is None:
            if result.targetVolumeNode is result.supportVolumeNode:
                destinationSegmentationNode = result.supportSegmentationNode
            else:
                destinationSegmentationNode = results.newSegmentationLike(
                    result.targetVolumeNode, f"{result.targetVolumeNode.GetName()} ProtoSAM")
                created = True
        return results.acceptPreview(result.previewSegmentationNode, result.targetVolumeNode,
                                     destinationSegmentationNode, result.supportSegmentationNode, mode,
                                     undo=undo, createdDestination=created)

    def bankAddition(self, result: PropagationResult):
        """What ``result`` (a preview, before Accept) offers an example bank: its painted and
        corrected whole slices, normalised as the engine does (bank.bankAddition)."""
        from . import bank

        return bank.bankAddition(self, result)

    def addToBank(self, folder, additions, undo: Optional[results.AcceptUndo] = None) -> list:
        """Add ``additions`` (bankAddition's, after the user agreed) to the bank in ``folder``
        (made there if the folder is new or empty); returns the protosam.examples.Example list.
        ``undo``: the Accept's record, which then remembers the added examples (undoAccept)."""
        from . import bank

        added = bank.addToBank(folder, additions)
        if undo is not None:
            undo.bankExamples.setdefault(str(folder), []).extend(example.id for example in added)
        return added

    def undoAccept(self, undo: results.AcceptUndo) -> None:
        """Revert the Accept(s) recorded in ``undo``: added segments go, replaced ones come back.
        The examples it added to a bank stay in ``undo`` (removeAcceptedExamples)."""
        results.undoAccept(undo)

    def removeAcceptedExamples(self, undo: results.AcceptUndo) -> int:
        """Remove from their banks the examples that the Accept recorded in ``undo`` added
        (those still there); returns how many were removed. Each bank's are forgotten once
        removed, so a retry after an error removes only the rest."""
        from . import bank

        removed = 0
        for folder, exampleIds in list(undo.bankExamples.items()):
            removed += len(bank.removeFromBank(folder, exampleIds))
            del undo.bankExamples[folder]
        return removed

    def discard(self, result: PropagationResult) -> None:
        """Remove a result's preview segmentation (and its correction session)."""
        self.closeCorrections(result)
        results.removeNode(result.previewSegmentationNode)

    # ------------------------------------------------------------------ corrections (main)
    def openCorrectionSession(self, result: PropagationResult, segmentIds: Optional[Sequence[str]] = None):
        """A correction session adopting ``result``'s preview, on the worker that ran it (the only
        place a session is opened; the Segment Editor effect and the module's update use it).

        The session works in the engine's canonical order (``correctionOrientation``), as the
        run did: then the volume it sees is the run's, and the run's cached encodings are its own.
        It adopts the masks the run (or the last update) wrote, with the run's painted slices as
        fixed slices, or, when the support was painted on another volume, with that support.
        Returns a WorkerSession (worker process: the GUI's case), a ServerSession (Compute on:
        server; the session lives on the server) or a LocalSession (the deprecated thread
        worker); all have the methods of protosam.session.Session it uses.
        """
        from protosam.orientation import canonical_orientation

        from .worker_client import WorkerClient, WorkerSession

        options = result.options or ProcessOptions()
        segmentIds = list(result.segmentIds if segmentIds is None else segmentIds)
        orientation = correctionOrientation(result)
        volume = orientation.to_canonical(mrml_io.volumeToArray(result.targetVolumeNode))
        count = volume.shape[0]
        masks = {}
        for segmentId in segmentIds:
            written = result.writtenMasks.get(segmentId)
            if written is None:
                written = mrml_io.segmentToArray(result.previewSegmentationNode, segmentId, result.targetVolumeNode)
            masks[segmentId] = orientation.to_canonical(written)
        external = (result.supportVolumeNode is not None and result.supportVolumeNode is not result.targetVolumeNode
                    and result.paintedSupports)
        fixed = {} if external else {
            segmentId: [orientation.canonical_slice(k, count) for k in result.supportSlices.get(segmentId, [])]
            for segmentId in segmentIds}
        supportVolume, supportMasks, supportSlices = None, {}, {}
        if external:
            supportNode = result.supportVolumeNode
            supportOrientation = canonical_orientation(mrml_io.ijkToWorldMatrix(supportNode), orientation.plane)
            supportVolume = supportOrientation.to_canonical(mrml_io.volumeToArray(supportNode))
            supportCount = supportVolume.shape[0]
            for segmentId in segmentIds:
                if not result.supportSlices.get(segmentId):  # not painted: its bank examples alone
                    continue
                if result.supportSegmentationNode.GetSegmentation().GetSegment(segmentId) is None:
                    raise InputError(f"The support segment '{segmentId}' was deleted: the preview cannot be updated "
                                     "without it. Propagate again.")
                supportMasks[segmentId] = supportOrientation.to_canonical(
                    mrml_io.segmentToArray(result.supportSegmentationNode, segmentId, supportNode))
                supportSlices[segmentId] = [supportOrientation.canonical_slice(k, supportCount)
                                            for k in result.supportSlices.get(segmentId, [])]
        sessionOptions = {"modality": options.modality, "auto_extent": options.autoExtent}
        if options.exclusive:  # only then: a server without the option still serves the others
            sessionOptions["exclusive"] = True
        if result.sliceRange is not None:
            ends = [orientation.canonical_slice(k, count) for k in result.sliceRange]
            sessionOptions["slice_range"] = [min(ends), max(ends)]
        # The run's evidence, in the session's slice order: the session starts from the run's
        # scores and rescores them after each correction (Session.adopt's ``evidence``).
        storedOrder = [orientation.stored_slice(k, count) for k in range(count)]
        evidence = {segmentId: np.ascontiguousarray(np.asarray(result.sliceEvidence[segmentId])[storedOrder])
                    for segmentId in segmentIds if segmentId in result.sliceEvidence}
        if evidence:  # only then, as the other options
            sessionOptions["slice_evidence"] = evidence

        onServer = _onServer(options)
        # On a server the session lives there (ServerSession, beside the run's encodings); the
        # local worker, on the CPU, only relays the requests.
        device = "cpu" if onServer else resolveDevice(options.device, idle=self.idle)
        engineSpec = engineSpecFor(options, device)  # the run's engine: its cached encodings serve the session
        examples = {key: value for key, value in result.examples.items() if key in segmentIds}  # a bank's, kept
        worker = self._workerFor(device)
        if onServer:
            from .server_session import ServerSession

            warnIfUnencrypted(options)
            return ServerSession(worker if isinstance(worker, WorkerClient) else None, options.serverUrl,
                                 options.serverToken, engineSpec, volume, 0, masks, fixed, sessionOptions,
                                 supportVolume=supportVolume, supportMasks=supportMasks, supportSlices=supportSlices,
                                 idle=self.idle, examples=examples, allowUnencrypted=options.serverAllowUnencrypted)
        if isinstance(worker, WorkerClient):
            return WorkerSession(worker, engineSpec, volume, 0, masks, fixed, sessionOptions,
                                 supportVolume=supportVolume, supportMasks=supportMasks, supportSlices=supportSlices,
                                 idle=self.idle, examples=examples)
        from protosam.session import Session

        from .worker import localEngines  # the deprecated thread worker's engines

        session = Session(localEngines().get(engineSpec), volume, axis=0, modality=options.modality,
                          cache_bytes=None, auto_extent=options.autoExtent,
                          slice_range=sessionOptions.get("slice_range"), exclusive=options.exclusive)
        for segmentId, mask in masks.items():
            externalSupport = {}
            if external and segmentId in supportMasks:  # painted on the other volume
                externalSupport = dict(support_volume=supportVolume, support_mask=supportMasks[segmentId],
                                       support_slices=supportSlices[segmentId])
            session.adopt(segmentId, mask, fixed.get(segmentId, []), examples=examples.get(segmentId),
                          evidence=evidence.get(segmentId), **externalSupport)
        return LocalSession(session)

    def rescoreFromSession(self, result: PropagationResult, session=None) -> None:
        """Take the review scores of ``session`` (default: ``result.corrections``) as they stand
        after its corrections and updates into ``result`` (what the Review section lists): the
        slice scores, the user-confirmed slices (they leave the queue) and the segments' scores
        of the segments the session holds; the volume's is the lowest segment score."""
        session = session if session is not None else result.corrections
        if session is None:
            return
        scores = session.confidence()
        orientation = correctionOrientation(result)
        count = mrml_io.volumeShapeKji(result.targetVolumeNode)[result.sliceAxis.kjiAxis]
        canonicalOrder = [orientation.canonical_slice(k, count) for k in range(count)]
        for segmentId, values in scores["slice_confidence"].items():
            result.sliceConfidence[segmentId] = np.asarray(values, np.float32)[canonicalOrder]
            result.confirmedSlices[segmentId] = sorted(orientation.stored_slice(k, count)
                                                       for k in session.fixed_slices(segmentId))
        result.segmentConfidence.update({key: float(value) for key, value in scores["structure_confidence"].items()})
        if result.segmentConfidence:
            result.volumeConfidence = float(min(result.segmentConfidence.values()))

    def closeCorrections(self, result: PropagationResult) -> None:
        """Close the correction session of a result, if one was opened (frees the worker's state)."""
        session, result.corrections = result.corrections, None
        if session is not None:
            session.close()

    def repaintedSlices(self, result: PropagationResult) -> Dict[str, List[int]]:
        """Per segment of the preview, the slices (IJK indices along ``result.sliceAxis``) whose
        mask differs from what the last run or update wrote: the user repainted them."""
        preview = result.previewSegmentationNode
        if preview is None or preview.GetScene() is None or not preview.GetScene().IsNodePresent(preview):
            raise InputError("The preview segmentation was removed: propagate again.")
        kjiAxis = result.sliceAxis.kjiAxis
        other = tuple(a for a in range(3) if a != kjiAxis)
        changed = {}
        for segmentId in result.segmentIds:
            if preview.GetSegmentation().GetSegment(segmentId) is None:
                raise InputError(f"Segment '{segmentId}' was deleted from the preview '{preview.GetName()}': "
                                 "propagate again.")
            current = mrml_io.segmentToArray(preview, segmentId, result.targetVolumeNode) != 0
            written = result.writtenMasks[segmentId] != 0
            slices = np.flatnonzero((current != written).any(axis=other))
            if len(slices):
                changed[segmentId] = [int(k) for k in slices]
        return changed

    def updatePreviews(self, resultList: Sequence[PropagationResult],
                       progressCallback: Optional[Callable[[int, int], None]] = None,
                       cancelEvent: Optional[threading.Event] = None) -> List[Dict[str, List[int]]]:
        """Update previews after the user repainted slices of them (any Segment Editor effect).

        Per preview and segment, every repainted slice becomes a fixed slice and a support
        (also when the run's support came from another volume: that support stays), and the
        segment is propagated again from the cached encodings, on the worker that ran it.
        Repainted slices keep their painting; the other slices are rewritten in the preview
        (only the box of changed voxels). Nothing is written until every update is done, so
        an error or ``cancelEvent`` (CancelledError) leaves the previews as they were.
        ``progressCallback(done, total)`` over all the segments to update; it may process GUI
        events (the waits do, through ``self.idle``). Returns the repainted slices per preview.
        Raises InputError when no slice of any preview was repainted.
        """
        changes = [self.repaintedSlices(result) for result in resultList]
        segmentCount = sum(len(changed) for changed in changes)
        if not segmentCount:
            raise InputError("No slice of the preview was repainted: repaint the wrong slices of the preview "
                             "segmentation in the Segment Editor, then click Update preview.")
        cancelEvent = cancelEvent if cancelEvent is not None else threading.Event()
        updated = []
        position = 0
        for result, changed in zip(resultList, changes):
            if not changed:
                continue
            if result.corrections is None:
                result.corrections = self.openCorrectionSession(result)
            session = result.corrections
            orientation = correctionOrientation(result)
            count = mrml_io.volumeShapeKji(result.targetVolumeNode)[result.sliceAxis.kjiAxis]
            for segmentId, slices in changed.items():
                current = orientation.to_canonical(
                    mrml_io.segmentToArray(result.previewSegmentationNode, segmentId, result.targetVolumeNode))
                for k in slices:
                    canonical = orientation.canonical_slice(k, count)
                    session.add_support(segmentId, canonical, current[canonical])

                def progress(done, total, offset=position):
                    if progressCallback is not None and total:
                        progressCallback(offset * total + done, segmentCount * total)

                stopped = None  # the worker's (or server's) own CancelledError, when it stopped the update
                try:
                    mask = session.update(segmentId, progress=progress, cancel=cancelEvent)
                except CancelledError as error:
                    cancelEvent.set()
                    stopped = error
                if cancelEvent.is_set():  # also when Cancel came after the worker's last slice
                    raise CancelledError("Update cancelled; the preview is as it was.") from stopped
                updated.append((result, segmentId, orientation.from_canonical(mask)))
                position += 1
            if result.options is not None and result.options.exclusive:
                # An exclusive update may move voxels between segments: rewrite every segment.
                updated = [entry for entry in updated if entry[0] is not result] + [
                    (result, segmentId, orientation.from_canonical(session.mask(segmentId)))
                    for segmentId in result.segmentIds]
        for result, segmentId, mask in updated:
            preview = result.previewSegmentationNode
            if preview.GetScene() is None or not preview.GetScene().IsNodePresent(preview):
                raise CancelledError("The preview was removed during the update; nothing was written.")
            with mrml_io.renderPaused():
                mrml_io.writeSegmentFromArray(mask, preview, segmentId, result.targetVolumeNode)
            result.writtenMasks[segmentId] = np.array(mask, dtype=np.uint8)
        for result, changed in zip(resultList, changes):  # written: they are the user's slices now
            for segmentId, slices in changed.items():
                result.correctedSlices[segmentId] = sorted(set(result.correctedSlices.get(segmentId, [])) | set(slices))
            if changed:  # the update's replies carry every slice scored again
                self.rescoreFromSession(result)
        logger.info("ProtoSAM preview updated from %d repainted segment(s).", segmentCount)
        return changes

    # ------------------------------------------------------------------ scene observation
    def _observeScene(self, scene) -> None:
        if scene is None or id(scene) in self._observedScenes:
            return
        import vtk

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def onNodeAboutToBeRemoved(caller, event, node):
            for handle in list(self.activeJobs):
                if handle.involves(node):
                    logger.info("'%s' is being removed: cancelling the ProtoSAM run that uses it.", node.GetName())
                    handle.cancel(f"'{node.GetName()}' was removed from the scene during the run; nothing was written.")

        def onEndClose(caller, event):
            self.releaseWorkerCaches()

        tags = [scene.AddObserver(slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent, onNodeAboutToBeRemoved),
                scene.AddObserver(slicer.vtkMRMLScene.EndCloseEvent, onEndClose)]
        self._observedScenes[id(scene)] = (scene, tags, (onNodeAboutToBeRemoved, onEndClose))

    def cleanup(self) -> None:
        """Cancel this logic's runs and stop observing scenes (module cleanup / reload)."""
        self.cancelAll("ProtoSAM was closed; the run was cancelled.")
        for scene, tags, _ in self._observedScenes.values():
            for tag in tags:
                scene.RemoveObserver(tag)
        self._observedScenes.clear()
        self.releaseWorkerCaches()


def correctionOrientation(result: PropagationResult):
    """The engine's canonical orientation (protosam.orientation) of ``result``'s target volume
    for its slice axis: the order the run segmented in, and the order its session works in."""
    from protosam.orientation import canonical_orientation

    ijkToWorld = mrml_io.ijkToWorldMatrix(result.targetVolumeNode)
    return canonical_orientation(ijkToWorld, plane_of_ijk_axis(ijkToWorld, result.sliceAxis.ijkAxis))


class LocalSession:
    """A protosam.session.Session on this process's engine (the deprecated thread worker),
    with WorkerSession's methods: the Session's own, and progress for a click that encodes."""

    def __init__(self, session):
        self.session = session

    def correct(self, structure, index: int, points, labels, progress=None):
        return self._encoding(index, progress, lambda: self.session.correct(structure, index, points, labels))

    def box(self, structure, index: int, box_xyxy, progress=None):
        return self._encoding(index, progress, lambda: self.session.box(structure, index, box_xyxy))

    def scribble(self, structure, index: int, points_xy, positive: bool, radius: float = 0.0, progress=None):
        return self._encoding(index, progress,
                              lambda: self.session.scribble(structure, index, points_xy, positive, radius=radius))

    def _encoding(self, index: int, progress, decode):
        """``decode()``, with progress (0, 1) and (1, 1) round it when the slice is encoded first."""
        encode = progress is not None and not self.session.has_sam_embedding(index)
        if encode:
            progress(0, 1)
        mask = decode()
        if encode:
            progress(1, 1)
        return mask

    def __getattr__(self, name):  # update, add_support, undo_click, clear_clicks, clicks, mask, close
        if name == "session":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.session, name)


def engineKwargs(prepared: PreparedRun, options: ProcessOptions, negatives: Optional[Dict] = None) -> Dict:
    """Keyword arguments of ``protosam.segment_volume`` for a prepared run: KJI arrays with their
    IJK-to-world matrices (the engine owns orientation) and plain JSON values, so they travel
    to the worker process as they are. ``negatives`` (segment ID -> KJI mask) only when given."""
    kwargs = dict(query_volume=prepared.query, support_volume=prepared.support, support_masks=prepared.masks,
                  query_ijk_to_ras=prepared.queryIjkToWorld, support_ijk_to_ras=prepared.supportIjkToWorld,
                  plane=prepared.plane, support_slices=prepared.supportSlices, slice_range=prepared.sliceRange,
                  modality=options.modality, auto_extent=options.autoExtent)
    if prepared.examples:  # only then, so that a server without example banks runs the other jobs
        kwargs["examples"] = prepared.examples
    if negatives:
        kwargs["negatives"] = {key: np.ascontiguousarray(value, dtype=np.uint8) for key, value in negatives.items()}
    if options.exclusive:  # only then, so that a server without the option runs the other jobs
        kwargs["exclusive"] = True
    return kwargs


def engineSpecFor(options: ProcessOptions, device: str) -> Dict:
    """The engine ``options`` describe on ``device``, as a protocol.EngineSpec dict. A run and the
    correction session of its preview use this one description, so the worker gives them the
    same engine (and the session finds the run's encodings in its cache)."""
    spec = dataclasses.asdict(protocol.EngineSpec(
        models=dataclasses.asdict(options.models), preset=options.preset, device=device,
        weights_home=options.weightsHome, download=options.allowDownload, cache_bytes=options.cacheBytes,
        precision=options.precision, propagation=options.propagation))
    if spec["precision"] == "auto":
        del spec["precision"]  # the default: a server older than the precision option accepts the spec
    if spec["propagation"] == "per-slice":
        del spec["propagation"]  # likewise for the propagation option
    return spec


def _engineJob(prepared: PreparedRun, options: ProcessOptions, device: str,
               negatives: Optional[Dict] = None) -> RequestFunction:
    """The job for a device worker: "run segment_volume with these arrays and keyword arguments"
    on the engine ``options`` describe (a protocol message; no MRML reference inside)."""
    # return_evidence: the preview's correction session rescores from the run's evidence.
    request = protocol.JobSubmit(id=protocol.new_id(), operation="segment_volume",
                                 kwargs=dict(engineKwargs(prepared, options, negatives), return_evidence=True),
                                 engine=engineSpecFor(options, device))
    if _onServer(options):
        from protosam.serving.client import forwarding_request

        warnIfUnencrypted(options)
        request = forwarding_request(request, options.serverUrl, options.serverToken,
                                     allow_unencrypted=options.serverAllowUnencrypted)
    return RequestFunction(request, decodeResult=lambda value: VolumeRunResult(**value))


def warnIfUnencrypted(options: ProcessOptions) -> None:
    """Log that a run goes to the server unencrypted, when the user allowed it and the URL is one."""
    from protosam.serving.client import ServerConnection

    if options.serverAllowUnencrypted:
        connection = ServerConnection(options.serverUrl, options.serverToken, allow_unencrypted=True)
        if connection.unencrypted:
            logger.warning("ProtoSAM: unencrypted connection to %s allowed in the settings: the token and the images "
                           "cross the network without encryption.", options.serverUrl)


def _onServer(options: ProcessOptions) -> bool:
    if options.computeOn not in ("local", "server"):
        raise ValueError(f"computeOn must be 'local' or 'server', not {options.computeOn!r}")
    return options.computeOn == "server"
