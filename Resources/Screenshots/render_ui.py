"""Render pictures of the ProtoSAM panels from the real .ui files (PySide6, offscreen).

Slicer's own widget classes (node selectors, collapsible buttons...) are not available outside
Slicer, so they are drawn as the closest plain Qt widgets filled with example values. The
layout, labels, tooltips and buttons are those of Resources/UI/*.ui. Run:

    QT_QPA_PLATFORM=offscreen python Resources/Screenshots/render_ui.py

Writes ProtoSAM-module.png and SegmentEditorProtoSAM-effect.png next to this file.
"""

import os
import pathlib
import xml.etree.ElementTree as ElementTree

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
UI = HERE.parent / "UI"
BASE_CLASSES = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLCheckableNodeComboBox": "QComboBox",
    "qMRMLSegmentsTableView": "QTableView",
    "ctkPathLineEdit": "QLineEdit",
}


class Loader(QtUiTools.QUiLoader):
    def createWidget(self, className, parent=None, name=""):
        return super().createWidget(BASE_CLASSES.get(className, className), parent, name)


def load(path):
    widget = Loader().load(str(path))
    children = {c.objectName(): c for c in widget.findChildren(QtWidgets.QWidget)}
    for element in ElementTree.parse(path).iter("widget"):  # collapsible button titles
        if element.get("class") == "ctkCollapsibleButton":
            children[element.get("name")].setTitle(element.findtext("./property[@name='text']/string"))
    return widget, children


def fill(combo, items, current=0):
    combo.clear()
    combo.addItems(items)
    combo.setCurrentIndex(current)


def renderModule():
    root, ui = load(UI / "ProtoSAM.ui")
    fill(ui["supportSegmentationSelector"], ["Segmentation"])
    fill(ui["supportVolumeSelector"], ["CT abdomen"])
    fill(ui["targetVolumesSelector"], ["CT abdomen, CT follow-up"])
    fill(ui["sliceViewComboBox"], ["Red (axial)", "Yellow (sagittal)", "Green (coronal)"])
    fill(ui["supportSliceComboBox"], ["Largest painted slice", "Slice shown in the view"])
    fill(ui["rangeComboBox"], ["Automatic extent", "All slices", "From - to"])
    ui["firstSliceSpinBox"].setVisible(False)
    ui["lastSliceSpinBox"].setVisible(False)
    model = QtGui.QStandardItemModel(0, 1, root)
    for name, colour in (("liver", "#dd8c6e"), ("spleen", "#9d6cbd"), ("kidney", "#b96a5c")):
        item = QtGui.QStandardItem(name)
        item.setData(QtGui.QColor(colour), QtCore.Qt.DecorationRole)
        model.appendRow(item)
    table = ui["supportSegmentsTableView"]
    table.setModel(model)
    table.horizontalHeader().setVisible(False)
    table.horizontalHeader().setStretchLastSection(True)
    table.verticalHeader().setVisible(False)
    table.verticalHeader().setDefaultSectionSize(22)
    table.setFixedHeight(72)
    table.selectRow(0)
    fill(ui["dinov2ComboBox"], ["DINOv2 ViT-B/14 (default)"])
    fill(ui["samComboBox"], ["SAM ViT-B (default)"])
    fill(ui["acceptModeComboBox"], ["New segments", "Replace segments of the same name"])
    fill(ui["computeOnComboBox"], ["This computer", "ProtoSAM server"])
    ui["applyButton"].setEnabled(True)
    ui["applyButton"].setText("Cancel")
    ui["progressBar"].setVisible(True)
    ui["progressBar"].setMaximum(50)
    ui["progressBar"].setValue(31)
    ui["statusLabel"].setText("Volume 1/2: 31/50 slices, about 12 s left")
    fill(ui["supportsComboBox"], ["Painted slices", "Example bank", "Painted slices and example bank"])
    for name in ("bankCollapsibleButton", "modelsCollapsibleButton", "advancedCollapsibleButton",
                 "computeOnCollapsibleButton"):
        ui[name].setFixedHeight(28)  # drawn collapsed, as they start in Slicer
        for child in ui[name].findChildren(QtWidgets.QWidget):
            child.setVisible(False)
    root.resize(512, 960)
    root.grab().save(str(HERE / "ProtoSAM-module.png"))


def renderEffect():
    root, ui = load(UI / "SegmentEditorProtoSAM.ui")
    fill(ui["extentComboBox"], ["Automatic extent", "All slices"])
    ui["modelsLabel"].setText("Models: dinov2_vitb14 + vit_b (change them in the ProtoSAM module)")
    ui["statusLabel"].setText("Slice 12 corrected by the lasso; Update volume to use it everywhere.")
    ui["propagateButton"].setEnabled(False)
    ui["propagateFromBankButton"].setEnabled(False)
    for name in ("applyButton", "cancelButton", "undoCorrectionButton", "clearSliceButton", "updateVolumeButton"):
        ui[name].setEnabled(True)
    ui["lassoToolButton"].setChecked(True)  # the tool buttons are one exclusive group
    root.resize(420, 250)
    root.grab().save(str(HERE / "SegmentEditorProtoSAM-effect.png"))


def main():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    app.setStyle("Fusion")
    renderModule()
    renderEffect()


if __name__ == "__main__":
    main()
