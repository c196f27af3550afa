"""The canonical voxel order the engine segments in, from a volume's geometry (numpy only).

Frames and conventions:

- ``RAS``: patient frame, x to the patient's Right, y Anterior, z Superior (Slicer's frame).
  SimpleITK/ITK/DICOM use LPS; :func:`ijk_to_ras_from_lps` converts at the edge.
- ``ijk_to_ras``: (4, 4) float matrix taking homogeneous voxel indices ``(i, j, k, 1)`` to RAS
  millimetres; its first three columns are the I, J, K axis directions scaled by the spacing.
- ``KJI`` arrays: the caller's volume array indexed ``[k, j, i]``, which is what both
  ``slicer.util.arrayFromVolume`` and ``SimpleITK.GetArrayFromImage`` return. (An array indexed
  ``[i, j, k]``, as nibabel gives, is passed as ``array.transpose(2, 1, 0)``.)
- ``canonical`` arrays ``[slice, row, column]``: the KJI array transposed and flipped (never
  resampled or interpolated, so values are bit-identical) so that, for the slicing ``plane``,
  each slice ``canonical[n]`` is the picture Slicer's slice view of that plane shows, row 0 at
  the top and column 0 on the left of the screen, and ``n`` increases along the view normal.

The in-plane rule follows Slicer's default slice views (``vtkMRMLSliceNode::Get{Axial,
Sagittal,Coronal}SliceToRASMatrix`` with "patient right is screen left"); SliceToRAS column 0
is screen right, column 1 screen up, column 2 the view normal:

============  ==========================  =========================  ==========================
plane         row 0 (top) -> last row     column 0 (left) -> last    slice index increases to
============  ==========================  =========================  ==========================
axial (Red)   anterior -> posterior       patient's right -> left    superior
coronal       superior -> inferior        patient's right -> left    anterior
(Green)
sagittal      superior -> inferior        anterior -> posterior      patient's left
(Yellow)
============  ==========================  =========================  ==========================

So in axial and coronal slices the patient's right is on the left of the picture (the
radiological convention), and anterior faces left in sagittal slices.

Volumes whose axes are rotated away from the patient axes are not resampled: each voxel axis
is matched to the patient axis it is closest to (largest absolute direction cosine, assigned
one-to-one), and the rule above is applied to the matched axes.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import numpy as np

from .errors import InputError

__all__ = [
    "PLANES", "SLICE_TO_RAS", "Orientation", "canonical_orientation", "choose_plane", "plane_of_ijk_axis",
    "ijk_to_ras_from_lps", "world_axis_of_ijk", "check_ijk_to_ras", "axis_directions",
]

#: Slicing planes, and the RAS axis (0=R, 1=A, 2=S) each one's slices are stacked along.
PLANES = ("axial", "coronal", "sagittal")
_PLANE_OF_WORLD_AXIS = {2: "axial", 1: "coronal", 0: "sagittal"}

#: Rotation part of Slicer's default SliceToRAS per plane, as (screen right, screen up,
#: view normal) RAS vectors (vtkMRMLSliceNode.cxx, patientRightIsScreenLeft = true).
SLICE_TO_RAS = {
    "axial": ((-1, 0, 0), (0, 1, 0), (0, 0, 1)),  # right = L, up = A, normal = S
    "sagittal": ((0, -1, 0), (0, 0, 1), (-1, 0, 0)),  # right = P, up = S, normal = L
    "coronal": ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),  # right = L, up = S, normal = A
}


def check_ijk_to_ras(ijk_to_ras) -> np.ndarray:
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise InputError("The volume geometry contains NaN or infinite values; fix the volume's origin, "
                         "spacing and directions and try again.")
    return matrix


def axis_directions(ijk_to_ras) -> np.ndarray:
    """Unit RAS direction of each IJK axis: (3, 3) float64, column ``a`` is IJK axis ``a``."""
    matrix = check_ijk_to_ras(ijk_to_ras)[:3, :3]
    lengths = np.linalg.norm(matrix, axis=0)
    if np.any(lengths <= 1e-12):
        raise InputError("The volume has a zero spacing or a degenerate direction matrix; fix its geometry "
                         "and try again.")
    return matrix / lengths


def ijk_to_ras_from_lps(direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """IJK-to-RAS (4, 4) float64 from SimpleITK/ITK geometry, which is in LPS.

    direction: 9 numbers, row-major 3x3, columns are the I, J, K directions in LPS
    (``image.GetDirection()``); spacing: (3,) mm in IJK order; origin: (3,) LPS mm.
    """
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras @ direction @ np.diag(np.asarray(spacing, dtype=np.float64))
    matrix[:3, 3] = lps_to_ras @ np.asarray(origin, dtype=np.float64)
    return matrix


def world_axis_of_ijk(ijk_to_ras) -> Tuple[int, int, int]:
    """RAS axis (0=R, 1=A, 2=S) closest to each IJK axis, one-to-one.

    Pairs are taken greedily by decreasing absolute cosine (stable order), so that even a
    45-degree rotation gives a permutation.
    """
    strength = np.abs(axis_directions(ijk_to_ras))  # [world axis, ijk axis]
    matched = [-1, -1, -1]
    used = set()
    for flat in np.argsort(-strength, axis=None, kind="stable"):
        world, ijk = divmod(int(flat), 3)
        if matched[ijk] < 0 and world not in used:
            matched[ijk] = world
            used.add(world)
    return tuple(matched)


def plane_of_ijk_axis(ijk_to_ras, ijk_axis: int) -> str:
    """The plane ("axial", "coronal", "sagittal") whose slices are stacked along IJK axis ``ijk_axis``."""
    if ijk_axis not in (0, 1, 2):
        raise ValueError(f"ijk_axis must be 0, 1 or 2, got {ijk_axis!r}")
    return _PLANE_OF_WORLD_AXIS[world_axis_of_ijk(ijk_to_ras)[ijk_axis]]


def choose_plane(ijk_to_ras, plane: str = "auto") -> str:
    """``plane`` checked, with "auto" resolved: the plane of the IJK axis with the coarsest
    spacing (thick-slice acquisitions are segmented slice by slice), axial when isotropic."""
    if plane in PLANES:
        return plane
    if plane != "auto":
        raise ValueError(f"plane must be 'auto' or one of {', '.join(PLANES)}, not {plane!r}")
    spacing = np.linalg.norm(check_ijk_to_ras(ijk_to_ras)[:3, :3], axis=0)
    if np.ptp(spacing) > 1e-3 * spacing.max():
        return plane_of_ijk_axis(ijk_to_ras, int(np.argmax(spacing)))
    return "axial"


@dataclasses.dataclass(frozen=True)
class Orientation:
    """Lossless map between a KJI array and the canonical ``[slice, row, column]`` array.

    plane: the slicing plane. permutation: for each canonical axis, the KJI array axis it
    is taken from (``permutation[0]`` is the caller's slicing axis). flips: for each canonical
    axis, whether it runs against the KJI index.
    """

    plane: str
    permutation: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]

    @property
    def slice_axis(self) -> int:
        """Axis of the caller's KJI array along which slices are stacked."""
        return self.permutation[0]

    def to_canonical(self, array_kji) -> np.ndarray:
        """(K, J, I) array -> canonical array, a C-contiguous copy (same dtype, same values)."""
        array = np.asarray(array_kji)
        if array.ndim != 3:
            raise InputError(f"Expected a 3-D volume, got an array of shape {array.shape}.")
        out = np.transpose(array, self.permutation)
        flip_axes = tuple(axis for axis, flip in enumerate(self.flips) if flip)
        # Always a contiguous copy: reductions over a strided view may sum in another order,
        # and equal canonical arrays must give bit-identical results whatever the storage.
        return np.ascontiguousarray(np.flip(out, axis=flip_axes) if flip_axes else out)

    def from_canonical(self, array_canonical) -> np.ndarray:
        """Canonical array -> (K, J, I) array, a C-contiguous copy; exact inverse of to_canonical."""
        array = np.asarray(array_canonical)
        if array.ndim != 3:
            raise ValueError(f"expected a 3-D canonical array, got shape {array.shape}")
        flip_axes = tuple(axis for axis, flip in enumerate(self.flips) if flip)
        if flip_axes:
            array = np.flip(array, axis=flip_axes)
        return np.ascontiguousarray(np.transpose(array, tuple(int(a) for a in np.argsort(self.permutation))))

    def canonical_shape(self, shape_kji: Sequence[int]) -> Tuple[int, int, int]:
        """Shape of the canonical array made from a KJI array of ``shape_kji``."""
        return tuple(int(shape_kji[axis]) for axis in self.permutation)

    def canonical_slice(self, index: int, count: int) -> int:
        """Slice index along the caller's slicing axis (``count`` slices) -> canonical slice index."""
        if not 0 <= index < count:
            raise ValueError(f"slice index {index} outside 0..{count - 1}")
        return count - 1 - index if self.flips[0] else index

    def stored_slice(self, canonical_index: int, count: int) -> int:
        """Canonical slice index -> index along the caller's slicing axis (the flip is its own inverse)."""
        return self.canonical_slice(canonical_index, count)


def canonical_orientation(ijk_to_ras, plane: str) -> Orientation:
    """How to bring the KJI array of a volume with voxel-to-RAS matrix ``ijk_to_ras`` into the
    canonical order for slicing in ``plane`` (see the module docstring for the rule)."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}, not {plane!r}")
    directions = axis_directions(ijk_to_ras)
    matched = world_axis_of_ijk(ijk_to_ras)
    screen_right, screen_up, normal = (np.asarray(v, dtype=np.float64) for v in SLICE_TO_RAS[plane])
    # Canonical axes [slice, row, column] run along the view normal, screen down, screen right.
    wanted = (normal, -screen_up, screen_right)
    permutation, flips = [], []
    for target in wanted:
        world = int(np.flatnonzero(target)[0])
        ijk = matched.index(world)
        permutation.append(2 - ijk)  # KJI array axis of IJK axis ``ijk``
        flips.append(bool(directions[world, ijk] * target[world] < 0))
    return Orientation(plane=plane, permutation=tuple(permutation), flips=tuple(flips))
