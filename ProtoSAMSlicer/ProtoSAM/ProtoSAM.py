"""ProtoSAM Slicer module: one painted slice -> the structure on every slice (batch propagation).

The widget only collects inputs and shows results; ProtoSAMSlicerLib.logic.ProtoSAMLogic does
the work, in a persistent worker process (see ProtoSAMSlicerLib/worker_client.py; a Python
thread would starve inside Slicer). ProtoSAMSlicerLib imports torch (through the engine),
so it is imported only after the first-run dependency setup has made torch available.
"""

import dataclasses
import enum
import logging
import os
from typing import Annotated

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Default, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from slicer.i18n import tr as _
from slicer.i18n import translate

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100
#: Least confident slices the Review section lists (all volumes of the last run together).
REVIEW_SLICES = 50
ERROR_RETRY_MS = 250
SLICE_VIEWS = {"Red": "vtkMRMLSliceNodeRed", "Yellow": "vtkMRMLSliceNodeYellow", "Green": "vtkMRMLSliceNodeGreen"}


class ProtoSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ProtoSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ProtoSAM developers"]
        self.parent.helpText = _(
            "Paint a structure on one slice (or a few) and propagate it to every slice of the volume, or of "
            "other volumes, with DINOv2 prototypes refined by Segment Anything. Results are previewed and "
            "accepted or discarded. The Segment Editor effect 'ProtoSAM' does the same from the editor.")
        self.parent.acknowledgementText = _(
            "ProtoSAM method: Ayzenberg et al., 'ProtoSAM - One-Shot Medical Image Segmentation With "
            "Foundational Models'. Uses DINOv2 and Segment Anything (Meta AI) and MedSAM (Ma et al.).")
        slicer.app.connect("aboutToQuit()", _shutdownWorkers)


def _shutdownWorkers():
    import sys

    # The worker processes; and the deprecated thread workers, when a script imported them.
    for name in ("ProtoSAMSlicerLib.worker_client", "ProtoSAMSlicerLib.worker"):
        module = sys.modules.get(name)
        if module is not None:
            module.shutdownAllWorkers(timeout=2.0)


class SliceView(enum.Enum):
    Red = "Red"
    Yellow = "Yellow"
    Green = "Green"

    def label(self):
        return {"Red": _("Red (axial)"), "Yellow": _("Yellow (sagittal)"), "Green": _("Green (coronal)")}[self.value]


class SupportSliceMode(enum.Enum):
    Largest = "largest"
    Current = "current"

    def label(self):
        return _("Largest painted slice") if self is SupportSliceMode.Largest else _("Slice shown in the view")


class RangeMode(enum.Enum):
    Automatic = "automatic"
    All = "all"
    FromTo = "fromTo"

    def label(self):
        return {"automatic": _("Automatic extent"), "all": _("All slices"), "fromTo": _("From - to")}[self.value]


class AcceptMode(enum.Enum):
    New = "new"
    Replace = "replace"

    def label(self):
        return _("New segments") if self is AcceptMode.New else _("Replace segments of the same name")


@parameterNodeWrapper
class ProtoSAMParameterNode:
    """Scene state of the module (saved with the scene). Model choices are user settings."""

    supportSegmentation: slicer.vtkMRMLSegmentationNode
    supportVolume: slicer.vtkMRMLScalarVolumeNode
    sliceView: SliceView = SliceView.Red
    supportSliceMode: SupportSliceMode = SupportSliceMode.Largest
    rangeMode: RangeMode = RangeMode.Automatic
    firstSlice: Annotated[int, Default(0)]
    lastSlice: Annotated[int, Default(0)]
    acceptMode: AcceptMode = AcceptMode.New
    exclusive: bool = False  # each voxel to at most one segment (ProcessOptions.exclusive)


def readSetting(name):
    from ProtoSAMSlicerLib import settings

    return settings.read(qt.QSettings(), name)


def writeSetting(name, value):
    from ProtoSAMSlicerLib import settings

    settings.write(qt.QSettings(), name, value)


def optionsFromSettings(autoExtent=None):
    """ProcessOptions from the user's settings (shared with the Segment Editor effect)."""
    from ProtoSAMSlicerLib import settings

    return settings.processOptions(qt.QSettings(), autoExtent=autoExtent)


_pendingErrors = []  # (text, windowTitle) waiting for the dialog that is open to close
_errorRetryScheduled = False


def showError(text, windowTitle=None):
    """``slicer.util.errorDisplay``, one dialog at a time (the module and the effect use it for
    errors that arrive while jobs are polled).

    A modal dialog runs a nested event loop in which Qt keeps firing QTimers: the module's and
    the effect's poll timers (and every other) go on delivering job events while a dialog is
    open, and an error shown from there would open a second dialog on top of the first. So when
    any modal dialog is open the error waits, and is shown once that dialog has closed.
    """
    _pendingErrors.append((text, windowTitle or _("ProtoSAM")))
    _showPendingErrors()


