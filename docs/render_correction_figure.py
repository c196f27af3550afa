"""Render the README's picture of a corrected slice from a real correction session.

A real :class:`protosam.session.Session` on real data (Colin27 T1 MRI with an AAL atlas
structure, Debian's ``mricron-data``), as a user works in the Segment Editor effect:

1. the structure is painted on one slice (its largest slice, copied from the AAL label);
2. ``start`` propagates it through the volume (the preview);
3. on another slice the script clicks where the preview and the AAL label disagree, as a
   reader of the scan would: a positive click in the middle of the part of the structure the
   preview misses, a negative click in the middle of the part it wrongly covers;
4. ``correct`` decodes that slice again with the clicks; nothing else changes.

The picture has three panels (painted example, preview with the clicks, slice after the clicks)
and says in small print which models made it. Nothing is drawn by hand: every mask is the
session's output.

By default the models are random-weight checkpoints in the official formats
(``protosam.testing``): tiny ones (seconds), or DINOv2 ViT-B/14 + SAM ViT-B with ``--full``
(about 9 minutes for ``--slices 8 --size 96`` on a busy 2-core CPU). Their masks mean nothing; the picture then shows what a click does, not
how accurate ProtoSAM is. With the published weights the same command draws the real thing::

    python docs/render_correction_figure.py                       # tiny random-weight models
    python docs/render_correction_figure.py --dinov2 ~/.protosam/weights/dinov2_vitb14_pretrain.pth \\
        --sam ~/.protosam/weights/sam_vit_b_01ec64.pth            # published weights

Writes ``docs/images/correction_slice.png`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "benchmarks"))
from benchmark_volumes import AAL_STRUCTURES, colin27_volume  # noqa: E402

from protosam import Engine, ModelSelection  # noqa: E402
from protosam.catalogue import DEFAULT_DINOV2, DEFAULT_INPUT_SIZE, DEFAULT_SAM  # noqa: E402
from protosam.evaluation.pictures import to_gray_rgb  # noqa: E402
from protosam.session import Session  # noqa: E402
from protosam.testing import TINY_DINOV2, TINY_SAM, save_random_checkpoint, save_random_sam_checkpoint  # noqa: E402


DEFAULT_OUT = REPOSITORY / "docs" / "images" / "correction_slice.png"
#: The picture's size in inches and its resolution: 960 x 400 pixels.
FIGURE_INCHES = (9.6, 4.0)
FIGURE_DPI = 100
FIGURE_PIXELS = (int(FIGURE_INCHES[0] * FIGURE_DPI), int(FIGURE_INCHES[1] * FIGURE_DPI))  # (width, height)
# Colours (RGB 0..1): painted example green, ProtoSAM mask red, voxels the clicks added cyan and
# removed blue, AAL label outline yellow, positive click green "+", negative click red "-".
PAINTED, MASK, ATLAS = (0.1, 0.85, 0.1), (1.0, 0.15, 0.1), (1.0, 0.9, 0.0)
ADDED, REMOVED = (0.0, 1.0, 1.0), (0.15, 0.3, 1.0)
POSITIVE, NEGATIVE = (0.1, 0.95, 0.1), (1.0, 0.1, 0.1)
#: A negative click goes on a wrong part of the preview within this many voxels of the structure.
NEAR = 12
#: DINOv2 input size of the tiny models (as the tests run them).
TINY_INPUT_SIZE = 112
RANDOM_CAPTION = "random-weight test models: shows what a click does, not the accuracy of ProtoSAM"


@dataclass
class CorrectionFigure:
    """What the script did. Masks are uint8 ``[N, H, W]`` (slice-first, the volume's order)."""

    png: Path
    structure: str
    support_slice: int
    clicked_slice: int
    clicks: List[Tuple[float, float, int]]  # (x = column, y = row, label 1/0) on clicked_slice
    preview: np.ndarray  # after start
    corrected: np.ndarray  # after the clicks
    models: str
    seconds: Dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        changed = np.flatnonzero((self.preview != self.corrected).any(axis=(1, 2))).tolist()
        return {
            "png": str(self.png), "structure": self.structure, "support_slice": self.support_slice,
            "clicked_slice": self.clicked_slice, "clicks": self.clicks, "models": self.models,
            "changed_slices": changed,
            "changed_voxels": int((self.preview != self.corrected).sum()),
            "preview_voxels_on_clicked_slice": int(self.preview[self.clicked_slice].sum()),
            "corrected_voxels_on_clicked_slice": int(self.corrected[self.clicked_slice].sum()),
            "seconds": self.seconds,
        }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    p.add_argument("--dinov2", type=Path, default=None, help="DINOv2 checkpoint (e.g. the published weights)")
    p.add_argument("--dinov2-model", default=DEFAULT_DINOV2, help="architecture of the --dinov2 file")
    p.add_argument("--sam", type=Path, default=None, help="SAM checkpoint (e.g. the published weights)")
    p.add_argument("--sam-model", default=DEFAULT_SAM, help="architecture of the --sam file (vit_b, vit_l, vit_h)")
    p.add_argument("--full", action="store_true",
                   help="without --dinov2/--sam: random-weight ViT-B/14 + SAM ViT-B instead of the tiny models")
    p.add_argument("--input-size", type=int, default=None,
                   help=f"DINOv2 input size (default {DEFAULT_INPUT_SIZE}; {TINY_INPUT_SIZE} for the tiny models)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--structure", default="Putamen_R", choices=AAL_STRUCTURES, help="AAL structure")
    p.add_argument("--slices", type=int, default=12, help="slices of the resampled Colin27 volume")
    p.add_argument("--size", type=int, default=128, help="slice height = width, voxels")
    p.add_argument("--work-dir", type=Path, default=None, help="folder for the random checkpoints (kept, reused)")
    p.add_argument("--masks", type=Path, default=None, help="also save the preview and corrected masks (.npz)")
    p.add_argument("--summary", type=Path, default=None, help="also write what the script did as JSON")
    args = p.parse_args(argv)
    if (args.dinov2 is None) != (args.sam is None):
        p.error("give both --dinov2 and --sam (checkpoint files), or neither for random-weight test models")
    return args


def load_models(args: argparse.Namespace) -> Tuple[ModelSelection, str]:
    """The models and the words the picture uses for them."""
    if args.dinov2 is not None:
        for path in (args.dinov2, args.sam):
            if not path.is_file():
                raise SystemExit(f"Checkpoint {path} not found: give the path of the downloaded weights file.")
        size = args.input_size or DEFAULT_INPUT_SIZE
        selection = ModelSelection(args.dinov2_model, str(args.dinov2), args.sam_model, str(args.sam), size)
        return selection, f"models: {args.dinov2_model} ({args.dinov2.name}) + SAM {args.sam_model} ({args.sam.name})"
    dinov2, sam = (DEFAULT_DINOV2, DEFAULT_SAM) if args.full else (TINY_DINOV2, TINY_SAM)
    size = args.input_size or (DEFAULT_INPUT_SIZE if args.full else TINY_INPUT_SIZE)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="protosam_figure_"))
    work.mkdir(parents=True, exist_ok=True)
    paths = {"dinov2": work / f"{dinov2}.pth", "sam": work / f"{sam}.pth"}
    if not paths["dinov2"].exists():
        save_random_checkpoint(dinov2, paths["dinov2"])
    if not paths["sam"].exists():
        save_random_sam_checkpoint(sam, paths["sam"])
    return (ModelSelection(dinov2, str(paths["dinov2"]), sam, str(paths["sam"]), size),
            f"{dinov2} + {sam}, {RANDOM_CAPTION}")


