"""Stand-ins for what only the 3D Slicer application provides, so that the module widget and the
Segment Editor effect classes run in tests against real MRML (slicer-core) and real Qt (PySide6).

Everything here is a thin mirror of a named Slicer/CTK/PythonQt source file (the path in each
docstring is in github.com/Slicer/Slicer unless said otherwise), reduced to what ProtoSAM's
classes use. Nothing here stands in for MRML (slicer-core is real: scenes, nodes, the
segmentations logic and vtkSlicerSegmentEditorLogic, which the Segment Editor's C++ effect base
class delegates to) or for ProtoSAM's own code.

``install(scene)`` puts the stand-ins in place (``qt``, ``ctk``-style widget classes used by the
.ui loader, ``ctk.ctkMessageBox``, ``slicer.app`` (with the main window and modal dialogs), ``slicer.i18n``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``SegmentEditorEffects``, ``qSlicerSegmentationsEditorEffectsPythonQt``)
and returns an ``uninstall`` callable.
"""

from __future__ import annotations

import enum
import importlib.util
import io
import logging
import os
import sys
import time
import types
import typing
import unittest
import xml.etree.ElementTree as ElementTree

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402

import slicer  # noqa: E402  (slicer-core: real MRML)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- PythonQt
class PythonQtObject:
    """PythonQt's view of a QObject (github.com/MeVisLab/pythonqt: src/PythonQtInstanceWrapper.cpp,
    src/PythonQtStdDecorators.cpp): Qt properties read and written as attributes
    (``button.enabled = False``, ``label.text``), ``obj.connect("signal(args)", callable)`` /
    ``disconnect``, ``className()``, and ``name`` for the object name (slicer.util.findChildren)."""

    def __getattribute__(self, name):
        if name in ("connect", "disconnect", "className", "name"):
            # Shiboken's own lookup would find QObject.connect first.
            return PythonQtObject.__dict__[name].__get__(self, type(self))
        if name[:1] != "_":
            meta = QtCore.QObject.metaObject(self)
            index = meta.indexOfProperty(name)
            if index >= 0:
                return meta.property(index).read(self)
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name[:1] != "_":
            meta = QtCore.QObject.metaObject(self)
            index = meta.indexOfProperty(name)
            if index >= 0:
                if not meta.property(index).write(self, value):
                    raise AttributeError(f"cannot set Qt property {name!r} of {type(self).__name__}")
                return
        super().__setattr__(name, value)

    @property
    def name(self):
        return QtCore.QObject.objectName(self)

    def className(self):
        return type(self).__name__

    def connect(self, signal, slot):
        getattr(self, signal.split("(", 1)[0]).connect(slot)

    def disconnect(self, signal, slot=None):
        bound = getattr(self, signal.split("(", 1)[0])
        if slot is None:
            bound.disconnect()
        else:
            bound.disconnect(slot)


def _pythonQtClass(base):
    return type(base.__name__, (PythonQtObject, base), {})


#: Qt classes as PythonQt exposes them (the ``qt`` module of Slicer's Python).
QT_CLASSES = {cls.__name__: _pythonQtClass(cls) for cls in (
    QtCore.QTimer, QtWidgets.QWidget, QtWidgets.QLabel, QtWidgets.QPushButton, QtWidgets.QComboBox,
    QtWidgets.QSpinBox, QtWidgets.QProgressBar, QtWidgets.QGroupBox, QtWidgets.QLineEdit,
    QtWidgets.QCheckBox, QtWidgets.QDialog, QtWidgets.QTableWidget)}


