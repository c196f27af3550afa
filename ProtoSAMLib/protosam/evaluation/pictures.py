"""Pictures of what the engine did: an overlay montage and a per-slice Dice plot (PNG).

Everything takes plain numpy arrays, so it works for any caller (evaluate, demo, segment):

* slices are ``[H, W]`` float arrays in row/column order, shown with row 0 at the top;
* masks are ``[H, W]`` arrays, non-zero = structure;
* SAM prompts are in SAM's 1024 x 1024 frame of the *square-resized* slice: boxes ``(k, 4)``
  XYXY and points ``(k, P, 2)`` as ``(x, y)``; they are mapped back to the slice with the
  half-pixel convention of bilinear resizing (``x_slice = (x + 0.5) * W / 1024 - 0.5``).

Overlays are composited in numpy (exact colours, nearest-neighbour upscaling) and laid out
with matplotlib's object API on the Agg canvas (no pyplot, no global backend change).
Colours: support mask green fill, ground truth green outline, coarse mask yellow outline,
final mask red fill + outline, boxes cyan, positive points magenta, negative points blue.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from scipy import ndimage

SAM_FRAME = 1024
COLORS = {
    "support": (0, 200, 0),
    "gt": (0, 255, 0),
    "coarse": (255, 255, 0),
    "final": (255, 0, 0),
    "box": (0, 255, 255),
    "positive": (255, 0, 255),
    "negative": (0, 80, 255),
}
MIN_PANEL_PIXELS = 256


@dataclass
class Panel:
    """One tile of the montage. ``kind`` is ``"support"`` or ``"query"``.

    ``mask``: support mask (support) or final mask (query); ``coarse``/``gt`` optional;
    ``boxes`` ``(k, 4)``, ``points`` ``(k, P, 2)`` and ``point_labels`` ``(k, P)`` in the
    1024 frame (see module docstring).
    """

    image: np.ndarray
    mask: Optional[np.ndarray] = None
    kind: str = "query"
    coarse: Optional[np.ndarray] = None
    gt: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None
    point_labels: Optional[np.ndarray] = None
    caption: str = ""


def prompts_to_arrays(prompts) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Engine prompt sets (objects with ``box``, ``points``, ``point_labels``) -> arrays.

    Returns boxes ``(k, 4)``, points ``(k, P, 2)`` and labels ``(k, P)`` (P = the largest
    number of points of a set; shorter sets are padded with label -1, which is not drawn).
    """
    prompts = list(prompts or [])
    if not prompts:
        return np.zeros((0, 4)), np.zeros((0, 0, 2)), np.zeros((0, 0), np.int64)
    width = max(len(np.asarray(p.points).reshape(-1, 2)) for p in prompts)
    boxes = np.stack([np.asarray(p.box, dtype=np.float64).reshape(4) for p in prompts])
    points = np.zeros((len(prompts), width, 2))
    labels = np.full((len(prompts), width), -1, dtype=np.int64)
    for i, prompt in enumerate(prompts):
        xy = np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2)
        points[i, : len(xy)] = xy
        labels[i, : len(xy)] = np.asarray(prompt.point_labels).reshape(-1)[: len(xy)]
    return boxes, points, labels


