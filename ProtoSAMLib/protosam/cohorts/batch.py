"""``protosam batch``: one support example, a cohort of target volumes, resumable.

The manifest is a CSV file with a header row and one row per target volume:

* ``image`` (required): the volume to segment;
* ``output`` (required): where its label map goes (folders are created);
* ``support_image``, ``support_mask`` (optional): override the command's ``--support-image``
  and ``--support-mask`` for this row; an empty field falls back to the option, and with no
  support image at all the labels are taken as painted on the row's own image. With
  ``--examples BANK`` a row needs no support mask (the bank's examples are its supports); with
  both, the support and the bank are used together (docs/cohorts.md).

Relative paths are relative to the manifest's folder. Every output is written atomically,
then a sidecar ``<output>.protosam.json`` records the parameters that decided it (engine
version, models and checkpoint identities, preset, labels, options, and the SHA-256 of the
image, support image and support mask) plus the output's own SHA-256; a volume stored as a
detached header (``.nhdr``, ``.mhd``, ``.hdr``) is hashed with the data files it names. A
later run skips a row whose output and sidecar match the current parameters and redoes the
others, so an interrupted cohort resumes where it stopped and a changed option or file is
redone.

Before anything is read, :func:`check_batch_paths` refuses a summary or output that is an
input of any row, a support file or the manifest. Each row ends ``done``, ``skipped``,
``failed``, ``interrupted`` or ``not run`` (see :class:`JobOutcome`).

Reading, checking and propagating reuse ``protosam segment``'s own functions
(:func:`protosam.cli.common.read_segment_inputs`, :func:`protosam.cli.common.propagate_labels`). This module
holds the manifest, the resume logic, the summary and the local runner (one Engine, models
loaded once); :mod:`protosam.cohorts.ray_cluster` runs the same rows on a Ray cluster and
:mod:`protosam.cli.batch` is the ``protosam batch`` command over both.
"""
from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .. import __version__
from ..cli.common import (
    ProgressBar, _parse_labels, check_support_slices, engine_from_args, propagate_labels, read_query_inputs,
    read_segment_inputs,
)
from ..confidence import review_record
from ..errors import InputError, ProtoSAMError

logger = logging.getLogger(__name__)

__all__ = [
    "BatchJob", "JobOutcome", "read_manifest", "RunParameters", "run_batch", "SIDECAR_SUFFIX",
]

MANIFEST_COLUMNS = ("image", "output", "support_image", "support_mask")
#: Least confident slices listed in the review file by default (``--review``).
REVIEW_SLICES = 20
REVIEW_COLUMNS = ("row", "image", "label", "plane", "slice_axis", "slice", "score")
SIDECAR_SUFFIX = ".protosam.json"
STATUSES = ("done", "skipped", "failed", "interrupted", "not run")
SIDECAR_FORMAT = 1
HASH_BLOCK = 1 << 20
# Support volumes kept in memory by the driver (rows usually share one; a few cover
# manifests that alternate between supports).
SUPPORT_FILES_KEPT = 4


@dataclass(frozen=True)
class BatchJob:
    """One manifest row, paths resolved. ``support_image`` None: the labels are on ``image``."""

    row: int  # 1-based data row (the header is row 0)
    image: Path
    output: Path
    support_mask: Optional[Path]  # None: the rows's supports are the example bank's alone
    support_image: Optional[Path] = None

    @property
    def sidecar(self) -> Path:
        return self.output.with_name(self.output.name + SIDECAR_SUFFIX)


@dataclass
class JobOutcome:
    """What happened to one row: ``status`` is one of :data:`STATUSES`: ``done``, ``skipped``,
    ``failed``, ``interrupted`` (the row being computed when the batch was interrupted: its
    seconds and attempts so far) or ``not run`` (the batch stopped before it)."""

    job: BatchJob
    status: str
    seconds: float = 0.0
    attempts: int = 0
    voxels: Dict[int, int] = field(default_factory=dict)
    error: str = ""
    # protosam.confidence.review_record of the result (every scored slice), kept in the sidecar.
    confidence: Optional[dict] = None


