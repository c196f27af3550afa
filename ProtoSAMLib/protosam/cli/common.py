"""What every ``protosam`` sub-command shares: model options, engine construction, the
progress bar, and reading and propagating a ``segment`` job.

The command modules of :mod:`protosam.cli` and the cohort runners (:mod:`protosam.cohorts`) import
it; it imports none of them, so they form no import cycle.
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, TextIO

import numpy as np

from .. import catalogue
from ..errors import InputError
from ..precision import PRECISIONS
from ..presets import PRESETS

logger = logging.getLogger(__name__)

__all__ = [
    "ProgressBar", "add_model_options", "engine_from_args", "SegmentInputs", "read_segment_inputs",
    "propagate_labels", "parse_support_slices", "check_support_slices", "add_label_options", "read_query_inputs",
]


class ProgressBar:
    """Progress of ``done`` of ``total`` units on a text stream (stderr), for every command.

    On a terminal one rewritten line: a bar, the counts and the time left; elsewhere (a log
    file, a pipe) one line per 10 %. ``format_count`` writes a count (``human_size`` for
    bytes). A total of 0 means unknown.
    """

    def __init__(self, label: str, stream: Optional[TextIO] = None, width: int = 28,
                 format_count: Callable[[int], str] = str):
        self.label, self.width, self.format_count = label, width, format_count
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        self._open_line = False

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 0.0
        counts = f"{self.format_count(done)}/{self.format_count(total)}" if total else self.format_count(done)
        if not self.interactive:
            decile = int(10 * fraction) if total else -1
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(f"{self.label}: {counts} ({10 * decile} %)\n")
                self.stream.flush()
            return
        now = time.perf_counter()
        if (not total or done < total) and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        elapsed = now - self.started
        left = elapsed / fraction - elapsed if fraction > 0 else float("nan")
        bar = "#" * int(round(fraction * self.width))
        self.stream.write(f"\r{self.label} [{bar:<{self.width}}] {counts}  {left:5.0f} s left ")
        self._open_line = True
        if total and done >= total:
            self.finish()
        self.stream.flush()

    def finish(self) -> None:
        """End the rewritten line (after an interruption or error that stopped the progress)."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def add_label_options(parser: argparse.ArgumentParser, *, every_row: bool = False) -> None:
    """``--labels``, ``--support-slice``, ``--axis`` and ``--modality``: one definition and one
    grammar for ``segment`` and ``batch`` (``every_row``: the help says they apply to every row)."""
    rows = "as for 'protosam segment', for every row: " if every_row else ""
    parser.add_argument("--labels", default=None, help="comma-separated labels to propagate (default: all)")
    parser.add_argument(
        "--support-slice", type=parse_support_slices, default=None, metavar="K[,K...]|painted",
        help=f"{rows}support slice indices along the support's slicing axis, in the file's own voxel order, or "
             "'painted' for every painted slice of each label (default: the slice where each label is largest)",
    )
    parser.add_argument("--axis", default="auto", choices=["auto", "axial", "coronal", "sagittal"],
                        help="slicing plane (auto: the coarsest-spacing axis, axial when isotropic)")
    parser.add_argument("--modality", default="auto", choices=["auto", "ct", "mri", "none"])