# --------------------------------------------------------------------------- CTK / qMRML widgets
class qMRMLWidget(QT_CLASSES["QWidget"]):
    """Libs/MRML/Widgets/qMRMLWidget.h: a QWidget with a scene; setMRMLScene emits mrmlSceneChanged."""

    mrmlSceneChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class ctkCollapsibleButton(QT_CLASSES["QWidget"]):
    """CTK Libs/Widgets/ctkCollapsibleButton.h: text, collapsed, contentsCollapsed(bool)."""

    contentsCollapsed = QtCore.Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text, self._collapsed = "", False

    def _getText(self):
        return self._text

    def _setText(self, value):
        self._text = value

    def _getCollapsed(self):
        return self._collapsed

    def _setCollapsed(self, value):
        if bool(value) != self._collapsed:
            self._collapsed = bool(value)
            self.contentsCollapsed.emit(self._collapsed)

    text = QtCore.Property(str, _getText, _setText)
    collapsed = QtCore.Property(bool, _getCollapsed, _setCollapsed)


class ctkPathLineEdit(QT_CLASSES["QWidget"]):
    """CTK Libs/Widgets/ctkPathLineEdit.h: currentPath, currentPathChanged(QString)."""

    currentPathChanged = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path = ""

    def _getPath(self):
        return self._path

    def _setPath(self, value):
        if value != self._path:
            self._path = value
            self.currentPathChanged.emit(value)

    currentPath = QtCore.Property(str, _getPath, _setPath)


