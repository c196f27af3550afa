"""Geometry between slice views, volumes and numpy arrays (numpy only: no Qt, no MRML).

Frames and conventions used throughout ProtoSAMSlicerLib:

- ``World``: Slicer's RAS frame after all parent transforms have been applied.
- ``ijkToWorld``: (4, 4) float64 matrix taking homogeneous voxel indices ``(i, j, k, 1)`` to
  World. Its first three columns are the IJK axis directions scaled by the spacing.
- ``KJI`` arrays: what ``slicer.util.arrayFromVolume`` returns, indexed ``[k, j, i]``. numpy
  axis 0 is IJK axis K (index 2), so ``kjiAxis = 2 - ijkAxis`` and spacing in KJI order is the
  IJK spacing reversed.

Only what is specific to Slicer lives here (slice view normal -> volume axis, World points ->
slice indices). The voxel order the engine segments in is the engine's own rule
(``protosam.orientation``): the logic hands it KJI arrays with their ``ijkToWorld`` and the
slicing plane, and gets KJI results back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import numpy as np

from protosam.errors import InputError
# One geometry check for the engine and Slicer: finite 4x4 matrix, unit IJK directions.
from protosam.orientation import axis_directions as axisDirections
from protosam.orientation import check_ijk_to_ras

#: Largest angle between the slice view normal and a volume axis that still counts as
#: "aligned". Slice views snapped to the volume ("Rotate to volume plane") are aligned to
#: floating point precision; anything beyond a fraction of a degree is a deliberately
#: reformatted (oblique) view, where one slice of the view is not one slice of the volume.
DEFAULT_ALIGNMENT_TOLERANCE_DEGREES = 0.5

IJK_AXIS_NAMES = ("I", "J", "K")


class ObliqueSliceError(InputError):
    """The slice view is not aligned with any axis of the volume."""


def kjiAxisFromIjkAxis(ijkAxis: int) -> int:
    """numpy axis of a KJI array that runs along IJK axis ``ijkAxis`` (0=I, 1=J, 2=K)."""
    if ijkAxis not in (0, 1, 2):
        raise ValueError(f"ijkAxis must be 0, 1 or 2, got {ijkAxis!r}")
    return 2 - ijkAxis


def ijkAxisFromKjiAxis(kjiAxis: int) -> int:
    """IJK axis (0=I, 1=J, 2=K) along which numpy axis ``kjiAxis`` of a KJI array runs."""
    if kjiAxis not in (0, 1, 2):
        raise ValueError(f"kjiAxis must be 0, 1 or 2, got {kjiAxis!r}")
    return 2 - kjiAxis


def spacingKji(spacing_Ijk: Sequence[float]) -> Tuple[float, float, float]:
    """Voxel spacing (mm) reordered from IJK to the axis order of KJI arrays."""
    if len(spacing_Ijk) != 3:
        raise ValueError(f"spacing must have 3 values, got {len(spacing_Ijk)}")
    return (float(spacing_Ijk[2]), float(spacing_Ijk[1]), float(spacing_Ijk[0]))


@dataclasses.dataclass(frozen=True)
class SliceAxis:
    """The volume axis a slice view looks along.

    ijkAxis: 0, 1 or 2 for I, J, K. kjiAxis: the matching numpy axis of KJI arrays.
    sign: +1 when the IJK axis points along the view normal, -1 when against it.
    angleDegrees: remaining angle between the view normal and that axis.
    """

    ijkAxis: int
    kjiAxis: int
    sign: int
    angleDegrees: float


def sliceAxisFromNormal(normal_World: Sequence[float], ijkToWorld: np.ndarray,
                        toleranceDegrees: float = DEFAULT_ALIGNMENT_TOLERANCE_DEGREES) -> SliceAxis:
    """Find the volume axis parallel to a slice view normal.

    normal_World: (3,) view normal in World (column 2 of the slice node's SliceToRAS).
    ijkToWorld: (4, 4) voxel-to-World matrix of the volume, parent transforms included.
    Raises ObliqueSliceError when no axis is within ``toleranceDegrees`` of the normal.
    """
    if toleranceDegrees < 0:
        raise ValueError(f"toleranceDegrees must be >= 0, got {toleranceDegrees}")
    normal = np.asarray(normal_World, dtype=np.float64).reshape(-1)
    if normal.shape != (3,) or not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 1e-12:
        raise ValueError(f"normal_World must be a finite non-zero 3-vector, got {normal_World!r}")
    normal = normal / np.linalg.norm(normal)
    cosines = axisDirections(ijkToWorld).T @ normal
    ijkAxis = int(np.argmax(np.abs(cosines)))
    cosine = float(np.clip(abs(cosines[ijkAxis]), 0.0, 1.0))
    angle = math.degrees(math.acos(cosine))
    if angle > toleranceDegrees:
        raise ObliqueSliceError(
            f"The slice view is oblique to the volume: its normal is {angle:.1f} degrees away from "
            f"the closest volume axis ({IJK_AXIS_NAMES[ijkAxis]}). ProtoSAM propagates along volume "
            "slices; use the slice view's 'Reset field of view / Rotate to volume plane' option (or "
            "pick the Axial/Sagittal/Coronal view that matches the acquisition) and try again.")
    sign = 1 if cosines[ijkAxis] >= 0 else -1
    return SliceAxis(ijkAxis=ijkAxis, kjiAxis=kjiAxisFromIjkAxis(ijkAxis), sign=sign,
                     angleDegrees=angle)


def ijkFromWorld(point_World: Sequence[float], ijkToWorld: np.ndarray) -> np.ndarray:
    """Continuous voxel coordinates (i, j, k) of a World point: (3,) float64."""
    point = np.asarray(point_World, dtype=np.float64).reshape(-1)
    if point.shape != (3,):
        raise ValueError(f"point_World must have 3 coordinates, got {point_World!r}")
    worldToIjk = np.linalg.inv(check_ijk_to_ras(ijkToWorld))
    return (worldToIjk @ np.append(point, 1.0))[:3]


def sliceIndexFromWorld(point_World: Sequence[float], ijkToWorld: np.ndarray, ijkAxis: int,
                        shape_Kji: Sequence[int]) -> int:
    """Index along ``ijkAxis`` of the volume slice that contains a World point.

    shape_Kji: shape of the volume's KJI array. Raises InputError when the point lies outside
    the volume along that axis (the slice view shows no slice of this volume).
    """
    if ijkAxis not in (0, 1, 2):
        raise ValueError(f"ijkAxis must be 0, 1 or 2, got {ijkAxis!r}")
    coordinate = float(ijkFromWorld(point_World, ijkToWorld)[ijkAxis])
    size = int(shape_Kji[kjiAxisFromIjkAxis(ijkAxis)])
    index = int(math.floor(coordinate + 0.5))
    if index < 0 or index >= size:
        raise InputError(
            f"The slice view is outside the volume (slice {index} along {IJK_AXIS_NAMES[ijkAxis]}, "
            f"the volume has {size}). Move the view onto the volume and try again.")
    return index
