"""The ``protosam`` command line: ``slices``, ``segment``, ``batch``, ``weights``, ``evaluate``, ``demo``.

Exit codes: 0 success, 1 a ProtoSAM error (message on stderr, no partial output file),
2 bad command-line usage, 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, TextIO

import numpy as np

from . import __version__
from .errors import CancelledError, InputError, ProtoSAMError

logger = logging.getLogger(__name__)

__all__ = [
    "main", "build_parser", "ProgressBar", "add_model_options", "engine_from_args", "SegmentInputs",
    "read_segment_inputs", "propagate_labels",
]


class ProgressBar:
    """A one-line text progress bar with time left, for stderr."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 28):
        self.label, self.stream, self.width = label, stream, width
        self.started = time.perf_counter()
        self._last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        fraction = done / total if total else 1.0
        elapsed = now - self.started
        left = elapsed / fraction - elapsed if fraction > 0 else float("nan")
        bar = "#" * int(round(fraction * self.width))
        self.stream.write(f"\r{self.label} [{bar:<{self.width}}] {done}/{total}  {left:5.0f} s left ")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def add_model_options(parser: argparse.ArgumentParser, *, default_size: int = 672) -> None:
    """The model/preset/device options shared by every command that runs the engine."""
    group = parser.add_argument_group("models")
    group.add_argument("--preset", default="default", choices=["default", "paper"],
                       help="'paper' reproduces the published reference exactly; 'default' is tuned for use")
    group.add_argument("--dinov2", default="dinov2_vitb14", help="DINOv2 architecture (see 'protosam weights list')")
    group.add_argument("--dinov2-checkpoint", default=None, metavar="FILE", help="DINOv2 checkpoint file (official format)")
    group.add_argument("--sam", default="vit_b", help="vit_b, vit_l, vit_h or medsam_vit_b")
    group.add_argument("--sam-checkpoint", default=None, metavar="FILE", help="SAM/MedSAM checkpoint file (official format)")
    group.add_argument("--input-size", type=int, default=default_size, help="ALPNet/DINOv2 input size S (multiple of 14)")
    group.add_argument("--cca", action="store_true", default=None, help="keep only the largest coarse component")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    group.add_argument("--batch-size", type=int, default=None, help="slices per encoder call (default 8 on CUDA, 1 on CPU)")
    group.add_argument("--no-download", action="store_true", help="never download weights; fail with instructions instead")
    group.add_argument("--weights-home", default=None, metavar="DIR", help="weights cache folder (default $PROTOSAM_HOME or ~/.protosam)")


def engine_from_args(args):
    """An :class:`Engine` from the options of :func:`add_model_options`."""
    from .pipeline import Engine, ModelSelection

    models = ModelSelection(
        dinov2=args.dinov2, dinov2_checkpoint=args.dinov2_checkpoint, sam=args.sam,
        sam_checkpoint=args.sam_checkpoint, input_size=args.input_size,
    )
    return Engine(
        models, preset=args.preset, device=args.device, cca=args.cca, download=not args.no_download,
        weights_home=args.weights_home, batch_size=args.batch_size,
        download_progress=ProgressBar("download") if not args.no_download else None,
    )


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"The {what} file does not exist: {path}") from None
    except (ValueError, OSError) as exc:
        raise InputError(f"Cannot read the {what} {path} as a .npy array: {exc}") from exc


def _pad_prompts(prompts_per_query):
    """Prompt sets per query -> fixed-shape arrays padded with NaN / -1 (no pickles in the .npz)."""
    count = len(prompts_per_query)
    max_sets = max((len(p) for p in prompts_per_query), default=0)
    max_points = max((len(s.points) for p in prompts_per_query for s in p), default=0)
    boxes = np.full((count, max_sets, 4), np.nan, np.float64)
    points = np.full((count, max_sets, max_points, 2), np.nan, np.float64)
    labels = np.full((count, max_sets, max_points), -1, np.int64)
    for q, sets in enumerate(prompts_per_query):
        for c, prompt in enumerate(sets):
            boxes[q, c] = prompt.box
            points[q, c, : len(prompt.points)] = prompt.points
            labels[q, c, : len(prompt.points)] = prompt.point_labels
    return boxes, points, labels, np.array([len(p) for p in prompts_per_query], np.int64)