class qMRMLNodeComboBox(QT_CLASSES["QComboBox"]):
    """Libs/MRML/Widgets/qMRMLNodeComboBox.h: the scene's nodes of ``nodeTypes``;
    currentNode()/setCurrentNode(), currentNodeChanged(vtkMRMLNode*). Follows node additions
    and removals like the real widget (through its scene model)."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._nodeTypes, self._scene, self._tags, self._nodes, self._current = [], None, [], [], None
        self.currentIndexChanged.connect(self._onIndexChanged)

    def _getNodeTypes(self):
        return self._nodeTypes

    def _setNodeTypes(self, value):
        self._nodeTypes = list(value)

    nodeTypes = QtCore.Property("QStringList", _getNodeTypes, _setNodeTypes)

    def setMRMLScene(self, scene):
        for tag in self._tags:
            self._scene.RemoveObserver(tag)
        self._scene, self._tags = scene, []
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._tags.append(scene.AddObserver(event, lambda *args: self._refresh()))
        self._refresh()

    def _matching(self):
        if self._scene is None:
            return []
        nodes = []
        for n in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(n)
            if any(node.IsA(t) for t in self._nodeTypes) and not node.GetHideFromEditors():
                nodes.append(node)
        return nodes

    def _refresh(self):
        nodes = self._matching()
        current = self._current if any(n is self._current for n in nodes) else None
        self.blockSignals(True)
        QtWidgets.QComboBox.clear(self)
        self._nodes = nodes
        for node in nodes:
            self.addItem(node.GetName())
        self.setCurrentIndex(next((i for i, n in enumerate(nodes) if n is current), -1))
        self.blockSignals(False)
        if current is not self._current:
            self._current = current
            self.currentNodeChanged.emit(current)

    def _onIndexChanged(self, index):
        node = self._nodes[index] if 0 <= index < len(self._nodes) else None
        if node is not self._current:
            self._current = node
            self.currentNodeChanged.emit(node)

    def currentNode(self):
        return self._current

    def setCurrentNode(self, node):
        index = next((i for i, n in enumerate(self._nodes) if n is node), -1)
        self.setCurrentIndex(index)
        self._onIndexChanged(index)


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    """Libs/MRML/Widgets/qMRMLCheckableNodeComboBox.h: checkedNodes(), setCheckState(node, state),
    checkedNodesChanged()."""

    checkedNodesChanged = QtCore.Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._checked = []

    def checkedNodes(self):
        alive = self._matching()
        return [node for node in self._checked if any(node is n for n in alive)]

    def setCheckState(self, node, state):
        checked = [n for n in self._checked if n is not node]
        if state == QtCore.Qt.Checked:
            checked.append(node)
        self._checked = checked
        self.checkedNodesChanged.emit()


class qMRMLSegmentsTableView(QT_CLASSES["QWidget"]):
    """Modules/Loadable/Segmentations/Widgets/qMRMLSegmentsTableView.h: setSegmentationNode,
    selectedSegmentIDs()/setSelectedSegmentIDs(), selectionChanged(QItemSelection,QItemSelection)."""

    selectionChanged = QtCore.Signal(object, object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._segmentationNode, self._selected = None, []

    def setMRMLScene(self, scene):
        pass

    def setSegmentationNode(self, node):
        self._segmentationNode = node
        self.setSelectedSegmentIDs([])

    def segmentationNode(self):
        return self._segmentationNode

    def selectedSegmentIDs(self):
        if self._segmentationNode is None:
            return []
        segmentation = self._segmentationNode.GetSegmentation()
        return [s for s in self._selected if segmentation.GetSegment(s) is not None]

    def setSelectedSegmentIDs(self, segmentIds):
        self._selected = list(segmentIds)
        self.selectionChanged.emit(None, None)


class qMRMLSliceView:
    """Libs/MRML/Widgets/qMRMLSliceView.h, as far as effects use it: ``scheduleRender()``
    (counted in ``renders``) and the view's renderer (a real vtkRenderer, where effects put their
    2-D actors through qSlicerSegmentEditorAbstractEffect::addActor2D)."""

    def __init__(self):
        import vtk

        self.renderer = vtk.vtkRenderer()
        self.renders = 0

    def scheduleRender(self):
        self.renders += 1


class qMRMLSliceWidget(QT_CLASSES["QWidget"]):
    """Libs/MRML/Widgets/qMRMLSliceWidget.h: a slice view; mrmlSliceNode(), sliceView()."""

    def __init__(self, sliceNode, parent=None):
        super().__init__(parent)
        self._sliceNode = sliceNode
        self._sliceView = qMRMLSliceView()

    def mrmlSliceNode(self):
        return self._sliceNode

    def sliceView(self):
        return self._sliceView


CUSTOM_WIDGETS = {cls.__name__: cls for cls in (
    qMRMLWidget, ctkCollapsibleButton, ctkPathLineEdit, qMRMLNodeComboBox, qMRMLCheckableNodeComboBox,
    qMRMLSegmentsTableView)}


class QUiLoader(QtUiTools.QUiLoader):
    """``qt.QUiLoader`` in Slicer: PythonQt's wrapper of Qt's QUiLoader, which builds the CTK and
    qMRML classes through their designer plugins (Libs/MRML/Widgets/DesignerPlugins, CTK's
    Libs/Widgets/Plugins). The .ui <connections> between those classes are made in Python after
    loading, as the stand-in signals carry Python objects."""

    def createWidget(self, className, parent=None, name=""):
        cls = CUSTOM_WIDGETS.get(className) or QT_CLASSES.get(className)
        if cls is None:
            return super().createWidget(className, parent, name)
        widget = cls(parent)
        widget.setObjectName(name)
        return widget

    def load(self, device, parent=None):
        tree = ElementTree.parse(io.BytesIO(bytes(device.readAll())))
        connections = tree.getroot().find("connections")
        wiring = []
        if connections is not None:
            for connection in list(connections):
                wiring.append([connection.findtext(tag) for tag in ("sender", "signal", "receiver", "slot")])
                connections.remove(connection)
        buffer = QtCore.QBuffer()
        buffer.setData(ElementTree.tostring(tree.getroot()))
        buffer.open(QtCore.QIODevice.ReadOnly)
        root = super().load(buffer, parent)
        if root is None:
            return None
        byName = {QtCore.QObject.objectName(w): w for w in root.findChildren(QtWidgets.QWidget)}
        byName[QtCore.QObject.objectName(root)] = root
        for sender, signal, receiver, slot in wiring:
            getattr(byName[sender], signal.split("(")[0]).connect(getattr(byName[receiver], slot.split("(")[0]))
        return root


def _qtModule():
    """The ``qt`` module of Slicer's Python: PythonQt's QtAll wrappers registered by CTK
    (Libs/Scripting/Python/Core/ctkAbstractPythonManager.cpp, imported by Slicer's
    Base/Python/slicerqt.py): QtCore, QtGui, QtWidgets and QUiLoader in one module."""
    module = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets, QtUiTools):
        for name in dir(source):
            if not name.startswith("_"):
                setattr(module, name, getattr(source, name))
    for name, cls in QT_CLASSES.items():
        setattr(module, name, cls)
    module.QUiLoader = QUiLoader
    return module


# --------------------------------------------------------------------------- slicer.app
class SlicerApplication:
    """Base/QTCore/qSlicerCoreApplication.h + Base/QTGUI/qSlicerApplication.h, as far as used:
    PythonQt-style ``connect`` to application signals (``emit`` plays them), processEvents,
    testingEnabled, topLevelWidgets (with the main window), override cursors and render pausing.

    ``testing`` is what ``testingEnabled()`` answers: True (the default) as when Slicer runs
    self-tests (``--testing``): slicer.util's errorDisplay & co. only log. False as for a user:
    they open a modal ``ctkMessageBox`` over the main window, which ``dialogs`` (ModalDialogs)
    runs in a real nested Qt event loop."""

    applicationName = "Slicer"

    def __init__(self, qapplication):
        self._qapplication = qapplication
        self._slots = {}
        self.renderPaused = 0
        self.testing = True
        self.dialogs = ModalDialogs()
        # Base/QTApp/qSlicerMainWindow: slicer.util.mainWindow() finds it by object name among
        # the application's top-level widgets; without it errorDisplay shows nothing.
        self.mainWindowWidget = QT_CLASSES["QWidget"]()
        self.mainWindowWidget.setObjectName("qSlicerMainWindow")

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal):
        for slot in list(self._slots.get(signal, [])):
            slot()

    def processEvents(self):
        self._qapplication.processEvents()

    def runEventLoopUntil(self, condition, timeout=300.0):
        """The application's event loop until ``condition()`` holds, so the module's and the
        effect's QTimers poll as they do in Slicer. A real ``QEventLoop.exec`` (as Slicer's
        main loop): a modal dialog opened from a slot then runs a nested loop one level deeper,
        and the ``deleteLater()`` slicer.util.messageBox calls before ``exec_()`` waits for
        that dialog to close (with no loop running, Qt would delete it as the dialog opens)."""
        if condition():
            return
        loop = QtCore.QEventLoop()
        deadline = time.monotonic() + timeout
        outcome = {}

        def check():
            try:
                if condition():
                    loop.quit()
                elif time.monotonic() > deadline:
                    outcome["timeout"] = True
                    loop.quit()
            except BaseException as error:  # raised again below, out of the event loop
                outcome["error"] = error
                loop.quit()

        checker = QtCore.QTimer()
        checker.setInterval(10)
        checker.timeout.connect(check)
        checker.start()
        try:
            loop.exec()
        finally:
            checker.stop()
        if "error" in outcome:
            raise outcome["error"]
        if outcome.get("timeout"):
            raise TimeoutError(f"the condition did not hold within {timeout} s")

    def testingEnabled(self):
        return self.testing

    def topLevelWidgets(self):
        return QtWidgets.QApplication.topLevelWidgets()

    def setOverrideCursor(self, cursor):
        QtWidgets.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        QtWidgets.QApplication.restoreOverrideCursor()

    def pauseRender(self):
        self.renderPaused += 1

    def resumeRender(self):
        self.renderPaused -= 1


class ModalDialogs:
    """The user in front of the modal dialogs slicer.util opens when testing is off.

    slicer.util (Base/Python/slicer/util.py, the real one from slicer-core runs here):
    ``errorDisplay`` -> ``_messageDisplay``, which only logs when ``slicer.app.testingEnabled()``
    and otherwise calls ``messageBox`` -> ``ctk.ctkMessageBox(mainWindow())`` ... ``mbox.exec_()``;
    ``tryWithErrorDisplay`` calls ``errorDisplay`` only when testing is off. ``exec_`` is a
    modal dialog's nested event loop: Qt goes on delivering every QTimer's timeouts (but not
    those of a timer whose own timeout slot opened the dialog: Qt does not let a timer recurse,
    qtimerinfo_unix.cpp QTimerInfoList::activateTimers), so the module's and the effect's poll
    timers keep polling while the dialog is open. That is what happens here: the stand-in box
    runs QMessageBox.exec (the real nested loop) and the "user" clicks ``answer`` once the
    dialog is the top-most modal widget (one cannot click a dialog under another), has been
    read for ``readSeconds``, and ``closeWhen()`` (if set) holds.

    ``shown``: one dict per dialog in the order they opened (title, text, detailedText and
    ``openAtOnce``, the number of dialogs open while it was); ``open``; ``maxOpen``.
    """

    def __init__(self):
        self.readSeconds = 0.5
        self.closeWhen = None
        self.maxSeconds = 120.0
        self.answer = QtWidgets.QMessageBox.Ok
        self.open = 0
        self.maxOpen = 0
        self.shown = []

    def run(self, box):
        self.open += 1
        self.maxOpen = max(self.maxOpen, self.open)
        self.shown.append({"title": QtWidgets.QMessageBox.windowTitle(box).strip(),
                           "text": QtWidgets.QMessageBox.text(box),
                           "detailedText": QtWidgets.QMessageBox.detailedText(box), "openAtOnce": self.open})
        opened = time.monotonic()

        def userLooks():
            if QtWidgets.QApplication.activeModalWidget() is not box:
                return
            waited = time.monotonic() - opened
            if waited < self.readSeconds:
                return
            if self.closeWhen is not None and not self.closeWhen() and waited < self.maxSeconds:
                return
            closer.stop()
            answered.append(True)
            button = box.button(self.answer) or box.defaultButton()
            if button is not None:
                button.click()
            else:
                box.accept()

        answered = []
        closer = QtCore.QTimer()
        closer.setInterval(20)
        closer.timeout.connect(userLooks)
        closer.start()
        try:
            result = QtWidgets.QMessageBox.exec(box)
        finally:
            closer.stop()
            self.open -= 1
        if not answered:
            # messageBox() calls deleteLater() before exec_(): called outside any event loop (the
            # test's own top level), Qt deletes the box as soon as exec_'s loop starts. In Slicer
            # that code runs inside the application's event loop: open dialogs from a slot.
            raise RuntimeError("the dialog closed before the user answered it (deleted by deleteLater()?)")
        return result


class ctkMessageBox(_pythonQtClass(QtWidgets.QMessageBox)):
    """CTK Libs/Widgets/ctkMessageBox.h: a QMessageBox (with a "Don't show again" option, not
    used here) as PythonQt exposes it; ``exec_`` is the modal loop, run by slicer.app.dialogs."""

    def exec_(self):
        return slicer.app.dialogs.run(self)


def _ctkModule():
    module = types.ModuleType("ctk")
    module.ctkMessageBox = ctkMessageBox
    return module


def _i18nModule():
    """Base/Python/slicer/i18n.py: tr() and translate() (no translation loaded: the source text)."""
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text
    module.translate = lambda context, text: text
    return module


# --------------------------------------------------------------------------- ScriptedLoadableModule
class ModulePanel(qMRMLWidget):
    """Base/QTGUI/qSlicerScriptedLoadableModuleWidget.h: the panel a module widget lives in
    (a layout, and ``isEntered`` while the module is shown)."""

    def __init__(self):
        super().__init__()
        self.setLayout(QtWidgets.QVBoxLayout())
        self.isEntered = False


def _scriptedLoadableModuleModule():
    """Base/Python/slicer/ScriptedLoadableModule.py: the four base classes, without the
    developer section (Reload/Test buttons), which is only shown in developer mode."""
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = self.moduleName
            parent.categories, parent.dependencies, parent.contributors = [], [], []
            parent.helpText = parent.acknowledgementText = ""
            slicer.selfTests[self.moduleName] = self.runTest

        def runTest(self, msec=100, **kwargs):
            testCase = getattr(sys.modules[self.__module__], self.moduleName + "Test")()
            testCase.messageDelay = msec
            testCase.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[:-len("Widget")]
            self.parent = parent if parent is not None else ModulePanel()
            self.layout = self.parent.layout()

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[:-len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.AddNode(self.createParameterNode())
            return node

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.messages = []

        def delayDisplay(self, message, requestedDelay=None, msec=None):
            self.messages.append(message)
            slicer.util.delayDisplay(message, getattr(self, "messageDelay", 50))

        def runTest(self):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


# --------------------------------------------------------------------------- parameterNodeWrapper
class Default:
    """Base/Python/slicer/parameterNodeWrapper/default.py."""

    def __init__(self, value):
        self.value = value


def parameterNodeWrapper(cls):
    """Base/Python/slicer/parameterNodeWrapper/wrapper.py, for the types ProtoSAM uses: MRML node
    references, enums and ints, stored in a vtkMRMLScriptedModuleNode; connectGui/disconnectGui
    bind widgets whose ``SlicerParameterName`` property names a field (guiConnectors.py:
    qMRMLNodeComboBox <-> node, QComboBox <-> enum filled with ``label()``, QSpinBox <-> int)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for name, hint in hints.items():
        default = cls.__dict__.get(name)
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            default = next((e.value for e in extras if isinstance(e, Default)), default)
        fields[name] = (hint, default)

    def isNode(kind):
        return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)

    def read(self, name):
        kind, default = fields[name]
        if isNode(kind):
            return self.parameterNode.GetNodeReference(name)
        text = self.parameterNode.GetParameter(name)
        if not text:
            return default
        if kind is bool:  # guiConnectors/serializers store "True" / "False"
            return text == "True"
        return kind(text) if issubclass(kind, enum.Enum) else kind(int(text)) if kind is int else kind(text)

    def write(self, name, value):
        kind, _ = fields[name]
        if isNode(kind):
            self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        else:
            self.parameterNode.SetParameter(name, str(value.value if isinstance(value, enum.Enum) else value))

    def __init__(self, parameterNode):
        object.__setattr__(self, "parameterNode", parameterNode)
        object.__setattr__(self, "_guis", {})
        for name, (kind, default) in fields.items():
            if not isNode(kind) and not parameterNode.GetParameter(name):
                write(self, name, default)

    def connectGui(self, ui):
        widgets = {w.property("SlicerParameterName"): w for w in vars(ui).values()
                   if isinstance(w, QtCore.QObject) and w.property("SlicerParameterName")}
        connections = []
        for name, widget in widgets.items():
            kind, _ = fields[name]
            if isNode(kind):
                signal, getter = widget.currentNodeChanged, widget.currentNode
            elif issubclass(kind, enum.Enum):
                if widget.count == 0:
                    for member in kind:
                        widget.addItem(kind.label(member))
                signal, getter = widget.currentIndexChanged, (lambda w=widget, k=kind: list(k)[w.currentIndex])
            elif kind is bool:  # QCheckBox <-> bool
                signal, getter = widget.toggled, (lambda w=widget: w.checked)
            else:
                # guiConnectors.py's QSpinBox <-> int connector opens the spin box to the whole
                # int range (-2**31 .. 2**31 - 1) unless the field is annotated with a range:
                # what the .ui sets as minimum/maximum does not hold in Slicer.
                if kind is int and isinstance(widget, QtWidgets.QSpinBox):
                    widget.setRange(-2**31, 2**31 - 1)
                signal, getter = widget.valueChanged, (lambda w=widget: w.value)
            slot = (lambda *args, n=name, g=getter: write(self, n, g()))
            signal.connect(slot)
            connections.append((signal, slot))
        tag = self.parameterNode.AddObserver("ModifiedEvent", lambda *args: updateWidgets(self, widgets))
        self._guis[tag] = connections
        updateWidgets(self, widgets)
        return tag

    def updateWidgets(self, widgets):
        for name, widget in widgets.items():
            kind, _ = fields[name]
            value = read(self, name)
            widget.blockSignals(True)
            if isNode(kind):
                widget.setCurrentNode(value)
            elif issubclass(kind, enum.Enum):
                widget.setCurrentIndex(list(kind).index(value))
            elif kind is bool:
                widget.setChecked(value)
            else:
                widget.setValue(value)
            widget.blockSignals(False)

    def disconnectGui(self, tag):
        for signal, slot in self._guis.pop(tag, []):
            signal.disconnect(slot)
        if tag is not None:
            self.parameterNode.RemoveObserver(tag)

    namespace = {"__init__": __init__, "connectGui": connectGui, "disconnectGui": disconnectGui,
                 "AddObserver": lambda self, *a: self.parameterNode.AddObserver(*a),
                 "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
                 "__doc__": cls.__doc__, "allParameters": dict(fields)}
    for name in fields:
        namespace[name] = property(lambda self, n=name: read(self, n), lambda self, v, n=name: write(self, n, v))
    return type(cls.__name__, (), namespace)