def from_sam_frame(xy: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """Map ``(..., 2)`` (x, y) coordinates from the 1024 frame to a ``(H, W)`` slice."""
    xy = np.asarray(xy, dtype=np.float64)
    height, width = hw
    out = np.empty_like(xy)
    out[..., 0] = (xy[..., 0] + 0.5) * width / SAM_FRAME - 0.5
    out[..., 1] = (xy[..., 1] + 0.5) * height / SAM_FRAME - 0.5
    return out


def to_gray_rgb(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` float -> ``[H, W, 3]`` float in [0, 1], windowed to the 1st-99th percentile."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    finite = image[np.isfinite(image)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    if high <= low:
        low, high = float(finite.min()) if finite.size else 0.0, (float(finite.max()) if finite.size else 1.0)
    scaled = np.clip((image - low) / (high - low if high > low else 1.0), 0, 1)
    scaled = np.nan_to_num(scaled)
    return np.repeat(scaled[..., None], 3, axis=2)


def _outline(mask: np.ndarray) -> np.ndarray:
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def _paint(rgb: np.ndarray, where: np.ndarray, color, alpha: float = 1.0) -> None:
    rgb[where] = (1 - alpha) * rgb[where] + alpha * (np.asarray(color, dtype=np.float64) / 255.0)


def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def _check_mask(mask, shape, name):
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, the image {shape}")
    return mask != 0


def compose_panel(panel: Panel, factor: int = 1) -> np.ndarray:
    """RGB ``[H*f, W*f, 3]`` float in [0, 1] with masks and boxes drawn in (points are not)."""
    shape = np.asarray(panel.image).shape
    mask = _check_mask(panel.mask, shape, "mask")
    coarse = _check_mask(panel.coarse, shape, "coarse mask")
    gt = _check_mask(panel.gt, shape, "ground truth")
    rgb = _upscale(to_gray_rgb(panel.image), factor)
    if mask is not None:
        big = _upscale(mask, factor)
        color = COLORS["support"] if panel.kind == "support" else COLORS["final"]
        _paint(rgb, big, color, alpha=0.35)
        _paint(rgb, _outline(big), color)
    if coarse is not None:
        _paint(rgb, _outline(_upscale(coarse, factor)), COLORS["coarse"])
    if gt is not None:
        _paint(rgb, _outline(_upscale(gt, factor)), COLORS["gt"])
    if panel.boxes is not None and len(panel.boxes):
        _draw_boxes(rgb, np.asarray(panel.boxes, dtype=np.float64).reshape(-1, 4), shape, factor)
    return rgb


def _draw_boxes(rgb: np.ndarray, boxes: np.ndarray, hw, factor: int) -> None:
    height, width = rgb.shape[:2]
    corners = from_sam_frame(boxes.reshape(-1, 2, 2), hw)
    for (x0, y0), (x1, y1) in corners:
        c0 = int(np.clip(round((x0 + 0.5) * factor - 0.5), 0, width - 1))
        c1 = int(np.clip(round((x1 + 0.5) * factor - 0.5), 0, width - 1))
        r0 = int(np.clip(round((y0 + 0.5) * factor - 0.5), 0, height - 1))
        r1 = int(np.clip(round((y1 + 0.5) * factor - 0.5), 0, height - 1))
        color = np.asarray(COLORS["box"], dtype=np.float64) / 255.0
        rgb[r0, c0:c1 + 1] = color
        rgb[r1, c0:c1 + 1] = color
        rgb[r0:r1 + 1, c0] = color
        rgb[r0:r1 + 1, c1] = color


def _legend_handles(panels: Sequence[Panel]):
    def has(attr):
        return any(getattr(p, attr) is not None and np.size(getattr(p, attr)) for p in panels)

    handles = []
    if any(p.kind == "support" and p.mask is not None for p in panels):
        handles.append(Patch(color=np.array(COLORS["support"]) / 255, label="support mask"))
    if any(p.kind == "query" and p.mask is not None for p in panels):
        handles.append(Patch(color=np.array(COLORS["final"]) / 255, label="final mask"))
    if has("coarse"):
        handles.append(Line2D([], [], color=np.array(COLORS["coarse"]) / 255, label="coarse mask"))
    if has("gt"):
        handles.append(Line2D([], [], color=np.array(COLORS["gt"]) / 255, label="ground truth"))
    if has("boxes"):
        handles.append(Line2D([], [], color=np.array(COLORS["box"]) / 255, label="prompt box"))
    if has("points"):
        handles.append(Line2D([], [], color=np.array(COLORS["positive"]) / 255, marker="*",
                              linestyle="", label="prompt point"))
    return handles


def axial_display_flips(direction: Sequence[float]) -> Tuple[bool, bool]:
    """``(flip_rows, flip_cols)`` that show a KJI-array axial slice radiologically.

    ``direction``: the volume's ITK direction (9 numbers, row-major, LPS frame). The
    result puts anterior at the top and the patient's right on the left of the picture.
    """
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    # Row index follows the j axis (column 1), column index follows the i axis (column 0).
    return bool(matrix[1, 1] < 0), bool(matrix[0, 0] < 0)


#: Montage layout, in inches: each tile, the band above it for its caption, the figure
#: title's band and the legend's band.
TILE_INCHES, CAPTION_INCHES, TITLE_INCHES, LEGEND_INCHES = 3.2, 0.35, 0.4, 0.45


def write_overlay_montage(path: Path, panels: Sequence[Panel], *, title: str = "",
                          columns: int = 4, flip_rows: bool = False,
                          flip_cols: bool = False) -> Path:
    """Write a montage PNG of ``panels`` (support tiles first, as given). Returns ``path``.

    ``flip_rows``/``flip_cols`` mirror every tile for display only (see
    :func:`axial_display_flips`); prompts are mirrored with it.
    """
    figure = overlay_montage_figure(panels, title=title, columns=columns, flip_rows=flip_rows, flip_cols=flip_cols)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def overlay_montage_figure(panels: Sequence[Panel], *, title: str = "", columns: int = 4,
                           flip_rows: bool = False, flip_cols: bool = False) -> Figure:
    """The montage of :func:`write_overlay_montage` as a matplotlib Figure (Agg canvas).

    Laid out explicitly, not by ``tight_layout`` (which let the captions of the lower rows
    overlap the images above them): every row of tiles has its own caption band above it, so a
    caption always sits between its own tile and the row above.
    """
    panels = list(panels)
    if not panels:
        raise ValueError("write_overlay_montage needs at least one panel")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    largest = max(max(np.asarray(p.image).shape) for p in panels)
    factor = max(1, math.ceil(MIN_PANEL_PIXELS / largest))
    handles = _legend_handles(panels)
    title_band = TITLE_INCHES if title else 0.0
    legend_band = LEGEND_INCHES if handles else 0.0
    width = TILE_INCHES * columns
    height = rows * (TILE_INCHES + CAPTION_INCHES) + title_band + legend_band
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        rows, columns, left=0.1 / width, right=1 - 0.1 / width, bottom=legend_band / height,
        top=1 - (title_band + CAPTION_INCHES) / height, hspace=CAPTION_INCHES / TILE_INCHES, wspace=0.2 / TILE_INCHES,
    )
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(grid[index // columns, index % columns])
        rgb = compose_panel(panel, factor)
        if flip_rows:
            rgb = rgb[::-1]
        if flip_cols:
            rgb = rgb[:, ::-1]
        axes.imshow(rgb, interpolation="nearest")
        if panel.points is not None and np.size(panel.points):
            hw = np.asarray(panel.image).shape
            xy = from_sam_frame(np.asarray(panel.points, dtype=np.float64).reshape(-1, 2), hw)
            xy = (xy + 0.5) * factor - 0.5
            if flip_cols:
                xy[:, 0] = rgb.shape[1] - 1 - xy[:, 0]
            if flip_rows:
                xy[:, 1] = rgb.shape[0] - 1 - xy[:, 1]
            labels = (np.asarray(panel.point_labels).reshape(-1) if panel.point_labels is not None
                      else np.ones(len(xy), np.int64))
            for value, key, marker in ((1, "positive", "*"), (0, "negative", "X")):
                chosen = labels == value
                if chosen.any():
                    axes.scatter(xy[chosen, 0], xy[chosen, 1], s=70, marker=marker,
                                 c=[np.array(COLORS[key]) / 255], edgecolors="black", linewidths=0.5)
        axes.set_title(panel.caption, fontsize=8)
        axes.set_xticks([])
        axes.set_yticks([])
    if handles:
        figure.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 6),
                      fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10, y=1 - 0.5 * title_band / height, va="center")
    return figure


def write_dice_plot(path: Path, series: Mapping[str, Mapping[int, float]], *, title: str = "",
                    chunk_starts: Optional[Mapping[str, Sequence[int]]] = None,
                    xlabel: str = "slice index") -> Path:
    """Per-slice Dice (0..1) for each named series ``{name: {slice: dice}}``; returns ``path``.

    ``chunk_starts``: optional ``{name: [first slice of part 1, part 2, ...]}`` drawn as
    dotted vertical lines in the series' colour.
    """
    figure = Figure(figsize=(7.5, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    plotted = 0
    for index, (name, values) in enumerate(series.items()):
        if not values:
            continue
        color = f"C{index % 10}"
        xs = sorted(values)
        ys = [values[x] for x in xs]
        mean = float(np.mean(ys))
        axes.plot(xs, ys, marker="o", markersize=3, color=color, label=f"{name} (mean {mean:.3f})")
        axes.axhline(mean, color=color, linewidth=0.8, linestyle="--")
        for start in (chunk_starts or {}).get(name, []):
            axes.axvline(start, color=color, linewidth=0.8, linestyle=":")
        plotted += 1
    axes.set_ylim(-0.02, 1.02)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(xlabel)
    axes.set_ylabel("Dice")
    axes.grid(True, alpha=0.3)
    if plotted:
        axes.legend(fontsize=8, loc="lower right")
    else:
        axes.text(0.5, 0.5, "no evaluated slices", ha="center", va="center", transform=axes.transAxes)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def spread(values: Sequence[int], count: int) -> list:
    """Up to ``count`` items of ``values`` spread evenly (first and last included)."""
    values = list(values)
    if len(values) <= count:
        return values
    picks = np.linspace(0, len(values) - 1, count).round().astype(int)
    return [values[i] for i in sorted(set(picks.tolist()))]
