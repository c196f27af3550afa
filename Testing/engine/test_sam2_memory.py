"""Memory mode (``propagation="memory"``): SAM 2's video predictor walks the slices.

The tiny random-weight SAM 2 (official format, the package's own classes) on a few small
slices: the masks mean nothing, the mechanics must hold: painted slices kept exactly and given
to the predictor as conditioning frames, a correction becoming a conditioning frame that
changes the walk on its neighbours, cancel, progress, a bounded inference state whose masks
equal the unbounded predictor's, the refusal with a SAM refiner, and the command line."""
import threading

import numpy as np
import pytest
import torch

from required_modules import require_module

require_module("sam2", "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 (see .ci/run)")

from engine_helpers import benchmark_module, box_volume, one_torch_thread, run_cli  # noqa: E402,F401 (autouse fixture)
from protosam import Engine, ModelSelection, catalogue  # noqa: E402
from protosam.errors import CancelledError, InputError  # noqa: E402
from protosam.models import sam2_video  # noqa: E402
from protosam.propagation import segment_volume  # noqa: E402
from protosam.session import Session  # noqa: E402
from protosam.testing import write_tiny_sam2_checkpoint  # noqa: E402



@pytest.fixture(scope="module")
def sam2_models(tmp_path_factory):
    return write_tiny_sam2_checkpoint(tmp_path_factory.mktemp("tiny_sam2_memory"), input_size=56)


@pytest.fixture(scope="module")
def engine(sam2_models):
    return Engine(sam2_models, device="cpu", download=False, propagation="memory")


@pytest.fixture
def walks(monkeypatch):
    """Every SliceWalk the runs make, and the slices each was given as conditioning masks."""
    made = []
    original = sam2_video.SliceWalk.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.conditioned_masks = {}
        made.append(self)

    original_condition = sam2_video.SliceWalk.condition

    def condition(self, index, mask):
        self.conditioned_masks[index] = np.asarray(mask).copy()
        return original_condition(self, index, mask)

    monkeypatch.setattr(sam2_video.SliceWalk, "__init__", init)
    monkeypatch.setattr(sam2_video.SliceWalk, "condition", condition)
    return made


def test_painted_slice_is_a_conditioning_frame_kept_exactly_and_memory_is_bounded(engine, walks, monkeypatch):
    # A window of 7 frames (num_maskmem; object pointers from 2 frames) so 12 slices exceed it.
    predictor = engine.refiner.model
    monkeypatch.setattr(predictor, "max_obj_ptrs_in_encoder", 2)
    volume, mask = box_volume(slices=12, size=32)
    mask[6] = 0
    mask[2, 8:24, 10:22] = 1  # painted on slice 2: the walk goes up 9 slices and down 2
    held, logits_by_slice = [], {}
    original_track = sam2_video.SliceWalk.track

    def track(self, index, downwards):
        logits = original_track(self, index, downwards)
        held.append(self.frames_held())
        logits_by_slice[index] = logits.clone()
        return logits

    monkeypatch.setattr(sam2_video.SliceWalk, "track", track)
    result = segment_volume(engine, volume, None, {"a": mask}, support_slices={"a": 2}, auto_extent=False)
    masks = result.masks["a"]
    np.testing.assert_array_equal(masks[2], mask[2])
    (walk,) = walks
    assert walk.window == 7 and walk.conditioning == [2]
    np.testing.assert_array_equal(walk.conditioned_masks[2], mask[2])
    assert sorted(result.processed_slices["a"]) == [0, 1] + list(range(3, 12))
    # Never more than the current window, the window kept above the start for the walk down,
    # and the conditioning frame; one frame's features.
    assert max(h["tracked"] for h in held) <= 2 * walk.window + 1
    assert max(h["tracked"] for h in held[:4]) < max(h["tracked"] for h in held)  # it did fill up...
    assert held[-1]["tracked"] < 12 - 1 and all(h["features"] == 1 for h in held)  # ...and was bounded
    assert all(h["conditioning"] == 1 for h in held)

    # What was dropped is never read again: the unbounded predictor gives the same mask logits,
    # bit for bit, also on the walk down (which reads the frames kept above the start).
    bounded_logits = dict(logits_by_slice)
    monkeypatch.setattr(sam2_video.SliceWalk, "_forget_behind", lambda self, frame, direction: None)
    unbounded = segment_volume(engine, volume, None, {"a": mask}, support_slices={"a": 2}, auto_extent=False)
    assert walks[-1].frames_held()["tracked"] == 11
    assert sorted(logits_by_slice) == list(range(12))
    for index, logits in bounded_logits.items():
        assert torch.equal(logits, logits_by_slice[index]), index
    np.testing.assert_array_equal(unbounded.masks["a"], masks)


