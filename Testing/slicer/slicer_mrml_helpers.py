"""Helpers that build MRML test data (volumes, transforms, segmentations) from numpy arrays."""

from __future__ import annotations

import numpy as np
import slicer


def ijkToRasFrom(directions, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(4, 4) IJK->RAS from a 3x3 direction matrix (columns = I, J, K axes), spacing, origin."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions, dtype=float) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def addVolume(scene, array_Kji, ijkToRas, name="volume", parentTransform=None):
    """Scalar volume node from a KJI array; optional linear parent transform (4x4 array)."""
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array_Kji), ijkToRas, name=name)
    if parentTransform is not None:
        transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name + "Transform")
        transformNode.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(parentTransform))
        node.SetAndObserveTransformNodeID(transformNode.GetID())
    return node


def addSegmentation(scene, referenceVolume, masks_Kji: dict, name="segmentation", colors=None):
    """Segmentation on ``referenceVolume``'s grid with one segment per (name -> KJI mask)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
    if referenceVolume.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(referenceVolume.GetParentTransformNode().GetID())
    ids = {}
    for index, (segmentName, mask) in enumerate(masks_Kji.items()):
        segmentId = node.GetSegmentation().AddEmptySegment(segmentName, segmentName)
        assert segmentId, "AddEmptySegment failed: segmentations logic not bound to the scene"
        if colors and segmentName in colors:
            node.GetSegmentation().GetSegment(segmentId).SetColor(*colors[segmentName])
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segmentId,
                                                         referenceVolume)
        ids[segmentName] = segmentId
    return node, ids


def rotationMatrix(axis, degrees) -> np.ndarray:
    """(3, 3) rotation about a unit axis by ``degrees`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def homogeneous(rotation3, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation3
    matrix[:3, 3] = translation
    return matrix


def segmentEditor(scene, segmentationNode, sourceVolumeNode, segmentId, overwriteMode=None):
    """The Segment Editor's real node and logic (what the editor widget holds) editing
    ``segmentId`` of ``segmentationNode`` on ``sourceVolumeNode``. Returns (node, logic)."""
    editorNode = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editorLogic = slicer.vtkSlicerSegmentEditorLogic()
    editorLogic.SetMRMLScene(scene)
    editorLogic.SetSegmentEditorNode(editorNode)
    editorNode.SetAndObserveSegmentationNode(segmentationNode)
    editorNode.SetAndObserveSourceVolumeNode(sourceVolumeNode)
    editorNode.SetSelectedSegmentID(segmentId)
    if overwriteMode is not None:
        editorNode.SetOverwriteMode(overwriteMode)
    return editorNode, editorLogic
