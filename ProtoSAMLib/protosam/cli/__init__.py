"""The ``protosam`` command line: ``slices``, ``segment``, ``batch``, ``examples``, ``weights``, ``evaluate``, ``demo``.

Exit codes: 0 success, 1 a ProtoSAM error (message on stderr, no partial output file),
2 bad command-line usage, 130 interrupted.

The package holds every command: this module the parser, ``slices`` and ``segment``;
:mod:`.common` what the commands share (model options, engine, file pipeline, progress);
:mod:`.batch`, :mod:`.weights`, :mod:`.evaluate` (``evaluate`` and ``demo``) and :mod:`.serve`
the other commands. ``protosam worker`` is the worker process's own entry
(:mod:`protosam.serving.worker_process`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Optional, Sequence

import numpy as np

from .. import __version__
from .common import (
    ProgressBar, add_label_options, add_model_options, check_support_slices, engine_from_args, propagate_labels,
    read_segment_inputs,
)
from ..errors import CancelledError, InputError, ProtoSAMError

logger = logging.getLogger(__name__)

__all__ = ["main", "build_parser"]


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
    from ..io import check_input_file, check_writable, save_npz_atomic

    inputs = {"--support-image": args.support_image, "--support-mask": args.support_mask, "--queries": args.queries}
    for option, path in inputs.items():
        check_input_file(path, option)
    check_writable(args.out, "--out", inputs)
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


def cmd_segment(args) -> int:
    # Everything that can be checked without the models is checked first, without importing
    # torch (seconds): files, output place, labels. Only then are the models loaded.
    from ..io import check_segment_paths, write_labelmap

    from ..examples.runs import bank_supports, open_bank_for_run, structure_labels
    from .common import read_query_inputs

    if args.support_mask is None and args.examples is None:
        raise InputError("Give the support labels (--support-mask), an example bank (--examples BANK), or both.")
    if args.support_mask is None and args.report:
        raise InputError("--report shows the support slices next to the result: it needs --support-mask.")
    check_segment_paths(args.image, args.support_mask, args.output, args.support_image, args.report)
    if args.review_json:
        _check_review_json(args)
    bank, bank_labels = None, {}
    if args.examples is not None:
        bank = open_bank_for_run(args.examples, {"--output": args.output, "--report": args.report})
    if args.support_mask is None:
        inputs, query_image = read_query_inputs(args.image, plane=args.axis)
    else:
        inputs, query_image = read_segment_inputs(
            args.image, args.support_mask, support_image=args.support_image, labels=args.labels, plane=args.axis
        )
        check_support_slices(inputs, args.support_slice, args.support_mask)
    if bank is not None:
        bank_labels = structure_labels(bank.structures(), args.structures, inputs.labels)
    engine = engine_from_args(args)
    examples = bank_supports(bank, bank_labels, inputs.geometry["plane"], engine) if bank else None
    cancel = threading.Event()
    output, result = propagate_labels(
        engine, inputs, support_slice=args.support_slice, support_mode=args.support_mode, modality=args.modality,
        progress=ProgressBar("segment"), cancel=cancel, exclusive=args.exclusive, examples=examples,
        similar_k=args.similar_k,
    )
    write_labelmap(output, query_image, args.output)
    try:
        if args.report:
            from ..evaluation.pictures import axial_display_flips
            from ..evaluation.segment_report import write_segment_report

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
    for label in result.masks:
        supports = f"support slice {result.support_slices[label]}" if result.support_slices[label] else ""
        if examples and label in examples:
            supports += (" and " if supports else "") + f"{len(examples[label])} bank example(s) of " \
                                                         f"'{bank_labels[label]}'"
        confidence = result.structure_confidence.get(label)
        print(f"label {label}: {int(result.masks[label].sum())} voxels on {len(result.processed_slices[label])} "
              f"processed slices ({supports})" + ("" if confidence is None else f", confidence {confidence:.2f}"))
    _print_review(result, args.review_json)
    print(f"wrote {args.output} in {result.seconds:.1f} s")
    return 0


# Least confident slices ``segment`` prints (--review-json writes them all).
PRINTED_REVIEW_SLICES = 5


def _check_review_json(args) -> None:
    """--review-json may be written: not an input, not the output, in a writable folder."""
    from ..io import WritePlan, labelmap_files

    plan = WritePlan()
    for option in ("image", "support_image", "support_mask"):
        plan.read("--" + option.replace("_", "-"), getattr(args, option))
    plan.write("--output", args.output, labelmap_files(args.output))
    plan.write("--review-json", args.review_json)
    plan.check()


def _print_review(result, review_json) -> None:
    """Print the volume's confidence and its least confident slices; write them all to
    ``review_json`` (atomically) when given."""
    import json

    from ..confidence import review_record

    if result.volume_confidence is None:
        return
    record = review_record(result)
    shown = ", ".join(f"{item['structure']}@{item['slice']} {item['score']:.2f}"
                      for item in record["slices"][:PRINTED_REVIEW_SLICES])
    print(f"confidence {record['volume']:.2f}; least confident slices (label@slice along {record['slice_axis']}): "
          f"{shown or 'none'}")
    if review_json:
        from ..io import atomic_output

        with atomic_output(review_json) as temporary:
            temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
        print(f"wrote the review list to {review_json}")


def build_parser() -> argparse.ArgumentParser:
    from . import weights as weights_cli

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
    add_model_options(slices, propagation=False)  # slices, not volumes: nothing to walk
    slices.set_defaults(func=cmd_slices)

    segment = commands.add_parser("segment", help="propagate labels of a support volume through a volume")
    segment.add_argument("--image", required=True, help="volume to segment (NIfTI, NRRD, ...)")
    segment.add_argument("--support-image", default=None, help="volume the support labels were drawn on (default: --image)")
    segment.add_argument("--support-mask", default=None,
                         help="label map on the support image's grid (optional with --examples)")
    add_label_options(segment)
    segment.add_argument(
        "--support-mode", default="nearest", choices=["nearest", "all", "similar"],
        help="with several support slices: each slice uses the nearest one's prototypes (default), all pooled, or "
             "the --similar-k most similar ones pooled (cosine of mean encoder features)",
    )
    from .examples import add_examples_options

    add_examples_options(segment)
    segment.add_argument(
        "--exclusive", action="store_true",
        help="give each voxel to at most one label: the one whose refined mask probability is highest there "
             "(ties: the label listed first); without it the label listed first keeps every overlap",
    )
    segment.add_argument("--output", required=True, help="output label map (same geometry as --image)")
    segment.add_argument("--report", default=None, metavar="DIR", help="also write overlay pictures into DIR")
    segment.add_argument("--review-json", default=None, metavar="FILE",
                         help="also write the confidence of the volume, of each label and of every scored slice, "
                              "least confident first, as JSON (docs/cohorts.md)")
    add_model_options(segment)
    segment.set_defaults(func=cmd_segment)

    weights_cli.add_subcommands(commands)
    from . import examples as examples_cli

    examples_cli.add_subcommands(commands)
    from . import batch as batch_cli
    from ..serving import worker_process

    batch_cli.add_subcommand(commands)
    worker = commands.add_parser("worker", help="persistent worker process of a ProtoSAM client (started by Slicer)")
    worker_process.build_parser(worker).set_defaults(func=worker_process.cli_serve)
    from . import serve as server

    serve = commands.add_parser("serve", help="ProtoSAM server for remote Slicer workstations (needs ProtoSAMLib[serve])")
    server.build_parser(serve).set_defaults(func=server.cli_serve)
    try:
        from . import evaluate as evaluation_cli
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