def cmd_slices(args) -> int:
    from .io import check_input_file, check_output_file, save_npz_atomic

    inputs = {"--support-image": args.support_image, "--support-mask": args.support_mask, "--queries": args.queries}
    for option, path in inputs.items():
        check_input_file(path, option)
    check_output_file(args.out, "--out", inputs)
    support_image = _load_npy(args.support_image, "support image")
    support_mask = _load_npy(args.support_mask, "support mask")
    queries = _load_npy(args.queries, "queries")
    if queries.ndim == 2:
        queries = queries[None]
    engine = engine_from_args(args)
    result = engine.segment_slices(
        support_image, support_mask, queries, coarse_only=args.coarse_only, progress=ProgressBar("slices")
    )
    boxes, points, point_labels, num_components = _pad_prompts(result.prompts)
    save_npz_atomic(
        args.out, coarse_prob=result.coarse_prob, coarse_mask=result.coarse_mask, mask=result.mask,
        boxes=boxes, points=points, point_labels=point_labels, num_components=num_components,
    )
    print(f"wrote {args.out}: {len(queries)} slices, {int(result.mask.sum())} foreground pixels")
    return 0


def _parse_labels(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--labels must be comma-separated integers such as 1,3,6; got {text!r}") from None
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
    from .io import MAX_LABEL_VALUE, check_same_geometry, read_volume, same_file
    from .orientation import choose_plane, ijk_to_ras_from_lps
    from .validation import support_labels

    read = read or read_volume
    requested = _parse_labels(labels)
    query, query_image = read(image, "image")
    same = support_image is None or same_file(support_image, image)
    support, support_header = (query, query_image) if same else read(support_image, "support image")
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
                     modality: str = "auto", progress=None, cancel: Optional[threading.Event] = None):
    """Propagate every label of ``inputs`` -> (``[k, j, i]`` uint8/uint16 label map, :class:`VolumeResult`).

    ``support_slice``: None (each label's largest slice), a slice index or indices along the
    slicing axis (the same for every label), or ``"painted"`` (every slice each label is
    painted on); ``support_mode``: "nearest" or "all" (see ``segment_volume``).

    Where labels overlap the one listed first keeps the voxel; within one volume the painted
    support slices are kept exactly as painted.
    """
    from .propagation import segment_volume

    labels, labelmap = inputs.labels, inputs.labelmap
    support_slices = None
    if isinstance(support_slice, str) and support_slice == "painted":
        from .orientation import canonical_orientation

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
        cancel=cancel, **inputs.geometry,
    )
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