def _parameterNodeWrapperModule():
    module = types.ModuleType("slicer.parameterNodeWrapper")
    module.parameterNodeWrapper = parameterNodeWrapper
    module.Default = Default
    return module


# --------------------------------------------------------------------------- Segment Editor
class AbstractScriptedSegmentEditorEffect:
    """Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/
    AbstractScriptedSegmentEditorEffect.py: holds ``scriptedEffect`` and registers it."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def register(self):
        qSlicerSegmentEditorEffectFactory.instance().registerEffect(self.scriptedEffect)

    @staticmethod
    def xyToRas(xy, viewWidget):
        """A slice view's pixel (x, y) -> RAS through its slice node's XYToRAS matrix, as
        qSlicerSegmentEditorAbstractEffect::xyToRas does."""
        import numpy as np

        matrix = viewWidget.mrmlSliceNode().GetXYToRAS()
        xyToRas = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        return (xyToRas @ np.array([xy[0], xy[1], 0.0, 1.0]))[:3]

    def cleanup(self):
        pass


class qSlicerSegmentEditorEffectFactory:
    """Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorEffectFactory.h (singleton)."""

    _instance = None

    def __init__(self):
        self._effects = []

    @classmethod
    def instance(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def registerEffect(self, effect):
        self._effects = [e for e in self._effects if e.name != effect.name] + [effect]

    def registeredEffects(self):
        return list(self._effects)


class qSlicerSegmentEditorScriptedEffect:
    """The C++ side of a scripted effect: Modules/Loadable/Segmentations/EditorEffects/
    qSlicerSegmentEditorScriptedEffect.cxx (loads the Python source, forwards activate/deactivate)
    and qSlicerSegmentEditorAbstractEffect.cxx, whose editing calls go to the Segment Editor's
    vtkSlicerSegmentEditorLogic (real, from slicer-core): saveStateForUndo -> SaveStateForUndo,
    defaultModifierLabelmap -> ResetModifierLabelmapToDefault + GetModifierLabelmap,
    modifySegmentByLabelmap -> ModifySegmentByLabelmap(..., perSegment, bypassMasking=False)."""

    editorLogic = None  # the Segment Editor widget's logic, set by the test's editor

    def __init__(self, parent=None):
        self.name = self.title = ""
        self.perSegment = self.requireSegments = False
        self.optionsFrame = QT_CLASSES["QWidget"]()
        self.optionsFrame.setLayout(QtWidgets.QVBoxLayout())
        self._python = None

    def setPythonSource(self, path):
        spec = importlib.util.spec_from_file_location("SegmentEditorEffect_" + str(abs(hash(path))), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._python = module.SegmentEditorEffect(self)
        return True

    def self(self):
        return self._python

    def addOptionsWidget(self, widget):
        self.optionsFrame.layout().addWidget(widget)

    def parameterSetNode(self):
        return self.editorLogic.GetSegmentEditorNode()

    def saveStateForUndo(self):
        self.editorLogic.SaveStateForUndo()

    def defaultModifierLabelmap(self):
        return self.editorLogic.GetModifierLabelmap() if self.editorLogic.ResetModifierLabelmapToDefault() else None

    def modifySegmentByLabelmap(self, segmentationNode, segmentId, labelmap, mode, bypassMasking=False):
        self.editorLogic.ModifySegmentByLabelmap(segmentationNode, segmentId, labelmap, mode, self.perSegment,
                                                 bypassMasking)

    def renderer(self, viewWidget):
        """qSlicerSegmentEditorAbstractEffect::renderer: the view's renderer."""
        return viewWidget.sliceView().renderer

    def addActor2D(self, viewWidget, actor):
        """qSlicerSegmentEditorAbstractEffect::addActor2D: the actor joins the view's renderer."""
        self.renderer(viewWidget).AddViewProp(actor)

    def removeActor2D(self, viewWidget, actor):
        self.renderer(viewWidget).RemoveViewProp(actor)