def _deepest(region: np.ndarray) -> Optional[Tuple[float, float]]:
    """``(x, y)`` of the voxel of ``region`` farthest from its edge (None when it is empty)."""
    if not region.any():
        return None
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    row, column = np.unravel_index(int(np.argmax(distance)), region.shape)
    return float(column), float(row)


def choose_clicks(preview: np.ndarray, truth: np.ndarray) -> List[Tuple[float, float, int]]:
    """Clicks a reader of the scan would give on a ``[H, W]`` slice: a positive click in the middle
    of what the preview misses of the structure (``truth``), a negative one in the middle of what
    it covers wrongly near the structure (within ``NEAR`` voxels of it, else anywhere); either is
    left out when there is nothing of its kind."""
    preview, truth = preview.astype(bool), truth.astype(bool)
    clicks = []
    missed = _deepest(truth & ~preview)
    if missed is not None:
        clicks.append((missed[0], missed[1], 1))
    wrong = preview & ~truth
    near = wrong & (ndimage.distance_transform_edt(~truth) <= NEAR) if truth.any() else wrong
    extra = _deepest(near if near.any() else wrong)
    if extra is not None:
        clicks.append((extra[0], extra[1], 0))
    return clicks


def render(args: argparse.Namespace) -> CorrectionFigure:
    """Run the session and draw the picture (see the module docstring)."""
    seconds = {}
    started = time.perf_counter()
    selection, models_words = load_models(args)
    engine = Engine(selection, preset="default", device=args.device, download=False)
    segments = AAL_STRUCTURES.index(args.structure) + 1
    data = colin27_volume(args.slices, args.size, segments)
    truth = data.masks[args.structure]
    support = int(np.argmax(truth.sum(axis=(1, 2))))
    painted = np.zeros_like(truth)
    painted[support] = truth[support]  # the user paints one slice
    seconds["setup"] = time.perf_counter() - started

    session = Session(engine, data.volume, modality="mri")
    started = time.perf_counter()
    preview = session.start({args.structure: painted})[args.structure].copy()
    seconds["start"] = time.perf_counter() - started
    # A slice the run decoded with SAM (its embedding is cached, so a click costs a decoding),
    # where the atlas has the structure: the nearest to the painted one that the preview gets wrong.
    decoded = sorted(k for k, sets in session.structures[args.structure].prompts.items() if sets)
    candidates = [k for k in decoded if k != support and truth[k].any() and choose_clicks(preview[k], truth[k])]
    if not candidates:
        raise SystemExit(f"No slice to correct: the preview of {args.structure} matches the atlas on every "
                         "decoded slice. Try another --structure.")
    clicked = min(candidates, key=lambda k: (abs(k - support), k))
    clicks = choose_clicks(preview[clicked], truth[clicked])
    started = time.perf_counter()
    for x, y, label in clicks:  # one click at a time, as in the effect
        session.correct(args.structure, clicked, [[x, y]], [label])
    seconds["clicks"] = time.perf_counter() - started
    corrected = session.mask(args.structure)
    if np.array_equal(corrected[clicked], preview[clicked]):
        raise SystemExit(f"The clicks on slice {clicked} changed nothing; the picture would show no correction.")

    result = CorrectionFigure(Path(args.out), args.structure, support, clicked, clicks, preview, corrected,
                              models_words, seconds)
    draw(result, data.volume, truth)
    return result


