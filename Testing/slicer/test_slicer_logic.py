"""ProtoSAMLogic against real MRML and the real engine with tiny random-weight models."""

import threading

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

import protosam
import slicer
from ProtoSAMSlicerLib import geometry, mrml_io, results
from ProtoSAMSlicerLib.logic import ProcessOptions, ProtoSAMLogic
from ProtoSAMSlicerLib.models import engineCacheForDevice
from protosam.errors import CancelledError, CheckpointError, InputError
from protosam.orientation import plane_of_ijk_axis
from slicer_mrml_helpers import addSegmentation, addVolume, homogeneous, ijkToRasFrom, rotationMatrix

LPS = np.diag([-1.0, -1.0, 1.0])
PERMUTED = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # I->S, J->R, K->A
AXIAL, CORONAL = (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)
# name: directions, spacing, parent transform, KJI shape, view normal, expected IJK slice axis
CASES = {
    "identity_axial": (np.eye(3), (1.0, 1.0, 1.0), None, (5, 20, 24), AXIAL, 2),
    "identity_coronal": (np.eye(3), (1.0, 1.0, 1.0), None, (20, 5, 24), CORONAL, 1),
    "lps_anisotropic": (LPS, (0.7, 0.9, 3.0), None, (5, 20, 24), AXIAL, 2),
    "permuted": (PERMUTED, (0.8, 1.0, 2.0), None, (20, 24, 5), AXIAL, 0),
    "rotated_parent_transform": (rotationMatrix((0, 0, 1), 30), (0.9, 0.9, 2.5),
                                 homogeneous(rotationMatrix((0, 0, 1), 90), (15.0, -5.0, 3.0)),
                                 (5, 20, 24), AXIAL, 2),
}
PAINTED = 2  # index of the painted slice along the view axis


