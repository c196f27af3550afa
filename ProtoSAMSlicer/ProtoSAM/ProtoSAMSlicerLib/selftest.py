"""The ProtoSAM self-test body: drives ProtoSAMLogic end to end with tiny random-weight models.

Used by ``ProtoSAMTest`` (Slicer's module self-test, registered in CMake with
slicer_add_python_unittest) and by the pytest suite, which runs it against slicer-core. It
builds its own nodes in the given scene and removes them afterwards.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
from typing import Dict

import numpy as np
import vtk
from vtk.util import numpy_support

from . import geometry, mrml_io, results
from .logic import ProcessOptions, ProtoSAMLogic

logger = logging.getLogger(__name__)

SHAPE_KJI = (5, 24, 28)
#: An LPS, anisotropic volume under a rotating parent transform: the geometry users get wrong.
IJK_TO_RAS = np.array([[-0.8, 0.0, 0.0, 30.0],
                       [0.0, -0.8, 0.0, 20.0],
                       [0.0, 0.0, 2.5, -10.0],
                       [0.0, 0.0, 0.0, 1.0]])
PARENT_TO_WORLD = np.array([[0.0, -1.0, 0.0, 5.0],
                            [1.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 1.0, 0.0],
                            [0.0, 0.0, 0.0, 1.0]])
PAINTED_SLICE = 2


def _matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def addVolume(scene, array_Kji: np.ndarray, ijkToRas: np.ndarray, name: str):
    """Scalar volume node holding a copy of a (K, J, I) float array."""
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array_Kji.shape[2], array_Kji.shape[1], array_Kji.shape[0])
    imageData.AllocateScalars(vtk.VTK_FLOAT, 1)
    numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())[:] = np.ravel(array_Kji.astype(np.float32))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.SetAndObserveImageData(imageData)
    node.SetIJKToRASMatrix(_matrix(ijkToRas))
    node.CreateDefaultDisplayNodes()
    return node


def runSelfTest(scene, workDir=None, options: ProcessOptions = None) -> Dict[str, object]:
    """Build a test scene, propagate with tiny models, check geometry, accept; returns facts.

    Raises AssertionError (with a message) when a check fails.
    """
    from protosam.testing import write_tiny_checkpoints

    created = []
    temporary = None
    if workDir is None:
        temporary = tempfile.TemporaryDirectory(prefix="ProtoSAMSelfTest")
        workDir = temporary.name
    try:
        if options is None:
            options = ProcessOptions(models=write_tiny_checkpoints(pathlib.Path(workDir), input_size=56),
                                     device="cpu", autoExtent=False)
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ProtoSAM self-test transform")
        created.append(transform)
        transform.SetMatrixTransformToParent(_matrix(PARENT_TO_WORLD))
        rng = np.random.default_rng(0)
        image = rng.normal(0.0, 20.0, SHAPE_KJI).astype(np.float32)
        image[1:4, 6:18, 8:20] += 400.0
        volume = addVolume(scene, image, IJK_TO_RAS, "ProtoSAM self-test volume")
        created.append(volume)
        volume.SetAndObserveTransformNodeID(transform.GetID())

        segmentation = results.newSegmentationLike(volume, "ProtoSAM self-test segmentation")
        created.append(segmentation)
        painted = np.zeros(SHAPE_KJI, np.uint8)
        painted[PAINTED_SLICE, 6:18, 8:20] = 1
        supportId = segmentation.GetSegmentation().AddEmptySegment("liver", "liver", (0.9, 0.4, 0.3))
        assert supportId, "AddEmptySegment failed: is the Segmentations module logic available?"
        mrml_io.writeSegmentFromArray(painted, segmentation, supportId, volume, np.zeros_like(painted))
        otherId = segmentation.GetSegmentation().AddEmptySegment("other", "other")
        other = np.zeros(SHAPE_KJI, np.uint8)
        other[0, 0:3, 0:3] = 1
        mrml_io.writeSegmentFromArray(other, segmentation, otherId, volume, np.zeros_like(other))

        # Axial view: the parent transform rotates about S, so K stays the slice axis.
        logic = ProtoSAMLogic()
        progress = []
        result = logic.process(volume, segmentation, [supportId], sliceNormal_World=(0.0, 0.0, 1.0),
                               options=options, progressCallback=lambda d, t: progress.append((d, t)))
        created.append(result.previewSegmentationNode)
        assert result.sliceAxis.ijkAxis == 2, f"slice axis {result.sliceAxis} is not K"
        assert result.supportSlices == {supportId: [PAINTED_SLICE]}, result.supportSlices
        assert result.processedSlices[supportId] == [k for k in range(SHAPE_KJI[0]) if k != PAINTED_SLICE]
        assert progress and progress[-1][0] == progress[-1][1], f"progress did not complete: {progress[-3:]}"
        preview = mrml_io.segmentToArray(result.previewSegmentationNode, supportId, volume)
        assert np.array_equal(preview[PAINTED_SLICE], painted[PAINTED_SLICE]), "painted slice moved"
        assert geometry.sliceAxisFromNormal((0, 0, 1), mrml_io.ijkToWorldMatrix(volume)).ijkAxis == 2

        written = logic.accept(result, mode=results.ACCEPT_NEW)
        newId = written[supportId]
        newSegment = segmentation.GetSegmentation().GetSegment(newId)
        assert newSegment.GetName() == "liver (ProtoSAM)", newSegment.GetName()
        assert np.array_equal(mrml_io.segmentToArray(segmentation, newId, volume), preview)
        assert np.array_equal(mrml_io.segmentToArray(segmentation, supportId, volume), painted), "support changed"
        assert np.array_equal(mrml_io.segmentToArray(segmentation, otherId, volume), other), "other segment changed"
        logger.info("ProtoSAM self-test passed (%d slices propagated).", len(result.processedSlices[supportId]))
        return {"processedSlices": result.processedSlices[supportId], "newSegmentId": newId,
                "previewVoxels": int(preview.sum())}
    finally:
        for node in reversed(created):
            results.removeNode(node)
        if temporary is not None:
            temporary.cleanup()
