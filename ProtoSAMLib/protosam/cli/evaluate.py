"""``protosam evaluate`` and ``protosam demo`` (registered by :func:`add_subcommands`)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from .. import catalogue
from ..errors import InputError

logger = logging.getLogger(__name__)

#: The paper's models and behaviour: DINOv2 ViT-L/14 + SAM ViT-H, ``paper`` preset.
EVALUATE_DEFAULTS = {"dinov2": catalogue.PAPER_DINOV2, "sam": catalogue.PAPER_SAM, "preset": "paper"}


def _model_options(parser: argparse.ArgumentParser) -> None:
    from .common import add_model_options  # one definition of the model options for all commands

    add_model_options(parser)


def _engine(args):
    from .common import engine_from_args

    return engine_from_args(args)


def _parse_range(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise InputError(f"--slices must look like FIRST:LAST (inclusive), e.g. 60:100; got {text!r}") from None
    if first < 0 or last < first:
        raise InputError(f"--slices {text}: need 0 <= FIRST <= LAST.")
    return first, last


def _print_progress(line: str) -> None:
    print(line, flush=True)


EVALUATE_FILES = ("summary.csv", "per_scan.csv", "per_slice.csv", "results.json", "table.txt")


def check_evaluate_paths(args) -> None:
    """Before any model loads: ``--out`` is a folder that can be made, not a data folder or a
    label-map file the evaluation reads (:class:`protosam.io.WritePlan`)."""
    from ..io import WritePlan

    out_dir = Path(args.out)
    plan = WritePlan()
    for option in ("data", "polyp_images", "polyp_masks", "support_images", "support_masks"):
        plan.read(f"--{option.replace('_', '-')}", getattr(args, option), folder=True)
    if args.label_map and Path(args.label_map).is_file():
        plan.read("--label-map", args.label_map)
    plan.write_folder("--out", out_dir, [out_dir / name for name in EVALUATE_FILES])
    plan.check()


def check_demo_paths(out_dir: Path, sample, option: str = "--out", files=()) -> None:
    """Before any model loads: the demo's output folder is not the sample's folder or file."""
    from ..io import WritePlan

    plan = WritePlan()
    for what, path in (("the sample image", sample.image), ("the sample labels", sample.labels),
                       ("the sample label names", sample.names)):
        plan.read(what, path)
    plan.read("the sample folder", Path(sample.image).parent, folder=True)
    plan.write_folder(option, out_dir, [out_dir / name for name in files])
    plan.check()


def check_interactive_paths(args) -> None:
    """Before any model loads: ``--out`` can be made and is not the data it reads."""
    from ..evaluation.interactive_report import RESULT_FILES
    from ..io import WritePlan

    out_dir = Path(args.out)
    plan = WritePlan()
    plan.read("--data", args.data, folder=Path(args.data).is_dir())
    if args.label_map and Path(args.label_map).is_file():
        plan.read("--label-map", args.label_map)
    plan.write_folder("--out", out_dir, [out_dir / name for name in RESULT_FILES])
    plan.check()
    if args.examples is not None:
        if args.interactive not in ("cohort", "all"):
            raise InputError("--examples BANK is the cohort track's example bank: use it with --interactive cohort "
                             "(or all).")
        bank, data = Path(args.examples).resolve(), Path(args.data).resolve()
        if bank == data or data in bank.parents:
            raise InputError(f"--examples {args.examples} lies inside --data: choose a bank folder outside the cases.")
        out = out_dir.resolve()
        if bank == out or bank in out.parents:
            raise InputError(f"--out {args.out} would be written inside the example bank {args.examples}: a bank "
                             "holds only its own files; choose another --out or bank folder.")


def cmd_evaluate_interactive(args) -> int:
    from ..evaluation.datasets import parse_label_map
    from ..evaluation.interactive import TrackOptions, discover_cases, run_track
    from ..evaluation.interactive_report import write_interactive_results

    if args.data is None:
        raise InputError("--interactive needs --data: a folder of challenge .npz cases (imgs, gts, spacing, boxes) "
                         "or of image/label volume pairs (NIfTI, NRRD).")
    if args.polyp_images is not None:
        raise InputError("--interactive evaluates 3-D volumes; polyp images are 2-D.")
    if args.clicks < 2:
        raise InputError("--clicks must be at least 2: the AUC is the area under the click steps.")
    check_interactive_paths(args)
    cases = discover_cases(Path(args.data), layout=args.layout, modality=args.modality)
    if args.max_cases is not None:
        cases = cases[:args.max_cases]
    names = {}
    classes = None
    if args.label_map is not None:
        names = {value: name for name, value in parse_label_map(args.label_map).items()}
        classes = sorted(names)
        if args.organs:
            wanted = [o.strip() for o in args.organs.split(",") if o.strip()]
            unknown = [o for o in wanted if o not in names.values()]
            if unknown:
                raise InputError(f"--organs {', '.join(unknown)} not in the label map ({', '.join(names.values())}).")
            classes = sorted(v for v, n in names.items() if n in wanted)
    engine = _engine(args)
    tracks = ("cvpr25", "one-shot", "cohort") if args.interactive == "all" else (args.interactive,)
    from ..evaluation.interactive import InteractiveResults
    from ..evaluation.report import package_versions

    results = InteractiveResults()
    for track in tracks:
        options = TrackOptions(track, clicks=args.clicks, box_seed=None if args.no_box_jitter else 2025,
                               modality=args.engine_modality, class_names=names, classes=classes)
        if track != "cohort":
            results.extend(run_track(engine, cases, options, progress=_print_progress))
            continue
        # The cohort's example bank: --examples, or a temporary one inside --out (removed after).
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as scratch:
            bank = args.examples if args.examples is not None else Path(
                scratch.enter_context(tempfile.TemporaryDirectory(prefix=".cohort-bank-", dir=args.out))) / "bank"
            cohort = run_track(engine, cases, options, examples=bank, progress=_print_progress)
        results.extend(cohort)
        results.meta.update({key: cohort.meta[key] for key in ("examples_after_volume", "examples_bank")})
    results.meta.update({
        "tracks": list(tracks), "data": str(args.data), "cases": [c.name for c in cases],
        "models": {"dinov2": args.dinov2, "sam": args.sam, "input_size": args.input_size},
        "preset": args.preset, "cca": bool(args.cca), "device": args.device, "versions": package_versions(),
        "protocol_source": "CVPR 2025 interactive challenge, JunMa11/CVPR-MedSegFMCompetition@748e862",
    })
    notice = args.report_notice
    if notice is None and ("tiny" in str(args.dinov2) or "tiny" in str(args.sam)):
        notice = ("These models are the test suite's tiny random-weight models: the numbers are meaningless; "
                  "the report shows the mechanics (interactions, scores, curves).")
    paths = write_interactive_results(results, Path(args.out), notice=notice)
    print()
    for case in results.cases:
        print(f"[{case.track}] {case.case}: DSC_AUC {case.dsc_auc:.3f} NSD_AUC {case.nsd_auc:.3f} "
              f"final DSC {case.dsc_final:.3f} NSD {case.nsd_final:.3f} ({case.seconds_total:.1f} s, "
              f"budget {case.budget_seconds:.0f} s{'' if case.within_budget else ' EXCEEDED'})")
    print(f"\nwrote {paths['per_step']}, per_class.csv, per_case.csv, results.json and {paths['html']}")
    return 0


def cmd_evaluate(args) -> int:
    from ..evaluation.polyp import run_polyp
    from ..evaluation.runner import AbdominalEvaluation, run_abdominal

    if args.interactive is not None:
        return cmd_evaluate_interactive(args)
    if (args.data is None) == (args.polyp_images is None):
        raise InputError("Give either --data (abdominal NIfTI scans) or --polyp-images/--polyp-masks.")
    out_dir = Path(args.out)
    check_evaluate_paths(args)
    engine = _engine(args)
    if args.polyp_images is not None:
        if args.polyp_masks is None:
            raise InputError("--polyp-images needs --polyp-masks.")
        report = run_polyp(engine, Path(args.polyp_images), Path(args.polyp_masks), out_dir, seed=args.seed,
                           support_images_dir=Path(args.support_images) if args.support_images else None,
                           support_masks_dir=Path(args.support_masks) if args.support_masks else None,
                           dataset_name=args.name, max_images=args.max_images, pictures=args.pictures,
                           progress=_print_progress)
    else:
        protocols = ("paper", "realistic") if args.protocol == "both" else (args.protocol,)
        organs = [o.strip() for o in args.organs.split(",") if o.strip()] if args.organs else None
        config = AbdominalEvaluation(
            data=Path(args.data), out_dir=out_dir, label_map=args.label_map or "synapse", organs=organs,
            layout=args.layout, fold=args.fold, n_folds=args.folds, support_scan=args.support_scan,
            protocols=protocols, n_chunks=args.chunks,
            normalization=None if args.normalize == "auto" else args.normalize,
            pictures=args.pictures, save_masks=args.save_masks, seed=args.seed,
        )
        report = run_abdominal(engine, config, progress=_print_progress)
    print()
    print(report.format_table())
    print(f"\nwrote {out_dir}/summary.csv, per_scan.csv, per_slice.csv, results.json, table.txt"
          + (f" and {len(report.meta.get('pictures', []))} pictures" if report.meta.get("pictures") else ""))
    return 0


def cmd_demo(args) -> int:
    from .common import ProgressBar
    from ..evaluation.demo import DEFAULT_STRUCTURES, run_demo
    from ..evaluation.pseudo_scans import build_pseudo_dataset
    from ..evaluation.sample_data import get_sample

    sample = get_sample(download=not args.no_sample_download,
                        cache_dir=Path(args.sample_dir) if args.sample_dir else None)
    print(f"sample data: {sample.image} + {sample.labels} ({sample.source})")
    if args.write_pseudo_dataset:
        check_demo_paths(Path(args.write_pseudo_dataset), sample, "--write-pseudo-dataset")
        description = build_pseudo_dataset(sample, Path(args.write_pseudo_dataset))
        print(f"wrote {len(description['scans'])} pseudo-scans (Synapse label map) to "
              f"{args.write_pseudo_dataset}; try: protosam evaluate --data {args.write_pseudo_dataset}")
        return 0
    structures = [s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else list(DEFAULT_STRUCTURES)
    check_demo_paths(Path(args.out), sample, files=("demo_segmentation.nii.gz", "demo_results.json", "pictures"))
    engine = _engine(args)
    result = run_demo(engine, Path(args.out), structures=structures, slice_range=_parse_range(args.slices),
                      sample=sample, progress=ProgressBar("demo"))
    for name in structures:
        print(f"{name}: support slice {result.support_slices[name]}, 3-D Dice {100 * result.dice_3d[name]:.1f}% "
              f"(2-D mean {100 * result.dice_2d_mean[name]:.1f}%), false-positive slices outside "
              f"{result.fp_slices_outside[name]}")
    print(f"wrote {result.segmentation}, {result.summary} and {len(result.pictures)} pictures in "
          f"{result.seconds:.1f} s")
    return 0


def add_subcommands(subparsers) -> None:
    """Register ``evaluate`` and ``demo`` on the ``protosam`` command's subparsers."""
    evaluate = subparsers.add_parser(
        "evaluate", help="reproduce the paper's evaluation on your data (abdominal NIfTI or polyp images)",
        description="One-shot evaluation as in the ProtoSAM / SSL-ALPNet papers. Defaults: DINOv2 ViT-L/14 + "
                    "SAM ViT-H with the 'paper' preset, fold 0, 3 support parts, Dice in 2-D and 3-D.")
    data = evaluate.add_argument_group("abdominal data (one NIfTI image + label per scan)")
    data.add_argument("--data", default=None, metavar="DIR",
                      help="image_<id>.nii.gz + label_<id>.nii.gz, or imagesTr/+labelsTr/, or images/+labels/")
    data.add_argument("--layout", default="auto", choices=["auto", "alpnet", "nnunet", "pairs"])
    data.add_argument("--label-map", default=None, metavar="NAME|JSON|FILE",
                      help="synapse (the default; spleen 1, RK 2, LK 3, liver 6), chaos (liver 1, RK 2, LK 3, "
                           "spleen 4), or a JSON object / file such as '{\"liver\": 6}'; with --interactive the "
                           "default is every label value, named by its number")
    data.add_argument("--organs", default=None, help="comma-separated subset of the label map (default all)")
    data.add_argument("--fold", type=int, default=0, help="fold index (support = first scan after the fold)")
    data.add_argument("--folds", type=int, default=5, help="number of folds")
    data.add_argument("--support-scan", default=None, metavar="ID", help="use this scan as support, all others as queries")
    data.add_argument("--protocol", default="paper", choices=["paper", "realistic", "both"],
                      help="paper: 3 support slices, query parts from its GT extent; realistic: one support slice, "
                           "whole-volume propagation, no GT extent")
    data.add_argument("--chunks", type=int, default=3, help="support parts of the paper protocol")
    interactive = evaluate.add_argument_group(
        "interactive tracks (CVPR 2025 challenge protocol; docs/evaluation.md)")
    interactive.add_argument("--interactive", default=None, choices=["cvpr25", "one-shot", "cohort", "all"],
                             help="cvpr25: box then 5 simulated clicks per class; one-shot: the GT mask of the "
                                  "median slice then 5 clicks; cohort: one example, growing with each corrected "
                                  "volume. --data: challenge .npz cases or image/label pairs")
    interactive.add_argument("--modality", default=None,
                             help="modality name for the report (default: the npz name's prefix, e.g. CT_, MR_)")
    interactive.add_argument("--engine-modality", default="auto", choices=["auto", "ct", "mri", "none"],
                             help="intensity preprocessing of the engine (as segment's --modality)")
    interactive.add_argument("--max-cases", type=int, default=None, help="only the first N cases")
    interactive.add_argument("--clicks", type=int, default=5,
                             help="simulated clicks per class (the challenge's 5; at least 2, for the AUC)")
    interactive.add_argument("--no-box-jitter", action="store_true",
                             help="boxes made from labels (image/label pairs) without get_boxes.py's 0-5 px jitter")
    interactive.add_argument("--examples", default=None, metavar="BANK",
                             help="cohort track: the example bank folder ('protosam examples') the corrected slices "
                                  "are added to and each next volume starts from (default: a temporary bank inside "
                                  "--out, removed at the end)")
    interactive.add_argument("--report-notice", default=None, help=argparse.SUPPRESS)
    data.add_argument("--normalize", default="auto", choices=["auto", "dataset", "volume", "none"],
                      help="z-score with the fold's dataset statistics (CT), per volume (MRI), or not; "
                           "auto: dataset for synapse, volume otherwise")
    polyp = evaluate.add_argument_group("polyp data (2-D images + masks)")
    polyp.add_argument("--polyp-images", default=None, metavar="DIR")
    polyp.add_argument("--polyp-masks", default=None, metavar="DIR")
    polyp.add_argument("--support-images", default=None, metavar="DIR", help="pick the support here (default: the test set)")
    polyp.add_argument("--support-masks", default=None, metavar="DIR")
    polyp.add_argument("--max-images", type=int, default=None, help="evaluate only the first N query images")
    polyp.add_argument("--name", default=None, help="data set name in the table (default: the folder's parent)")
    output = evaluate.add_argument_group("output")
    output.add_argument("--out", default="protosam-evaluation", metavar="DIR")
    output.add_argument("--pictures", default="first", choices=["none", "first", "all"],
                        help="overlay montages for the first query scan per organ, all, or none")
    output.add_argument("--save-masks", action="store_true", help="also write every predicted mask (NIfTI)")
    output.add_argument("--seed", type=int, default=0, help="random seed (polyp support choice; recorded)")
    _model_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate, **EVALUATE_DEFAULTS)

    demo = subparsers.add_parser(
        "demo", help="segment structures of the Colin27 sample brain from one slice each, with pictures",
        description="Runs ProtoSAM end to end on Colin27 + AAL (Debian package mricron-data, or a verified "
                    "download of it) and writes the segmentation, an overlay montage and a per-slice plot.")
    demo.add_argument("--out", default="protosam-demo", metavar="DIR")
    demo.add_argument("--structures", default=None,
                      help="comma-separated AAL region names (default Thalamus_L,Thalamus_R)")
    demo.add_argument("--slices", default=None, metavar="FIRST:LAST",
                      help="only process these axial slices (inclusive), for a quick run")
    demo.add_argument("--no-sample-download", action="store_true",
                      help="do not download the sample when mricron-data is not installed")
    demo.add_argument("--sample-dir", default=None, metavar="DIR", help="sample download cache folder")
    demo.add_argument("--write-pseudo-dataset", default=None, metavar="DIR",
                      help="only write a small Synapse-layout dataset cut from the sample (for 'evaluate') and exit")
    _model_options(demo)
    demo.set_defaults(func=cmd_demo)