def draw(result: CorrectionFigure, volume: np.ndarray, truth: np.ndarray) -> Path:
    """Three panels: the painted example, the preview with the clicks, the slice after the clicks
    with the voxels the clicks added and removed marked."""
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    k, s = result.clicked_slice, result.support_slice
    before, after = result.preview[k].astype(bool), result.corrected[k].astype(bool)
    added, removed = after & ~before, before & ~after
    panels = [
        (s, [(truth[s].astype(bool), PAINTED)], f"1. Painted example (slice {s})", False),
        (k, [(before, MASK)], f"2. Preview of slice {k}, with the clicks", True),
        (k, [(after & ~added, MASK), (added, ADDED), (removed, REMOVED)],
         f"3. Slice {k} after the clicks: +{int(added.sum())} / -{int(removed.sum())} voxels", True),
    ]
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    outline = [patheffects.withStroke(linewidth=5, foreground="black")]
    for number, (index, layers, title, with_clicks) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 3, number)
        rgb = to_gray_rgb(volume[index])
        for where, colour in layers:
            rgb[where] = 0.5 * rgb[where] + 0.5 * np.asarray(colour)
        axes.imshow(rgb, interpolation="nearest")
        if with_clicks:
            axes.contour(truth[index].astype(float), levels=[0.5], colors=[ATLAS], linewidths=1.0)
            for x, y, label in result.clicks:
                axes.plot([x], [y], marker="+" if label else "_", markersize=14, markeredgewidth=3,
                          color=POSITIVE if label else NEGATIVE, linestyle="none", path_effects=outline)
        # Colin27's array rows run posterior -> anterior and columns left -> right: show it
        # radiologically (anterior up, the patient's right on the left), voxel coordinates kept.
        axes.invert_yaxis()
        axes.invert_xaxis()
        axes.set_title(title, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
    handles = [
        Patch(color=PAINTED, label="painted"), Patch(color=MASK, label="ProtoSAM mask"),
        Patch(color=ADDED, label="added by the clicks"), Patch(color=REMOVED, label="removed by the clicks"),
        Line2D([], [], color=ATLAS, label="AAL atlas label"),
        Line2D([], [], marker="+", markersize=9, markeredgewidth=2.5, color=POSITIVE, linestyle="none",
               path_effects=outline, label="left-click: add"),
        Line2D([], [], marker="_", markersize=9, markeredgewidth=2.5, color=NEGATIVE, linestyle="none",
               path_effects=outline, label="right-click: remove"),
    ]
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.135), ncol=7, fontsize=7.5,
                  frameon=False, handlelength=1.5, columnspacing=1.2)
    figure.text(0.5, 0.012, f"Colin27 T1 MRI, AAL {result.structure}: a real protosam Session (start from the painted "
                f"slice, then correct on slice {k}; clicks placed where preview and atlas disagree).\n"
                f"{result.models}.", ha="center", fontsize=7.5, linespacing=1.4)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.14, wspace=0.03)
    path = Path(result.png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=FIGURE_DPI)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    result = render(args)
    summary = result.summary()
    if args.masks is not None:
        np.savez_compressed(args.masks, preview=result.preview, corrected=result.corrected)
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=2))
    print(f"wrote {result.png}: {result.structure}, painted slice {result.support_slice}, "
          f"{len(result.clicks)} click(s) on slice {result.clicked_slice}, changed slices "
          f"{summary['changed_slices']} ({summary['changed_voxels']} voxels); {result.models}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