def _showPendingErrors(retry=False):
    global _errorRetryScheduled
    if retry:
        _errorRetryScheduled = False
    if qt.QApplication.activeModalWidget() is not None:
        if not _errorRetryScheduled:
            _errorRetryScheduled = True
            qt.QTimer.singleShot(ERROR_RETRY_MS, lambda: _showPendingErrors(retry=True))
        return
    while _pendingErrors:  # errors arriving while one is shown are queued, then shown here
        text, windowTitle = _pendingErrors.pop(0)
        slicer.util.errorDisplay(text, windowTitle=windowTitle)


def batchFailureMessage(failures, volumeCount, previewsReady):
    """One message for the failed volumes of a run: (volume name, error) pairs; volumes that
    failed with the same error share a line."""
    if volumeCount <= 1 and len(failures) == 1:
        return _("ProtoSAM failed: {error}").format(error=failures[0][1])
    byError = {}
    for name, error in failures:
        byError.setdefault(str(error), []).append(name)
    text = _("ProtoSAM failed on {failed} of {count} volumes.").format(failed=len(failures), count=volumeCount)
    if previewsReady:
        text += " " + _("The previews of the other volumes are ready: Accept or Discard.")
    return text + "\n\n" + "\n".join("- " + ", ".join(names) + ": " + error for error, names in byError.items())


def ensureDependencies() -> bool:
    """First-run setup: one confirmation listing everything, then install. True when ready."""
    from ProtoSAMSlicerLib import dependencies

    plan = dependencies.installPlan()
    if plan.torchBlocked:
        slicer.util.errorDisplay(plan.torchBlocked, windowTitle=_("ProtoSAM setup"))
        return False
    if plan.empty:
        return True
    if not slicer.util.confirmOkCancelDisplay(plan.confirmationText(), windowTitle=_("ProtoSAM setup")):
        return False
    try:
        with slicer.util.tryWithErrorDisplay(_("Installing ProtoSAM's Python packages failed."), waitCursor=True):
            dependencies.install(plan, pipInstall=slicer.util.pip_install)
    except Exception:
        return False
    return True


class ProtoSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Collects inputs, shows progress and results; all work is done by ProtoSAMLogic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.jobs = []
        self.batchSize = 0
        self.failures = []  # (volume name, error) of the running batch, shown when it ends
        self.results = []
        self.downloadJob = None
        self._afterDownload = None
        self.acceptUndo = None  # results.AcceptUndo of the last Accept, until undone or replaced
        self.updateCancel = None  # threading.Event of the running "Update preview", else None
        self.reviewResults = []  # results of the last run, listed in the Review section
        self.reviewRows = {"volumes": [], "slices": []}  # review.ReviewRow shown in each table

    # ------------------------------------------------------------------ setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from ProtoSAMSlicerLib import resourcePath  # light: no torch

        uiWidget = slicer.util.loadUI(str(resourcePath("UI", "ProtoSAM.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPoll)

        self._populateModelWidgets()
        self.ui.supportSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSupportSegmentationChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.acceptButton.connect("clicked(bool)", self.onAcceptButton)
        self.ui.updatePreviewButton.connect("clicked(bool)", self.onUpdatePreviewButton)
        self.ui.discardButton.connect("clicked(bool)", self.onDiscardButton)
        self.ui.undoAcceptButton.connect("clicked(bool)", self.onUndoAcceptButton)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeightsButton)
        for comboBox in (self.ui.dinov2ComboBox, self.ui.samComboBox, self.ui.presetComboBox,
                         self.ui.deviceComboBox, self.ui.modalityComboBox):
            comboBox.connect("currentIndexChanged(int)", self.onModelSettingChanged)
        self.ui.precisionComboBox.connect("currentIndexChanged(int)", self.onPrecisionChanged)
        self.ui.propagationComboBox.connect("currentIndexChanged(int)", self.onPropagationChanged)
        self.ui.customCheckpointPathLineEdit.connect("currentPathChanged(QString)", self.onModelSettingChanged)
        self.ui.weightsFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelSettingChanged)
        self._setupComputeOn()
        self.ui.targetVolumesSelector.connect("checkedNodesChanged()", self.updateGUI)
        self.ui.supportSegmentsTableView.connect("selectionChanged(QItemSelection,QItemSelection)", self.updateGUI)
        self._setupReview()
        self._setupBank()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # Checking weights imports the engine (and torch): only when the user looks at them.
        self.ui.modelsCollapsibleButton.connect("contentsCollapsed(bool)",
                                                lambda collapsed: None if collapsed else self.updateWeightsStatus())
        self.initializeParameterNode()

    def _populateModelWidgets(self):
        # The torch-free catalogue: the module must load before torch is installed.
        from protosam import catalogue
        from ProtoSAMSlicerLib.logic import deviceChoices

        choices = {
            self.ui.dinov2ComboBox: ([(name, _(label)) for name, label in catalogue.choices("dinov2")], "DINOv2"),
            self.ui.samComboBox: ([(name, _(label)) for name, label in catalogue.choices("sam")], "SAM"),
            self.ui.presetComboBox: ([("default", _("default")), ("paper", _("paper"))], "Preset"),
            # What the worker process reports once it has answered (logic.deviceChoices); see refreshDeviceList.
            self.ui.deviceComboBox: ([(name, _(label)) for name, label in deviceChoices()], "Device"),
            self.ui.precisionComboBox: ([("auto", _("auto")), ("fp32", _("fp32 (exact)")), ("bf16", _("bf16")),
                                         ("fp16", _("fp16 (NVIDIA GPUs only)"))], "Precision"),
            self.ui.modalityComboBox: ([("auto", _("auto")), ("ct", _("CT")), ("mri", _("MRI")), ("none", _("none"))],
                                       "Modality"),
            self.ui.propagationComboBox: ([("per-slice", _("per slice")), ("memory", _("memory (SAM 2 refiners)"))],
                                          "Propagation"),
        }
        for comboBox, (items, setting) in choices.items():
            comboBox.blockSignals(True)
            for name, label in items:
                comboBox.addItem(label, name)
            index = comboBox.findData(readSetting(setting))
            comboBox.setCurrentIndex(max(index, 0))
            comboBox.blockSignals(False)
        self.ui.customCheckpointPathLineEdit.currentPath = readSetting("SAMCheckpoint")
        self.ui.weightsFolderPathLineEdit.currentPath = readSetting("WeightsFolder")

    def _setupComputeOn(self):
        """"Compute on": this computer or a ProtoSAM server (URL + token, kept in QSettings)."""
        self.ui.computeOnComboBox.addItem(_("This computer"), "local")
        self.ui.computeOnComboBox.addItem(_("ProtoSAM server"), "server")
        self.ui.computeOnComboBox.setCurrentIndex(max(self.ui.computeOnComboBox.findData(readSetting("ComputeOn")), 0))
        self.ui.serverUrlLineEdit.text = readSetting("ServerURL")
        self.ui.serverTokenLineEdit.text = readSetting("ServerToken")
        self.ui.serverTokenStorageLabel.text = _(
            "The token is stored in plain text in Slicer's settings file {path} (key ProtoSAM/ServerToken), "
            "readable by your user account.").format(path=qt.QSettings().fileName())
        self.ui.computeOnComboBox.connect("currentIndexChanged(int)", self.onComputeOnChanged)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onComputeOnChanged)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onComputeOnChanged)
        self.ui.serverAllowUnencryptedCheckBox.checked = readSetting("ServerAllowUnencrypted") == "true"
        self.ui.serverAllowUnencryptedCheckBox.connect("toggled(bool)", self.onComputeOnChanged)
        self.onComputeOnChanged()

    def onComputeOnChanged(self, *args):
        onServer = self.ui.computeOnComboBox.currentData == "server"
        writeSetting("ComputeOn", self.ui.computeOnComboBox.currentData)
        writeSetting("ServerURL", self.ui.serverUrlLineEdit.text.strip())
        writeSetting("ServerToken", self.ui.serverTokenLineEdit.text.strip())
        unencrypted = self.ui.serverAllowUnencryptedCheckBox.checked
        writeSetting("ServerAllowUnencrypted", "true" if unencrypted else "false")
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.serverAllowUnencryptedCheckBox):
            widget.enabled = onServer
        # The choice stays visible: the box is red while it allows an unencrypted connection.
        self.ui.serverAllowUnencryptedCheckBox.styleSheet = "color: #c00000; font-weight: bold" if unencrypted else ""

    def cleanup(self):
        self.pollTimer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        if self.logic is not None:
            self.logic.cancelAll(_("The scene was closed; the run was cancelled."))
        self.results = []
        self.acceptUndo = None
        self.showReview([])
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(ProtoSAMParameterNode(ProtoSAMParameterLogic().getParameterNode()))
        if not self._parameterNode.supportSegmentation:
            self._parameterNode.supportSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.onSupportSegmentationChanged(self._parameterNode.supportSegmentation)
            self.updateGUI()

    # ------------------------------------------------------------------ GUI state
    def onSupportSegmentationChanged(self, node):
        self.ui.supportSegmentsTableView.setSegmentationNode(node)
        if node is not None and self._parameterNode is not None and not self._parameterNode.supportVolume:
            reference = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
            if reference is not None and reference.IsA("vtkMRMLScalarVolumeNode"):
                self._parameterNode.supportVolume = reference
                self.ui.targetVolumesSelector.setCheckState(reference, qt.Qt.Checked)
        self.updateGUI()

    def updateGUI(self, caller=None, event=None):
        if self._parameterNode is None:
            return
        running = bool(self.jobs) or self.downloadJob is not None or self.updateCancel is not None
        ready = (self._parameterNode.supportSegmentation is not None
                 and len(self.ui.supportSegmentsTableView.selectedSegmentIDs()) > 0
                 and len(self.ui.targetVolumesSelector.checkedNodes()) > 0)
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.text = _("Cancel") if running else _("Propagate")
        self.ui.applyButton.toolTip = _("Stop the run; nothing is written.") if running else _(
            "Propagate the selected segment(s) through the checked volume(s) into a preview.")
        fromTo = self._parameterNode.rangeMode is RangeMode.FromTo
        self.ui.firstSliceSpinBox.visible = fromTo
        self.ui.lastSliceSpinBox.visible = fromTo
        self.ui.acceptButton.enabled = bool(self.results) and not running
        self.ui.updatePreviewButton.enabled = bool(self.results) and not running
        self.ui.discardButton.enabled = bool(self.results) and not running
        self.ui.undoAcceptButton.enabled = self.acceptUndo is not None and not self.acceptUndo.empty and not running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.modelsCollapsibleButton.enabled = not running

    def onModelSettingChanged(self, *args):
        writeSetting("DINOv2", self.ui.dinov2ComboBox.currentData)
        writeSetting("SAM", self.ui.samComboBox.currentData)
        writeSetting("Preset", self.ui.presetComboBox.currentData)
        writeSetting("Device", self.ui.deviceComboBox.currentData)
        writeSetting("Modality", self.ui.modalityComboBox.currentData)
        writeSetting("SAMCheckpoint", self.ui.customCheckpointPathLineEdit.currentPath)
        writeSetting("WeightsFolder", self.ui.weightsFolderPathLineEdit.currentPath)
        self.updateWeightsStatus()

    def onPrecisionChanged(self, *args):
        # Its own setting only: the weights do not depend on it. The worker checks it against
        # the device and the preset when the next run builds its engine.
        writeSetting("Precision", self.ui.precisionComboBox.currentData)

    def onPropagationChanged(self, *args):
        # Its own setting only; a refiner that cannot walk with memory is refused, with what
        # to choose, when the next run reads the settings (settings.processOptions).
        writeSetting("Propagation", self.ui.propagationComboBox.currentData)

    def updateWeightsStatus(self):
        from ProtoSAMSlicerLib import dependencies

        if not dependencies.installPlan().empty:
            self.ui.weightsStatusLabel.text = _("Python packages not installed yet: they are set up on first use.")
            return
        try:
            from ProtoSAMSlicerLib import models
        except ImportError:
            self.ui.weightsStatusLabel.text = _("Python packages not installed yet: they are set up on first use.")
            return
        try:
            options = optionsFromSettings()
            self.ui.weightsStatusLabel.text = models.offlineInstructions(
                models.weightsStatus(options.models, options.weightsHome))
        except Exception as error:  # shown, not raised: this only refreshes a label
            self.ui.weightsStatusLabel.text = str(error)

    # ------------------------------------------------------------------ run
    def ensureLogic(self) -> bool:
        if not ensureDependencies():
            return False
        if self.logic is None:
            from ProtoSAMSlicerLib.logic import ProtoSAMLogic

            self.logic = ProtoSAMLogic()
            self.logic.idle = slicer.app.processEvents
        return True

    def onApplyButton(self):
        if self.jobs or self.downloadJob is not None or self.updateCancel is not None:
            self.cancelRuns()
            return
        if not self.ensureLogic():
            return
        from ProtoSAMSlicerLib import bank, geometry, models, mrml_io
        from ProtoSAMSlicerLib.logic import sliceViewGeometry

        with slicer.util.tryWithErrorDisplay(_("ProtoSAM could not start."), waitCursor=True):
            options = optionsFromSettings()
            statuses = models.weightsStatus(options.models, options.weightsHome)
            if options.computeOn == "local" and not all(status.ready for status in statuses):  # a server has its own
                self.startDownload(options, then=self.onApplyButton)
                return
            self.discardResults()
            self.showReview([])
            parameters = self._parameterNode
            segmentation = parameters.supportSegmentation
            segmentIds = list(self.ui.supportSegmentsTableView.selectedSegmentIDs())
            supportVolume = parameters.supportVolume
            sliceNode = slicer.mrmlScene.GetNodeByID(SLICE_VIEWS[parameters.sliceView.value])
            normal, point = sliceViewGeometry(sliceNode)
            supportSlices = None
            targets = list(self.ui.targetVolumesSelector.checkedNodes())
            supports = self.ui.supportsComboBox.currentData or bank.SUPPORTS_PAINTED
            examples = self.bankExamples(supports, segmentation, segmentIds, targets, normal)
            if supports == bank.SUPPORTS_BANK:
                supportVolume = None  # not read: the bank's examples carry their slices
            elif parameters.supportSliceMode is SupportSliceMode.Current:
                ijkToWorld = mrml_io.ijkToWorldMatrix(supportVolume)
                axis = geometry.sliceAxisFromNormal(normal, ijkToWorld)
                supportSlices = geometry.sliceIndexFromWorld(point, ijkToWorld, axis.ijkAxis,
                                                             mrml_io.volumeShapeKji(supportVolume))
            sliceRange = None
            if parameters.rangeMode is RangeMode.FromTo:
                sliceRange = (parameters.firstSlice, parameters.lastSlice)
            options = dataclasses.replace(options, autoExtent=parameters.rangeMode is RangeMode.Automatic,
                                          exclusive=parameters.exclusive)
            self.batchSize, self.failures = len(targets), []
            self.jobs = self.logic.processBatch(
                targets, segmentation, segmentIds, supportVolumeNode=supportVolume, sliceNormal_World=normal,
                supportSlices=supportSlices, sliceRange=sliceRange, options=options, waitForCompletion=False,
                onFinished=self.onJobFinished, examples=examples,
                paintedSupports=supports != bank.SUPPORTS_BANK)
            logger.info("ProtoSAM: propagating %d segment(s) through %d volume(s).", len(segmentIds), len(targets))
            self.ui.progressBar.visible = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Loading models...")
            self.pollTimer.start()
        self.updateGUI()

    def refreshDeviceList(self):
        """Show the devices the worker process reported (its torch knows them; Slicer's process
        never imports torch). Called after a run, when a worker has answered."""
        from ProtoSAMSlicerLib.logic import deviceChoices

        comboBox = self.ui.deviceComboBox
        current = comboBox.currentData or readSetting("Device")
        comboBox.blockSignals(True)
        comboBox.clear()
        for name, label in deviceChoices():
            comboBox.addItem(label, name)
        index = comboBox.findData(current)
        if index < 0:  # a device this computer does not have: keep the choice visible, the run says why
            comboBox.addItem(current, current)
            index = comboBox.findData(current)
        comboBox.setCurrentIndex(index)
        comboBox.blockSignals(False)

    def startDownload(self, options, then):
        from ProtoSAMSlicerLib import models
        from ProtoSAMSlicerLib.logic import resolveDevice
        from ProtoSAMSlicerLib.worker_client import workerForDevice

        statuses = [s for s in models.weightsStatus(options.models, options.weightsHome) if not s.ready]
        total = sum(s.sizeBytes or 0 for s in statuses)
        text = _("ProtoSAM needs to download model weights ({size:.1f} GB) into {folder}.").format(
            size=total / 1e9, folder=os.path.dirname(str(statuses[0].path))) if statuses else ""
        if not slicer.util.confirmOkCancelDisplay(text + "\n\n" + models.offlineInstructions(statuses),
                                                  windowTitle=_("ProtoSAM weights")):
            return
        function = models.downloadWeightsFunction(options.models, options.weightsHome)
        worker = workerForDevice(resolveDevice(options.device, idle=slicer.app.processEvents))
        self._afterDownload = then
        self.downloadJob = worker.submit(function, name="ProtoSAM weights", onFinished=self.onDownloadFinished)
        self._downloadWorker = worker
        self.ui.progressBar.visible = True
        self.ui.statusLabel.text = _("Downloading model weights...")
        self.pollTimer.start()
        self.updateGUI()

    def onDownloadWeightsButton(self):
        if not self.ensureLogic():
            return
        with slicer.util.tryWithErrorDisplay(_("Downloading weights failed."), waitCursor=False):
            self.startDownload(optionsFromSettings(), then=None)

    def onDownloadFinished(self, job):
        self.downloadJob = None
        self.updateWeightsStatus()
        after, self._afterDownload = self._afterDownload, None
        self._stopPollingIfIdle()  # before a dialog: see showError
        if job.error is not None:
            self.ui.statusLabel.text = str(job.error)
            if job.state.value != "cancelled":
                showError(str(job.error), windowTitle=_("ProtoSAM weights"))
        elif after is not None:
            after()

    def onPoll(self):
        if self.logic is not None:
            self.logic.poll()
        if self.downloadJob is not None:
            self._downloadWorker.poll()
            done, total = self.downloadJob.progress
            self.ui.progressBar.maximum = 1000
            self.ui.progressBar.value = int(1000 * done / total) if total else 0
            return
        if self.jobs:
            current = next((job for job in self.jobs if not job.finished), self.jobs[-1])
            done, total = current.progress
            index = self.jobs.index(current) + 1
            self.ui.progressBar.maximum = max(total, 1)
            self.ui.progressBar.value = done
            remaining = current.remainingSeconds()
            text = _("Volume {index}/{count}: {done}/{total} slices").format(
                index=index, count=len(self.jobs), done=done, total=total)
            if remaining is not None:
                text += _(", about {seconds:.0f} s left").format(seconds=remaining)
            self.ui.statusLabel.text = text

    def onJobFinished(self, job):
        from protosam.errors import CancelledError

        if job.error is None:
            self.results.append(job.result)
            self.reviewResults.append(job.result)
            slicer.util.setSliceViewerLayers(background=job.result.targetVolumeNode)
        elif isinstance(job.error, CancelledError):
            self.ui.statusLabel.text = str(job.error)
        else:
            # Shown once, for every failed volume, when the batch has ended (not one dialog per
            # volume while the others still run: see showError).
            name = job.nodes[0].GetName() if job.nodes else "?"
            logger.error("ProtoSAM run on '%s' failed: %s", name, job.error)
            self.failures.append((name, job.error))
        if all(j.finished for j in self.jobs):
            volumeCount = len(self.jobs) or self.batchSize
            self.jobs = []
            self.refreshDeviceList()  # the worker has said which devices it has
            if self.results:
                self.ui.statusLabel.text = _("Preview ready: Accept or Discard.")
            self.showReview(self.reviewResults)
            failures, self.failures = self.failures, []
            self._stopPollingIfIdle()  # the poll timer stops before the dialog opens
            if failures:
                self.ui.statusLabel.text = _("ProtoSAM failed on {failed} of {count} volume(s).").format(
                    failed=len(failures), count=volumeCount)
                showError(batchFailureMessage(failures, volumeCount, bool(self.results)), windowTitle=_("ProtoSAM"))
            return
        self._stopPollingIfIdle()

    def _stopPollingIfIdle(self):
        if not self.jobs and self.downloadJob is None:
            self.pollTimer.stop()
            self.ui.progressBar.visible = False
        self.updateGUI()

    def cancelRuns(self):
        if self.downloadJob is not None:
            self.downloadJob.cancel()
        if self.updateCancel is not None:
            self.updateCancel.set()
        for job in self.jobs:
            job.cancel(_("Cancelled by the user; nothing was written."))
        self.ui.statusLabel.text = _("Cancelling...")

    # ------------------------------------------------------------------ results
    def onUpdatePreviewButton(self):
        """Propagate the previews again with the slices the user repainted as examples."""
        import threading

        from protosam.errors import CancelledError

        def showProgress(done, total):
            self.ui.progressBar.maximum = max(total, 1)
            self.ui.progressBar.value = done
            self.ui.statusLabel.text = _("Updating the preview: {done}/{total} slices").format(done=done, total=total)

        # The update runs in the worker process; the logic processes events while it waits, so
        # the Cancel button (the Propagate button meanwhile) stays usable.
        self.updateCancel = threading.Event()
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Updating the preview...")
        self.updateGUI()
        try:
            with slicer.util.tryWithErrorDisplay(_("Updating the preview failed."), waitCursor=True):
                try:
                    changes = self.logic.updatePreviews(self.results, progressCallback=showProgress,
                                                        cancelEvent=self.updateCancel)
                except CancelledError as error:
                    self.ui.statusLabel.text = str(error)
                    return
                except Exception as error:  # e.g. nothing repainted: said in the panel and in a dialog
                    self.ui.statusLabel.text = str(error)
                    raise
                count = sum(len(slices) for changed in changes for slices in changed.values())
                self.showReview(self.reviewResults)  # the logic rescored the updated previews
                self.ui.statusLabel.text = _(
                    "Preview updated from {count} repainted slice(s), kept as painted: Accept or Discard."
                ).format(count=count)
        finally:
            self.updateCancel = None
            self.ui.progressBar.visible = False
            self.updateGUI()

    def onAcceptButton(self):
        from ProtoSAMSlicerLib import results

        mode = self._parameterNode.acceptMode.value
        self.acceptUndo = results.AcceptUndo()
        folder = readSetting("ExampleBank")
        additions = []
        accepted = False
        with slicer.util.tryWithErrorDisplay(_("Accepting the results failed."), waitCursor=True):
            while self.results:
                if folder:  # read before Accept removes the preview; offered to the bank below
                    try:
                        additions.append(self.logic.bankAddition(self.results[0]))
                    except Exception as error:  # never in the way of the Accept itself
                        logger.warning("ProtoSAM: the slices of '%s' cannot be offered to the example bank: %s",
                                       self.results[0].targetVolumeNode.GetName(), error)
                self.logic.accept(self.results[0], mode=mode, undo=self.acceptUndo)
                self.results.pop(0)
            self.ui.statusLabel.text = _("Results accepted. 'Undo accept' reverts them.")
            accepted = True
        self.updateGUI()
        if accepted:
            self.offerToBank(folder, additions)

    # ------------------------------------------------------------------ example bank
    def _setupBank(self):
        from ProtoSAMSlicerLib import bank

        self.ui.supportsComboBox.addItem(_("Painted slices"), bank.SUPPORTS_PAINTED)
        self.ui.supportsComboBox.addItem(_("Example bank"), bank.SUPPORTS_BANK)
        self.ui.supportsComboBox.addItem(_("Painted slices and example bank"), bank.SUPPORTS_BOTH)
        self.ui.supportsComboBox.setCurrentIndex(max(self.ui.supportsComboBox.findData(readSetting("Supports")), 0))
        self.ui.supportsComboBox.connect("currentIndexChanged(int)", self.onSupportsChanged)
        self.ui.bankTableWidget.setColumnCount(len(bank.BANK_COLUMNS))
        self.ui.bankTableWidget.setHorizontalHeaderLabels([_(title) for title in bank.BANK_COLUMNS])
        self.ui.bankFolderPathLineEdit.currentPath = readSetting("ExampleBank")
        self.ui.bankFolderPathLineEdit.connect("currentPathChanged(QString)", self.onBankFolderChanged)
        self.ui.bankRefreshButton.connect("clicked(bool)", self.refreshBank)
        self.refreshBank()

    def onSupportsChanged(self, *args):
        writeSetting("Supports", self.ui.supportsComboBox.currentData)
        self.updateGUI()

    def onBankFolderChanged(self, *args):
        writeSetting("ExampleBank", self.ui.bankFolderPathLineEdit.currentPath.strip())
        self.refreshBank()

    def refreshBank(self, *args):
        """List the bank's structures and example counts (its index only). A folder that is not
        a bank is said in the section, not raised: this only refreshes a view."""
        from ProtoSAMSlicerLib import bank

        folder = readSetting("ExampleBank")
        rows = []
        if not folder:
            self.ui.bankStatusLabel.text = _("Choose a folder for the example bank.")
        else:
            try:
                rows = bank.bankRows(folder)
                self.ui.bankStatusLabel.text = _(
                    "{examples} example(s) of {structures} structure(s). A segment named as a structure is "
                    "propagated from its examples.").format(examples=sum(row.count for row in rows),
                                                            structures=len(rows)) if rows else _(
                    "The bank is empty: accept a propagated volume and add its slices to it.")
            except Exception as error:  # said in the section; a run from the bank raises it
                self.ui.bankStatusLabel.text = str(error)
        self.bankRows = rows
        table = self.ui.bankTableWidget
        table.setRowCount(len(rows))
        for number, row in enumerate(rows):
            for column, text in enumerate(bank.rowTexts(row)):
                table.setItem(number, column, qt.QTableWidgetItem(text))

    def bankExamples(self, supports, segmentation, segmentIds, targets, normal):
        """The bank's examples of the selected segments (by name) for a run, or {} for painted slices."""
        from protosam.errors import InputError
        from ProtoSAMSlicerLib import bank

        if supports == bank.SUPPORTS_PAINTED or not targets:  # no target: processBatch says so
            return {}
        planes = {bank.runPlane(volume, normal) for volume in targets}
        if len(planes) > 1:
            raise InputError(_("The view cuts the checked volumes in different planes ({planes}): propagate them from "
                               "the bank separately.").format(planes=", ".join(sorted(planes))))
        return bank.examplesForSegments(readSetting("ExampleBank"), segmentation, segmentIds, planes.pop(),
                                        required=supports == bank.SUPPORTS_BANK)

    def offerToBank(self, folder, additions):
        """Ask (never silently) whether the accepted volumes' painted and corrected slices go into
        the bank; the logic adds them when the user says yes."""
        from ProtoSAMSlicerLib import bank

        question = bank.additionQuestion(additions, folder) if folder else None
        if question is None:
            return
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("ProtoSAM example bank")):
            self.ui.statusLabel.text = _("Results accepted; nothing was added to the example bank.")
            return
        with slicer.util.tryWithErrorDisplay(_("Adding to the example bank failed."), waitCursor=True):
            added = self.logic.addToBank(folder, additions, undo=self.acceptUndo)
            self.ui.statusLabel.text = _("Results accepted; {count} example(s) added to the bank.").format(
                count=len(added))
        self.refreshBank()

    def onUndoAcceptButton(self):
        """Scene undo is off in Slicer: the last Accept is reverted from what it recorded. When that
        Accept added examples to the bank, the user is asked whether they go too."""
        from ProtoSAMSlicerLib import bank

        undo = self.acceptUndo
        question = bank.undoQuestion(undo)
        removeExamples = question is not None and slicer.util.confirmOkCancelDisplay(
            question, windowTitle=_("ProtoSAM example bank"))
        undone = False
        with slicer.util.tryWithErrorDisplay(_("Undoing the accept failed."), waitCursor=True):
            self.logic.undoAccept(undo)
            undone = True
            text = _("Accept undone: the segments are as they were before it.")
            self.ui.statusLabel.text = text if question is None or removeExamples else (
                text + " " + _("The examples it added stay in the bank."))
        if undone and removeExamples:
            with slicer.util.tryWithErrorDisplay(
                    _("The segments are restored, but removing the examples from the bank failed."), waitCursor=True):
                removed = self.logic.removeAcceptedExamples(undo)
                self.ui.statusLabel.text = _("Accept undone: the segments are as they were before it, and the {count} "
                                             "example(s) it added were removed from the bank.").format(count=removed)
            self.refreshBank()
        self.acceptUndo = None
        self.updateGUI()

    def onDiscardButton(self):
        self.discardResults()
        self.showReview([])
        self.ui.statusLabel.text = _("Results discarded.")
        self.updateGUI()

    # ------------------------------------------------------------------ review
    def _setupReview(self):
        from ProtoSAMSlicerLib import review

        for table, columns, slot in ((self.ui.reviewVolumesTableWidget, review.VOLUME_COLUMNS, self.onReviewVolumeClicked),
                                     (self.ui.reviewSlicesTableWidget, review.SLICE_COLUMNS, self.onReviewSliceClicked)):
            table.setColumnCount(len(columns))
            table.setHorizontalHeaderLabels([_(title) for title in columns])
            table.connect("cellClicked(int,int)", slot)

    def showReview(self, results):
        """List ``results``' volumes and their REVIEW_SLICES least confident slices, least confident first."""
        from ProtoSAMSlicerLib import review

        self.reviewResults = list(results)
        self.reviewRows = {"volumes": review.volumeRows(self.reviewResults),
                           "slices": review.sliceRows(self.reviewResults, REVIEW_SLICES)}
        for table, rows, texts in ((self.ui.reviewVolumesTableWidget, self.reviewRows["volumes"], review.volumeRowTexts),
                                   (self.ui.reviewSlicesTableWidget, self.reviewRows["slices"], review.sliceRowTexts)):
            table.setRowCount(len(rows))
            for number, row in enumerate(rows):
                for column, text in enumerate(texts(row)):
                    table.setItem(number, column, qt.QTableWidgetItem(text))
        if self.reviewRows["volumes"]:
            self.ui.reviewStatusLabel.text = _(
                "{volumes} volume(s), least confident first; click a row to show its slice.").format(
                volumes=len(self.reviewRows["volumes"]))
        else:
            self.ui.reviewStatusLabel.text = _("Propagate to list the least confident volumes and slices here.")

    def onReviewVolumeClicked(self, row, column=0):
        self._jumpTo(self.reviewRows["volumes"][row])

    def onReviewSliceClicked(self, row, column=0):
        self._jumpTo(self.reviewRows["slices"][row])

    def _jumpTo(self, row):
        from ProtoSAMSlicerLib import review

        with slicer.util.tryWithErrorDisplay(_("Cannot show this slice."), waitCursor=True):
            slicer.util.setSliceViewerLayers(background=row.result.targetVolumeNode)
            review.jumpToRow(row)

    def discardResults(self):
        for result in self.results:
            self.logic.discard(result)
        self.results = []


class ProtoSAMParameterLogic(ScriptedLoadableModuleLogic):
    """Gives the module its parameter node; the real logic is ProtoSAMSlicerLib.logic.ProtoSAMLogic."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.moduleName = "ProtoSAM"  # parameter node of this module, not "ProtoSAMParameter"


class ProtoSAMTest(ScriptedLoadableModuleTest):
    """Self-test: the headless logic end to end with tiny random-weight models (no download)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PropagationWithTinyModels()

    def test_PropagationWithTinyModels(self):
        """End to end with tiny models; without ProtoSAM's Python packages (as on Slicer's build
        machines) it reports that instead of failing or skipping (a skip shows as an error)."""
        from ProtoSAMSlicerLib import dependencies

        plan = dependencies.installPlan()
        if not plan.empty:
            self.delayDisplay(_("ProtoSAM self-test: dependencies not installed, propagation not tested. ")
                              + (plan.torchBlocked or plan.confirmationText()))
            return
        from ProtoSAMSlicerLib import selftest

        self.delayDisplay("Propagating with tiny models")
        facts = selftest.runSelfTest(slicer.mrmlScene)
        self.assertEqual(facts["processedSlices"], [0, 1, 3, 4])
        self.delayDisplay("Test passed")
