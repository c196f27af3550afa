"""MRML volumes and segments <-> numpy arrays with correct geometry (no Qt).

Arrays crossing this boundary are KJI (``[k, j, i]``, see geometry.py): volumes as float32,
masks as uint8 with values 0/1. Geometry follows the volume node, parent transforms included
(linear transforms only; non-linear ones are refused with instructions to harden them).

Everything here must run on the main thread: it reads and writes MRML nodes.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from protosam.errors import InputError

logger = logging.getLogger(__name__)

#: A box of voxels in a KJI array: ((k0, k1), (j0, j1), (i0, i1)), half-open.
BoxKji = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


def _matrixToArray(vtkMatrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[vtkMatrix.GetElement(r, c) for c in range(4)] for r in range(4)],
                    dtype=np.float64)


def _arrayToMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    vtkMatrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtkMatrix.SetElement(r, c, float(array[r, c]))
    return vtkMatrix


def parentToWorldMatrix(node) -> np.ndarray:
    """(4, 4) float64 matrix from a transformable node's local frame to World.

    Raises InputError when a non-linear transform sits above the node.
    """
    transformNode = node.GetParentTransformNode()
    if transformNode is None:
        return np.eye(4)
    if not transformNode.IsTransformToWorldLinear():
        raise InputError(
            f"'{node.GetName()}' is under a non-linear transform ('{transformNode.GetName()}'). "
            "Harden the transform on the volume and segmentation (Data module: right-click > "
            "Harden transform) and try again.")
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(matrix)
    return _matrixToArray(matrix)


def ijkToWorldMatrix(volumeNode) -> np.ndarray:
    """(4, 4) float64 voxel (i, j, k) -> World matrix of a volume, parent transforms included."""
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    return parentToWorldMatrix(volumeNode) @ _matrixToArray(ijkToRas)


def volumeShapeKji(volumeNode) -> Tuple[int, int, int]:
    """Shape (K, J, I) of a volume's voxel array."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None:
        name = volumeNode.GetName() if volumeNode is not None else "(none)"
        raise InputError(f"Volume '{name}' has no image data; load or select another volume.")
    dims = imageData.GetDimensions()
    return (int(dims[2]), int(dims[1]), int(dims[0]))


def volumeArrayView(volumeNode) -> np.ndarray:
    """The volume's voxels as a (K, J, I) numpy view (not a copy; original dtype). Read only.

    Raises InputError for vector/RGB volumes and volumes without voxels.
    """
    shape = volumeShapeKji(volumeNode)
    imageData = volumeNode.GetImageData()
    scalars = imageData.GetPointData().GetScalars()
    if scalars is None or min(shape) < 1:
        raise InputError(f"Volume '{volumeNode.GetName()}' is empty; select a volume with voxels.")
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(
            f"Volume '{volumeNode.GetName()}' has {scalars.GetNumberOfComponents()} components per "
            "voxel (colour or vector image). Convert it to a scalar volume (Vector to Scalar Volume "
            "module) and try again.")
    return numpy_support.vtk_to_numpy(scalars).reshape(shape)


def volumeToArray(volumeNode) -> np.ndarray:
    """Copy of a scalar volume's voxels: (K, J, I) float32."""
    return volumeArrayView(volumeNode).astype(np.float32, copy=True)


def _segmentationFrameMatrix(segmentationNode) -> np.ndarray:
    """World -> segmentation-local frame (inverse of the segmentation's parent transform)."""
    return np.linalg.inv(parentToWorldMatrix(segmentationNode))


def volumeGeometryImage(volumeNode, segmentationNode, extent_Ijk=None) -> "slicer.vtkOrientedImageData":
    """Empty uint8 oriented image with the volume's voxel grid in the segmentation's frame.

    extent_Ijk: (i0, i1, j0, j1, k0, k1) inclusive, VTK order; defaults to the whole volume.
    """
    shape = volumeShapeKji(volumeNode)
    if extent_Ijk is None:
        extent_Ijk = (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    ijkToFrame = _segmentationFrameMatrix(segmentationNode) @ ijkToWorldMatrix(volumeNode)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent_Ijk)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(0)
    image.SetImageToWorldMatrix(_arrayToMatrix(ijkToFrame))
    return image


def _imageArray(image) -> np.ndarray:
    """Writable KJI view on an oriented image's scalars (shape from its extent)."""
    e = image.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def segmentIds(segmentationNode) -> list:
    """IDs of all segments, in display order."""
    ids = vtk.vtkStringArray()
    segmentationNode.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(n) for n in range(ids.GetNumberOfValues())]