def add_model_options(parser: argparse.ArgumentParser, *, default_size: int = catalogue.DEFAULT_INPUT_SIZE,
                      propagation: bool = True) -> None:
    """The model/preset/device options shared by every command that runs the engine
    (``propagation``: also ``--propagation``, for the commands that walk volumes)."""
    group = parser.add_argument_group("models")
    group.add_argument("--preset", default="default", choices=sorted(PRESETS),
                       help="'paper' reproduces the published reference exactly; 'default' is tuned for use")
    group.add_argument("--dinov2", default=catalogue.DEFAULT_DINOV2, help="DINOv2 architecture (see 'protosam weights list')")
    group.add_argument("--dinov2-checkpoint", default=None, metavar="FILE", help="DINOv2 checkpoint file (official format)")
    group.add_argument("--sam", default=catalogue.DEFAULT_SAM,
                       help=" or ".join(", ".join(name for name, _ in catalogue.choices("sam")).rsplit(", ", 1)))
    group.add_argument("--sam-checkpoint", default=None, metavar="FILE", help="refiner checkpoint file in its official format (SAM, MedSAM, SAM 2.1, MedSAM2; "
                       "required for SAM 2.1 and MedSAM2, whose downloads ProtoSAM cannot verify)")
    group.add_argument("--input-size", type=int, default=default_size, help="ALPNet/DINOv2 input size S (multiple of 14)")
    group.add_argument("--cca", action="store_true", default=None, help="keep only the largest coarse component")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="the encoders' precision: fp32 (exact), bf16, fp16 (NVIDIA GPUs only), or auto (bf16 on "
                            "GPUs with bfloat16 units, else fp32; the log names the choice); --preset paper pins fp32")
    group.add_argument("--batch-size", type=int, default=None, help="slices per encoder call (default 8 on CUDA, 1 on CPU)")
    if propagation:
        group.add_argument("--propagation", default=catalogue.DEFAULT_PROPAGATION, choices=catalogue.PROPAGATION_MODES,
                           help="per-slice: each slice refined from its own prototype prompts (any refiner); memory: "
                                "SAM 2's video predictor carries the mask from the painted slices through the volume "
                                "(SAM 2 refiners; docs/refiners.md)")
    group.add_argument("--no-download", action="store_true", help="never download weights; fail with instructions instead")
    group.add_argument("--weights-home", default=None, metavar="DIR", help="weights cache folder (default $PROTOSAM_HOME or ~/.protosam)")


def engine_from_args(args):
    """An :class:`Engine` from the options of :func:`add_model_options`."""
    from ..engine import Engine, ModelSelection
    from ..weights.transfer import human_size

    models = ModelSelection(
        dinov2=args.dinov2, dinov2_checkpoint=args.dinov2_checkpoint, sam=args.sam,
        sam_checkpoint=args.sam_checkpoint, input_size=args.input_size,
    )
    engine = Engine(
        models, preset=args.preset, device=args.device, cca=args.cca, download=not args.no_download,
        weights_home=args.weights_home, batch_size=args.batch_size, precision=getattr(args, "precision", "auto"),
        propagation=getattr(args, "propagation", catalogue.DEFAULT_PROPAGATION),
        download_progress=ProgressBar("download", format_count=human_size) if not args.no_download else None,
    )
    print(f"protosam: {engine.precision_note}", file=sys.stderr)  # what "auto" chose, and why
    return engine