# ----------------------------------------------------------------------------- manifest
def read_manifest(path, *, support_image=None, support_mask=None, examples=None) -> List[BatchJob]:
    """Parse the manifest CSV into jobs; the command's support files fill empty row fields.

    Raises InputError for a missing file, missing/unknown columns, a row without image or
    output, a row without any support mask, or two rows writing the same output.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The manifest file does not exist: {path}")
    folder = path.parent

    def resolve(value: Optional[str]) -> Optional[Path]:
        if value is None or not value.strip():
            return None
        candidate = Path(value.strip()).expanduser()
        return candidate if candidate.is_absolute() else folder / candidate

    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        columns = [name.strip() for name in (reader.fieldnames or [])]
        unknown = [name for name in columns if name not in MANIFEST_COLUMNS]
        if unknown or not {"image", "output"} <= set(columns):
            raise InputError(
                f"The manifest {path} needs a header row with the columns image,output (optionally "
                f"support_image,support_mask); it has {columns or 'none'}."
            )
        reader.fieldnames = columns
        jobs, seen = [], {}
        for number, row in enumerate(reader, start=1):
            if not any((value or "").strip() for value in row.values()):
                continue
            image, output = resolve(row.get("image")), resolve(row.get("output"))
            if image is None or output is None:
                raise InputError(f"Row {number} of {path} has no image or no output path: fill both columns.")
            mask = resolve(row.get("support_mask")) or (Path(support_mask) if support_mask else None)
            if mask is None and examples is None:
                raise InputError(
                    f"Row {number} of {path} has no support mask: give --support-mask, a support_mask column or "
                    "an example bank (--examples)."
                )
            row_support_image = resolve(row.get("support_image")) or (Path(support_image) if support_image else None)
            key = os.path.abspath(output)
            if key in seen:
                raise InputError(f"Rows {seen[key]} and {number} of {path} both write {output}: give each its own output.")
            seen[key] = number
            jobs.append(BatchJob(number, image, output, mask, row_support_image))
    if not jobs:
        raise InputError(f"The manifest {path} lists no volumes.")
    return jobs


# ----------------------------------------------------------------------------- parameters
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def volume_sha256(path: Path, what: str) -> str:
    """SHA-256 of a volume: of its file, or, for a detached header (``.nhdr``, ``.mhd``, ``.hdr``;
    see :func:`protosam.io.volume_files`), of the header and every data file it names, so that
    changed voxels in a data file change it. InputError when a file is missing."""
    from ..io import volume_files

    files = volume_files(path)
    for file in files:
        if not file.is_file():
            if file == path:
                raise InputError(f"The {what} file does not exist: {path}")
            raise InputError(f"The {what} {path} names the data file {file}, which does not exist: restore it, "
                             "or correct the header.")
    if len(files) == 1:
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file_sha256(file)}\n".encode("utf-8"))
    return digest.hexdigest()


def _checkpoint_identity(name: str, checkpoint: Optional[str]) -> str:
    """An explicit file: its SHA-256; an official one: the registry's published SHA-256."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InputError(f"Checkpoint file for {name} not found: {path}. Check the path.")
        return f"sha256:{file_sha256(path)}"
    from ..weights.registry import REGISTRY

    entry = REGISTRY.get(name)
    return f"sha256:{entry.sha256}" if entry is not None and entry.sha256 else f"official:{name}"


class RunParameters:
    """Everything that decides an output, as JSON-ready dicts (compared for resuming)."""

    def __init__(self, args: argparse.Namespace):
        from ..presets import get_preset

        self.common = {
            "engine_version": __version__,
            "models": {
                "dinov2": args.dinov2, "dinov2_checkpoint": _checkpoint_identity(args.dinov2, args.dinov2_checkpoint),
                "sam": args.sam, "sam_checkpoint": _checkpoint_identity(args.sam, args.sam_checkpoint),
                "input_size": args.input_size,
            },
            # Holds the precision asked for (a change re-runs the rows; "auto" may differ across machines).
            "preset": asdict(get_preset(args.preset, cca=args.cca, precision=getattr(args, "precision", None))),
            "labels": _parse_labels(args.labels) or "all",  # in order: the first listed wins overlaps
            "axis": args.axis,
            "modality": args.modality,
            "support_slice": args.support_slice,
        }
        if getattr(args, "exclusive", False):  # recorded only when set: earlier outputs stay finished
            self.common["exclusive"] = True
        if getattr(args, "propagation", "per-slice") != "per-slice":  # as exclusive: only when set
            self.common["propagation"] = args.propagation
        if getattr(args, "support_mode", "nearest") != "nearest":
            # Only when not the default, so that the sidecars of earlier runs stay valid.
            self.common["support_mode"] = args.support_mode
        if getattr(args, "examples", None):
            # Only with a bank, so that the sidecars of runs without one stay valid.
            from ..examples import ExampleBank

            ids = [e.id for e in ExampleBank(args.examples, create=False).list()]
            self.common["examples"] = {
                "bank": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "structures": args.structures,
                "similar_k": args.similar_k,
            }
        self._hashes: Dict[str, str] = {}

    def _hash(self, path: Path, what: str) -> str:
        key = os.path.abspath(path)
        if key not in self._hashes:
            self._hashes[key] = volume_sha256(path, what)
        return self._hashes[key]

    def for_job(self, job: BatchJob) -> dict:
        """The job's full parameters (support files hashed once per run; a detached header with
        its data files). InputError if a file is missing."""
        return dict(
            self.common,
            image_sha256=volume_sha256(job.image, "image"),
            support_image_sha256=self._hash(job.support_image, "support image") if job.support_image else "image",
            support_mask_sha256=self._hash(job.support_mask, "support mask") if job.support_mask else "none",
        )