def _requireSegment(segmentationNode, segmentId: str):
    if segmentationNode is None:
        raise InputError("No segmentation selected; select the segmentation with the support segment.")
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise InputError(f"Segment '{segmentId}' is not in '{segmentationNode.GetName()}'; "
                         "select an existing segment.")
    return segment


def _boxExtent(box: BoxKji) -> Tuple[int, int, int, int, int, int]:
    """Half-open KJI box -> inclusive VTK extent (i0, i1, j0, j1, k0, k1)."""
    (k0, k1), (j0, j1), (i0, i1) = box
    return (i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)


def _boxShape(box: BoxKji) -> Tuple[int, int, int]:
    return tuple(int(b - a) for a, b in box)


def _checkBox(box: BoxKji, shape) -> None:
    if len(box) != 3 or any(not (0 <= a < b <= n) for (a, b), n in zip(box, shape)):
        raise ValueError(f"box {box} is not a non-empty box inside the volume of shape {shape}")


def segmentToArray(segmentationNode, segmentId: str, referenceVolumeNode, box: Optional[BoxKji] = None) -> np.ndarray:
    """A segment resampled (nearest neighbour) onto a volume's voxel grid: (K, J, I) uint8 0/1.

    Works when the segmentation has another geometry or another (linear) parent transform than
    the volume; closed-surface segments are converted to a labelmap first. ``box`` (half-open
    KJI): read only these voxels of the grid (e.g. one slice); the array has the box's shape.
    """
    segment = _requireSegment(segmentationNode, segmentId)
    segmentation = segmentationNode.GetSegmentation()
    labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(labelmapName):
        if not segmentation.CreateRepresentation(labelmapName):
            raise InputError(f"Segmentation '{segmentationNode.GetName()}' cannot be converted to a "
                             "binary labelmap; convert it in the Segmentations module and try again.")
    shape = volumeShapeKji(referenceVolumeNode)
    if box is not None:
        _checkBox(box, shape)
        shape = _boxShape(box)
    labelmap = slicer.vtkOrientedImageData()
    ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentationNode, segmentId, labelmap, False)
    extent = labelmap.GetExtent()
    if not ok or extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return np.zeros(shape, dtype=np.uint8)  # empty segment
    reference = volumeGeometryImage(referenceVolumeNode, segmentationNode,
                                    None if box is None else _boxExtent(box))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False):
        raise InputError(f"Segment '{segment.GetName()}' could not be resampled onto volume "
                         f"'{referenceVolumeNode.GetName()}'.")
    # The internal labelmap may be shared by several segments, each with its own label value.
    values = _imageArray(resampled)
    if values.shape != shape:
        raise InputError(f"Resampling segment '{segment.GetName()}' gave shape {values.shape}, "
                         f"expected {shape}.")
    return (values == segment.GetLabelValue()).astype(np.uint8)


