"""Volume I/O: atomic writes, geometry checks, plane -> array axis."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from protosam.errors import InputError, ProtoSAMError
from protosam.io import atomic_output, check_same_geometry, read_volume, slice_axis_for_plane, write_labelmap


def _image(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spacing=(1.0, 1.0, 1.0), size=(5, 6, 7)):
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetDirection(direction)
    image.SetSpacing(spacing)
    image.SetOrigin((3.0, -2.0, 10.5))
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_labelmap_keeps_geometry_in_every_format(tmp_path, suffix):
    reference = _image(direction=(0, 0, 1, -1, 0, 0, 0, -1, 0), spacing=(0.7, 0.8, 3.0))
    labels = np.zeros((7, 6, 5), np.uint8)
    labels[2, 3, 4] = 6
    path = tmp_path / f"labels{suffix}"
    write_labelmap(labels, reference, path)
    array, image = read_volume(path)
    np.testing.assert_array_equal(array, labels)
    check_same_geometry(reference, image, "reference", "written")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_output_leaves_nothing_on_failure_and_refuses_bad_folders(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ProtoSAMError, match="does not exist"):
        with atomic_output(tmp_path / "missing" / "x.nii.gz"):
            pass
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ProtoSAMError, match="not writable"):
            with atomic_output(locked / "x.nii.gz"):
                pass


def test_geometry_mismatch_names_the_difference():
    with pytest.raises(InputError, match="spacing"):
        check_same_geometry(_image(), _image(spacing=(1, 1, 2)), "image", "mask")
    with pytest.raises(InputError, match="direction"):
        check_same_geometry(_image(), _image(direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)), "image", "mask")


@pytest.mark.parametrize(
    "direction, plane, axis",
    [
        ((1, 0, 0, 0, 1, 0, 0, 0, 1), "axial", 0),
        ((1, 0, 0, 0, 1, 0, 0, 0, 1), "coronal", 1),
        ((1, 0, 0, 0, 1, 0, 0, 0, 1), "sagittal", 2),
        ((-1, 0, 0, 0, -1, 0, 0, 0, 1), "axial", 0),  # RAS-flipped: still axial along k
        ((1, 0, 0, 0, 0, 1, 0, -1, 0), "axial", 1),  # coronally acquired volume: S runs along j
        ((0, 0, 1, 1, 0, 0, 0, 1, 0), "sagittal", 0),  # i->P?, permuted axes
    ],
)
def test_plane_to_array_axis_follows_the_direction_matrix(direction, plane, axis):
    assert slice_axis_for_plane(_image(direction=direction), plane) == axis


def test_auto_plane_prefers_the_thick_slice_axis():
    assert slice_axis_for_plane(_image(spacing=(0.8, 0.8, 5.0)), "auto") == 0
    assert slice_axis_for_plane(_image(spacing=(4.0, 0.8, 0.8)), "auto") == 2
    assert slice_axis_for_plane(_image(), "auto") == 0


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "nothing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="Cannot read"):
        read_volume(tmp_path / "junk.nii.gz")