def _parse_labels(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        shown = text if len(text) <= 60 else f"{text[:60]}... ({len(text):,} characters)"
        raise InputError(f"--labels must be comma-separated integers such as 1,3,6; got {shown!r}") from None
    if not labels or any(label <= 0 for label in labels):
        raise InputError("--labels must list positive label values such as 1,3,6.")
    return labels


@dataclass
class SegmentInputs:
    """A checked ``segment`` job: ``[k, j, i]`` arrays as read, and what to propagate.

    ``support`` is None when the labels were painted on ``query`` itself; ``labelmap`` (any
    integer or whole-number dtype) has the support's shape; ``labels`` lists the label values
    to propagate, first = wins overlaps; ``geometry``: the orientation keywords of
    :func:`protosam.segment_volume` (``query_ijk_to_ras``, ``support_ijk_to_ras``: (4, 4) RAS
    matrices from the files' LPS headers, ``plane``: resolved, never "auto"), so that the
    engine slices in its canonical order (:mod:`protosam.orientation`) and hands back masks in
    the files' own order.
    """

    query: np.ndarray
    support: Optional[np.ndarray]
    labelmap: np.ndarray
    labels: List[int]
    geometry: Dict[str, object]


def read_segment_inputs(image, support_mask, *, support_image=None, labels: Optional[str] = None,
                        plane: str = "auto", read=None):
    """Read and check the volumes of a ``segment`` job -> (:class:`SegmentInputs`, the image's sitk header).

    No torch import. ``labels``: comma-separated text as typed (None: every label of the mask).
    ``read(path, what)`` replaces :func:`protosam.io.read_volume` (``protosam batch`` reuses one
    support that way). The file checks of :func:`protosam.io.check_segment_paths` come first.
    """
    from ..io import MAX_LABEL_VALUE, check_same_geometry, read_volume, same_file
    from ..orientation import choose_plane, ijk_to_ras_from_lps
    from ..validation import support_labels

    read = read or read_volume
    requested = _parse_labels(labels)
    query, query_image = read(image, "image")
    _check_finite_file(query, "--image", image)
    same = support_image is None or same_file(support_image, image)
    support, support_header = (query, query_image) if same else read(support_image, "support image")
    if not same:
        _check_finite_file(support, "--support-image", support_image)
    labelmap, labelmap_image = read(support_mask, "support mask")
    check_same_geometry(support_header, labelmap_image, "support image", "support mask")
    chosen = support_labels(
        labelmap, requested, mask_option="--support-mask", mask_path=support_mask,
        image_option="--image" if support_image is None else "--support-image",
        max_value=MAX_LABEL_VALUE, image_values=lambda: np.unique(support),
    )
    def ijk_to_ras(header):
        return ijk_to_ras_from_lps(header.GetDirection(), header.GetSpacing(), header.GetOrigin())

    query_ijk_to_ras = ijk_to_ras(query_image)
    geometry = {"query_ijk_to_ras": query_ijk_to_ras, "support_ijk_to_ras": None if same else ijk_to_ras(support_header),
                "plane": choose_plane(query_ijk_to_ras, plane)}
    return SegmentInputs(query, None if same else support, labelmap, chosen, geometry), query_image


def read_query_inputs(image, *, plane: str = "auto", read=None):
    """The volume to segment alone (a run from the bank with no support mask) -> (SegmentInputs, header)."""
    from ..io import read_volume
    from ..orientation import choose_plane, ijk_to_ras_from_lps
    query, header = (read or read_volume)(image, "image")
    if np.issubdtype(query.dtype, np.floating):
        from ..validation import check_finite

        check_finite(query, f"--image {image}")
    ijk_to_ras = ijk_to_ras_from_lps(header.GetDirection(), header.GetSpacing(), header.GetOrigin())
    geometry = {"query_ijk_to_ras": ijk_to_ras, "support_ijk_to_ras": None, "plane": choose_plane(ijk_to_ras, plane)}
    return SegmentInputs(query, None, np.zeros((1, 1, 1), np.uint8), [], geometry), header


def _check_finite_file(array: np.ndarray, option: str, path) -> None:
    """NaN or infinite voxels in a float image: refused here, before any model loads, naming the file."""
    if np.issubdtype(array.dtype, np.floating):
        from ..validation import check_finite

        check_finite(array, f"{option} {path}")


def check_support_slices(inputs: SegmentInputs, support_slice, mask_path) -> None:
    """``--support-slice`` against the support label map, before any model loads: every index
    lies inside the support's slices along its slicing axis and every label is painted on it.

    ``support_slice``: as :func:`parse_support_slices` returns it, or None (nothing to check).
    Slice numbers are the file's own, along the axis :func:`propagate_labels` slices.
    """
    if support_slice is None or support_slice == "painted":
        return
    from ..orientation import canonical_orientation
    from ..validation import format_values

    geometry = inputs.geometry
    axis = canonical_orientation(geometry["support_ijk_to_ras"] if geometry["support_ijk_to_ras"] is not None
                                 else geometry["query_ijk_to_ras"], geometry["plane"]).slice_axis
    count = inputs.labelmap.shape[axis]
    outside = [index for index in support_slice if not 0 <= index < count]
    if outside:
        raise InputError(
            f"--support-slice {format_values(outside)} is outside the support's {count} {geometry['plane']} slices "
            f"(0..{count - 1}): give slice indices in that range, or 'painted'.")
    other_axes = tuple(a for a in range(3) if a != axis)
    for label in inputs.labels:
        painted = (inputs.labelmap == label).any(axis=other_axes)
        missing = [index for index in support_slice if not painted[index]]
        if missing:
            where = np.flatnonzero(painted).tolist()
            raise InputError(
                f"Label {label} of --support-mask {mask_path} is not painted on support slice(s) "
                f"{format_values(missing)}; it is painted on slice(s) {format_values(where)}. Give --support-slice "
                "slices where every label is painted, 'painted', or pick labels with --labels.")


def parse_support_slices(text: str):
    """``--support-slice``: ``"painted"`` or comma-separated slice indices -> "painted" or [int]."""
    if text.strip().lower() == "painted":
        return "painted"
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        indices = []
    if not indices or min(indices) < 0:
        raise argparse.ArgumentTypeError(
            f"--support-slice takes 'painted' or slice indices like 12,30,41, not {text!r}"
        )
    return indices


def propagate_labels(engine, inputs: SegmentInputs, *, support_slice=None, support_mode: str = "nearest",
                     modality: str = "auto", progress=None, cancel: Optional[threading.Event] = None,
                     exclusive: bool = False, examples: Optional[Dict[int, list]] = None, similar_k: int = 3):
    """Propagate every label of ``inputs`` -> (``[k, j, i]`` uint8/uint16 label map, :class:`VolumeResult`).

    ``support_slice``: None (each label's largest slice), a slice index or indices along the
    slicing axis (the same for every label), or ``"painted"`` (every slice each label is
    painted on); ``support_mode``: "nearest", "all" or "similar" (see ``segment_volume``);
    ``examples``: label -> :class:`protosam.propagation.SupportExample` list (an example
    bank's), used with the label's support mask or alone; ``similar_k``: see ``segment_volume``.

    Where labels overlap the one listed first keeps the voxel; with ``exclusive`` the overlap
    is settled before that, voxel by voxel, by the highest refined mask probability (ties: the
    label listed first; see ``segment_volume``). Within one volume the painted support slices
    are kept exactly as painted.
    """
    from ..propagation import segment_volume

    labels, labelmap = inputs.labels, inputs.labelmap
    support_slices = None
    if isinstance(support_slice, str) and support_slice == "painted":
        from ..orientation import canonical_orientation

        geometry = inputs.geometry
        support_axis = canonical_orientation(geometry["support_ijk_to_ras"] if geometry["support_ijk_to_ras"] is not None
                                             else geometry["query_ijk_to_ras"], geometry["plane"]).slice_axis
        other_axes = tuple(a for a in range(3) if a != support_axis)
        support_slices = {label: np.flatnonzero((labelmap == label).any(axis=other_axes)).tolist() for label in labels}
    elif support_slice is not None:
        support_slices = {label: support_slice for label in labels}
    result = segment_volume(
        engine, inputs.query, inputs.support, {label: labelmap == label for label in labels},
        support_slices=support_slices, support_mode=support_mode, modality=modality, progress=progress,
        cancel=cancel, exclusive=exclusive, examples=examples, similar_k=similar_k, **inputs.geometry,
    )
    labels = list(labels) + [label for label in result.masks if label not in labels]
    axis = result.axis  # the files' array axis of the plane
    output = np.zeros(inputs.query.shape, np.uint16 if max(labels) > 255 else np.uint8)
    # Overlaps: the label listed first keeps the voxel ...
    for label in reversed(labels):
        output[result.masks[label] > 0] = label
    # ... but what the user painted always wins over what was propagated.
    if inputs.support is None:
        for label in labels:
            for k in result.support_slices[label]:
                index = (slice(None),) * axis + (k,)
                painted = labelmap[index] == label
                output[index][painted] = label
    return output, result
