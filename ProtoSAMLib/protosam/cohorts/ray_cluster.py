"""``protosam batch --ray``: the rows of :mod:`protosam.cohorts.batch` on a Ray cluster.

* **Workers**: one Ray actor per GPU of the cluster (1 GPU + ``--ray-cpus-per-worker`` CPUs,
  default 1), or, on a cluster without GPUs, one per N CPUs (default 4, or a whole node if
  smaller). Each actor loads the models once and keeps them for every volume it gets.
* **Data is shipped**: the driver (the process running ``protosam batch``) reads each row's
  files, checks them with ``protosam segment``'s own code, and sends the arrays through Ray's
  object store; the actor returns the label map and the driver writes the output and its
  sidecar. Worker nodes therefore need no access to the images or outputs; only checkpoints
  given by path must exist at that path on every node (official weights are fetched into
  each node's own cache). Support volumes are sent once and shared by every row using them.
* **Example banks** (``--examples BANK``): only the driver opens the bank. It sends each
  structure's examples as arrays, once per plane and labels, shared by every row, with their
  encoder features for the workers' setting (:func:`protosam.examples.feature_setting`): read
  from the bank's cache, or, for examples not cached yet, encoded once by one worker and
  stored in the bank's cache by the driver (keyed as a local run keys them). No worker
  encodes an example again, and no worker needs the bank's folder.
* **Streaming**: at most :data:`IN_FLIGHT_PER_WORKER` rows per actor at a time (one computing,
  one arriving), so the driver holds only a few volumes in memory whatever the cohort size.
* **Lost workers**: actors run without Ray restarts; when one dies (``RayActorError``: process
  killed, out of memory, node gone) the driver starts a replacement and resubmits its rows.
  The row it was computing counts one attempt; after :data:`MAX_ATTEMPTS` it is reported failed.

Ray is imported only here and only when ``--ray`` is given: the engine works without it.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

import numpy as np

from .batch import (
    SUPPORT_FILES_KEPT, BatchJob, JobOutcome, PendingJob, Report, SupportReader, failed_outcome, interrupted_outcome,
    read_job, save_result,
)
from ..cli.common import SegmentInputs, engine_from_args, propagate_labels
from ..confidence import review_record
from ..errors import InputError, ProtoSAMError
from ..examples.runs import bank_supports, structure_labels

logger = logging.getLogger(__name__)

__all__ = ["run_on_ray", "BatchWorker", "MAX_ATTEMPTS", "IN_FLIGHT_PER_WORKER"]

MAX_ATTEMPTS = 3
IN_FLIGHT_PER_WORKER = 2
DEFAULT_CPUS_PER_CPU_WORKER = 4
# Engine options an actor needs (those of cli_common.add_model_options).
MODEL_OPTIONS = (
    "dinov2", "dinov2_checkpoint", "sam", "sam_checkpoint", "input_size", "preset", "cca", "device", "batch_size",
    "no_download", "weights_home", "precision", "propagation",
)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ProtoSAMError(
            "--ray needs Ray, which is not installed: pip install 'ProtoSAMLib[ray]' (or pip install ray) "
            "on this machine and on every node of the cluster."
        ) from None
    return ray


class BatchWorker:
    """Body of a Ray actor: one Engine, loaded once by :meth:`start`, for many volumes."""

    def __init__(self, model_options: Dict[str, object], threads: int):
        self.model_options, self.threads, self.engine = model_options, threads, None

    def start(self) -> Dict[str, object]:
        """Load the models -> where this worker runs (pid, host, device)."""
        import torch

        # One torch thread per CPU Ray gave this actor: actors on one node must not oversubscribe it.
        torch.set_num_threads(self.threads)
        self.engine = engine_from_args(argparse.Namespace(**self.model_options))
        from ..examples import feature_setting

        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.engine.device),
                "feature_setting": feature_setting(self.engine)}

    def encode(self, images: List) -> List:
        """Encoder features of example slices (``[H, W]`` float32 each), as the bank caches them."""
        from ..examples import encode_example

        return [encode_example(self.engine, np.array(image)) for image in images]  # copies: Ray's are read-only

    def segment(self, query, support, labelmap, labels: List[int], geometry: Dict[str, object],
                support_slice: Optional[int], modality: str, exclusive: bool = False, *,
                examples: Optional[Dict[int, list]] = None, support_mode: str = "nearest", similar_k: int = 3):
        """Propagate one volume (arrays as :class:`SegmentInputs` holds them; ``examples``: label ->
        bank examples with their features) -> (label map, seconds, the result's
        :func:`protosam.confidence.review_record`)."""
        started = time.perf_counter()
        if examples:
            # Ray hands arrays over read-only (zero-copy from its object store); torch tensors
            # made from them would share that memory: the examples are small, copy them.
            import dataclasses

            examples = {label: [dataclasses.replace(
                example, image=np.array(example.image), mask=np.array(example.mask),
                features=None if example.features is None else np.array(example.features))
                for example in found] for label, found in examples.items()}
        inputs = SegmentInputs(query, support, labelmap, list(labels), geometry)
        output, result = propagate_labels(self.engine, inputs, support_slice=support_slice, modality=modality,
                                          exclusive=exclusive, examples=examples, support_mode=support_mode,
                                          similar_k=similar_k)
        return output, time.perf_counter() - started, review_record(result)


@dataclass
class _Task:
    job: BatchJob
    parameters: dict
    losses: int = 0
    arguments: Optional[tuple] = None  # object refs and options, built once, reused on resubmission
    bank_labels: Optional[tuple] = None  # with --examples: (plane, ((label, structure), ...)) of the row
    reference: object = None  # the target's sitk header, for writing the output
    submitted: float = 0.0  # perf_counter() when last sent to a worker


@dataclass
class _Worker:
    handle: object
    start_ref: object
    info: Optional[dict] = None
    feature_setting: Optional[dict] = None  # what its encoder's features depend on (bank feature cache key)
    in_flight: Deque[tuple] = field(default_factory=collections.deque)  # (task, ref), oldest first


def _plan_workers(ray, args: argparse.Namespace, wanted: int):
    """(number of actors, CPUs per actor, actor options, device for the engine) from the cluster's nodes."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    use_gpu = args.device != "cpu" and any(node.get("GPU", 0) >= 1 for node in nodes)
    if args.device.startswith("cuda") and not use_gpu:
        raise InputError(f"--device {args.device} was given but the Ray cluster has no GPU: use --device cpu or auto.")
    if args.ray_cpus_per_worker is not None and args.ray_cpus_per_worker < 1:
        raise InputError("--ray-cpus-per-worker must be at least 1.")
    largest = max((int(node.get("CPU", 0)) for node in nodes), default=0)
    if use_gpu:
        cpus = args.ray_cpus_per_worker or 1
        count = sum(min(int(node.get("GPU", 0)), int(node.get("CPU", 0)) // cpus) for node in nodes)
        options, device = {"num_gpus": 1, "num_cpus": cpus}, "cuda"
    else:
        cpus = args.ray_cpus_per_worker or max(1, min(DEFAULT_CPUS_PER_CPU_WORKER, largest))
        count = sum(int(node.get("CPU", 0)) // cpus for node in nodes)
        options, device = {"num_cpus": cpus}, "cpu"
    if count < 1:
        raise InputError(
            f"No node of the Ray cluster has {cpus} CPU(s){' beside a GPU' if use_gpu else ''} "
            f"(largest: {largest}); lower --ray-cpus-per-worker."
        )
    return min(count, wanted), cpus, options, device


class _Scheduler:
    """Streams tasks to actors, replaces lost ones and reports every row exactly once."""

    def __init__(self, ray, args: argparse.Namespace, pending: List[PendingJob], report: Report):
        self.ray, self.args, self.report = ray, args, report
        self.queue: Deque[_Task] = collections.deque(_Task(job, parameters) for job, parameters in pending)
        count, cpus, options, device = _plan_workers(ray, args, len(pending))
        model_options = {name: getattr(args, name) for name in MODEL_OPTIONS}
        model_options["device"] = device
        # No Ray restarts (max_restarts=0): a lost actor is replaced here, where its rows are known.
        self.actor_class = ray.remote(**options, max_restarts=0)(BatchWorker)
        self.actor_arguments = (model_options, cpus)
        self.workers: List[_Worker] = []
        self.replacements_left = 2 * count + MAX_ATTEMPTS
        self.reader = SupportReader()
        self.support_refs: "collections.OrderedDict[str, object]" = collections.OrderedDict()
        self.bank = None
        # (feature setting, plane, labels) -> object ref of {label: [SupportExample with features]}
        self.example_refs: Dict[tuple, object] = {}
        if getattr(args, "examples", None):
            from ..examples import ExampleBank

            self.bank = ExampleBank(args.examples, create=False)
        logger.info("Ray: %d worker(s), %s each", count, options)
        for _ in range(count):
            self._start_worker()

    # ------------------------------------------------------------------ workers
    def _start_worker(self) -> None:
        handle = self.actor_class.remote(*self.actor_arguments)
        self.workers.append(_Worker(handle, handle.start.remote()))

    def _lose_worker(self, worker: _Worker, error: BaseException) -> None:
        """Drop a dead actor; resubmit its rows (the one it was computing counts an attempt)."""
        logger.warning("Ray worker %s was lost: %s", worker.info or "(starting)", str(error).splitlines()[0])
        self.workers.remove(worker)
        self.ray.kill(worker.handle, no_restart=True)
        requeue = []
        for position, (task, _) in enumerate(worker.in_flight):
            if position == 0:
                task.losses += 1
                if task.losses >= MAX_ATTEMPTS:
                    self.report(failed_outcome(task.job, ProtoSAMError(
                        f"The Ray worker computing this volume was lost {task.losses} times (killed, out of memory, "
                        "or its node left the cluster); see the Ray logs."), attempts=task.losses))
                    continue
            requeue.append(task)
        self.queue.extendleft(reversed(requeue))
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self._start_worker()

    # ------------------------------------------------------------------ submission
    def _shared_ref(self, key: str, array):
        if key not in self.support_refs:
            self.support_refs[key] = self.ray.put(array)
            while len(self.support_refs) > SUPPORT_FILES_KEPT:
                self.support_refs.popitem(last=False)
        self.support_refs.move_to_end(key)
        return self.support_refs[key]

    def _prepare(self, task: _Task) -> bool:
        """Read and check the row on the driver and put its arrays in the object store."""
        if task.arguments is not None:
            return True
        try:
            inputs, task.reference = read_job(task.job, self.args, self.reader)
        except Exception as error:  # the per-volume boundary: report the row, go on
            self.report(failed_outcome(task.job, error, attempts=0))
            return False
        job = task.job
        support = None if inputs.support is None else self._shared_ref(f"image:{os.path.abspath(job.support_image)}", inputs.support)
        labelmap = inputs.labelmap if job.support_mask is None else self._shared_ref(
            f"mask:{os.path.abspath(job.support_mask)}", inputs.labelmap)
        if self.bank is not None:
            try:
                labels = structure_labels(self.bank.structures(), self.args.structures, inputs.labels)
            except InputError as error:
                self.report(failed_outcome(task.job, error, attempts=0))
                return False
            task.bank_labels = (inputs.geometry["plane"], tuple(sorted(labels.items())))
        task.arguments = (self.ray.put(inputs.query), support, labelmap, inputs.labels, inputs.geometry,
                          self.args.support_slice, self.args.modality, getattr(self.args, "exclusive", False))
        return True

    def _examples_ref(self, worker: _Worker, task: _Task):
        """The object ref of the row's bank examples with features for ``worker``'s encoder
        setting (None without a bank): put once per setting, plane and labels; examples
        without cached features are encoded by ``worker`` (and cached in the bank) first."""
        if task.bank_labels is None:
            return None
        from ..examples.bank import _setting_key

        plane, labels = task.bank_labels
        key = (_setting_key(worker.feature_setting), plane, labels)
        if key not in self.example_refs:
            bank, setting = self.bank, worker.feature_setting

            def features(examples):
                found = bank.cached_features(examples, setting)
                missing = [example for example in examples if example.id not in found]
                if missing:
                    images = [bank.arrays(example)[0] for example in missing]
                    computed = dict(zip((e.id for e in missing), self.ray.get(worker.handle.encode.remote(images))))
                    bank.store_features(setting, computed)
                    found.update(computed)
                    logger.info("Ray worker %s encoded %d bank example(s)", worker.info, len(missing))
                return [found[example.id] for example in examples]

            self.example_refs[key] = self.ray.put(bank_supports(bank, dict(labels), plane, features=features))
        return self.example_refs[key]

    def _submit(self, worker: _Worker, task: _Task) -> bool:
        """Send a prepared row to ``worker``; False when the worker was lost meanwhile (the row
        goes back to the front of the queue)."""
        try:
            examples = self._examples_ref(worker, task)
        except self.ray.exceptions.RayActorError as error:  # lost while encoding the examples
            self.queue.appendleft(task)
            self._lose_worker(worker, error)
            return False
        except (self.ray.exceptions.RayTaskError, ProtoSAMError, OSError) as error:
            cause = getattr(error, "cause", None) or error
            self.report(failed_outcome(task.job, cause, attempts=task.losses))
            return True
        task.submitted = time.perf_counter()
        worker.in_flight.append((task, worker.handle.segment.remote(
            *task.arguments, examples=examples, support_mode=getattr(self.args, "support_mode", "nearest"),
            similar_k=getattr(self.args, "similar_k", 3))))
        return True

    def _fill(self) -> None:
        for worker in list(self.workers):
            while worker.info is not None and len(worker.in_flight) < IN_FLIGHT_PER_WORKER and self.queue:
                task = self.queue.popleft()
                if self._prepare(task) and not self._submit(worker, task):
                    break  # this worker is gone

    # ------------------------------------------------------------------ results
    def _finish(self, worker: _Worker, task: _Task, ref) -> None:
        attempts = task.losses + 1
        try:
            labelmap, seconds, confidence = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            raise  # the worker is lost: run() resubmits its rows, this one included
        except self.ray.exceptions.RayTaskError as error:
            worker.in_flight.popleft()
            self.report(failed_outcome(task.job, error.cause if error.cause is not None else error, attempts=attempts))
            return
        worker.in_flight.popleft()
        try:
            voxels = save_result(task.job, labelmap, task.reference, task.parameters, seconds,
                                 dict(worker.info, confidence=confidence))
        except Exception as error:  # writing the output failed: report the row, go on
            self.report(failed_outcome(task.job, error, attempts=attempts))
            return
        self.report(JobOutcome(task.job, "done", seconds, attempts, voxels, confidence=confidence))

    def run(self) -> None:
        ray = self.ray
        while self.queue or any(worker.in_flight for worker in self.workers):
            self._fill()
            waiting = {}
            for worker in self.workers:
                if worker.info is None:
                    waiting[worker.start_ref] = (worker, None)
                elif worker.in_flight:
                    task, ref = worker.in_flight[0]  # each actor finishes its rows in order
                    waiting[ref] = (worker, task)
            if not waiting:  # rows left but no worker (every one lost, no replacement left)
                for task in self.queue:
                    self.report(failed_outcome(task.job, ProtoSAMError(
                        "Not run: every Ray worker was lost; see the Ray logs."), attempts=task.losses))
                self.queue.clear()
                break
            ready, _ = ray.wait(list(waiting), num_returns=1)
            worker, task = waiting[ready[0]]
            try:
                if task is None:
                    worker.info = ray.get(ready[0])
                    worker.feature_setting = worker.info.pop("feature_setting", None)
                    logger.info("Ray worker ready: %s", worker.info)
                else:
                    self._finish(worker, task, ready[0])
            except ray.exceptions.RayActorError as error:
                self._lose_worker(worker, error)
            except ray.exceptions.RayTaskError as error:
                # Only start() gets here: models that do not load on a worker fail the whole run.
                raise (error.cause if error.cause is not None else error) from None

    def interrupted(self) -> None:
        """Ctrl-C: the row each worker was computing is reported ``interrupted`` with its time
        and attempts; the rows behind it never started (``not run``, by the caller)."""
        now = time.perf_counter()
        for worker in self.workers:
            if worker.in_flight:
                task, _ = worker.in_flight[0]
                self.report(interrupted_outcome(task.job, now - task.submitted, task.losses + 1))

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker.handle, no_restart=True)
        self.workers.clear()


def run_on_ray(pending: List[PendingJob], args: argparse.Namespace, report: Report) -> None:
    """Compute ``pending`` rows on Ray (``args.ray``: "" = local instance, else an address for ray.init)."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=args.ray or None, logging_level=logging.WARNING)
        except ConnectionError as error:
            raise ProtoSAMError(
                f"Could not reach the Ray cluster at {args.ray or 'this machine'}: {error} Start it with "
                "'ray start --head' (and 'ray start --address=HEAD:6379' on each worker node), or check --ray ADDRESS."
            ) from error
    scheduler = None
    try:
        scheduler = _Scheduler(ray, args, pending, report)
        try:
            scheduler.run()
        except KeyboardInterrupt:
            scheduler.interrupted()
            raise
    finally:
        if scheduler is not None:
            scheduler.close()
        if started_here:
            ray.shutdown()
