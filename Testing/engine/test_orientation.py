"""The engine's canonical orientation, and one result whatever way a volume is stored.

A volume is "stored differently" when its voxel array is transposed and/or flipped and its
voxel-to-RAS matrix changed to match, so that every voxel keeps its physical position (what a
scanner writing LPS or RAS, axial or sagittal slices, does). Such volumes hold the same image;
the engine must then segment the same canonical arrays and give the same label map once
mapped back. The canonical arrays are pure permutations/flips of the stored ones (no
resampling, no arithmetic), so equal inputs are bit-identical and the engine's results are
too: the tests below assert exact equality, which holds by construction on any CPU.
"""
import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from protosam import Engine, InputError, segment_volume
from protosam.cli import main
from protosam.orientation import (
    PLANES, SLICE_TO_RAS, canonical_orientation, choose_plane, ijk_to_ras_from_lps, plane_of_ijk_axis,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(axis, degrees):
    """(3, 3) rotation about ``axis`` by ``degrees`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def stored_differently(array_kji, ijk_to_ras, permutation, flips):
    """(array, ijk_to_ras) of the same volume with its KJI axes transposed by ``permutation``
    and then flipped where ``flips`` says; each voxel keeps its RAS position."""
    array = np.transpose(array_kji, permutation)
    shape = array.shape
    array = np.ascontiguousarray(np.flip(array, axis=[a for a in range(3) if flips[a]]))
    new_to_old_kji = np.zeros((4, 4))  # homogeneous new KJI index -> old KJI index
    new_to_old_kji[3, 3] = 1
    for new_axis, old_axis in enumerate(permutation):
        new_to_old_kji[old_axis, new_axis] = -1 if flips[new_axis] else 1
        new_to_old_kji[old_axis, 3] = shape[new_axis] - 1 if flips[new_axis] else 0
    reverse = np.eye(4)[[2, 1, 0, 3]]  # IJK <-> KJI index order
    return array, np.asarray(ijk_to_ras) @ reverse @ new_to_old_kji @ reverse


def restored(array_kji, permutation, flips):
    """Inverse of :func:`stored_differently` for arrays (back to the first storage order)."""
    array = np.flip(array_kji, axis=[a for a in range(3) if flips[a]])
    return np.transpose(array, np.argsort(permutation))


# name -> (KJI permutation, flips): the storage orders every caller is tested with.
STORAGE = {
    "as_acquired": ((0, 1, 2), (False, False, False)),
    "slices_reversed": ((0, 1, 2), (True, False, False)),
    "ras_instead_of_lps": ((0, 1, 2), (False, True, True)),
    "stored_sagittally": ((2, 0, 1), (False, False, False)),
    "permuted_and_flipped": ((1, 2, 0), (True, False, True)),
}
# A tilted acquisition: 12 degrees about an oblique axis, on top of Colin27's LPS directions.
TILT = rotation((1.0, 2.0, 3.0), 12.0)


def world_coordinates(shape_kji, ijk_to_ras):
    """RAS position of every voxel: (K, J, I, 3) float64."""
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij"), axis=-1)
    ijk = kji[..., ::-1].reshape(-1, 3).astype(float)
    ras = ijk @ np.asarray(ijk_to_ras)[:3, :3].T + np.asarray(ijk_to_ras)[:3, 3]
    return ras.reshape(*shape_kji, 3)


def signed_permutations():
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(permutation, signs)):
                matrix[row, column] = sign
            yield matrix


def matrix_from(directions, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


# --------------------------------------------------------------------------- the rule itself
@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("tilted", [False, True], ids=["aligned", "tilted"])
def test_canonical_slices_show_what_slicer_s_slice_view_shows(plane, tilted):
    """Every one of the 48 axis-aligned storage orders (and each tilted by 12 degrees) gives
    slices whose index runs along Slicer's view normal, rows downwards on the screen and
    columns to the screen's right (vtkMRMLSliceNode's default SliceToRAS for the plane)."""
    screen_right, screen_up, normal = (np.asarray(v, float) for v in SLICE_TO_RAS[plane])
    shape = (4, 5, 6)
    for directions in signed_permutations():
        if tilted:
            directions = TILT @ directions
        ijk_to_ras = matrix_from(directions, (0.5, 0.75, 2.0), (3.0, -7.0, 11.0))
        orientation = canonical_orientation(ijk_to_ras, plane)
        ras = world_coordinates(shape, ijk_to_ras)
        canonical = np.stack([orientation.to_canonical(ras[..., c]) for c in range(3)], axis=-1)
        for axis, direction in enumerate((normal, -screen_up, screen_right)):
            along = canonical @ direction
            assert np.all(np.diff(along, axis=axis) > 0), (plane, directions, axis)
            if not tilted:
                for other in set(range(3)) - {axis}:
                    assert np.allclose(np.diff(along, axis=other), 0)
        values = np.arange(np.prod(shape)).reshape(shape)
        assert np.array_equal(orientation.from_canonical(orientation.to_canonical(values)), values)
        assert orientation.canonical_shape(shape) == orientation.to_canonical(values).shape
        # Slice indices map consistently with the arrays, both ways.
        count = shape[orientation.slice_axis]
        for index in range(count):
            stored_slice = np.take(values, index, axis=orientation.slice_axis)
            canonical_slice = orientation.to_canonical(values)[orientation.canonical_slice(index, count)]
            assert set(stored_slice.ravel()) == set(canonical_slice.ravel())
            assert orientation.stored_slice(orientation.canonical_slice(index, count), count) == index


def test_axial_picture_of_a_dicom_style_volume_is_stored_as_is():
    """LPS storage (i to the patient's left, j posterior, k superior) already is the radiologist's
    axial picture: anterior at the top, the patient's right on the left; slices go upwards."""
    ijk_to_ras = ijk_to_ras_from_lps(np.eye(3).ravel(), (0.8, 0.8, 3.0), (10.0, 20.0, -30.0))
    orientation = canonical_orientation(ijk_to_ras, "axial")
    assert orientation.permutation == (0, 1, 2) and orientation.flips == (False, False, False)
    # A RAS-stored one (i to the right, j anterior) is mirrored both ways in-plane.
    assert canonical_orientation(matrix_from(np.eye(3)), "axial").flips == (False, True, True)


def test_ijk_to_ras_from_lps_agrees_with_simpleitk():
    image = sitk.Image(5, 6, 7, sitk.sitkUInt8)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((12.0, -3.0, 40.0))
    image.SetDirection(tuple((TILT @ np.diag([1.0, -1.0, 1.0])).ravel()))
    ijk_to_ras = ijk_to_ras_from_lps(image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    for index in [(0, 0, 0), (4, 1, 6), (2, 5, 3)]:
        lps = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose(ijk_to_ras @ np.append(index, 1.0), np.append(LPS_TO_RAS @ lps, 1.0))


def test_planes_auto_is_the_coarse_axis_and_45_degrees_is_still_a_permutation():
    thick_k = matrix_from(LPS_TO_RAS, (0.8, 0.8, 4.0))
    assert choose_plane(thick_k) == "axial"
    assert choose_plane(matrix_from(np.eye(3)[:, [2, 0, 1]], (0.8, 0.8, 4.0))) == "coronal"  # k along A
    assert choose_plane(matrix_from(np.eye(3))) == "axial"  # isotropic
    assert choose_plane(thick_k, "sagittal") == "sagittal"
    with pytest.raises(ValueError, match="plane"):
        choose_plane(thick_k, "oblique")
    turned = matrix_from(rotation((0, 0, 1), 45))
    for plane in PLANES:
        assert sorted(canonical_orientation(turned, plane).permutation) == [0, 1, 2]
    assert plane_of_ijk_axis(matrix_from(np.eye(3)[:, [1, 2, 0]]), 0) == "coronal"  # i along A


# --------------------------------------------------------------------------- the volume API
def _tilted_colin_slab(colin27):
    """5 shrunk axial Colin27 slices (through the thalami) with two AAL labels, re-tilted by TILT:
    (image, labels, ijk_to_ras). Small because every slice costs a SAM embedding per run;
    isotropic 3 mm voxels, so that the CLI's ``--axis auto`` picks the axial plane."""
    image = sitk.Shrink(sitk.ReadImage(str(colin27[0]), sitk.sitkFloat32), [3, 3, 3])
    labels = sitk.Shrink(sitk.ReadImage(str(colin27[1])), [3, 3, 3])
    volume = sitk.GetArrayFromImage(image)[27:32]
    atlas = sitk.GetArrayFromImage(labels)[27:32]
    values, counts = np.unique(atlas[atlas > 0], return_counts=True)
    chosen = values[np.argsort(counts)[-2:]]
    atlas = np.where(np.isin(atlas, chosen), atlas, 0).astype(np.uint8)
    direction = TILT @ np.asarray(image.GetDirection()).reshape(3, 3)
    ijk_to_ras = ijk_to_ras_from_lps(direction.ravel(), image.GetSpacing(), image.GetOrigin())
    return volume, atlas, ijk_to_ras


@pytest.fixture(scope="module")
def slab(colin27):
    return _tilted_colin_slab(colin27)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_python_api_gives_one_label_map_for_every_storage_order(slab, tiny_models, preset):
    volume, atlas, ijk_to_ras = slab
    engine = Engine(tiny_models, preset=preset, device="cpu")
    masks = {int(v): atlas == v for v in np.unique(atlas) if v}
    results = {}
    for name, (permutation, flips) in STORAGE.items():
        stored, stored_to_ras = stored_differently(volume, ijk_to_ras, permutation, flips)
        stored_masks = {k: stored_differently(m, ijk_to_ras, permutation, flips)[0] for k, m in masks.items()}
        result = segment_volume(engine, stored, None, stored_masks, query_ijk_to_ras=stored_to_ras,
                                plane="axial", modality="mri")
        assert all(m.shape == stored.shape for m in result.masks.values())
        # Slice numbers come back in the caller's own storage: the support slice is painted there.
        for key, indices in result.support_slices.items():
            assert indices and all(np.take(stored_masks[key], i, axis=result.axis).any() for i in indices)
        results[name] = {k: restored(m, permutation, flips) for k, m in result.masks.items()}
    reference = results["as_acquired"]
    assert any(m.any() for m in reference.values())
    for name, masks_back in results.items():
        for key in masks:
            # Bit-identical canonical inputs -> bit-identical results (see module docstring).
            assert np.array_equal(masks_back[key], reference[key]), (name, key)


def _write(path, array_kji, ijk_to_ras):
    image = sitk.GetImageFromArray(array_kji)
    matrix = LPS_TO_RAS @ np.asarray(ijk_to_ras)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((matrix / spacing).ravel()))
    image.SetOrigin(tuple(LPS_TO_RAS @ np.asarray(ijk_to_ras)[:3, 3]))
    sitk.WriteImage(image, str(path))


def _model_args(models, preset):
    return ["--dinov2", models.dinov2, "--dinov2-checkpoint", models.dinov2_checkpoint, "--sam", models.sam,
            "--sam-checkpoint", models.sam_checkpoint, "--input-size", str(models.input_size), "--device", "cpu",
            "--preset", preset]


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_cli_gives_one_label_map_for_every_storage_order(slab, tiny_models, tmp_path, capsys, preset):
    """Real files (NIfTI and NRRD, written and read by SimpleITK in LPS) through ``protosam segment``;
    the output equals the Python API run on the same arrays and geometry."""
    volume, atlas, ijk_to_ras = slab
    outputs = {}
    # Three of the storage orders (each run costs seconds): as acquired, reversed slices, and
    # permuted + flipped; the Python API test above covers all five.
    cli_storage = {name: STORAGE[name] for name in ("as_acquired", "slices_reversed", "permuted_and_flipped")}
    for number, (name, (permutation, flips)) in enumerate(cli_storage.items()):
        suffix = ".nrrd" if number % 2 else ".nii.gz"
        stored, stored_to_ras = stored_differently(volume, ijk_to_ras, permutation, flips)
        stored_atlas = stored_differently(atlas, ijk_to_ras, permutation, flips)[0]
        _write(tmp_path / f"{name}_image{suffix}", stored, stored_to_ras)
        _write(tmp_path / f"{name}_labels{suffix}", stored_atlas, stored_to_ras)
        output = tmp_path / f"{name}_out{suffix}"
        code = main(["segment", "--image", str(tmp_path / f"{name}_image{suffix}"),
                     "--support-mask", str(tmp_path / f"{name}_labels{suffix}"), "--output", str(output),
                     "--modality", "mri", *_model_args(tiny_models, preset)])
        assert code == 0, capsys.readouterr().err
        written = sitk.ReadImage(str(output))
        outputs[name] = restored(sitk.GetArrayFromImage(written), permutation, flips)
    reference = outputs["as_acquired"]
    labels = [int(v) for v in np.unique(atlas) if v]
    assert set(np.unique(reference)) == {0, *labels}
    for name, output in outputs.items():
        assert np.array_equal(output, reference), name
    # The same engine call from Python (geometry read back from the file, as the CLI does;
    # "auto" plane: isotropic voxels -> axial).
    image = sitk.ReadImage(str(tmp_path / "as_acquired_image.nii.gz"))
    api = segment_volume(
        Engine(tiny_models, preset=preset, device="cpu"), sitk.GetArrayFromImage(image), None,
        {label: atlas == label for label in labels},
        query_ijk_to_ras=ijk_to_ras_from_lps(image.GetDirection(), image.GetSpacing(), image.GetOrigin()),
        modality="mri")
    composed = np.zeros(atlas.shape, np.uint8)
    for label in reversed(labels):
        composed[api.masks[label] > 0] = label
    for label in labels:  # the CLI keeps what the user painted on the support slices
        for k in api.support_slices[label]:
            composed[k][atlas[k] == label] = label
    assert np.array_equal(reference, composed)


# --------------------------------------------------------------------------- seeding across volumes
SLICES, SIZE = 30, 48
BLOCKS = (range(3, 9), range(20, 27))  # two separate stretches of slices hold the structure


@pytest.fixture
def transparent_engine(tiny_models):
    """A real Engine whose encoders are intensity features and an identity SAM, so that a
    structure is found exactly where it is bright (as in test_propagation)."""
    engine = Engine(tiny_models, preset="default", device="cpu")

    def encode(images):
        intensity = F.adaptive_avg_pool2d(images[:, :1].float(), 32)
        return torch.cat([intensity, torch.ones_like(intensity)], dim=1)

    def decode(embedding, prompts, **_):
        union = torch.from_numpy(np.any([p.full_mask((1024, 1024)) for p in prompts], axis=0))
        return union, [1.0] * len(prompts)

    engine.encode = encode
    engine.refiner.embed = lambda images, **_: torch.zeros(images.shape[0], 1, 64, 64)
    engine.refiner.decode = decode
    return engine


def _two_block_volume(seed):
    """Axial slices (RAS geometry, k superior) with a bright disc on the slices of BLOCKS only."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(0, 0.05, (SLICES, SIZE, SIZE)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    for k in itertools.chain(*BLOCKS):
        truth[k] = (yy - 22) ** 2 + (xx - 25) ** 2 <= 81
    volume += 2.0 * truth
    return volume, truth, matrix_from(np.eye(3), (1.0, 1.0, 2.5), (0.0, 0.0, -40.0))


def _reversed_support(seed=1):
    """The support volume stored with its slices in the opposite order, painted on the
    stored slice that holds anatomical slice 5 (the lower block)."""
    volume, truth, ijk_to_ras = _two_block_volume(seed)
    stored, stored_to_ras = stored_differently(volume, ijk_to_ras, (0, 1, 2), (True, False, False))
    painted = np.zeros_like(truth)
    painted[SLICES - 1 - 5] = truth[5]
    return stored, stored_to_ras, painted


def test_a_reversed_support_volume_seeds_the_anatomically_matching_slice(transparent_engine):
    query, query_truth, query_to_ras = _two_block_volume(seed=2)
    support, support_to_ras, painted = _reversed_support()
    result = segment_volume(transparent_engine, query, support, {"d": painted}, query_ijk_to_ras=query_to_ras,
                            support_ijk_to_ras=support_to_ras, plane="axial", modality="none")
    assert result.support_slices == {"d": [SLICES - 1 - 5]}  # the caller's own slice number
    found = sorted(set(np.flatnonzero(result.masks["d"].reshape(SLICES, -1).any(axis=1))))
    # Seeded at anatomical slice 5: the lower block is followed and the walk stops before the
    # upper one (a seed at the mirrored slice 24 would find the upper block instead).
    assert found == list(BLOCKS[0])


def test_cli_seeds_a_reversed_support_file_at_the_matching_slice(transparent_engine, tmp_path, capsys, monkeypatch):
    """Through real files; before the engine owned orientation, the CLI mapped the support slice
    by its stored index and seeded the mirrored slice (the upper block)."""
    import protosam.cli

    query, _, query_to_ras = _two_block_volume(seed=2)
    support, support_to_ras, painted = _reversed_support()
    _write(tmp_path / "query.nii.gz", query, query_to_ras)
    _write(tmp_path / "support.nrrd", support, support_to_ras)
    _write(tmp_path / "painted.nrrd", painted, support_to_ras)
    monkeypatch.setattr(protosam.cli, "engine_from_args", lambda args: transparent_engine)
    code = main(["segment", "--image", str(tmp_path / "query.nii.gz"), "--support-image", str(tmp_path / "support.nrrd"),
                 "--support-mask", str(tmp_path / "painted.nrrd"), "--output", str(tmp_path / "out.nii.gz"),
                 "--modality", "none", "--axis", "axial", "--dinov2", "unused", "--sam", "unused"])
    assert code == 0, capsys.readouterr().err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz")))
    assert sorted(set(np.flatnonzero(labels.reshape(SLICES, -1).any(axis=1)))) == list(BLOCKS[0])


def test_support_slices_that_seed_one_target_slice_are_refused(transparent_engine):
    """A 30-slice support with a 10-slice target: support slices 10 and 11 both fall on target
    slice 3. They used to overwrite each other's prototypes silently. The message names the
    caller's own slice numbers, as stored and with geometry alike."""
    support, truth, support_to_ras = _two_block_volume(seed=1)
    truth[10:12] = truth[5]
    query, query_to_ras = support[::3].copy(), support_to_ras @ np.diag([1.0, 1.0, 3.0, 1.0])
    for kwargs in (dict(), dict(query_ijk_to_ras=query_to_ras, support_ijk_to_ras=support_to_ras, plane="axial")):
        with pytest.raises(InputError, match="Support slices 10 and 11 of 'd' both map to the same slice"):
            segment_volume(transparent_engine, query, support, {"d": truth}, support_slices={"d": [10, 11]},
                           modality="none", **kwargs)
    # Stored in the opposite order, the same two anatomical slices are 19 and 18.
    reversed_support, reversed_to_ras = stored_differently(support, support_to_ras, (0, 1, 2), (True, False, False))
    reversed_truth = np.ascontiguousarray(truth[::-1])
    with pytest.raises(InputError, match="Support slices 18 and 19 of 'd' both map"):
        segment_volume(transparent_engine, query, reversed_support, {"d": reversed_truth},
                       support_slices={"d": [18, 19]}, modality="none", query_ijk_to_ras=query_to_ras,
                       support_ijk_to_ras=reversed_to_ras, plane="axial")
    # Slices further apart are fine.
    result = segment_volume(transparent_engine, query, support, {"d": truth}, support_slices={"d": [5, 11]},
                            modality="none")
    assert result.support_slices == {"d": [5, 11]}


def test_geometry_and_axis_are_exclusive_and_a_support_needs_its_geometry(transparent_engine):
    volume, truth, ijk_to_ras = _two_block_volume(seed=1)
    with pytest.raises(ValueError, match="not both"):
        segment_volume(transparent_engine, volume, None, {"d": truth}, query_ijk_to_ras=ijk_to_ras, axis=0)
    with pytest.raises(ValueError, match="support_ijk_to_ras"):
        segment_volume(transparent_engine, volume, volume.copy(), {"d": truth}, query_ijk_to_ras=ijk_to_ras)
