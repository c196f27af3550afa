"""Fixtures for tests of the Slicer extension against real MRML (PyPI slicer-core, no Slicer app).

slicer-core gives the MRML library but no ``slicer.mrmlScene``, ``slicer.modules`` or
``slicer.app``. The ``scene`` fixture builds a scene with the application, colors,
segmentations and volumes logics bound to it, and exposes it as ``slicer.mrmlScene`` /
``slicer.modules.<name>.logic()`` for the duration of one test.
"""

from __future__ import annotations

import pathlib
import sys
import types

import numpy as np
import pytest

# Testing/support holds helpers shared by Testing/engine and Testing/slicer (required_modules).
# Only that folder goes on sys.path: with Testing/ itself there, Testing/slicer would shadow the
# real ``slicer`` package (test modules imported as slicer.test_*).
_SUPPORT = str(pathlib.Path(__file__).resolve().parents[1] / "support")
if _SUPPORT not in sys.path:
    sys.path.insert(0, _SUPPORT)

from required_modules import require_slicer_core  # noqa: E402 (needs the path above)

REPO = pathlib.Path(__file__).resolve().parents[2]
for _path in (REPO / "ProtoSAMSlicer" / "ProtoSAM", REPO / "ProtoSAMSlicer" / "SegmentEditorProtoSAM"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture
def scene():
    """A fresh MRML scene with the logics Slicer modules would register, set as slicer.mrmlScene."""
    slicer = require_slicer_core()
    from slicer_mrml_helpers import sceneWithLogics

    mrmlScene, modules = sceneWithLogics()
    saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = mrmlScene
    slicer.modules = modules
    try:
        yield mrmlScene
    finally:
        mrmlScene.Clear(True)
        for name, value in saved.items():
            if value is None:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)


@pytest.fixture
def markupsLogic(scene):
    """Slicer's real Markups module logic (slicer-core's vtkSlicerMarkupsLogic) bound to ``scene``
    as the application binds it: from then on, adding a markups node makes it the active place
    list of the selection node (vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded -> SetActiveList)."""
    slicer = require_slicer_core()
    appLogic = scene._protosamTestLogics[0]
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLApplicationLogic(appLogic)
    logic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Markups", logic)
    slicer.modules.markups = types.SimpleNamespace(logic=lambda: logic)
    scene._protosamMarkupsLogic = logic
    return logic


@pytest.fixture(scope="session")
def tinyModels(tmp_path_factory):
    """Tiny random-weight DINOv2 + SAM checkpoints in the official formats (engine's own writer)."""
    from protosam.testing import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny-checkpoints"), input_size=56)


@pytest.fixture(scope="session")
def tinyOptions(tinyModels):
    """ProcessOptions running the tiny models on the CPU over every slice (deterministic cost).

    The encoder cache lets a test re-run the engine on the same arrays for reference at no cost.
    """
    from ProtoSAMSlicerLib.logic import ProcessOptions
    from ProtoSAMSlicerLib.worker_client import shutdownAllWorkers

    yield ProcessOptions(models=tinyModels, preset="default", device="cpu", autoExtent=False,
                         cacheBytes=256 * 1024 * 1024)
    shutdownAllWorkers()


@pytest.fixture
def cpuWorker():
    """The CPU worker process client every test shares (``worker_client.workerForDevice("cpu")``,
    the one ProtoSAMLogic uses): its process starts once and keeps the tiny models loaded until
    ``tinyOptions`` ends (or this process exits)."""
    from ProtoSAMSlicerLib.worker_client import workerForDevice

    return workerForDevice("cpu")


@pytest.fixture
def editedVolume(scene):
    """Builds the Segment Editor effect tests' volume, segments and editor in ``scene``
    (slicer_mrml_helpers.addEditedVolume; keywords: liverSlices, kidney, parentTransform)."""
    from slicer_mrml_helpers import addEditedVolume

    return lambda **options: addEditedVolume(scene, **options)


EFFECT_PY = REPO / "ProtoSAMSlicer" / "SegmentEditorProtoSAM" / "SegmentEditorProtoSAMLib" / "SegmentEditorEffect.py"


@pytest.fixture
def editor(scene, slicerApp, editedVolume):
    """A Segment Editor: editor node and logic (real), the ProtoSAM effect loaded from its file,
    the red slice view on the painted slice (shared by the effect, updating and dialog tests)."""
    import slicer_app_standins as standins
    from slicer_mrml_helpers import EFFECT_IJK_TO_RAS

    built = editedVolume()
    volume, segmentation, ids, image = built["volume"], built["segmentation"], built["ids"], built["image"]
    liver, spleen = built["arrays"]["liver"], built["arrays"]["spleen"]
    editorNode, editorLogic = built["editorNode"], built["editorLogic"]
    sliceNode = scene.GetNodeByID("vtkMRMLSliceNodeRed")
    centre = EFFECT_IJK_TO_RAS @ np.array([9.0, 8.0, 2.0, 1.0])
    sliceNode.JumpSliceByOffsetting(*centre[:3])
    standins.qSlicerSegmentEditorScriptedEffect.editorLogic = editorLogic
    scriptedEffect = standins.qSlicerSegmentEditorScriptedEffect(None)
    scriptedEffect.setPythonSource(str(EFFECT_PY))
    effect = scriptedEffect.self()
    effect.setupOptionsFrame()
    effect.activate()
    yield dict(volume=volume, segmentation=segmentation, ids=ids, liver=liver, spleen=spleen, image=image,
               editorNode=editorNode, editorLogic=editorLogic, sliceNode=sliceNode, effect=effect,
               scriptedEffect=scriptedEffect, app=slicerApp)
    effect.cleanup()


SLICER_MODULES = ("ProtoSAM", "SegmentEditorProtoSAM")


@pytest.fixture
def slicerApp(scene, tmp_path, tinyModels, markupsLogic):
    """The stand-in application (slicer_app_standins) with the user's settings choosing the tiny
    models on the CPU, a Red slice view and the Markups logic (as in the application). ProtoSAM's module
    files are imported afresh."""
    import slicer_app_standins as standins

    slicer = require_slicer_core()
    from slicer_mrml_helpers import addSliceNode
    uninstall = standins.install(tmp_path / "settings")
    for name in SLICER_MODULES:
        sys.modules.pop(name, None)
    import qt

    settings = qt.QSettings()
    for key, value in {"DINOv2": tinyModels.dinov2, "DINOv2Checkpoint": tinyModels.dinov2_checkpoint,
                       "SAM": tinyModels.sam, "SAMCheckpoint": tinyModels.sam_checkpoint, "Device": "cpu"}.items():
        settings.setValue("ProtoSAM/" + key, value)
    settings.sync()
    addSliceNode(scene, "Red")
    try:
        yield slicer.app
    finally:
        for name in SLICER_MODULES:
            sys.modules.pop(name, None)
        uninstall()



@pytest.fixture
def modalDialogs(slicerApp):
    """``slicer.app.testingEnabled()`` False, as for a user: slicer.util's errorDisplay & co. open
    modal dialogs, each a real nested Qt event loop (QTimers keep firing) that the stand-in user
    answers after ``readSeconds`` (slicer_app_standins.ModalDialogs: ``shown``, ``maxOpen``)."""
    slicerApp.testing = False
    try:
        yield slicerApp.dialogs
    finally:
        slicerApp.testing = True