def finished_record(job: BatchJob, parameters: dict) -> Optional[dict]:
    """The sidecar when ``job.output`` is complete for exactly ``parameters``, else None."""
    try:
        record = json.loads(job.sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT or record.get("parameters") != parameters:
        return None
    try:
        if volume_sha256(job.output, "output") != record.get("output_sha256"):
            return None
    except (InputError, OSError):  # the output, or a data file its header names, is missing
        return None
    return record


def save_result(job: BatchJob, labelmap: np.ndarray, reference, parameters: dict, seconds: float, info: dict) -> Dict[int, int]:
    """Write the label map, then its sidecar (both atomic) -> voxels per label.

    A crash between the two leaves a sidecar that does not match the new output's hash, so
    the row is redone; it never leaves a half-written file.
    """
    from ..io import atomic_output, write_labelmap

    write_labelmap(labelmap, reference, job.output)
    values, counts = np.unique(labelmap[labelmap > 0], return_counts=True)
    voxels = {int(v): int(c) for v, c in zip(values, counts)}
    record = {
        "format": SIDECAR_FORMAT,
        "parameters": parameters,
        "output_sha256": volume_sha256(job.output, "output"),
        "voxels": {str(label): count for label, count in voxels.items()},
        "seconds": round(seconds, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    with atomic_output(job.sidecar) as temporary:
        temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return voxels


# ----------------------------------------------------------------------------- reading
class SupportReader:
    """``read(path, what)`` for :func:`read_segment_inputs` that reads a shared support file once.

    Target images are read every time (each row has its own); support files are usually
    shared by every row, so the last :data:`SUPPORT_FILES_KEPT` are kept (a bound, for
    manifests where every row has its own support mask).
    """

    def __init__(self):
        self._volumes: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()

    def __call__(self, path, what: str):
        from ..io import read_volume

        if what == "image":
            return read_volume(path, what)
        key = f"{what}:{os.path.abspath(path)}"
        if key not in self._volumes:
            self._volumes[key] = read_volume(path, what)
            while len(self._volumes) > SUPPORT_FILES_KEPT:
                self._volumes.popitem(last=False)
        self._volumes.move_to_end(key)
        return self._volumes[key]


def read_job(job: BatchJob, args: argparse.Namespace, reader: SupportReader):
    """(:class:`SegmentInputs`, the target's sitk header) for one row; InputError when unusable.

    ``segment``'s own file checks first (inputs exist, the output is a label-map format and
    overwrites no input); the output's folder is created.
    """
    from ..io import check_segment_paths

    job.output.parent.mkdir(parents=True, exist_ok=True)
    check_segment_paths(job.image, job.support_mask, job.output, job.support_image)
    if job.support_mask is None:
        return read_query_inputs(job.image, plane=args.axis, read=reader)
    inputs, reference = read_segment_inputs(
        job.image, job.support_mask, support_image=job.support_image, labels=args.labels, plane=args.axis, read=reader
    )
    check_support_slices(inputs, args.support_slice, job.support_mask)
    return inputs, reference


def failed_outcome(job: BatchJob, error: BaseException, seconds: float = 0.0, attempts: int = 0) -> JobOutcome:
    """A ``failed`` outcome: our own errors as their message, others with their type (and logged with a traceback)."""
    ours = isinstance(error, ProtoSAMError)
    logger.warning("Row %d (%s) failed: %s", job.row, job.image, error, exc_info=error if not ours else None)
    message = str(error) if ours else f"{type(error).__name__}: {error}"
    return JobOutcome(job, "failed", seconds, attempts, error=" ".join(message.split()))


def interrupted_outcome(job: BatchJob, seconds: float, attempts: int) -> JobOutcome:
    """The row that was being computed when the batch was interrupted: what it spent so far."""
    return JobOutcome(job, "interrupted", seconds, attempts,
                      error="interrupted while this volume was computed; run the same command again to redo it")


# ----------------------------------------------------------------------------- summary
def default_summary_path(manifest) -> Path:
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.summary.csv")


def review_path(summary) -> Path:
    """The review file written beside ``summary``: ``<summary stem>.review.csv``."""
    summary = Path(summary)
    return summary.with_name(f"{summary.stem}.review.csv")


def write_summary(path, outcomes: Iterable[JobOutcome]) -> None:
    """CSV, one line per row: row, image, output, status, seconds, attempts, voxels_<label>...,
    confidence (the volume's, see :mod:`protosam.confidence`), confidence_<label>..., error.
    Confidence fields are empty for rows without a result, and for results from before it existed."""
    from ..io import atomic_output

    outcomes = sorted(outcomes, key=lambda o: o.job.row)
    labels = sorted({label for o in outcomes for label in o.voxels})
    fields = ["row", "image", "output", "status", "seconds", "attempts", *[f"voxels_{l}" for l in labels],
              "confidence", *[f"confidence_{l}" for l in labels], "error"]
    with atomic_output(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(fields)
            for o in outcomes:
                counts = [o.voxels.get(label, 0) if o.status in ("done", "skipped") else "" for label in labels]
                confidence = o.confidence if o.status in ("done", "skipped") and o.confidence else {}
                volume = "" if confidence.get("volume") is None else confidence["volume"]
                per_label = confidence.get("structures") if isinstance(confidence.get("structures"), dict) else {}
                structures = [per_label.get(str(label), "") for label in labels]
                writer.writerow([o.job.row, o.job.image, o.job.output, o.status, f"{o.seconds:.2f}", o.attempts,
                                 *counts, volume, *structures, o.error])


def write_review(path, outcomes: Iterable[JobOutcome], count: int = REVIEW_SLICES) -> None:
    """CSV of the ``count`` least confident slices of the whole cohort, least confident first:
    row, image, label, plane, slice_axis (the voxel axis, k/j/i, the slice index runs along),
    slice, score. Ties: row, label, slice."""
    from ..io import atomic_output

    items = []
    for o in outcomes:
        confidence = o.confidence if o.status in ("done", "skipped") and o.confidence else {}
        for entry in confidence.get("slices", []):
            try:
                key = (float(entry["score"]), o.job.row, str(entry["structure"]), int(entry["slice"]))
            except (KeyError, TypeError, ValueError):  # a sidecar edited by hand: its row is left out
                continue
            items.append(key + (o.job.image, confidence.get("plane", ""), confidence.get("slice_axis", "")))
    items.sort(key=lambda item: (item[0], item[1], item[2], item[3]))
    with atomic_output(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(REVIEW_COLUMNS)
            for score, row, label, index, image, plane, axis in items[:max(0, int(count))]:
                writer.writerow([row, image, label, plane, axis, index, f"{score:.4f}"])


# ----------------------------------------------------------------------------- runners
PendingJob = Tuple[BatchJob, dict]  # a row to compute and its parameters
Report = Callable[[JobOutcome], None]


def run_local(pending: List[PendingJob], args: argparse.Namespace, report: Report) -> None:
    """Compute rows one after the other in this process with one Engine (models loaded once)."""
    reader = SupportReader()
    engine = None
    bank = None
    if getattr(args, "examples", None):
        from ..examples import ExampleBank

        bank = ExampleBank(args.examples, create=False)
    for job, parameters in pending:
        started = time.perf_counter()
        attempts = 0
        try:
            # Broad catches: this is the per-volume boundary; one volume's failure (bad file,
            # unexpected error) is reported in the summary and must not stop the cohort.
            try:
                inputs, reference = read_job(job, args, reader)
            except Exception as error:
                report(failed_outcome(job, error, time.perf_counter() - started, attempts=0))
                continue
            if engine is None:
                loading = time.perf_counter()
                engine = engine_from_args(args)  # models that do not load fail the whole run
                started += time.perf_counter() - loading
            attempts = 1
            try:
                examples = None
                if bank is not None:
                    from ..examples.runs import bank_supports, structure_labels

                    # Features come from the bank's cache: after the first row, no encoder work.
                    labels = structure_labels(bank.structures(), args.structures, inputs.labels)
                    examples = bank_supports(bank, labels, inputs.geometry["plane"], engine)
                labelmap, result = propagate_labels(engine, inputs, support_slice=args.support_slice,
                                               modality=args.modality, examples=examples,
                                               exclusive=getattr(args, "exclusive", False),
                                               support_mode=getattr(args, "support_mode", "nearest"),
                                               similar_k=getattr(args, "similar_k", 3))
                seconds = time.perf_counter() - started
                confidence = review_record(result)
                voxels = save_result(job, labelmap, reference, parameters, seconds,
                                     {"device": str(engine.device), "confidence": confidence})
            except Exception as error:
                report(failed_outcome(job, error, time.perf_counter() - started, attempts=1))
                continue
        except KeyboardInterrupt:
            report(interrupted_outcome(job, time.perf_counter() - started, attempts))
            raise
        report(JobOutcome(job, "done", seconds, 1, voxels, confidence=confidence))


def check_batch_paths(args: argparse.Namespace, jobs: List[BatchJob], summary: Path) -> None:
    """Before anything is read or run: no row's output (with its companion files and sidecar)
    and not the summary is an input of any row, the command's support image or mask, or the
    manifest, and no two of them are one file (links, hard links and other spellings
    included; :class:`protosam.io.WritePlan`). InputError otherwise; the summary's folder
    must be writable. Each row's own format and folder are checked when it runs."""
    from ..io import WritePlan, labelmap_files

    plan = WritePlan()
    plan.read("--manifest", args.manifest)
    plan.read("--support-image", args.support_image)
    plan.read("--support-mask", args.support_mask)
    if getattr(args, "examples", None):
        from ..examples.runs import open_bank_for_run

        plan.read("--examples", Path(args.examples) / "index.json")
        outputs = {f"the output of row {job.row}": str(job.output) for job in jobs}
        open_bank_for_run(args.examples, {**outputs, "--summary": str(summary)})
    for job in jobs:
        plan.read(f"the image of row {job.row}", job.image)
        plan.read(f"the support image of row {job.row}", job.support_image)
        plan.read(f"the support mask of row {job.row}", job.support_mask)
    for job in jobs:
        plan.write(f"the output of row {job.row}", job.output, [*labelmap_files(job.output), job.sidecar])
    plan.write("--summary", summary, [summary, review_path(summary)])
    plan.check_collisions()
    WritePlan().write("--summary", summary, make_folder=True).check()


def run_batch(args: argparse.Namespace, run_remote: Optional[Callable[[List[PendingJob], argparse.Namespace, Report], None]] = None
              ) -> List[JobOutcome]:
    """Run a whole manifest (locally, or with ``args.ray`` through ``run_remote``, i.e.
    :func:`protosam.cohorts.ray_cluster.run_on_ray`); write the summary; return outcomes."""
    examples = getattr(args, "examples", None)
    jobs = read_manifest(args.manifest, support_image=args.support_image, support_mask=args.support_mask,
                         examples=examples)
    summary = Path(args.summary) if args.summary else default_summary_path(args.manifest)
    check_batch_paths(args, jobs, summary)
    parameters = RunParameters(args)
    outcomes: Dict[int, JobOutcome] = {}
    progress = ProgressBar("batch")

    def report(outcome: JobOutcome) -> None:
        outcomes[outcome.job.row] = outcome
        progress(len(outcomes), len(jobs))

    pending: List[PendingJob] = []
    try:
        for job in jobs:
            try:
                job_parameters = parameters.for_job(job)
            except (InputError, OSError) as error:
                report(failed_outcome(job, error))
                continue
            record = finished_record(job, job_parameters)
            if record is not None:
                voxels = {int(label): int(count) for label, count in record.get("voxels", {}).items()}
                confidence = record.get("confidence") if isinstance(record.get("confidence"), dict) else None
                report(JobOutcome(job, "skipped", voxels=voxels, confidence=confidence))
            else:
                pending.append((job, job_parameters))
        if pending and args.ray is not None:
            if run_remote is None:
                raise InputError("--ray needs the Ray runner (protosam.cohorts.ray_cluster.run_on_ray).")
            run_remote(pending, args, report)
        elif pending:
            run_local(pending, args, report)
    finally:
        for job in jobs:
            if job.row not in outcomes:
                outcomes[job.row] = JobOutcome(job, "not run", error="the batch stopped before this volume")
        summary.parent.mkdir(parents=True, exist_ok=True)
        write_summary(summary, outcomes.values())
        write_review(review_path(summary), outcomes.values(), getattr(args, "review", REVIEW_SLICES))
    return [outcomes[job.row] for job in jobs]
