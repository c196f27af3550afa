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


# Output format -> the companion files SimpleITK writes beside it (same stem), as seen on disk.
FORMATS = {
    ".nii.gz": (), ".nii": (), ".nrrd": (), ".mha": (), ".h5": (), ".hdf5": (), ".mnc": (),
    ".nhdr": (".raw.gz",), ".mhd": (".zraw",), ".hdr": (".img",), ".img": (".hdr",),
}


def test_the_accepted_output_formats_are_those_tested_here():
    from protosam.io import LABELMAP_FORMATS

    assert LABELMAP_FORMATS == FORMATS


@pytest.mark.parametrize("suffix", sorted(FORMATS))
@pytest.mark.parametrize("large", [False, True], ids=["uint8", "uint16"])
def test_labelmap_keeps_geometry_in_every_format(tmp_path, suffix, large):
    """Every file lands under its final name (a detached header names its final data file),
    nothing temporary is left, and the files still read as the label map once moved elsewhere."""
    reference = _image(direction=(0, 0, 1, -1, 0, 0, 0, -1, 0), spacing=(0.7, 0.8, 3.0))
    labels = np.zeros((7, 6, 5), np.uint16 if large else np.uint8)
    labels[2, 3, 4] = 6
    labels[5, 1, 0] = 65535 if large else 255
    out = tmp_path / "out"
    out.mkdir()
    path = out / f"labels{suffix}"
    write_labelmap(labels, reference, path)
    expected = {path.name} | {f"labels{companion}" for companion in FORMATS[suffix]}
    assert {p.name for p in out.iterdir()} == expected
    moved = tmp_path / "moved"
    out.rename(moved)  # a header pointing at any other data file no longer reads
    array, image = read_volume(moved / path.name)
    np.testing.assert_array_equal(array, labels)
    check_same_geometry(reference, image, "reference", "written")


def test_labelmap_refuses_labels_it_cannot_store(tmp_path):
    labels = np.zeros((7, 6, 5), np.int32)
    labels[1, 1, 1] = 70000
    with pytest.raises(InputError, match="65535"):
        write_labelmap(labels, _image(), tmp_path / "labels.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_umask_mode(tmp_path):
    """Not mkstemp's 0600: what any other program writing a new file would get."""
    from protosam.io import save_npz_atomic

    previous = os.umask(0o027)
    try:
        write_labelmap(np.ones((7, 6, 5), np.uint8), _image(), tmp_path / "labels.nhdr")
        save_npz_atomic(tmp_path / "result.npz", a=np.zeros(3))
    finally:
        os.umask(previous)
    for name in ("labels.nhdr", "labels.raw.gz", "result.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_atomic_output_leaves_nothing_on_failure_and_refuses_bad_folders(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while a two-file format is half written
        with atomic_output(tmp_path / "out.nhdr") as temporary:
            temporary.with_name("out.raw.gz").write_bytes(b"data")
            raise KeyboardInterrupt
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
    with pytest.raises(InputError, match="is a directory"):
        read_volume(tmp_path)
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="Cannot read"):
        read_volume(tmp_path / "junk.nii.gz")
