"""Slice-axis detection and slice indices (ProtoSAMSlicerLib.geometry). The canonical order the
engine segments in is tested with the engine (Testing/engine/test_orientation.py)."""

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

from ProtoSAMSlicerLib import geometry
from protosam.errors import InputError
from slicer_mrml_helpers import homogeneous, ijkToRasFrom, rotationMatrix

LPS = np.diag([-1.0, -1.0, 1.0])
PERMUTED = np.array([[0.0, 1.0, 0.0],   # I -> S, J -> R, K -> A (a sagittally stored volume)
                     [0.0, 0.0, 1.0],
                     [1.0, 0.0, 0.0]])


def test_kji_ijk_axis_mapping_and_spacing():
    assert [geometry.kjiAxisFromIjkAxis(a) for a in range(3)] == [2, 1, 0]
    assert [geometry.ijkAxisFromKjiAxis(a) for a in range(3)] == [2, 1, 0]
    assert geometry.spacingKji((0.5, 0.7, 3.0)) == (3.0, 0.7, 0.5)
    with pytest.raises(ValueError):
        geometry.kjiAxisFromIjkAxis(3)


@pytest.mark.parametrize("directions, normal, expected", [
    (np.eye(3), (0, 0, 1), (2, 0, 1)),          # axial view on an RAS volume: K
    (np.eye(3), (1, 0, 0), (0, 2, 1)),          # sagittal: I
    (np.eye(3), (0, 1, 0), (1, 1, 1)),          # coronal: J
    (LPS, (1, 0, 0), (0, 2, -1)),               # LPS volume, sagittal view: I, reversed
    (LPS, (0, 0, 1), (2, 0, 1)),
    (PERMUTED, (0, 0, 1), (0, 2, 1)),           # axial view looks along I of a permuted volume
    (PERMUTED, (1, 0, 0), (1, 1, 1)),
    (PERMUTED, (0, -1, 0), (2, 0, -1)),
])
def test_slice_axis_from_view_normal(directions, normal, expected):
    ijkToWorld = ijkToRasFrom(directions, spacing=(0.6, 0.8, 2.5))
    axis = geometry.sliceAxisFromNormal(normal, ijkToWorld)
    assert (axis.ijkAxis, axis.kjiAxis, axis.sign) == expected
    assert axis.angleDegrees == pytest.approx(0.0, abs=1e-6)


def test_slice_axis_through_parent_transform():
    # The volume is RAS-aligned locally but rotated 90 degrees about S by its parent transform:
    # its I axis now points A, so a coronal view (normal A) looks along I.
    parent = homogeneous(rotationMatrix((0, 0, 1), 90), (5.0, -2.0, 1.0))
    ijkToWorld = parent @ ijkToRasFrom(np.eye(3), spacing=(1.0, 1.0, 3.0))
    axis = geometry.sliceAxisFromNormal((0, 1, 0), ijkToWorld)
    assert axis.ijkAxis == 0 and axis.sign == 1


def test_nearly_aligned_view_accepted_oblique_view_refused_with_instructions():
    ijkToWorld = ijkToRasFrom(np.eye(3))
    slightly = rotationMatrix((1, 0, 0), 0.2) @ np.array([0.0, 0.0, 1.0])
    assert geometry.sliceAxisFromNormal(slightly, ijkToWorld).ijkAxis == 2
    oblique = rotationMatrix((1, 0, 0), 20) @ np.array([0.0, 0.0, 1.0])
    with pytest.raises(geometry.ObliqueSliceError, match=r"oblique.*20\.0 degrees.*Rotate to volume plane"):
        geometry.sliceAxisFromNormal(oblique, ijkToWorld)
    assert issubclass(geometry.ObliqueSliceError, InputError)
    # A volume acquired obliquely is refused in a World-aligned view for the same reason.
    obliqueVolume = ijkToRasFrom(rotationMatrix((0, 1, 0), 30))
    with pytest.raises(geometry.ObliqueSliceError):
        geometry.sliceAxisFromNormal((0, 0, 1), obliqueVolume)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError):
        geometry.sliceAxisFromNormal((0, 0, 0), np.eye(4))
    with pytest.raises(ValueError):
        geometry.sliceAxisFromNormal((0, 0, 1), np.eye(3))
    with pytest.raises(InputError, match="zero spacing"):
        geometry.sliceAxisFromNormal((0, 0, 1), np.diag([1.0, 1.0, 0.0, 1.0]))


def test_slice_index_from_world_point_round_trips_and_refuses_outside():
    ijkToWorld = homogeneous(rotationMatrix((0, 0, 1), 90)) @ ijkToRasFrom(LPS, (0.5, 0.7, 2.0), (10, -3, 4))
    shape_Kji = (6, 9, 11)
    for ijk in [(0, 0, 0), (3, 8, 5), (10, 1, 2)]:
        point = (ijkToWorld @ np.array([*ijk, 1.0]))[:3]
        for ijkAxis in range(3):
            assert geometry.sliceIndexFromWorld(point, ijkToWorld, ijkAxis, shape_Kji) == ijk[ijkAxis]
    outside = (ijkToWorld @ np.array([0, 0, 6.2, 1.0]))[:3]
    with pytest.raises(InputError, match="outside the volume"):
        geometry.sliceIndexFromWorld(outside, ijkToWorld, 2, shape_Kji)
