"""The .ui files load in a real Qt (PySide6, offscreen) and hold every widget the code uses."""

import ast
import os
import pathlib
import re
import xml.etree.ElementTree as ElementTree

import pytest
from required_modules import PYSIDE6, require_module

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = require_module("PySide6.QtWidgets", PYSIDE6)
QtUiTools = require_module("PySide6.QtUiTools", PYSIDE6)

REPO = pathlib.Path(__file__).resolve().parents[2]
MODULE_UI = REPO / "Resources" / "UI" / "ProtoSAM.ui"
EFFECT_UI = REPO / "Resources" / "UI" / "SegmentEditorProtoSAM.ui"
MODULE_PY = REPO / "ProtoSAMSlicer" / "ProtoSAM" / "ProtoSAM.py"
EFFECT_PY = REPO / "ProtoSAMSlicer" / "SegmentEditorProtoSAM" / "SegmentEditorProtoSAMLib" / "SegmentEditorEffect.py"
# Slicer/CTK widget classes -> the closest plain Qt class, so PySide6 builds a real widget.
BASE_CLASSES = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLCheckableNodeComboBox": "QComboBox",
    "qMRMLSegmentsTableView": "QTableView",
    "ctkPathLineEdit": "QLineEdit",
}


class SlicerUiLoader(QtUiTools.QUiLoader):
    def createWidget(self, className, parent=None, name=""):
        widget = super().createWidget(BASE_CLASSES.get(className, className), parent, name)
        if widget is not None:
            widget.setProperty("slicerClass", className)
        return widget


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def load(app, path):
    loader = SlicerUiLoader()
    widget = loader.load(str(path))
    assert widget is not None, f"{path.name} did not load: {loader.errorString()}"
    return widget


def widgetsByName(root):
    return {child.objectName(): child for child in root.findChildren(QtWidgets.QWidget) if child.objectName()}


def usedNames(path):
    """Names the code reads as self.ui.<name>."""
    return set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", path.read_text()))


@pytest.mark.parametrize("uiPath, codePath, rootName", [
    (MODULE_UI, MODULE_PY, "ProtoSAM"),
    (EFFECT_UI, EFFECT_PY, "SegmentEditorProtoSAM"),
])
def test_ui_loads_and_has_every_widget_the_code_uses(app, uiPath, codePath, rootName):
    root = load(app, uiPath)
    assert root.objectName() == rootName
    widgets = widgetsByName(root)
    used = usedNames(codePath)
    assert used, "the code should use the .ui widgets"
    missing = sorted(used - set(widgets))
    assert not missing, f"{codePath.name} uses widgets missing from {uiPath.name}: {missing}"
    for name in used:
        assert re.fullmatch(r"[a-z][A-Za-z0-9]*", name), f"widget name {name} is not camelCase"


def test_module_widget_classes(app):
    root = load(app, MODULE_UI)  # keep the parent alive while its children are inspected
    widgets = widgetsByName(root)
    expected = {
        "supportSegmentationSelector": "qMRMLNodeComboBox",
        "supportVolumeSelector": "qMRMLNodeComboBox",
        "targetVolumesSelector": "qMRMLCheckableNodeComboBox",
        "supportSegmentsTableView": "qMRMLSegmentsTableView",
        "inputsCollapsibleButton": "ctkCollapsibleButton",
        "customCheckpointPathLineEdit": "ctkPathLineEdit",
        "applyButton": "QPushButton",
        "progressBar": "QProgressBar",
        "firstSliceSpinBox": "QSpinBox",
    }
    for name, className in expected.items():
        actual = widgets[name].property("slicerClass") or type(widgets[name]).__name__
        assert actual == className, f"{name} is a {actual}, expected {className}"


def test_node_selectors_declare_node_types_and_scene_connections():
    tree = ElementTree.parse(MODULE_UI)
    nodeTypes = {}
    for widget in tree.iter("widget"):
        if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox"):
            strings = widget.findall("./property[@name='nodeTypes']/stringlist/string")
            nodeTypes[widget.get("name")] = [s.text for s in strings]
    assert nodeTypes == {
        "supportSegmentationSelector": ["vtkMRMLSegmentationNode"],
        "supportVolumeSelector": ["vtkMRMLScalarVolumeNode"],
        "targetVolumesSelector": ["vtkMRMLScalarVolumeNode"],
    }
    receivers = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert receivers == set(nodeTypes) | {"supportSegmentsTableView"}


def test_parameter_node_fields_are_bound_in_the_ui():
    """Every field of ProtoSAMParameterNode has a widget with SlicerParameterName, and back."""
    module = ast.parse(MODULE_PY.read_text())
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "ProtoSAMParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    tree = ElementTree.parse(MODULE_UI)
    bound = {p.findtext("string"): w.get("name") for w in tree.iter("widget")
             for p in w.findall("./property[@name='SlicerParameterName']")}
    assert set(bound) == fields, f"fields {sorted(fields)} vs bound {sorted(bound)}"


def test_module_files_import_nothing_heavy_at_load_time():
    """Slicer loads the module files at startup, before torch may be installed."""
    allowed = {"enum", "logging", "os", "typing", "dataclasses", "qt", "vtk", "slicer", "ctk", "SegmentEditorEffects"}
    for path in (MODULE_PY, EFFECT_PY, REPO / "ProtoSAMSlicer" / "SegmentEditorProtoSAM" / "SegmentEditorProtoSAM.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            elif isinstance(node, ast.Try):
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name} at module level"