def changedBox(new_Kji: np.ndarray, old_Kji: Optional[np.ndarray]) -> Optional[BoxKji]:
    """Smallest half-open KJI box holding every voxel where the masks differ (or new is set).

    Returns None when nothing changes.
    """
    diff = new_Kji != 0 if old_Kji is None else (new_Kji != 0) != (old_Kji != 0)
    if not diff.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(diff.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def writeSegmentFromArray(mask_Kji: np.ndarray, segmentationNode, segmentId: str,
                          referenceVolumeNode, previous_Kji: Optional[np.ndarray] = None,
                          box: Optional[BoxKji] = None) -> Optional[BoxKji]:
    """Replace a segment's voxels by ``mask_Kji`` where they differ; other segments untouched.

    mask_Kji: (K, J, I) mask on the reference volume's grid (nonzero = inside).
    previous_Kji: the segment on the same grid before the change (segmentToArray), if the caller
    already has it; read here otherwise. Only the box of changed voxels is written.
    box: half-open KJI box of the grid that ``mask_Kji`` (and ``previous_Kji``) cover, e.g. one
    slice; the segment's voxels outside it are left as they are. Default: the whole grid.
    Returns the written box (in the whole grid's indices), or None when the segment already matched.
    """
    _requireSegment(segmentationNode, segmentId)
    shape = volumeShapeKji(referenceVolumeNode)
    if box is None:
        box = tuple((0, n) for n in shape)
    _checkBox(box, shape)
    mask = np.asarray(mask_Kji)
    if mask.shape != _boxShape(box):
        raise ValueError(f"mask shape {mask.shape} does not match the shape {_boxShape(box)} of box {box} "
                         f"(volume shape {shape})")
    if previous_Kji is None:
        previous_Kji = segmentToArray(segmentationNode, segmentId, referenceVolumeNode, box=box)
    changed = changedBox(mask, previous_Kji)
    if changed is None:
        return None
    inside = mask[tuple(slice(a, b) for a, b in changed)] != 0
    changed = tuple((a + origin, b + origin) for (a, b), (origin, _) in zip(changed, box))
    extent = _boxExtent(changed)
    # Slicer's MODE_REPLACE replaces the WHOLE segment by the modifier (the extent only clips
    # it; on a shared layer it clears the segment first), so a box-sized modifier would drop
    # every voxel outside the box. Two merges confined to the box do what the Segment Editor's
    # erase and paint do instead: MIN with "keep" = 255 inside the mask removes the segment's
    # voxels outside the mask (other labels of a shared layer are masked out by Slicer), then
    # MASK writes the segment's label where the mask is set.
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = segmentationNode.GetSegmentation()
    if not inside.all():
        keep = volumeGeometryImage(referenceVolumeNode, segmentationNode, extent)
        _imageArray(keep)[:] = np.where(inside, 255, 0)
        keep.Modified()
        # Listing the layer's other segments as "overwritable" only stops Slicer from moving this
        # segment to a layer of its own: MIN (minimumOfAllSegments False) never changes them.
        sharedIds = []
        segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segmentId, sharedIds, False)
        if not logic.SetBinaryLabelmapToSegment(keep, segmentationNode, segmentId, logic.MODE_MERGE_MIN,
                                                extent, False, sharedIds):
            raise InputError(f"Erasing in segment '{segmentId}' of '{segmentationNode.GetName()}' failed.")
    if inside.any():
        add = volumeGeometryImage(referenceVolumeNode, segmentationNode, extent)
        _imageArray(add)[:] = inside
        add.Modified()
        # Where other segments of a shared layer lie under the mask, Slicer moves this segment to
        # its own layer first, so they keep their voxels (segments may overlap).
        if not logic.SetBinaryLabelmapToSegment(add, segmentationNode, segmentId, logic.MODE_MERGE_MASK, extent):
            raise InputError(f"Writing segment '{segmentId}' into '{segmentationNode.GetName()}' failed.")
    return changed


def referenceGeometryImage(segmentationNode, sourceVolumeNode=None) -> "slicer.vtkOrientedImageData":
    """Empty uint8 image on the segmentation's reference geometry, in the segmentation's frame.

    This is the grid the Segment Editor edits on (its "default modifier labelmap"): the
    segmentation's reference image geometry, which may differ from the source volume's grid
    (segmentation made on another volume, oversampled, or "Specify geometry"). A segmentation
    without one falls back to ``sourceVolumeNode``'s grid, as the Segment Editor does.
    """
    geometry = slicer.vtkSlicerSegmentEditorLogic.GetReferenceImageGeometryStringFromSegmentation(
        segmentationNode.GetSegmentation())
    if not geometry:
        if sourceVolumeNode is None:
            raise InputError(f"Segmentation '{segmentationNode.GetName()}' has no reference geometry; "
                             "select a source volume in the Segment Editor.")
        return volumeGeometryImage(sourceVolumeNode, segmentationNode)
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image, True, vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(0)
    return image


def segmentIntoImage(sourceSegmentationNode, segmentId: str, image, imageSegmentationNode) -> None:
    """Fill ``image`` (uint8, in ``imageSegmentationNode``'s frame) with a segment, 1 inside / 0 outside.

    The segment is resampled (nearest neighbour) through both nodes' parent transforms: this
    puts a preview made on the source volume's grid onto the grid the Segment Editor edits on.
    """
    segment = _requireSegment(sourceSegmentationNode, segmentId)
    target = _imageArray(image)
    target[:] = 0
    labelmap = slicer.vtkOrientedImageData()
    ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        sourceSegmentationNode, segmentId, labelmap, False)
    if not ok or _isEmptyExtent(labelmap.GetExtent()):
        image.Modified()
        return
    sourceToImageFrame = np.linalg.inv(parentToWorldMatrix(imageSegmentationNode)) @ parentToWorldMatrix(
        sourceSegmentationNode)
    transform = vtk.vtkTransform()
    transform.SetMatrix(_arrayToMatrix(sourceToImageFrame))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, image, resampled, False, False, transform):
        raise InputError(f"Segment '{segment.GetName()}' could not be resampled onto the segmentation's geometry.")
    target[:] = _imageArray(resampled) == segment.GetLabelValue()
    image.Modified()


def _isEmptyExtent(extent) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


@contextlib.contextmanager
def renderPaused() -> Iterator[None]:
    """Pause view rendering while a block modifies MRML, inside the Slicer application only.

    Headless (slicer-core without ``slicer.app``) there is nothing to render, so this is a no-op.
    """
    if getattr(slicer, "app", None) is None:
        yield
        return
    with slicer.util.RenderBlocker():
        yield
