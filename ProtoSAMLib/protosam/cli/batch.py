"""The ``protosam batch`` command over :mod:`protosam.cohorts.batch` (local runner) and
:mod:`protosam.cohorts.ray_cluster` (``--ray``), which imports :mod:`protosam.cohorts.batch` itself."""
from __future__ import annotations

import argparse
import sys

from ..cohorts.batch import REVIEW_SLICES, default_summary_path, review_path, run_batch
from .common import add_label_options, add_model_options


def cmd_batch(args: argparse.Namespace) -> int:
    run_remote = None
    if args.ray is not None:
        from ..cohorts.ray_cluster import run_on_ray as run_remote  # Ray itself is imported only when a row is run
    summary = args.summary or default_summary_path(args.manifest)
    try:
        outcomes = run_batch(args, run_remote)
    except KeyboardInterrupt:
        # Finished rows are complete (output + sidecar), the row being computed was never
        # renamed into place, and run_batch wrote the summary on its way out.
        print(f"protosam: interrupted; finished volumes are kept and the summary ({summary}) lists "
              "the volume being computed as interrupted and the rest as not run. Run the same command again to "
              "resume.", file=sys.stderr)
        return 130
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; summary in {summary}, "
          f"least confident slices in {review_path(summary)}")
    for outcome in outcomes:
        if outcome.status == "failed":
            print(f"row {outcome.job.row} ({outcome.job.image}): {outcome.error}")
    return 1 if counts["failed"] else 0


def add_subcommand(commands) -> None:
    """Register ``protosam batch`` on the ``protosam`` sub-command parser."""
    batch = commands.add_parser(
        "batch", help="segment a cohort listed in a CSV manifest from one support example (resumable; --ray for a cluster)"
    )
    batch.add_argument("--manifest", required=True, metavar="jobs.csv",
                       help="CSV with columns image,output[,support_image,support_mask]; paths relative to it "
                            "(with --examples no support mask is needed)")
    batch.add_argument("--support-image", default=None, metavar="S",
                       help="volume the support labels were drawn on (default: each row's own image)")
    batch.add_argument("--support-mask", default=None, metavar="M", help="label map on the support image's grid")
    add_label_options(batch, every_row=True)
    batch.add_argument("--exclusive", action="store_true",
                       help="in every row, give each voxel to at most one label: the one whose refined mask probability "
                            "is highest there (ties: the label listed first), as 'protosam segment --exclusive'")
    batch.add_argument("--support-mode", default="nearest", choices=["nearest", "all", "similar"],
                       help="as for 'protosam segment'")
    from .examples import add_examples_options

    add_examples_options(batch)
    batch.add_argument("--summary", default=None, metavar="FILE", help="summary CSV (default: <manifest>.summary.csv beside it)")
    batch.add_argument("--review", type=int, default=REVIEW_SLICES, metavar="N",
                       help=f"list the N least confident slices of the cohort in <summary>.review.csv (default {REVIEW_SLICES})")
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray: no ADDRESS = connect to or start a local instance; 'auto', host:port or ray://...")
    batch.add_argument("--ray-cpus-per-worker", type=int, default=None, metavar="N",
                       help="CPUs per Ray worker (default: 1 beside each GPU; 4 on CPU-only clusters)")
    add_model_options(batch)
    batch.set_defaults(func=cmd_batch)