def imageAndMasks(shape, kjiAxis, seed=0):
    """A bright box on noise, the box painted on one slice ("liver"), and an untouched "spleen"."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 20, size=shape).astype(np.float32)
    box = np.zeros(shape, bool)
    box[tuple(slice(n // 4, n // 4 + max(2, n // 2)) for n in shape)] = True
    image[box] += 300
    liver = np.zeros(shape, np.uint8)
    index = [slice(None)] * 3
    index[kjiAxis] = PAINTED
    liver[tuple(index)] = box[tuple(index)]
    spleen = np.zeros(shape, np.uint8)
    spleen[0, 0:2, 0:3] = 1
    return image, liver, spleen


def buildCase(scene, name):
    directions, spacing, parent, shape, normal, ijkAxis = CASES[name]
    kjiAxis = geometry.kjiAxisFromIjkAxis(ijkAxis)
    image, liver, spleen = imageAndMasks(shape, kjiAxis)
    ijkToRas = ijkToRasFrom(directions, spacing, (4.0, -6.0, 9.0))
    volume = addVolume(scene, image, ijkToRas, name=name, parentTransform=parent)
    segmentation, ids = addSegmentation(scene, volume, {"liver": liver, "spleen": spleen},
                                        colors={"liver": (0.8, 0.3, 0.2)})
    ijkToWorld = ijkToRas if parent is None else parent @ ijkToRas
    return volume, segmentation, ids, image, liver, spleen, ijkToWorld, normal, ijkAxis


@pytest.mark.parametrize("case", sorted(CASES))
def test_results_land_on_the_right_voxels(scene, tinyOptions, case):
    volume, segmentation, ids, image, liver, spleen, ijkToWorld, normal, ijkAxis = buildCase(scene, case)
    before = {k: mrml_io.segmentToArray(segmentation, v, volume) for k, v in ids.items()}
    progress = []
    logic = ProtoSAMLogic()
    result = logic.process(volume, segmentation, [ids["liver"]], sliceNormal_World=normal, options=tinyOptions,
                           progressCallback=lambda done, total: progress.append((done, total)))

    kjiAxis = geometry.kjiAxisFromIjkAxis(ijkAxis)
    size = liver.shape[kjiAxis]
    assert result.sliceAxis.ijkAxis == ijkAxis
    assert result.supportSlices == {ids["liver"]: [PAINTED]}
    assert result.processedSlices[ids["liver"]] == [k for k in range(size) if k != PAINTED]
    assert progress[-1][0] == progress[-1][1] and [d for d, _ in progress] == sorted(d for d, _ in progress)

    preview = result.previewSegmentationNode
    assert results.isPreview(preview)
    out = mrml_io.segmentToArray(preview, ids["liver"], volume)
    # The painted slice comes back on exactly the painted voxels: geometry round trip.
    index = [slice(None)] * 3
    index[kjiAxis] = PAINTED
    assert np.array_equal(out[tuple(index)], liver[tuple(index)])
    # Every slice equals the engine run on the same arrays with the same geometry and plane.
    engine = engineCacheForDevice("cpu").get(tinyOptions.models, tinyOptions.preset, "cpu",
                                             cacheBytes=tinyOptions.cacheBytes)
    reference = protosam.segment_volume(
        engine, image, None, {"liver": liver}, query_ijk_to_ras=ijkToWorld,
        plane=plane_of_ijk_axis(ijkToWorld, ijkAxis), auto_extent=False)
    assert np.array_equal(out, reference.masks["liver"])
    # Preview geometry is the target's; the user's segmentation was not touched.
    assert preview.GetParentTransformNode() is volume.GetParentTransformNode()
    assert np.allclose(mrml_io.ijkToWorldMatrix(volume), ijkToWorld)
    previewSegment = preview.GetSegmentation().GetSegment(ids["liver"])
    assert previewSegment.GetName() == "liver"
    assert previewSegment.GetColor() == pytest.approx((0.8, 0.3, 0.2))
    for name, segmentId in ids.items():
        assert np.array_equal(mrml_io.segmentToArray(segmentation, segmentId, volume), before[name])
    assert mrml_io.segmentIds(segmentation) == [ids["liver"], ids["spleen"]]


def test_cancel_mid_run_leaves_no_partial_segment(scene, tinyOptions):
    volume, segmentation, ids, *_ = buildCase(scene, "identity_coronal")
    nodesBefore = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    cancel = threading.Event()
    events = []

    def onProgress(done, total):
        events.append(done)
        cancel.set()  # the user presses Cancel after the first slice

    logic = ProtoSAMLogic()
    with pytest.raises(CancelledError):
        logic.process(volume, segmentation, [ids["liver"]], sliceNormal_World=CORONAL, options=tinyOptions,
                      progressCallback=onProgress, cancelEvent=cancel)
    assert events and events[-1] <= events[0] + 1  # stopped within one slice
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodesBefore
    assert mrml_io.segmentIds(segmentation) == [ids["liver"], ids["spleen"]]
    assert logic.activeJobs == []


@pytest.mark.parametrize("removed", ["volume", "segmentation", "whole scene"])
def test_removing_inputs_during_a_run_cancels_it_cleanly(scene, tinyOptions, removed):
    volume, segmentation, ids, *_ = buildCase(scene, "identity_axial")

    def remove(done, total):
        if removed == "whole scene":
            if scene.IsNodePresent(volume):
                scene.Clear(False)
        else:
            node = volume if removed == "volume" else segmentation
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)

    logic = ProtoSAMLogic()
    finished = []
    job = logic.process(volume, segmentation, [ids["liver"]], options=tinyOptions, waitForCompletion=False,
                        progressCallback=remove, onFinished=finished.append)
    job.worker.runUntilFinished(job.job, timeout=120)
    assert finished == [job] and job.result is None
    assert job.progress[0] < job.progress[1]  # stopped early, not after the last slice
    with pytest.raises(CancelledError, match="removed from the scene"):
        job.resultOrRaise()
    expected = 0 if removed != "volume" else 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == expected  # no preview left
    logic.cleanup()


def test_errors_reach_the_caller(scene, tinyOptions, tmp_path):
    volume, segmentation, ids, image, *_ = buildCase(scene, "identity_axial")
    logic = ProtoSAMLogic()
    empty = segmentation.GetSegmentation().AddEmptySegment("empty", "empty")
    with pytest.raises(InputError, match="'empty' is empty"):
        logic.process(volume, segmentation, [empty], options=tinyOptions)
    with pytest.raises(geometry.ObliqueSliceError):
        logic.process(volume, segmentation, [ids["liver"]], options=tinyOptions,
                      sliceNormal_World=rotationMatrix((1, 0, 0), 25) @ np.array(AXIAL))
    with pytest.raises(InputError, match="Slice range"):
        logic.process(volume, segmentation, [ids["liver"]], options=tinyOptions, sliceRange=(0, 99))
    with pytest.raises(InputError, match="Support slice"):
        logic.process(volume, segmentation, [ids["liver"]], options=tinyOptions, supportSlices=7)
    # An engine error raised on the worker thread (bad checkpoint) reaches the caller.
    badModels = protosam.ModelSelection(dinov2="dinov2_tiny14", dinov2_checkpoint=str(tmp_path / "missing.pth"),
                                        sam="sam_tiny", sam_checkpoint=tinyOptions.models.sam_checkpoint,
                                        input_size=56)
    with pytest.raises(CheckpointError, match="not found"):
        logic.process(volume, segmentation, [ids["liver"]],
                      options=ProcessOptions(models=badModels, device="cpu", autoExtent=False))
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_batch_over_two_volumes_with_the_same_support_and_accept(scene, tinyOptions):
    volume, segmentation, ids, image, liver, *_ = buildCase(scene, "identity_axial")
    # A second scan of the same size, stored LPS and shifted: support comes from the first volume.
    other = addVolume(scene, image[:, ::-1, ::-1].copy(), ijkToRasFrom(LPS, (1.0, 1.0, 1.0), (23.0, 19.0, 9.0)),
                      name="other")
    logic = ProtoSAMLogic()
    copied = []  # the volumes whose voxels the logic copied, in order (#21 item 9)
    prepare = logic.prepare

    def recordingPrepare(target, *args, **kwargs):
        prepared = prepare(target, *args, **kwargs)
        if prepared.query is not None:
            copied.append(target.GetName())
        return prepared

    logic.prepare = recordingPrepare
    finished = []
    jobs = logic.processBatch([volume, other], segmentation, [ids["liver"]], options=tinyOptions,
                              supportVolumeNode=volume, waitForCompletion=False,
                              onFinished=lambda job: finished.append((job, list(copied))))
    # Every volume was checked, only the first one copied: the second is copied when it is sent.
    assert len(jobs) == 2 and copied == [volume.GetName()] and jobs[1].job is None
    jobs[0].worker.runUntilFinished(jobs[0].job, timeout=300)
    assert finished[0] == (jobs[0], [volume.GetName()])  # "other" not copied while the first ran
    assert jobs[1].job is not None and copied == [volume.GetName(), "other"]
    assert jobs[0].worker is jobs[1].worker  # one persistent worker
    jobs[1].worker.runUntilFinished(jobs[1].job, timeout=300)
    assert [job for job, _ in finished] == jobs
    first, second = (job.resultOrRaise() for job in jobs)
    assert first.previewSegmentationNode is not second.previewSegmentationNode
    # "other" is the same anatomy flipped in I and J: the canonical orientation makes the
    # engine see identical arrays, so the results are the same voxels in World.
    a = mrml_io.segmentToArray(first.previewSegmentationNode, ids["liver"], volume)
    b = mrml_io.segmentToArray(second.previewSegmentationNode, ids["liver"], other)
    assert a.any() and np.array_equal(a[:, ::-1, ::-1], b)
    written = logic.accept(second)
    destination = scene.GetFirstNodeByName("other ProtoSAM")
    assert destination is not None and not results.isPreview(destination)
    newSegment = destination.GetSegmentation().GetSegment(written[ids["liver"]])
    assert newSegment.GetName() == "liver" and newSegment.GetColor() == pytest.approx((0.8, 0.3, 0.2))
    assert np.array_equal(mrml_io.segmentToArray(destination, written[ids["liver"]], other), b)
    assert not scene.IsNodePresent(second.previewSegmentationNode)
    logic.discard(first)
    assert not scene.IsNodePresent(first.previewSegmentationNode)


def test_batch_with_one_unusable_volume_runs_none(scene, tinyOptions):
    volume, segmentation, ids, image, *_ = buildCase(scene, "identity_axial")
    oblique = addVolume(scene, image, ijkToRasFrom(rotationMatrix((1, 0, 0), 30)), name="oblique")
    logic = ProtoSAMLogic()
    with pytest.raises(geometry.ObliqueSliceError):
        logic.processBatch([volume, oblique], segmentation, [ids["liver"]], options=tinyOptions,
                           supportVolumeNode=volume, waitForCompletion=False)
    # Every volume is checked before any is copied or sent: nothing was queued.
    assert logic.activeJobs == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    # The module's slice range spin boxes allow -2**31..2**31-1 (parameter-node int connector).
    for sliceRange in ((-3, 2), (2, -1), (0, 2**31 - 1), (0.5, 2)):
        with pytest.raises(InputError, match="Slice range"):
            logic.processBatch([volume, volume], segmentation, [ids["liver"]], options=tinyOptions,
                               supportVolumeNode=volume, sliceRange=sliceRange, waitForCompletion=False)
        assert logic.activeJobs == []
    with pytest.raises(InputError, match="at least one volume"):
        logic.processBatch([], segmentation, [ids["liver"]], options=tinyOptions, supportVolumeNode=volume)


def test_worker_gets_copies_not_views_of_scene_memory(scene):
    """Arrays handed to the worker must survive the volume being edited or freed meanwhile."""
    volume, segmentation, ids, image, *_ = buildCase(scene, "identity_axial")  # float32, RAS: no reorder
    prepared = ProtoSAMLogic().prepare(volume, segmentation, [ids["liver"]])
    view = mrml_io.volumeArrayView(volume)
    assert prepared.query.flags.c_contiguous and prepared.query.dtype == np.float32
    assert not np.shares_memory(prepared.query, view)
    for mask in prepared.masks.values():
        assert mask.flags.c_contiguous and mask.dtype == np.uint8


def test_the_thread_worker_kind_is_deprecated(tmp_path):
    import warnings

    from ProtoSAMSlicerLib import worker
    from ProtoSAMSlicerLib.models import downloadWeightsFunction
    from ProtoSAMSlicerLib.worker_client import WorkerClient

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default, the worker process, warns of nothing
        assert isinstance(ProtoSAMLogic()._workerFor("cpu-deprecated"), WorkerClient)
    with pytest.warns(DeprecationWarning, match=r'workerKind="thread"\) is deprecated and will be removed in the '
                                                r"next release.*protosam\.segment_volume or protosam\.Session"):
        logic = ProtoSAMLogic(workerKind="thread")
    # Still works for this release: the logic's jobs run on an in-process thread.
    thread = logic._workerFor("cpu-deprecated")
    assert isinstance(thread, worker.Worker)
    checkpoint = tmp_path / "custom.pth"
    checkpoint.write_bytes(b"x")  # custom checkpoints: nothing to download, the job returns at once
    selection = protosam.ModelSelection(dinov2_checkpoint=str(checkpoint), sam_checkpoint=str(checkpoint))
    try:
        job = thread.runUntilFinished(thread.submit(downloadWeightsFunction(selection, str(tmp_path))), timeout=30)
    finally:
        worker.shutdownThreadWorkers()
    assert job.resultOrRaise() == [] and job.threadIdent != threading.get_ident()


def test_batch_job_cancelled_before_it_is_sent_never_copies_its_volume(scene, tinyOptions):
    volume, segmentation, ids, image, *_ = buildCase(scene, "identity_axial")
    other = addVolume(scene, image.copy(), ijkToRasFrom(np.eye(3)), name="other")
    logic = ProtoSAMLogic()
    copied = []
    prepare = logic.prepare
    logic.prepare = lambda target, *a, **k: (lambda p: (copied.append(target.GetName()) if p.query is not None
                                                        else None, p)[1])(prepare(target, *a, **k))
    finished = []
    jobs = logic.processBatch([volume, other], segmentation, [ids["liver"]], options=tinyOptions,
                              supportVolumeNode=volume, waitForCompletion=False, onFinished=finished.append)
    assert len(logic.activeJobs) == 2  # the sent job and the one waiting: cancelAll reaches both
    logic.cancelAll("Cancelled by the user; nothing was written.")
    jobs[0].worker.runUntilFinished(jobs[0].job, timeout=120)
    assert finished == jobs and copied == [volume.GetName()] and jobs[1].job is None
    for job in jobs:
        assert isinstance(job.error, CancelledError) and job.result is None and job.finished
        assert str(job.error) == "Cancelled by the user; nothing was written."
    assert logic.activeJobs == [] and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    # waitForCompletion=True: results in order, each volume copied when its turn came.
    copied.clear()
    results_ = logic.processBatch([volume, other], segmentation, [ids["liver"]], options=tinyOptions,
                                  supportVolumeNode=volume)
    assert copied == [volume.GetName(), "other"] and all(r.previewSegmentationNode is not None for r in results_)
