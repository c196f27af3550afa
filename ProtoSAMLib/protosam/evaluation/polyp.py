"""Polyp mode: 2-D images + masks folders, one support image chosen by seed, Dice per image.

Layout: ``<images>/<name>.<png|jpg|...>`` and ``<masks>/<name>.<png|...>`` with the same stem
(Kvasir-SEG, CVC-ClinicDB, CVC-ColonDB and ETIS test sets are distributed this way).
The support image is ``sorted(names)[random.Random(seed).randrange(n)]`` from the support
folders (default: the evaluated folders, and the support image is then left out of the
queries). Every other image is segmented from it; Dice is per image, averaged over images.

Differences from the reference, on purpose: the engine takes one channel, so colour images
are converted to luminance (ITU-R 601-2, PIL ``"L"``) and z-scored per image; the reference
feeds RGB normalised with dataset statistics. Masks are foreground where the grey value > 127.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..errors import CancelledError, InputError
from .abdominal import PictureOptions
from .metrics import dice_score
from .pictures import Panel, prompts_to_arrays, spread, write_dice_plot, write_overlay_montage
from .report import EvaluationReport, ScanRecord, SliceRecord, package_versions

logger = logging.getLogger(__name__)

POLYP = "polyp"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImagePair:
    name: str
    image: Path
    mask: Path


def discover_pairs(images_dir: Path, masks_dir: Path) -> List[ImagePair]:
    """Image/mask pairs matched by file stem, sorted by name."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise InputError(f"Folder not found: {folder}")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = [ImagePair(p.stem, p, masks[p.stem]) for p in sorted(images_dir.iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in masks]
    if not pairs:
        raise InputError(f"No image/mask pairs with matching names in {images_dir} and {masks_dir}.")
    return pairs


def read_gray(path: Path) -> np.ndarray:
    """Image as float32 ``[H, W]`` luminance, z-scored per image."""
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L"), dtype=np.float32)
    std = float(gray.std())
    return ((gray - float(gray.mean())) / (std if std > 0 else 1.0)).astype(np.float32)


def read_mask(path: Path) -> np.ndarray:
    """Mask as uint8 ``[H, W]``: 1 where the grey value is above 127."""
    with Image.open(path) as image:
        return (np.asarray(image.convert("L")) > 127).astype(np.uint8)


def choose_support(pairs: List[ImagePair], seed: int) -> ImagePair:
    """The seed's support image: ``pairs[random.Random(seed).randrange(len(pairs))]``."""
    return pairs[random.Random(seed).randrange(len(pairs))]


def run_polyp(engine, images_dir: Path, masks_dir: Path, out_dir: Path, *, seed: int = 0,
              support_images_dir: Optional[Path] = None, support_masks_dir: Optional[Path] = None,
              dataset_name: Optional[str] = None, max_images: Optional[int] = None,
              pictures: str = "first", progress: Optional[Callable[[str], None]] = None,
              cancel: Optional[threading.Event] = None) -> EvaluationReport:
    """Evaluate one polyp test set; writes the report files into ``out_dir``."""
    pairs = discover_pairs(images_dir, masks_dir)
    if (support_images_dir is None) != (support_masks_dir is None):
        raise ValueError("Give both support folders (images and masks) or neither.")
    support_pool = (discover_pairs(support_images_dir, support_masks_dir)
                    if support_images_dir is not None else pairs)
    support = choose_support(support_pool, seed)
    queries = [p for p in pairs if p.image != support.image]
    if max_images is not None:
        queries = queries[:max_images]
    if not queries:
        raise InputError("No query image left after choosing the support image.")
    support_image, support_mask = read_gray(support.image), read_mask(support.mask)
    if not support_mask.any():
        raise InputError(f"The support mask {support.mask} is empty; choose another --seed.")
    name = dataset_name or Path(images_dir).resolve().parent.name or "polyp"
    # The name becomes part of output file names: keep it inside the output folder.
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "polyp"
    report = EvaluationReport()
    models = getattr(engine, "models", None)
    report.meta.update({
        "models": asdict(models) if models is not None else {},
        "preset": getattr(getattr(engine, "preset", None), "name", ""),
        "device": str(getattr(engine, "device", "")), "seed": seed, "dataset": str(images_dir),
        "support_scan": support.name, "support_image": str(support.image),
        "query_scans": [f"{len(queries)} images"], "protocols": [POLYP],
        "versions": package_versions(),
    })
    results: Dict[str, Tuple[np.ndarray, np.ndarray, object, np.ndarray, np.ndarray]] = {}
    dice_by_index: Dict[int, float] = {}
    dice_by_name: Dict[str, float] = {}
    for index, pair in enumerate(queries):
        if cancel is not None and cancel.is_set():
            raise CancelledError("Evaluation cancelled.")
        started = time.perf_counter()
        image, gt = read_gray(pair.image), read_mask(pair.mask)
        if image.shape != gt.shape:
            raise InputError(f"{pair.image} is {image.shape} but its mask {pair.mask} is {gt.shape}.")
        result = engine.segment_slices(support_image, support_mask, image[None])
        dice = dice_score(result.mask[0], gt)
        dice_by_index[index] = dice
        dice_by_name[pair.name] = dice
        report.slices.append(SliceRecord(POLYP, name, pair.name, 0, 0, 0, dice, int(gt.sum()),
                                         int(result.mask[0].sum())))
        report.scans.append(ScanRecord(POLYP, name, pair.name, support.name, "0", 0, 0, 1, dice, dice, 1,
                                       seconds=time.perf_counter() - started))
        results[pair.name] = (image, gt, result.prompts[0], result.coarse_mask[0], result.mask[0])
        if progress is not None:
            progress(f"{POLYP}: {pair.name}: Dice {100 * dice:.1f}%")
    out_dir = Path(out_dir)
    options = PictureOptions(out_dir=out_dir / "pictures", mode=pictures)
    if options.wants(0):
        ranked = sorted(results, key=lambda n: dice_by_name[n])
        panels = [Panel(support_image, support_mask, kind="support", caption=f"support {support.name}")]
        for key in spread(ranked, options.max_query_slices):
            image, gt, prompts, coarse, mask = results[key]
            boxes, points, labels = prompts_to_arrays(prompts)
            panels.append(Panel(image, mask, coarse=coarse, gt=gt, boxes=boxes, points=points,
                                point_labels=labels, caption=f"{key} Dice {dice_by_name[key]:.2f}"))
        options.written.append(write_overlay_montage(
            options.out_dir / f"{POLYP}_{name}.png", panels, columns=4,
            title=f"{name}: support {support.name} (seed {seed}), queries from worst to best"))
        options.written.append(write_dice_plot(
            options.out_dir / f"{POLYP}_dice_{name}.png", {name: dice_by_index},
            title=f"{name}: Dice per image", xlabel="query image (sorted by name)"))
    report.meta["pictures"] = [str(p.relative_to(out_dir)) for p in options.written]
    report.write(out_dir)
    return report
