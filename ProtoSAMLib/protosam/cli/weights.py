"""``protosam weights list|download|path``: manage the pretrained checkpoints from a shell.

:func:`add_subcommands` registers the ``weights`` command on the main parser's subparsers;
each leaf sets ``args.func(args) -> int`` (the exit code). Results go to stdout, progress
and errors to stderr.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping, Optional

from .common import ProgressBar
from ..errors import CancelledError, ProtoSAMError
from ..weights.resolve import cache_path, cache_status, checkpoint_option, download, resolve_checkpoint
from ..weights.transfer import human_size
from ..weights.registry import REGISTRY, TEST_ONLY_ARCHITECTURES, WeightsEntry, get_entry

_HOME_HELP = "ProtoSAM home folder; weights live in HOME/weights (default: $PROTOSAM_HOME, else ~/.protosam)"


def add_subcommands(
    subparsers: "argparse._SubParsersAction", *, registry: Optional[Mapping[str, WeightsEntry]] = None
) -> argparse.ArgumentParser:
    """Register ``weights`` with ``list``, ``download`` and ``path`` on ``subparsers``.

    ``registry`` replaces the official registry (tests point entries at a local server).
    Returns the ``weights`` parser.
    """
    parser = subparsers.add_parser(
        "weights",
        help="list, download and locate the pretrained checkpoints",
        description="Manage the official DINOv2 / SAM / MedSAM checkpoints in the ProtoSAM cache.",
    )
    commands = parser.add_subparsers(dest="weights_command", metavar="{list,download,path}")
    commands.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=None, help=_HOME_HELP)
    common.set_defaults(weights_registry=registry)

    p_list = commands.add_parser("list", parents=[common], help="show every known checkpoint and whether it is cached")
    p_list.set_defaults(func=cmd_list)

    p_download = commands.add_parser(
        "download", parents=[common], help="download checkpoints (resumes unfinished downloads)"
    )
    p_download.add_argument("names", nargs="+", metavar="NAME", help="model names, as shown by 'weights list'")
    p_download.add_argument(
        "--base-url", default=None,
        help="fetch BASE_URL/<file name> from a mirror instead (https only; the file is still checked "
        "against the published size and SHA-256)",
    )
    p_download.add_argument("--timeout", type=float, default=30.0, help="seconds without data before retrying")
    p_download.set_defaults(func=cmd_download)

    p_path = commands.add_parser(
        "path", parents=[common], help="print the checkpoint path a model would use (exit 1 if it is missing)"
    )
    p_path.add_argument("name", metavar="NAME")
    p_path.set_defaults(func=cmd_path)
    return parser


def _registry(args: argparse.Namespace) -> Mapping[str, WeightsEntry]:
    registry = getattr(args, "weights_registry", None)
    return REGISTRY if registry is None else registry


def cmd_list(args: argparse.Namespace) -> int:
    """Print one row per checkpoint: name, family, size, cache status, path."""
    rows = [("NAME", "FAMILY", "SIZE", "CACHED", "PATH")]
    for entry in _registry(args).values():
        where = (f"(not downloaded: pass {checkpoint_option(entry.family)} FILE; see docs/weights.md)"
                 if entry.local_only else str(cache_path(entry, args.home)))
        rows.append((entry.name, entry.family, human_size(entry.size), cache_status(entry, args.home), where))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    print(f"(test-only architectures {', '.join(TEST_ONLY_ARCHITECTURES)} have no download; "
          "pass their checkpoint paths explicitly)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Download each named checkpoint; exit 1 if any failed, 130 when interrupted."""
    registry = _registry(args)
    failed = 0
    for name in args.names:
        if name in TEST_ONLY_ARCHITECTURES and name not in registry:
            print(f"error: {name} is a test-only architecture with no published weights; pass its checkpoint with "
                  f"{checkpoint_option(TEST_ONLY_ARCHITECTURES[name])} FILE instead.", file=sys.stderr)
            failed += 1
            continue
        printer = ProgressBar(name, sys.stderr, format_count=human_size)
        try:
            entry = get_entry(name, registry)
            path = download(entry, args.home, progress=printer, timeout=args.timeout, base_url=args.base_url)
        except KeyboardInterrupt:
            printer.finish()
            print(f"interrupted: run 'protosam weights download {name}' again to resume.", file=sys.stderr)
            return 130
        except CancelledError as exc:
            printer.finish()
            print(f"cancelled: {exc}", file=sys.stderr)
            return 130
        except (ProtoSAMError, ValueError) as exc:
            printer.finish()
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        printer.finish()
        print(f"{name}\t{path}")
    return 1 if failed else 0


def cmd_path(args: argparse.Namespace) -> int:
    """Print the path of the verified cached checkpoint; exit 1 with instructions if missing."""
    try:
        path = resolve_checkpoint(args.name, download=False, home=args.home, registry=getattr(args, "weights_registry", None))
    except (ProtoSAMError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
