"""Render the pictures of docs/corrections.md: one per gesture, from a real correction session.

A real :class:`protosam.session.Session` on real data (Colin27 T1 MRI with AAL atlas
structures, Debian's ``mricron-data``), as docs/render_correction_figure.py does for clicks:

1. the structure is painted on one slice (its largest, copied from the AAL label) and
   ``start`` propagates it (the preview);
2. on another slice the run decoded, where preview and atlas disagree, each gesture is made as a
   reader of the scan would make it, then undone (so every gesture meets the same preview):
   a **box** round the atlas label (``Session.box``); a **positive scribble** through the middle
   of what the preview misses and a **negative scribble** through the middle of what it wrongly
   covers (``Session.scribble``, one voxel wide); a **lasso** tracing the atlas outline
   (``Session.lasso``, positive);
3. **"not this"**: another AAL structure, as another segment of the user's, is given as the
   structure's negatives (``Session.set_negatives``) and the structure is updated; the picture
   shows the slice where that removed most.

Each picture has two panels (the preview with the gesture drawn; the slice after it, the voxels
it added and removed marked) and says in small print which models made it. Nothing is drawn by
hand but the gesture's own outline: every mask is the session's output. The models are
random-weight checkpoints in the official formats (tiny by default; their masks mean nothing,
the pictures show what each gesture does), or the published weights with ``--dinov2``/``--sam``
as for render_correction_figure.py::

    python docs/render_gesture_figures.py        # writes docs/images/gesture_*.png (tiny models, ~1 min)

Writes ``<out-dir>/gesture_<name>.png`` for name in :data:`GESTURES`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))
from render_correction_figure import (  # noqa: E402
    ADDED, ATLAS, MASK, NEAR, REMOVED, AAL_STRUCTURES, colin27_volume, load_models, parse_args as _click_args,
)

from protosam import Engine  # noqa: E402
from protosam.evaluation.pictures import to_gray_rgb  # noqa: E402
from protosam.session import Session  # noqa: E402

GESTURES = ("box", "scribble_positive", "scribble_negative", "lasso", "not_this")
DEFAULT_OUT_DIR = DOCS / "images"
#: Each picture: 640 x 360 pixels.
FIGURE_INCHES = (6.4, 3.6)
FIGURE_DPI = 100
FIGURE_PIXELS = (int(FIGURE_INCHES[0] * FIGURE_DPI), int(FIGURE_INCHES[1] * FIGURE_DPI))
#: Colours (RGB 0..1) of the gestures' outlines and of the "not this" segment.
BOX, ADD_STROKE, REMOVE_STROKE, OTHER = (0.2, 0.6, 1.0), (0.1, 0.95, 0.1), (1.0, 0.1, 0.1), (0.85, 0.2, 0.85)
#: The structures loaded from the atlas (the crop covers them): the structure and its possible
#: "other segments".
SEGMENTS = 6


@dataclass
class GestureFigure:
    """One gesture: where it was made, what it drew and what it changed (``[N, H, W]`` uint8)."""

    name: str
    png: Path
    slice_index: int
    drawn: object  # box (x0, y0, x1, y1), polyline / polygon [[x, y], ...], or the other structure's name
    before: np.ndarray
    after: np.ndarray
    title: str

    def summary(self) -> dict:
        changed = np.flatnonzero((self.before != self.after).any(axis=(1, 2))).tolist()
        k = self.slice_index
        before, after = self.before[k].astype(bool), self.after[k].astype(bool)
        return {"png": str(self.png), "slice": k, "changed_slices": changed,
                "added": int((after & ~before).sum()), "removed": int((before & ~after).sum()),
                "drawn": self.drawn if isinstance(self.drawn, str) else np.asarray(self.drawn).tolist()}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="folder of the PNGs")
    p.add_argument("--summary", type=Path, default=None, help="also write what the script did as JSON")
    p.add_argument("--masks", type=Path, default=None, help="also save every before/after mask (.npz)")
    own, rest = p.parse_known_args(argv)
    # Models, data and device: the options of render_correction_figure.py (--out is not used).
    shared = _click_args(rest)
    for key, value in vars(own).items():
        setattr(shared, key, value)
    return shared


def _run_through(region: np.ndarray) -> List[List[float]]:
    """A stroke inside ``region`` (``[H, W]`` bool): through its deepest voxel, along the row or
    column where the region is longer there, one voxel short of its edges."""
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), region.shape)

    def run(line: np.ndarray, at: int) -> Tuple[int, int]:
        start = stop = at
        while start > 0 and line[start - 1]:
            start -= 1
        while stop < len(line) - 1 and line[stop + 1]:
            stop += 1
        inset = 1 if stop - start >= 4 else 0
        return start + inset, stop - inset

    (c0, c1), (r0, r1) = run(region[row], col), run(region[:, col], row)
    if c1 - c0 >= r1 - r0:
        return [[float(c0), float(row)], [float(col), float(row)], [float(c1), float(row)]]
    return [[float(col), float(r0)], [float(col), float(row)], [float(col), float(r1)]]


def _outline(region: np.ndarray, at_most: int = 60) -> List[List[float]]:
    """The longest contour of ``region`` (``[H, W]`` bool) as at most ``at_most`` (x, y) vertices."""
    from contourpy import contour_generator

    lines = contour_generator(z=np.pad(region, 1).astype(float)).lines(0.5)
    longest = max(lines, key=len)[:-1] - 1.0  # closed: the last vertex repeats the first
    step = max(1, int(np.ceil(len(longest) / at_most)))
    return longest[::step].tolist()


def render(args: argparse.Namespace) -> Tuple[List[GestureFigure], dict]:
    """Run the session, make each gesture, draw each picture (see the module docstring)."""
    seconds: Dict[str, float] = {}
    started = time.perf_counter()
    selection, models_words = load_models(args)
    engine = Engine(selection, preset="default", device=args.device, download=False)
    data = colin27_volume(args.slices, args.size, max(SEGMENTS, AAL_STRUCTURES.index(args.structure) + 1))
    name = args.structure
    truth = data.masks[name]
    support = int(np.argmax(truth.sum(axis=(1, 2))))
    painted = np.zeros_like(truth)
    painted[support] = truth[support]
    seconds["setup"] = time.perf_counter() - started

    session = Session(engine, data.volume, modality="mri")
    started = time.perf_counter()
    preview = session.start({name: painted})[name].copy()
    seconds["start"] = time.perf_counter() - started
    decoded = sorted(k for k, sets in session.structures[name].prompts.items() if sets)
    wrong = preview.astype(bool) & ~truth.astype(bool)
    missed = truth.astype(bool) & ~preview.astype(bool)
    # The nearest decoded slice with the structure, preferring one where the preview both misses
    # part of it and covers something else (a stroke for each scribble).
    candidates = [k for k in decoded if k != support and truth[k].any()]
    if not candidates:
        raise SystemExit(f"No slice to correct: the atlas has {name} on no decoded slice but the painted one. Try "
                         "another --structure or more --slices.")
    k = min(candidates, key=lambda index: (not (missed[index].any() and wrong[index].any()), abs(index - support),
                                           index))
    near = wrong[k] & (ndimage.distance_transform_edt(~truth[k].astype(bool)) <= NEAR)
    rows, cols = np.nonzero(truth[k])
    box = (float(max(cols.min() - 1, 0)), float(max(rows.min() - 1, 0)),
           float(min(cols.max() + 1, args.size - 1)), float(min(rows.max() + 1, args.size - 1)))
    strokes = {
        "box": (box, lambda: session.box(name, k, box), "Box round the structure (drag)"),
        "scribble_positive": (_run_through(missed[k] if missed[k].any() else truth[k].astype(bool)), None,
                              "Positive scribble: \"this is it\""),
        "scribble_negative": (_run_through(near if near.any() else wrong[k] if wrong[k].any()
                                           else preview[k].astype(bool)), None,
                              "Negative scribble: \"this is not\""),
        "lasso": (_outline(truth[k].astype(bool)), None, "Lasso traced round the structure (adds)"),
    }
    figures = []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for gesture, (drawn, make, title) in strokes.items():
        started = time.perf_counter()
        if gesture.startswith("scribble"):
            session.scribble(name, k, drawn, gesture.endswith("positive"))
        elif gesture == "lasso":
            session.lasso(name, k, drawn, True)
        else:
            make()
        seconds[gesture] = time.perf_counter() - started
        after = session.mask(name).copy()  # the session's own array: undo changes it
        session.undo(name, k)
        assert np.array_equal(session.mask(name), preview), "undo gives the preview back"
        figures.append(GestureFigure(gesture, args.out_dir / f"gesture_{gesture}.png", k, drawn, preview, after,
                                     title))

    # "Not this": the other loaded structure that the preview covers most (off the painted slice).
    others = [other for other in data.masks if other != name]
    overlap = {other: int((preview & data.masks[other])[np.arange(len(preview)) != support].sum()) for other in others}
    other = max(others, key=lambda o: (overlap[o], -others.index(o)))
    if not overlap[other]:
        raise SystemExit(f"The preview of {name} covers no other atlas structure: no \"not this\" to show.")
    started = time.perf_counter()
    session.set_negatives(name, data.masks[other])
    after = session.update(name)
    seconds["not_this_update"] = time.perf_counter() - started
    removed = (preview.astype(bool) & ~after.astype(bool)).sum(axis=(1, 2)).astype(np.int64)
    removed[support] = -1
    shown = int(np.argmax(removed))
    figures.append(GestureFigure("not_this", args.out_dir / "gesture_not_this.png", shown, other, preview, after,
                                 f"\"Not this\": segment {other} as negatives, update"))
    for figure in figures:
        draw(figure, data.volume, truth, data.masks[other], name, models_words)
    info = {"structure": name, "support_slice": support, "models": models_words, "seconds": seconds,
            "not_this_segment": other}
    return figures, info


def draw(figure: GestureFigure, volume: np.ndarray, truth: np.ndarray, other_mask: np.ndarray, structure: str,
         models_words: str) -> Path:
    """Two panels: the preview with the gesture drawn; the slice after it with what changed."""
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    k = figure.slice_index
    before, after = figure.before[k].astype(bool), figure.after[k].astype(bool)
    added, removed = after & ~before, before & ~after
    window = _window(truth[k].astype(bool) | (other_mask[k].astype(bool) if figure.name == "not_this" else False))
    canvas = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(canvas)
    outline = [patheffects.withStroke(linewidth=4, foreground="black")]
    panels = [([(before, MASK)], f"Preview of slice {k}", True),
              ([(after & ~added, MASK), (added, ADDED), (removed, REMOVED)],
               f"After: +{int(added.sum())} / -{int(removed.sum())} voxels", False)]
    for number, (layers, title, with_gesture) in enumerate(panels, start=1):
        axes = canvas.add_subplot(1, 2, number)
        rgb = to_gray_rgb(volume[k])
        if figure.name == "not_this":
            where = other_mask[k].astype(bool)
            rgb[where] = 0.5 * rgb[where] + 0.5 * np.asarray(OTHER)
        for where, colour in layers:
            rgb[where] = 0.5 * rgb[where] + 0.5 * np.asarray(colour)
        axes.imshow(rgb, interpolation="nearest")
        axes.contour(truth[k].astype(float), levels=[0.5], colors=[ATLAS], linewidths=1.0)
        if with_gesture and figure.name == "box":
            x0, y0, x1, y1 = figure.drawn
            axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=BOX,
                                     linewidth=2, path_effects=outline))
        elif with_gesture and figure.name != "not_this":
            points = np.asarray(figure.drawn)
            if figure.name == "lasso":
                points = np.concatenate([points, points[:1]])
            colour = REMOVE_STROKE if figure.name == "scribble_negative" else ADD_STROKE
            axes.plot(points[:, 0], points[:, 1], color=colour, linewidth=2.5, solid_capstyle="round",
                      path_effects=outline)
        # Radiological view, as the click picture (anterior up, the patient's right on the left),
        # zoomed on the structure so that the gesture shows.
        (x0, x1), (y0, y1) = window
        axes.set_xlim(x1 + 0.5, x0 - 0.5)
        axes.set_ylim(y0 - 0.5, y1 + 0.5)
        axes.set_title(title, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
    canvas.suptitle(figure.title, fontsize=10)
    legend = ("red: ProtoSAM mask, cyan: added, blue: removed, yellow line: AAL atlas label"
              + (f", magenta: the other segment ({figure.drawn})" if figure.name == "not_this" else ""))
    models_words = models_words.replace("what a click does", "what a gesture does")
    canvas.text(0.5, 0.015, f"Colin27 T1 MRI, AAL {structure}; a real protosam Session.\n{legend}.\n{models_words}.",
                ha="center", fontsize=6.5, linespacing=1.4)
    canvas.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.13, wspace=0.03)
    figure.png.parent.mkdir(parents=True, exist_ok=True)
    canvas.savefig(figure.png, dpi=FIGURE_DPI)
    return figure.png


def _window(region: np.ndarray) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Columns and rows (inclusive) of a square view round ``region`` with a margin."""
    size = region.shape[0]
    rows, cols = np.nonzero(region)
    half = max(size // 5, (max(np.ptp(rows), np.ptp(cols)) + 1) // 2 + size // 10)
    centre = [(int(rows.min()) + int(rows.max())) // 2, (int(cols.min()) + int(cols.max())) // 2]
    low = [min(max(c - half, 0), max(size - 2 * half - 1, 0)) for c in centre]
    return (low[1], min(low[1] + 2 * half, size - 1)), (low[0], min(low[0] + 2 * half, size - 1))


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    figures, info = render(args)
    summary = dict(info, gestures={figure.name: figure.summary() for figure in figures})
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=2))
    if args.masks is not None:
        np.savez_compressed(args.masks, preview=figures[0].before,
                            **{f"after_{figure.name}": figure.after for figure in figures})
    for figure in figures:
        entry = summary["gestures"][figure.name]
        print(f"wrote {figure.png}: slice {entry['slice']}, +{entry['added']} / -{entry['removed']} voxels, "
              f"changed slices {entry['changed_slices']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
