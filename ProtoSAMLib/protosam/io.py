"""Reading and writing volumes (NIfTI, NRRD, anything SimpleITK reads) and result files.

Arrays from SimpleITK are indexed ``[k, j, i]`` (slice, row, column), i.e. reversed from the
image's ``(i, j, k)`` index order; direction and spacing stay on the ``sitk.Image``. Every
write goes to a temporary file in the destination folder first and is renamed into place, so
a failure (disk full, cancel, crash) never leaves a partial output file.
"""
from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, ProtoSAMError

logger = logging.getLogger(__name__)

__all__ = [
    "read_volume", "write_labelmap", "check_same_geometry", "slice_axis_for_plane", "atomic_output",
    "save_npz_atomic", "PLANES",
]

PathLike = Union[str, os.PathLike]
PLANES = ("auto", "axial", "coronal", "sagittal")
# Which physical (LPS) axis a plane's normal follows.
_PLANE_NORMAL = {"sagittal": 0, "coronal": 1, "axial": 2}


def read_volume(path: PathLike, what: str = "image") -> Tuple[np.ndarray, sitk.Image]:
    """Read a 3-D scalar volume -> (``[k, j, i]`` array in its own dtype, the sitk image)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The {what} file does not exist: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Cannot read the {what} {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The {what} {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
            "convert it to a single-channel (grey-scale) volume first."
        )
    if image.GetDimension() != 3:
        raise InputError(
            f"The {what} {path} is {image.GetDimension()}-D (size {image.GetSize()}); a 3-D volume is needed. "
            "For a 4-D series extract one time point; for a 2-D image use 'protosam slices'."
        )
    return sitk.GetArrayFromImage(image), image


def check_same_geometry(a: sitk.Image, b: sitk.Image, what_a: str, what_b: str, tolerance: float = 1e-4) -> None:
    """Raise InputError unless size, spacing, origin and direction agree."""
    problems = []
    if a.GetSize() != b.GetSize():
        problems.append(f"size {a.GetSize()} vs {b.GetSize()}")
    for name, va, vb in (
        ("spacing", a.GetSpacing(), b.GetSpacing()),
        ("origin", a.GetOrigin(), b.GetOrigin()),
        ("direction", a.GetDirection(), b.GetDirection()),
    ):
        scale = max(1.0, max(abs(v) for v in va))
        if not np.allclose(va, vb, atol=tolerance * scale, rtol=0):
            problems.append(f"{name} {tuple(round(v, 4) for v in va)} vs {tuple(round(v, 4) for v in vb)}")
    if problems:
        raise InputError(
            f"The {what_a} and the {what_b} do not share one voxel grid ({'; '.join(problems)}). "
            f"Resample the {what_b} onto the {what_a} first."
        )


def slice_axis_for_plane(image: sitk.Image, plane: str = "auto") -> int:
    """Array axis (0..2 of the ``[k, j, i]`` array) whose slices lie in ``plane``.

    ``auto`` picks the index axis with the coarsest spacing (thick-slice acquisitions are
    segmented slice by slice), and the axial one when spacing is isotropic.
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}, not {plane!r}")
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: i, j, k in LPS
    if plane == "auto":
        spacing = np.array(image.GetSpacing())
        if np.ptp(spacing) > 1e-3 * spacing.max():
            return 2 - int(np.argmax(spacing))
        plane = "axial"
    index_axis = int(np.argmax(np.abs(direction[_PLANE_NORMAL[plane], :])))
    return 2 - index_axis


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes); rename it into place on success.

    The temporary file is removed on any failure, and the destination is never half-written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ProtoSAMError(f"Output folder does not exist: {folder}. Create it first.")
    if not os.access(folder, os.W_OK):
        raise ProtoSAMError(f"Output folder is not writable: {folder}. Choose another output path.")
    suffix = "".join(path.suffixes) or ".tmp"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=folder)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def write_labelmap(labels: np.ndarray, reference: sitk.Image, path: PathLike) -> None:
    """Write a ``[k, j, i]`` integer label array with ``reference``'s exact geometry, atomically."""
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    image = sitk.GetImageFromArray(labels.astype(dtype, copy=False))
    image.CopyInformation(reference)
    with atomic_output(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), useCompression=True)
        except RuntimeError as exc:
            raise ProtoSAMError(f"Could not write {path}: {str(exc).strip().splitlines()[-1]}") from exc


def save_npz_atomic(path: PathLike, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` into ``path`` exactly (no suffix added), atomically."""
    buffer = _io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_output(path) as temporary:
        temporary.write_bytes(buffer.getvalue())