def cmd_segment(args) -> int:
    # Everything that can be checked without the models is checked first, without importing
    # torch (seconds): files, output place, labels. Only then are the models loaded.
    from .io import check_segment_paths, write_labelmap

    check_segment_paths(args.image, args.support_mask, args.output, args.support_image, args.report)
    inputs, query_image = read_segment_inputs(
        args.image, args.support_mask, support_image=args.support_image, labels=args.labels, plane=args.axis
    )
    engine = engine_from_args(args)
    cancel = threading.Event()
    output, result = propagate_labels(
        engine, inputs, support_slice=args.support_slice, support_mode=args.support_mode, modality=args.modality,
        progress=ProgressBar("segment"), cancel=cancel,
    )
    write_labelmap(output, query_image, args.output)
    try:
        if args.report:
            from .evaluation.pictures import axial_display_flips
            from .evaluation.report import write_segment_report

            axis = result.axis
            flip_rows, flip_cols = axial_display_flips(query_image.GetDirection()) if axis == 0 else (False, False)
            write_segment_report(
                args.report, query=inputs.query, labels=output, axis=axis, result=result, support=inputs.support,
                support_labels={label: inputs.labelmap == label for label in inputs.labels},
                flip_rows=flip_rows, flip_cols=flip_cols,
            )
    except KeyboardInterrupt:
        print(f"protosam: interrupted while writing the report; {args.output} was written, "
              f"the report in {args.report} is incomplete.", file=sys.stderr)
        return 130
    for label in inputs.labels:
        print(f"label {label}: {int(result.masks[label].sum())} voxels on {len(result.processed_slices[label])} "
              f"processed slices (support slice {result.support_slices[label]})")
    print(f"wrote {args.output} in {result.seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import weights_cli

    parser = argparse.ArgumentParser(
        prog="protosam", description="ProtoSAM one-shot segmentation: DINOv2 + ALPNet prototypes prompt SAM."
    )
    parser.add_argument("--version", action="version", version=f"protosam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    slices = commands.add_parser("slices", help="segment 2-D query slices from one support slice (.npy in, .npz out)")
    slices.add_argument("--support-image", required=True, metavar="S.npy", help="H x W float32, preprocessed")
    slices.add_argument("--support-mask", required=True, metavar="M.npy", help="H x W, non-zero = structure")
    slices.add_argument("--queries", required=True, metavar="Q.npy", help="N x H x W float32, preprocessed")
    slices.add_argument("--coarse-only", action="store_true", help="skip SAM: mask = coarse ALPNet mask")
    slices.add_argument("--out", required=True, metavar="R.npz")
    add_model_options(slices)
    slices.set_defaults(func=cmd_slices)

    segment = commands.add_parser("segment", help="propagate labels of a support volume through a volume")
    segment.add_argument("--image", required=True, help="volume to segment (NIfTI, NRRD, ...)")
    segment.add_argument("--support-image", default=None, help="volume the support labels were drawn on (default: --image)")
    segment.add_argument("--support-mask", required=True, help="label map on the support image's grid")
    segment.add_argument("--labels", default=None, help="comma-separated labels to propagate (default: all)")
    segment.add_argument(
        "--support-slice", type=parse_support_slices, default=None, metavar="K[,K...]|painted",
        help="support slice indices along the support's slicing axis, in the file's own voxel order, or 'painted' "
             "for every painted slice of each label "
             "(default: the slice where each label is largest)",
    )
    segment.add_argument(
        "--support-mode", default="nearest", choices=["nearest", "all"],
        help="with several support slices: each slice uses the nearest one's prototypes (default), or all pooled",
    )
    segment.add_argument("--axis", default="auto", choices=["auto", "axial", "coronal", "sagittal"],
                         help="slicing plane (auto: the coarsest-spacing axis, axial when isotropic)")
    segment.add_argument("--modality", default="auto", choices=["auto", "ct", "mri", "none"])
    segment.add_argument("--output", required=True, help="output label map (same geometry as --image)")
    segment.add_argument("--report", default=None, metavar="DIR", help="also write overlay pictures into DIR")
    add_model_options(segment)
    segment.set_defaults(func=cmd_segment)

    weights_cli.add_subcommands(commands)
    from . import batch, worker_process

    batch.add_subcommand(commands)
    worker = commands.add_parser("worker", help="persistent worker process of a ProtoSAM client (started by Slicer)")
    worker_process.build_parser(worker).set_defaults(func=worker_process.cli_serve)
    from . import server

    serve = commands.add_parser("serve", help="ProtoSAM server for remote Slicer workstations (needs ProtoSAMLib[serve])")
    server.build_parser(serve).set_defaults(func=server.cli_serve)
    try:
        from .evaluation import cli as evaluation_cli
    except ImportError:  # pragma: no cover - only while the evaluation package is absent
        evaluation_cli = None
    if evaluation_cli is not None:
        evaluation_cli.add_subcommands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CancelledError as exc:
        print(f"protosam: cancelled: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("protosam: interrupted; no output was written.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ProtoSAMError, ValueError) as exc:
        print(f"protosam: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
