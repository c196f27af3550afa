"""``protosam examples add|list|remove|export`` and the ``--examples BANK`` option of
``segment`` and ``batch`` (docs/cohorts.md, "Teach once")."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import InputError

__all__ = ["add_subcommands", "add_examples_options"]


# ----------------------------------------------------------------------------- --examples
def add_examples_options(parser: argparse.ArgumentParser) -> None:
    """``--examples``, ``--structures`` and ``--similar-k`` of ``segment`` and ``batch``."""
    parser.add_argument("--examples", default=None, metavar="BANK",
                        help="example bank folder ('protosam examples'): its examples are supports too; with it "
                             "--support-mask is optional")
    parser.add_argument("--structures", default=None, metavar="NAME[=LABEL],...",
                        help="bank structures to segment and their output labels (default: every structure; a "
                             "structure named by a number keeps that label, the others get the next free ones); a "
                             "--support-mask label with the same number is used together with it")
    parser.add_argument("--similar-k", type=int, default=3, metavar="K",
                        help="with --support-mode similar: how many supports each slice pools (default 3)")


# ----------------------------------------------------------------------------- the commands
def _slices(text: str):
    if text.strip().lower() == "painted":
        return "painted"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--slices takes 'painted' or slice indices like 12,30, not {text!r}")
    return values


def cmd_add(args) -> int:
    from ..examples import ExampleBank
    from ..io import WritePlan, check_input_file
    from ..orientation import canonical_orientation
    from ..preprocessing import guess_modality, normalize_volume
    from .common import read_segment_inputs

    for option, path in (("--image", args.image), ("--label-map", args.label_map)):
        check_input_file(path, option)
    WritePlan().read("--image", args.image).read("--label-map", args.label_map).write_folder("BANK", args.bank).check()
    inputs, _ = read_segment_inputs(args.image, args.label_map, labels=args.labels, plane=args.axis)
    names = [n.strip() for n in args.names.split(",")] if args.names else [str(label) for label in inputs.labels]
    if len(names) != len(inputs.labels) or not all(names):
        raise InputError(f"--names gives {len(names)} name(s) for {len(inputs.labels)} label(s) "
                         f"({', '.join(map(str, inputs.labels))}): give one name per label, in --labels order.")
    plane = inputs.geometry["plane"]
    orientation = canonical_orientation(inputs.geometry["query_ijk_to_ras"], plane)
    # As segment_volume reads it (contiguous float32), so the normalised slices are the same bits.
    canonical = np.ascontiguousarray(orientation.to_canonical(inputs.query), np.float32)
    modality = guess_modality(canonical) if args.modality == "auto" else args.modality
    normalised = normalize_volume(canonical, modality)
    labelmap = orientation.to_canonical(inputs.labelmap)
    count = normalised.shape[0]
    bank = ExampleBank(args.bank)
    added = []
    for label, name in zip(inputs.labels, names):
        mask = labelmap == label
        painted = np.flatnonzero(mask.reshape(count, -1).any(axis=1)).tolist()
        if args.slices == "painted":
            chosen = painted
        else:
            outside = [k for k in args.slices if not 0 <= k < count]
            if outside:
                raise InputError(f"--slices {outside} is outside the image's {count} {plane} slices (0..{count - 1}).")
            chosen = [orientation.canonical_slice(k, count) for k in args.slices]
            empty = [orientation.stored_slice(k, count) for k in chosen if k not in painted]
            if empty:
                raise InputError(f"Label {label} is not painted on slice(s) {empty} of --label-map: an example is a "
                                 "slice showing the whole structure. Give painted slices or 'painted'.")
        added += bank.add_slices(name, normalised, mask, chosen, plane=plane, terminology=args.terminology,
                                 modality=modality)
    print(f"added {len(added)} example(s) to {args.bank}: " + ", ".join(
        f"{name} {count}" for name, count in bank.structures().items()))
    return 0


def cmd_list(args) -> int:
    from ..examples import ExampleBank

    bank = ExampleBank(args.bank, create=False)
    examples = bank.list(args.structure)
    if args.json:
        print(json.dumps([e.to_json() for e in examples], indent=1))
        return 0
    counts = bank.structures()
    if not counts:
        print(f"{args.bank}: no examples")
        return 0
    for name, count in counts.items():
        if args.structure is None or name == args.structure:
            print(f"{name}: {count} example(s)")
    if args.all:
        for e in examples:
            where = e.plane or f"axis {e.axis}"
            print(f"  {e.id}  {e.structure}  {where} slice {e.slice_index}/{e.slice_count} "
                  f"({e.relative_position:.2f})  {e.shape[0]}x{e.shape[1]}  volume {e.volume_hash[:12]}"
                  + (f"  {e.terminology}" if e.terminology else ""))
    return 0


def cmd_remove(args) -> int:
    from ..examples import ExampleBank

    if not args.ids and args.structure is None:
        raise InputError("Say what to remove: example ids ('protosam examples list --all') or --structure NAME.")
    bank = ExampleBank(args.bank, create=False)
    if args.structure is not None and args.structure not in bank.structures():
        raise InputError(f"The bank has no structure '{args.structure}'.")
    removed = bank.remove(args.ids, structure=args.structure)
    print(f"removed {len(removed)} example(s) from {args.bank}")
    return 0


def cmd_export(args) -> int:
    from ..examples import ExampleBank
    from ..io import WritePlan

    bank = ExampleBank(args.bank, create=False)
    plan = WritePlan().read("BANK", args.bank, folder=True)
    destination = Path(args.destination)
    if destination.suffix.lower() == ".zip":
        plan.write("DESTINATION", destination)
    else:
        plan.write_folder("DESTINATION", destination)
    plan.check()
    if Path(args.bank).resolve() in destination.resolve().parents:
        raise InputError(f"{destination} is inside the bank {args.bank}: export it elsewhere.")
    structures = [s.strip() for s in args.structures.split(",")] if args.structures else None
    bank.export(destination, structures=structures)
    print(f"exported {len(ExampleBank(destination).list()) if destination.suffix.lower() != '.zip' else 'the'} "
          f"example(s) to {destination}")
    return 0


def add_subcommands(commands) -> None:
    """Register ``protosam examples`` with its sub-commands."""
    examples = commands.add_parser("examples", help="the example bank: supports kept across scans (add, list, "
                                                    "remove, export)")
    actions = examples.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    add = actions.add_parser("add", help="add a label map's slices to a bank (made when missing)")
    add.add_argument("bank", metavar="BANK", help="the bank folder (a new or empty folder makes a bank)")
    add.add_argument("--image", required=True, help="the volume the labels were drawn on")
    add.add_argument("--label-map", required=True, help="label map on the image's grid: whole structures per slice")
    add.add_argument("--labels", default=None, help="comma-separated labels to add (default: all)")
    add.add_argument("--axis", default="auto", choices=["auto", "axial", "coronal", "sagittal"],
                     help="slicing plane (auto: the coarsest-spacing axis, axial when isotropic); a run uses the "
                          "examples of its own plane")
    add.add_argument("--modality", default="auto", choices=["auto", "ct", "mri", "none"],
                     help="intensity preprocessing, as for 'protosam segment'")
    add.add_argument("--slices", type=_slices, default="painted", metavar="K[,K...]|painted",
                     help="slices to add, in the file's own voxel order (default: every slice each label is painted "
                          "on)")
    add.add_argument("--names", default=None, metavar="NAME,...", help="structure name of each label, in --labels "
                                                                      "order (default: the label number)")
    add.add_argument("--terminology", default=None, metavar="TEXT", help="Slicer terminology string of the structure")
    add.set_defaults(func=cmd_add)
    listing = actions.add_parser("list", help="structures and example counts of a bank")
    listing.add_argument("bank", metavar="BANK")
    listing.add_argument("--structure", default=None, help="only this structure")
    listing.add_argument("--all", action="store_true", help="one line per example, with its id")
    listing.add_argument("--json", action="store_true", help="the examples as JSON")
    listing.set_defaults(func=cmd_list)
    remove = actions.add_parser("remove", help="remove examples by id, or a whole structure")
    remove.add_argument("bank", metavar="BANK")
    remove.add_argument("ids", nargs="*", metavar="ID")
    remove.add_argument("--structure", default=None, help="remove every example of this structure")
    remove.set_defaults(func=cmd_remove)
    export = actions.add_parser("export", help="copy a bank (or some structures) to a new folder or .zip")
    export.add_argument("bank", metavar="BANK")
    export.add_argument("destination", metavar="DESTINATION", help="a new folder, or a file ending in .zip")
    export.add_argument("--structures", default=None, metavar="NAME,...", help="only these structures")
    export.set_defaults(func=cmd_export)
