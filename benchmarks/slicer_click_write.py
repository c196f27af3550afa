"""Slicer-side time of one click correction: putting the corrected slice into the preview.

Times, on real MRML (PyPI slicer-core, no Slicer application), what the Segment Editor effect
does in Slicer's process after the worker returns a click's slice mask:

- **whole extent** (the effect before #21 item 11): read the whole preview segment
  (``mrml_io.segmentToArray``), put it in the engine's canonical order, replace the slice, back
  to KJI, write the whole extent (``writeSegmentFromArray(..., previous_Kji=mask == 0)``);
- **one slice** (now, ``EffectSession._showSlice``): read and write only that slice
  (``writeSegmentFromArray(..., box=slice)``).

The volume is 512 x 512 x 300 (I, J, K), LPS with 0.7 x 0.7 x 2.5 mm voxels; the preview
segment has voxels on every slice. Both paths must leave the same segment (checked).

Run (from the repository root)::

    PYTHONPATH=ProtoSAMLib:ProtoSAMSlicer/ProtoSAM:Testing/slicer:Testing/support \\
        python benchmarks/slicer_click_write.py [--repeats 5] [--shape 300 512 512]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import types

import numpy as np


def buildScene():
    """A scene with the logics Slicer registers (the tests' own helper), set as slicer.mrmlScene."""
    import slicer
    from slicer_mrml_helpers import sceneWithLogics

    scene, slicer.modules = sceneWithLogics()
    slicer.mrmlScene = scene
    return scene


def wholeExtentClick(session, canonicalSlice, mask):
    """The effect's click write before #21 item 11 (effect_session._showSlice at 6faa897)."""
    from ProtoSAMSlicerLib import mrml_io

    current = session._orientation.to_canonical(
        mrml_io.segmentToArray(session.result.previewSegmentationNode, session.segmentId, session.sourceVolumeNode))
    current[canonicalSlice] = mask
    whole = session._orientation.from_canonical(current)
    mrml_io.writeSegmentFromArray(whole, session.result.previewSegmentationNode, session.segmentId,
                                  session.sourceVolumeNode, previous_Kji=(whole == 0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("K", "J", "I"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from ProtoSAMSlicerLib import geometry, mrml_io, results
    from ProtoSAMSlicerLib.effect_session import EffectSession
    from protosam.orientation import canonical_orientation
    from slicer_mrml_helpers import addSegmentation, addVolume, ijkToRasFrom

    shape = tuple(args.shape)
    scene = buildScene()
    ijkToRas = ijkToRasFrom(np.diag([-1.0, -1.0, 1.0]), (0.7, 0.7, 2.5), (10.0, 20.0, -300.0))
    volume = addVolume(scene, np.zeros(shape, np.float32), ijkToRas, "ct")
    rng = np.random.default_rng(0)
    propagated = np.zeros(shape, np.uint8)
    propagated[:, shape[1] // 4:3 * shape[1] // 4, shape[2] // 4:3 * shape[2] // 4] = 1
    support, ids = addSegmentation(scene, volume, {"liver": np.zeros(shape, np.uint8)})
    segmentId = ids["liver"]
    preview = results.createPreview(volume, support, {segmentId: propagated})

    session = EffectSession(logic=None, saveStateForUndo=lambda: None, modifySegment=lambda *a: None)
    session.sourceVolumeNode, session.segmentId = volume, segmentId
    axis = geometry.sliceAxisFromNormal(ijkToRas[:3, 2], mrml_io.ijkToWorldMatrix(volume))
    session.result = types.SimpleNamespace(previewSegmentationNode=preview, sliceAxis=axis)
    session._orientation = canonical_orientation(mrml_io.ijkToWorldMatrix(volume), "axial")
    canonicalShape = session._orientation.canonical_shape(shape)

    times = {"whole extent": [], "one slice": []}
    clicks = {"whole extent": lambda index, mask: wholeExtentClick(session, index, mask),
              "one slice": session._showSlice}
    canonicalPropagated = session._orientation.to_canonical(propagated)
    for repeat in range(args.repeats):
        canonicalSlice = int(rng.integers(canonicalShape[0]))
        mask = (rng.random(canonicalShape[1:]) < 0.3).astype(np.uint8)
        expected = session._orientation.from_canonical(
            np.concatenate([canonicalPropagated[:canonicalSlice], mask[np.newaxis],
                            canonicalPropagated[canonicalSlice + 1:]]))
        for name, click in clicks.items():
            start = time.perf_counter()
            click(canonicalSlice, mask)
            times[name].append(time.perf_counter() - start)
            if not np.array_equal(mrml_io.segmentToArray(preview, segmentId, volume), expected):
                raise SystemExit(f"{name}: the preview is not what the click should have made")
            session._showSlice(canonicalSlice, canonicalPropagated[canonicalSlice])  # back to the propagated mask

    print(f"Slicer-side write of one click into a {shape[2]} x {shape[1]} x {shape[0]} (I x J x K) preview "
          f"({args.repeats} clicks, {platform.processor() or platform.machine()}, {platform.python_version()}):")
    for name, values in times.items():
        print(f"  {name:13s} median {statistics.median(values) * 1000:8.1f} ms  "
              f"(min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})")


if __name__ == "__main__":
    main()