def test_a_correction_becomes_a_conditioning_frame_and_changes_the_walk(engine, walks, monkeypatch):
    logits_by_slice = {}
    original_track = sam2_video.SliceWalk.track

    def track(self, index, downwards):
        logits_by_slice[index] = original_track(self, index, downwards).clone()
        return logits_by_slice[index]

    monkeypatch.setattr(sam2_video.SliceWalk, "track", track)
    volume, mask = box_volume(slices=6, size=32)
    session = Session(engine, volume, auto_extent=False)
    first = session.start({"1": mask})["1"]
    first_logits = dict(logits_by_slice)
    np.testing.assert_array_equal(first[3], mask[3])
    assert walks[-1].conditioning == [3]
    painted = np.zeros((32, 32), np.uint8)
    painted[4:14, 18:30] = 1
    boxed = session.box("1", 5, [4, 4, 28, 28])  # a gesture fixes slice 5
    session.add_support("1", 1, painted)  # a repaint fixes slice 1
    updated = session.update("1")
    walk = walks[-1]
    assert walk.conditioning == [1, 3, 5]
    np.testing.assert_array_equal(walk.conditioned_masks[1], painted)
    np.testing.assert_array_equal(walk.conditioned_masks[5], boxed)
    np.testing.assert_array_equal(updated[1], painted)
    np.testing.assert_array_equal(updated[5], boxed)
    np.testing.assert_array_equal(updated[3], mask[3])
    # Slices 0, 2 and 4 were walked again with the new conditioning frames in the memory: their
    # mask logits changed (the random-weight masks need not cross the threshold).
    for index in (0, 2, 4):
        assert not torch.equal(logits_by_slice[index], first_logits[index]), index
    session.close()


def test_progress_is_monotonic_and_cancel_stops_the_walk(engine):
    volume, mask = box_volume(slices=5, size=32)
    seen = []
    segment_volume(engine, volume, None, {"a": mask, "b": mask}, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (10, 10) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    cancel = threading.Event()

    def cancel_after_two(done, total):
        if done >= 2:
            cancel.set()

    with pytest.raises(CancelledError):
        segment_volume(engine, volume, None, {"a": mask}, progress=cancel_after_two, cancel=cancel, auto_extent=False)


def test_another_volumes_support_starts_from_the_first_prompted_slice(engine, walks, monkeypatch):
    volume, mask = box_volume(slices=5, size=32)
    other, _ = box_volume(slices=5, size=32, seed=1)
    # Prompts on every slice with a coarse mask: the walk starts at the seed (slice 2).
    monkeypatch.setattr(sam2_video, "MEMORY_PROMPT_MIN_PROBABILITY", 0.0)
    result = segment_volume(engine, other, volume, {"a": mask}, auto_extent=False)
    assert walks[-1].conditioning == [2] and not walks[-1].conditioned_masks
    assert sorted(result.processed_slices["a"]) == [0, 1, 2, 3, 4]
    # No slice sure enough: nothing to start from, an empty result.
    monkeypatch.setattr(sam2_video, "MEMORY_PROMPT_MIN_PROBABILITY", 1.0)
    empty = segment_volume(engine, other, volume, {"a": mask})
    assert not empty.masks["a"].any()


def test_memory_mode_needs_a_sam2_refiner():
    # Refused before any weights are looked for.
    with pytest.raises(InputError, match="needs a SAM 2 refiner.*sam2.1_hiera_tiny.*per-slice"):
        Engine(ModelSelection(sam=catalogue.SAM_VIT_B), device="cpu", download=False, propagation="memory")
    with pytest.raises(InputError, match="Unknown propagation"):
        Engine(ModelSelection(), device="cpu", download=False, propagation="video")
    assert catalogue.propagation_problem("memory", catalogue.TINY_SAM2) is None


def test_segment_command_with_memory_propagation(sam2_models, tmp_path):
    import SimpleITK as sitk

    volume, mask = box_volume(slices=5, size=32)
    for array, name in ((volume, "image.nii.gz"), (mask, "labels.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
    model_args = ["--dinov2", sam2_models.dinov2, "--dinov2-checkpoint", sam2_models.dinov2_checkpoint,
                  "--sam", sam2_models.sam, "--sam-checkpoint", sam2_models.sam_checkpoint,
                  "--input-size", str(sam2_models.input_size), "--device", "cpu", "--no-download"]
    code, _ = run_cli(["segment", "--image", str(tmp_path / "image.nii.gz"), "--support-mask",
                       str(tmp_path / "labels.nii.gz"), "--output", str(tmp_path / "out.nii.gz"),
                       "--propagation", "memory", *model_args])
    assert code == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz")))
    np.testing.assert_array_equal(labels[2], mask[2])
    local = segment_volume(Engine(sam2_models, device="cpu", download=False, propagation="memory"), volume, None,
                           {1: mask}, modality="auto")
    np.testing.assert_array_equal(labels, local.masks[1])
    # A SAM refiner with memory: refused with the message, exit code 2, nothing written.
    code, _ = run_cli(["segment", "--image", str(tmp_path / "image.nii.gz"), "--support-mask",
                       str(tmp_path / "labels.nii.gz"), "--output", str(tmp_path / "refused.nii.gz"),
                       "--propagation", "memory", "--sam", catalogue.SAM_VIT_B, "--no-download"])
    assert code != 0 and not (tmp_path / "refused.nii.gz").exists()


def test_refiner_benchmark_measures_memory_mode():
    """benchmarks/refiner_benchmark.py --mode memory on the tiny SAM 2 (a few slices)."""
    refiner_benchmark = benchmark_module("refiner_benchmark")
    threads = torch.get_num_threads()
    try:
        figures = refiner_benchmark.run_one_memory(catalogue.TINY_SAM2, slices=10, structures=1, threads=1,
                                                   prompt_every=3, reuse_features=True)
    finally:
        torch.set_num_threads(threads)
    assert figures["walk_seconds"] > 0 and figures["peak_rss_mib"] > 0 and figures["window_frames"] == 16
    held = figures["held"]["10"]
    assert held["frames"] == {"conditioning": 1, "tracked": 9, "tracked_records": 10, "features": 1}
    assert held["state_mib"] > 0