#: qSlicerSegmentEditorAbstractEffect::ModificationMode (same values as the logic's enum).
qSlicerSegmentEditorAbstractEffect = types.SimpleNamespace(
    ModificationModeSet=slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet,
    ModificationModeAdd=slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd,
    ModificationModeRemove=slicer.vtkSlicerSegmentEditorLogic.ModificationModeRemove)


# --------------------------------------------------------------------------- install
def install(settingsFolder):
    """Put every stand-in in place; returns a function that removes them again.

    settingsFolder: where QSettings() writes (Slicer's application settings) for this test.
    """
    application = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["slicer-standins"])
    application.setQuitOnLastWindowClosed(False)  # Slicer's main window outlives its dialogs
    QtCore.QCoreApplication.setOrganizationName("ProtoSAMTests")
    QtCore.QCoreApplication.setApplicationName("Slicer")
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, str(settingsFolder))
    modules = {
        "qt": _qtModule(),
        "ctk": _ctkModule(),
        "slicer.i18n": _i18nModule(),
        "slicer.ScriptedLoadableModule": _scriptedLoadableModuleModule(),
        "slicer.parameterNodeWrapper": _parameterNodeWrapperModule(),
        "SegmentEditorEffects": types.SimpleNamespace(
            AbstractScriptedSegmentEditorEffect=AbstractScriptedSegmentEditorEffect),
        "qSlicerSegmentationsEditorEffectsPythonQt": types.SimpleNamespace(
            qSlicerSegmentEditorScriptedEffect=qSlicerSegmentEditorScriptedEffect,
            qSlicerSegmentEditorEffectFactory=qSlicerSegmentEditorEffectFactory),
    }
    attributes = {
        "app": SlicerApplication(application), "selfTests": {}, "i18n": modules["slicer.i18n"],
        "ScriptedLoadableModule": modules["slicer.ScriptedLoadableModule"],
        "parameterNodeWrapper": modules["slicer.parameterNodeWrapper"],
        "qMRMLWidget": qMRMLWidget,
        "qSlicerSegmentEditorAbstractEffect": qSlicerSegmentEditorAbstractEffect,
        "qSlicerSegmentEditorEffectFactory": qSlicerSegmentEditorEffectFactory,
    }
    savedModules = {name: sys.modules.get(name) for name in modules}
    savedAttributes = {name: getattr(slicer, name, None) for name in attributes}
    sys.modules.update(modules)
    for name, value in attributes.items():
        setattr(slicer, name, value)

    def uninstall():
        for name, module in savedModules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in savedAttributes.items():
            if value is None:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        attributes["app"].mainWindowWidget.deleteLater()
        qSlicerSegmentEditorEffectFactory._instance = None
        qSlicerSegmentEditorScriptedEffect.editorLogic = None

    return uninstall
