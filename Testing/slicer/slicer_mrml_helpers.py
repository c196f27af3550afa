"""Helpers that build MRML test data (volumes, transforms, segmentations) from numpy arrays."""

from __future__ import annotations

import types

import numpy as np
import slicer


def addSliceNode(scene, layoutName, orientation="Axial"):
    """A slice view's node with the ID the application's layout gives it (vtkMRMLSliceNode<Name>)."""
    node = slicer.vtkMRMLSliceNode()
    node.SetSingletonTag(layoutName)
    node.SetLayoutName(layoutName)
    node.SetName(layoutName)
    node.SetOrientation(orientation)
    scene.AddNode(node)
    return node


def sceneWithLogics():
    """A new MRML scene with the logics Slicer's modules register, and ``slicer.modules``-like
    access to them: (scene, modules). Set both as ``slicer.mrmlScene`` / ``slicer.modules`` to
    use ``slicer.util`` helpers (the ``scene`` fixture does, and restores them after)."""
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkSlicerColorLogic()
    colorLogic.SetMRMLApplicationLogic(appLogic)
    colorLogic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Colors", colorLogic)
    # Registers the labelmap <-> surface converters: without it AddEmptySegment returns ''.
    segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentationsLogic.SetMRMLApplicationLogic(appLogic)
    segmentationsLogic.SetMRMLScene(scene)
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLApplicationLogic(appLogic)
    volumesLogic.SetMRMLScene(scene)
    modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentationsLogic),
        volumes=types.SimpleNamespace(logic=lambda: volumesLogic),
        colors=types.SimpleNamespace(logic=lambda: colorLogic),
    )
    scene._protosamTestLogics = (appLogic, colorLogic, segmentationsLogic, volumesLogic)  # kept alive with it
    return scene, modules


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


#: The Segment Editor effect tests' volume: LPS, anisotropic, (K, J, I) = EFFECT_SHAPE.
EFFECT_SHAPE = (6, 16, 18)
EFFECT_LPS = np.diag([-1.0, -1.0, 1.0])
EFFECT_IJK_TO_RAS = ijkToRasFrom(EFFECT_LPS, (0.8, 0.8, 2.5), (7.0, 3.0, -2.0))


def addEditedVolume(scene, *, liverSlices=(2,), kidney=False, parentTransform=None) -> dict:
    """The effect tests' setup: a bright box on noise ("ct"), the segments "liver" (painted on
    ``liverSlices``), "spleen" (a column at the border) and, with ``kidney``, "kidney", and
    Slicer's segment editor on them with "liver" selected. Returns the nodes, ids, arrays and
    the editor node and logic."""
    rng = np.random.default_rng(3)
    image = rng.normal(0, 20, EFFECT_SHAPE).astype(np.float32)
    image[1:5, 4:12, 5:13] += 300
    volume = addVolume(scene, image, EFFECT_IJK_TO_RAS, "ct", parentTransform=parentTransform)
    arrays = {"liver": np.zeros(EFFECT_SHAPE, np.uint8), "spleen": np.zeros(EFFECT_SHAPE, np.uint8)}
    painted = {2: (slice(4, 12), slice(5, 13)), 3: (slice(5, 11), slice(6, 12))}
    for k in liverSlices:
        arrays["liver"][(k,) + painted[k]] = 1
    arrays["spleen"][0:6, 0:16, 14:18] = 1  # a column at the border, overlapping where results may land
    if kidney:
        arrays["kidney"] = np.zeros(EFFECT_SHAPE, np.uint8)
        arrays["kidney"][0:6, 8:16, 0:18] = 1
    segmentation, ids = addSegmentation(scene, volume, arrays)
    editorNode, editorLogic = segmentEditor(scene, segmentation, volume, ids["liver"])
    return dict(image=image, volume=volume, segmentation=segmentation, ids=ids, arrays=arrays,
                editorNode=editorNode, editorLogic=editorLogic)
