"""The example bank in Slicer (protosam.examples, docs/cohorts.md "Teach once"), without Qt.

What the module's "Example bank" section and the Segment Editor effect do with a bank folder:

- ``bankRows(folder)``: the structures the bank holds and how many examples each (the index
  only: no image is read, nothing is imported that needs torch);
- ``examplesForSegments``: a run's supports from the bank, by segment name (segment name =
  structure name), as arrays (``image``, ``mask``, ``slice_index``, ``slice_count``) that travel
  to the worker process as they are; it never hands the worker a path;
- ``removeFromBank`` / ``undoQuestion``: Undo accept offers to take the examples that Accept
  added back out of the bank (asked: the slices are the user's own labels, which may still be
  wanted after the propagated result is undone);
- ``bankAddition`` / ``addToBank``: the painted and corrected slices of an accepted volume as
  examples. ``bankAddition`` reads them from the preview *before* Accept removes it (the slice
  as the engine normalises it, in the engine's canonical order, and its whole mask), and
  ``addToBank`` writes them once the user said yes. Only whole-slice masks are examples: the
  slices the user painted (the run's support slices on this volume) and the slices repainted in
  the preview (Update preview, or repainted before Accept).

Every error is an ``InputError`` that names the folder and says what to do, raised before
anything is written: a missing folder or an unreadable index never changes a segment.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from protosam.errors import InputError
from protosam.orientation import plane_of_ijk_axis

from . import mrml_io

#: The module's "Supports" choices: the painted slices (as before), the bank alone, or both.
SUPPORTS_PAINTED, SUPPORTS_BANK, SUPPORTS_BOTH = "painted", "bank", "both"
SUPPORTS_MODES = (SUPPORTS_PAINTED, SUPPORTS_BANK, SUPPORTS_BOTH)


@dataclasses.dataclass(frozen=True)
class BankRow:
    """One structure of a bank: its name, its number of examples and their planes."""

    structure: str
    count: int
    planes: str


def openBank(folder, *, create: bool = False):
    """The ``protosam.examples.ExampleBank`` in ``folder``. ``create``: make a bank in a missing
    or empty folder (adding examples); otherwise the folder must hold a bank (reading)."""
    from protosam.examples import ExampleBank

    folder = str(folder or "").strip()
    if not folder:
        raise InputError("Choose the example bank folder first (ProtoSAM module, Example bank section).")
    if not create and not os.path.isdir(folder):
        raise InputError(f"The example bank folder {folder} does not exist: choose the folder of your bank, or an "
                         "empty folder to start one (add an accepted volume's slices to it).")
    if not create and not os.path.isfile(os.path.join(folder, "index.json")):
        if os.listdir(folder):
            raise InputError(f"{folder} is not an example bank (it has no index.json): choose the folder of your "
                             "bank, or an empty folder to start one.")
        raise InputError(f"The example bank {folder} is empty: accept a propagated volume and add its painted and "
                         "corrected slices to the bank first.")
    return ExampleBank(folder, create=create)


def bankRows(folder) -> List[BankRow]:
    """The structures of the bank in ``folder`` (in the order they were first added) with their
    example counts and planes; an empty list for an empty folder (a bank to be)."""
    folder = str(folder or "").strip()
    if folder and os.path.isdir(folder) and not os.listdir(folder):
        return []
    bank = openBank(folder)
    planes: Dict[str, List[str]] = {}
    for example in bank.list():
        plane = example.plane or f"axis {example.axis}"
        names = planes.setdefault(example.structure, [])
        if plane not in names:
            names.append(plane)
    return [BankRow(name, count, ", ".join(planes.get(name, []))) for name, count in bank.structures().items()]


def rowTexts(row: BankRow) -> List[str]:
    return [row.structure, str(row.count), row.planes]


#: Column titles of the bank table (translated by the widget).
BANK_COLUMNS = ("Structure", "Examples", "Planes")


def runPlane(volumeNode, sliceNormal_World) -> str:
    """The anatomical plane a run along ``sliceNormal_World`` cuts ``volumeNode`` in (the plane
    its examples must have been taken in). Oblique views are refused as for a run."""
    from . import geometry

    ijkToWorld = mrml_io.ijkToWorldMatrix(volumeNode)
    axis = geometry.sliceAxisFromNormal(sliceNormal_World, ijkToWorld)
    return plane_of_ijk_axis(ijkToWorld, axis.ijkAxis)


def examplesForSegments(folder, segmentationNode, segmentIds: Sequence[str], plane: str, *,
                        required: bool = True) -> Dict[str, List[dict]]:
    """segment ID -> the bank's examples of the structure named as the segment, taken in
    ``plane``, as SupportExample field mappings of arrays and numbers (what the worker and a
    ProtoSAM server receive). ``required``: a segment without examples is an error saying what
    to do; otherwise it is left out (painted slices and the bank together)."""
    bank = openBank(folder)
    counts = bank.structures()
    found: Dict[str, List[dict]] = {}
    for segmentId in segmentIds:
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise InputError(f"Segment '{segmentId}' is not in '{segmentationNode.GetName()}'.")
        name = segment.GetName()
        examples = [e for e in bank.list(name) if e.plane == plane]
        if not examples:
            if not required:
                continue
            if name not in counts:
                held = ", ".join(counts) or "nothing yet"
                raise InputError(
                    f"The example bank {folder} has no examples of '{name}' (it holds {held}). Name the segment as a "
                    "structure of the bank, or paint this structure on a slice, propagate, accept, and add the "
                    "slices to the bank.")
            planes = sorted({e.plane or f"axis {e.axis}" for e in bank.list(name)})
            raise InputError(
                f"The example bank {folder} has no {plane} examples of '{name}' (it has {', '.join(planes)} ones): "
                f"propagate in a {planes[0]} slice view, or add {plane} examples.")
        entries = []
        for example in examples:
            image, mask = bank.arrays(example)
            entries.append({"image": np.ascontiguousarray(image, np.float32),
                            "mask": np.ascontiguousarray(mask, np.uint8),
                            "slice_index": int(example.slice_index), "slice_count": int(example.slice_count)})
        found[segmentId] = entries
    return found


@dataclasses.dataclass
class BankAddition:
    """The examples an accepted result offers the bank, read before Accept: per structure
    name, the slices (in the engine's canonical order) with their normalised images and masks.

    ``slicesBySegment``: segment ID -> the slices as the user knows them (IJK indices along the
    run's slice axis), for the question the module asks."""

    volumeName: str
    plane: str
    modality: str
    sliceCount: int
    entries: List[dict]
    slicesBySegment: Dict[str, List[int]]
    names: Dict[str, str]
    #: The normalised canonical volume, hashed by the bank (salted) when the examples are added.
    volume: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def empty(self) -> bool:
        return not self.entries

    def describe(self) -> str:
        """"liver: slices 2, 7; spleen: slice 4" (IJK indices as the slice views show them)."""
        parts = []
        for segmentId, slices in self.slicesBySegment.items():
            word = "slice" if len(slices) == 1 else "slices"
            parts.append(f"{self.names[segmentId]}: {word} {', '.join(str(k) for k in slices)}")
        return "; ".join(parts)


def userSlices(logic, result) -> Dict[str, List[int]]:
    """segment ID -> slices of ``result``'s volume whose mask the user gave as a whole slice:
    the run's painted support slices when they were painted on this volume, the slices repainted
    through Update preview, and those repainted in the preview since (IJK indices along the
    run's slice axis)."""
    painted = {}
    if result.supportVolumeNode is result.targetVolumeNode:
        painted = {segmentId: list(slices) for segmentId, slices in result.supportSlices.items()}
    repainted = logic.repaintedSlices(result)
    chosen = {}
    for segmentId in result.segmentIds:
        slices = set(painted.get(segmentId, [])) | set(result.correctedSlices.get(segmentId, [])) \
            | set(repainted.get(segmentId, []))
        if slices:
            chosen[segmentId] = sorted(slices)
    return chosen


def bankAddition(logic, result) -> BankAddition:
    """What ``result`` (a preview not accepted yet) would add to a bank: its painted and
    corrected slices (``userSlices``) that show their structure, each the slice as the engine
    normalised it (``result.options.modality``, the whole volume) in the canonical order of the
    run's plane, with its mask as the preview holds it now."""
    from protosam.orientation import canonical_orientation
    from protosam.preprocessing import guess_modality, normalize_volume

    chosen = userSlices(logic, result)
    volumeNode = result.targetVolumeNode
    # The run's canonical order (as logic.correctionOrientation; not imported: logic imports this module).
    ijkToWorld = mrml_io.ijkToWorldMatrix(volumeNode)
    orientation = canonical_orientation(ijkToWorld, plane_of_ijk_axis(ijkToWorld, result.sliceAxis.ijkAxis))
    modality = (result.options.modality if result.options is not None else "auto") or "auto"
    entries, slicesBySegment, names = [], {}, {}
    volume = None
    if chosen:
        raw = orientation.to_canonical(mrml_io.volumeToArray(volumeNode)).astype(np.float32)
        modality = guess_modality(raw) if modality == "auto" else modality
        volume = normalize_volume(raw, modality)
    count = mrml_io.volumeShapeKji(volumeNode)[result.sliceAxis.kjiAxis]
    preview = result.previewSegmentationNode
    for segmentId, slices in chosen.items():
        segment = preview.GetSegmentation().GetSegment(segmentId)
        source = result.supportSegmentationNode.GetSegmentation().GetSegment(segmentId)
        name = (source or segment).GetName()
        terminology = _terminology(source or segment)
        mask = orientation.to_canonical(mrml_io.segmentToArray(preview, segmentId, volumeNode))
        kept = []
        for k in slices:
            canonical = orientation.canonical_slice(k, count)
            if not mask[canonical].any():  # the structure is not on this slice: nothing to teach
                continue
            kept.append(k)
            entries.append(dict(structure=name, image=volume[canonical], mask=mask[canonical] != 0,
                                slice_index=int(canonical), slice_count=int(volume.shape[0]),
                                plane=orientation.plane, terminology=terminology or None, modality=modality))
        if kept:
            slicesBySegment[segmentId], names[segmentId] = kept, name
    return BankAddition(volumeName=volumeNode.GetName(), plane=orientation.plane, modality=modality,
                        sliceCount=count, entries=entries, slicesBySegment=slicesBySegment,
                        names=names, volume=volume)


def _terminology(segment) -> str:
    from .results import segmentTerminology

    return segmentTerminology(segment) if segment is not None else ""


def addToBank(folder, additions: Sequence[BankAddition]):
    """Write ``additions`` into the bank in ``folder`` (made there when the folder is new or
    empty), each volume's examples as one change (all or none). Returns the added Examples."""
    bank = openBank(folder, create=True)
    added = []
    for addition in additions:
        if addition.empty:
            continue
        source = bank.volume_hash(addition.volume)
        added += bank.add_many([dict(entry, volume_hash=source) for entry in addition.entries])
    return added


def additionQuestion(additions: Sequence[BankAddition], folder) -> Optional[str]:
    """The question the module asks after Accept, or None when there is nothing to add."""
    offered = [addition for addition in additions if not addition.empty]
    if not offered:
        return None
    lines = [f"- {addition.volumeName}: {addition.describe()}" for addition in offered]
    total = sum(addition.count for addition in offered)
    return (f"Add the {total} painted and corrected slice(s) of the accepted result to the example bank {folder}?\n\n"
            + "\n".join(lines) + "\n\nLater volumes can then be propagated from the bank with no painting. The bank "
            "keeps these slices of the scan (patient data), without names, IDs, paths or dates.")


def removeFromBank(folder, exampleIds: Sequence[str]) -> list:
    """Remove the examples with ``exampleIds`` from the bank in ``folder``: those still there
    (some may have been removed since, e.g. with ``protosam examples remove``). Returns the
    removed ``protosam.examples.Example`` list."""
    bank = openBank(folder)
    present = {example.id for example in bank.list()}
    ids = [exampleId for exampleId in exampleIds if exampleId in present]
    return bank.remove(ids) if ids else []


def undoQuestion(undo) -> Optional[str]:
    """The question Undo accept asks when that Accept added examples to a bank (``undo``: a
    results.AcceptUndo), or None when it added none."""
    added = {folder: ids for folder, ids in undo.bankExamples.items() if ids}
    if not added:
        return None
    total = sum(len(ids) for ids in added.values())
    folders = ", ".join(sorted(added))
    return (f"This Accept also added {total} painted and corrected slice(s) to the example bank {folders}.\n\n"
            "Remove them from the bank too? (OK: remove them; Cancel: keep them as examples. The segments are "
            "restored either way.)")
