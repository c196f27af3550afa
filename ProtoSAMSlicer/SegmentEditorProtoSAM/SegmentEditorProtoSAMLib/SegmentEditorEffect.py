"""ProtoSAM Segment Editor effect: propagate the selected segment from its painted slice(s).

Thin Qt layer: widgets, a QTimer that polls the background worker, and two Segment Editor
operations (undo state, masked segment modification) handed to the Qt-free
ProtoSAMSlicerLib.effect_session.EffectSession, which holds the behaviour.
"""

import logging

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from slicer.i18n import tr as _

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Paint one slice (or a few) of a segment, click Propagate, check the preview, Apply."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "ProtoSAM"  # untranslated: used to find the effect
        scriptedEffect.title = _("ProtoSAM")
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.session = None
        self.clickRunning = False
        self.lastSliceNode = None
        self.ui = None
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPoll)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        from ProtoSAMSlicerLib import resourcePath

        try:
            return qt.QIcon(str(resourcePath("Icons", "SegmentEditorProtoSAM.png")))
        except FileNotFoundError:
            return qt.QIcon()

    def helpText(self):
        return "<html>" + _(
            "Propagate the selected segment through the volume.<br>"
            "<b>1.</b> Paint the structure on one slice (or a few) in a slice view aligned with the volume.<br>"
            "<b>2.</b> Move the mouse over that view and click <b>Propagate</b>; the result appears as a preview.<br>"
            "<b>3.</b> Fix slices of the preview in that view: <b>left-click</b> adds what is missing, "
            "<b>right-click</b> (or <b>Shift+click</b>) removes what is wrong; <b>Undo click</b>, "
            "<b>Clear slice</b>; <b>Update volume</b> propagates again with the fixed slices as examples.<br>"
            "<b>4.</b> <b>Apply</b> adds it to the segment (one undo step; masking settings apply), "
            "<b>Cancel</b> discards it.<br>Models are chosen in the ProtoSAM module.") + "</html>"

    def setupOptionsFrame(self):
        from ProtoSAMSlicerLib import resourcePath

        uiWidget = slicer.util.loadUI(str(resourcePath("UI", "SegmentEditorProtoSAM.ui")))
        self.scriptedEffect.addOptionsWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.ui.extentComboBox.addItem(_("Automatic extent"), "automatic")
        self.ui.extentComboBox.addItem(_("All slices"), "all")
        self.ui.propagateButton.connect("clicked()", self.onPropagate)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.undoClickButton.connect("clicked()", self.onUndoClick)
        self.ui.clearSliceButton.connect("clicked()", self.onClearSlice)
        self.ui.updateVolumeButton.connect("clicked()", self.onUpdateVolume)

    def activate(self):
        self.updateGUI()

    def deactivate(self):
        # Leaving the effect (another effect, segment or segmentation, Esc, another module)
        # cancels a run, but the timer keeps polling until its "finished" event has arrived:
        # that event alone returns the session to idle. A preview is kept, as in Slicer's own
        # preview effects, so the user can look elsewhere and come back to Apply or Cancel.
        if self.session is not None:
            self.session.stopRun()
        self.updateGUI()

    def cleanup(self):
        if self.session is not None:
            self.session.stopRun()
        self.pollTimer.stop()
        self.pollTimer.disconnect("timeout()", self.onPoll)

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        # Remember the slice view the user works in. While a preview is shown, a click in a
        # slice view corrects that slice (the event is consumed); other events pass through.
        if viewWidget is None or viewWidget.className() != "qMRMLSliceWidget":
            return False
        self.lastSliceNode = viewWidget.mrmlSliceNode()
        if self.session is None or self.session.state not in ("preview", "updating"):
            return False
        if eventId not in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.RightButtonPressEvent):
            return False
        if self.clickRunning or self.session.state == "updating":
            # A click still encoding its slice, or an update running (events are processed
            # meanwhile): the press is consumed and ignored.
            return True
        positive = eventId == vtk.vtkCommand.LeftButtonPressEvent and not callerInteractor.GetShiftKey()
        point_World = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        from ProtoSAMSlicerLib.logic import sliceViewGeometry

        normal_World = sliceViewGeometry(self.lastSliceNode)[0]
        self.clickRunning = True
        self.updateGUI()
        try:
            with slicer.util.tryWithErrorDisplay(_("The click could not correct the preview."), waitCursor=True):
                sliceIndex = self.session.clickTarget(point_World, normal_World)[0]

                def showEncoding(done, total):
                    # A slice without a cached SAM embedding is encoded first (seconds on a CPU).
                    # After encoding, the click is still decoded: the label must not keep saying
                    # "Encoding" once the bar is gone.
                    self.ui.progressBar.visible = done < total
                    self.ui.progressBar.maximum = 0  # one step of unknown length: a busy bar
                    if done < total:
                        self.ui.statusLabel.text = _("Encoding slice {index} for the click...").format(index=sliceIndex)
                    else:
                        self.ui.statusLabel.text = _("Correcting slice {index}...").format(index=sliceIndex)

                self.session.addClick(point_World, normal_World, positive, progressCallback=showEncoding)
                self.ui.statusLabel.text = _("Slice {index} corrected ({count} click(s)); Update volume to use it "
                                             "everywhere.").format(index=sliceIndex,
                                                                   count=len(self.session.clicks(sliceIndex)))
        finally:
            self.clickRunning = False
            self.updateGUI()
        return True

    # ------------------------------------------------------------------ actions
    def _ensureSession(self):
        if self.session is not None:
            return True
        from ProtoSAM import ensureDependencies

        if not ensureDependencies():
            return False
        from ProtoSAMSlicerLib.effect_session import EffectSession
        from ProtoSAMSlicerLib.logic import ProtoSAMLogic

        logic = ProtoSAMLogic()
        logic.idle = slicer.app.processEvents
        self.session = EffectSession(logic, self.scriptedEffect.saveStateForUndo, self._modifySegment,
                                     self.scriptedEffect.defaultModifierLabelmap,
                                     editedSegmentationNode=lambda: self.scriptedEffect.parameterSetNode().GetSegmentationNode())
        self.session.stateChanged = self.updateGUI  # an update starts or ends (events are processed meanwhile)
        return True

    def _modifySegment(self, labelmap, segmentId):
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        self.scriptedEffect.modifySegmentByLabelmap(
            segmentationNode, segmentId, labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd)

    def onPropagate(self):
        if not self._ensureSession():
            return
        from ProtoSAM import optionsFromSettings

        with slicer.util.tryWithErrorDisplay(_("ProtoSAM could not start."), waitCursor=True):
            parameterSetNode = self.scriptedEffect.parameterSetNode()
            sliceNode = self.lastSliceNode or slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
            options = optionsFromSettings(autoExtent=self.ui.extentComboBox.currentData == "automatic")
            self.session.start(parameterSetNode.GetSourceVolumeNode(), parameterSetNode.GetSegmentationNode(),
                               parameterSetNode.GetSelectedSegmentID(), sliceNode, options=options,
                               onFinished=self.onFinished)
            self.ui.statusLabel.text = _("Propagating along the {view} view...").format(view=sliceNode.GetName())
            self.pollTimer.start()
        self.updateGUI()

    def onPoll(self):
        if self.session is None:
            return
        self.session.logic.poll()
        done, total = self.session.progress
        if total:
            self.ui.progressBar.maximum = total
            self.ui.progressBar.value = done

    def onFinished(self, session):
        self.pollTimer.stop()  # before a dialog: its event loop would go on running the timer
        if session.lastError is not None:
            self.ui.statusLabel.text = str(session.lastError)
            from protosam.errors import CancelledError

            if not isinstance(session.lastError, CancelledError):
                # Not on top of a dialog already open (e.g. the module's, whose timer kept
                # polling this run): ProtoSAM.showError waits for it to close.
                from ProtoSAM import showError

                showError(_("ProtoSAM failed: {error}").format(error=session.lastError), windowTitle=_("ProtoSAM"))
        else:
            segment = session.segmentationNode.GetSegmentation().GetSegment(session.segmentId)
            self.ui.statusLabel.text = _("Preview of '{segment}' ready: Apply or Cancel.").format(
                segment=segment.GetName() if segment is not None else session.segmentId)
        self.updateGUI()

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("Applying the ProtoSAM result failed."), waitCursor=True):
            self.session.apply()
            self.ui.statusLabel.text = _("Applied.")
        self.updateGUI()

    def onCancel(self):
        if self.session is not None:
            state = self.session.state
            self.session.cancel()
            if state == "updating":
                self.ui.statusLabel.text = _("Cancelling the update...")
            else:
                self.ui.statusLabel.text = _("Cancelling...") if self.session.state == "running" else _("Discarded.")
        self.updateGUI()

    def onUndoClick(self):
        with slicer.util.tryWithErrorDisplay(_("Undoing the click failed.")):
            sliceIndex = self.session.undoClick()
            if sliceIndex is not None:
                self.ui.statusLabel.text = _("Last click on slice {index} undone.").format(index=sliceIndex)
        self.updateGUI()

    def onClearSlice(self):
        from ProtoSAMSlicerLib.logic import sliceViewGeometry

        with slicer.util.tryWithErrorDisplay(_("Clearing the slice's clicks failed.")):
            normal_World, point_World = sliceViewGeometry(self.lastSliceNode or
                                                          slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed"))
            sliceIndex = self.session.clickTarget(point_World, normal_World)[0]
            self.session.clearSliceClicks(sliceIndex)
            self.ui.statusLabel.text = _("Clicks of slice {index} cleared.").format(index=sliceIndex)
        self.updateGUI()

    def onUpdateVolume(self):
        def showProgress(done, total):
            self.ui.progressBar.maximum = total
            self.ui.progressBar.value = done

        from protosam.errors import CancelledError

        # The update runs in the worker process; the logic processes events while it waits, and
        # the session's "updating" state (stateChanged -> updateGUI) leaves only Cancel enabled.
        self.ui.statusLabel.text = _("Updating the preview from the corrected slices...")
        try:
            with slicer.util.tryWithErrorDisplay(_("Updating the preview failed."), waitCursor=True):
                try:
                    self.session.updateVolume(progressCallback=showProgress)
                    self.ui.statusLabel.text = _("Preview updated from the corrected slices: Apply or Cancel.")
                except CancelledError:
                    self.ui.statusLabel.text = _("Update cancelled; the preview is as it was.")
        finally:
            self.updateGUI()

    def updateGUI(self):
        if self.ui is None:
            return
        state = self.session.state if self.session is not None else "idle"
        if self.clickRunning:  # nothing else may change the preview until the click is done
            state = "click"
        self.ui.propagateButton.enabled = state == "idle"
        self.ui.applyButton.enabled = state == "preview"
        self.ui.cancelButton.enabled = state in ("running", "preview", "updating")
        hasClicks = state == "preview" and self.session.hasClicks
        self.ui.undoClickButton.enabled = hasClicks
        self.ui.clearSliceButton.enabled = hasClicks
        self.ui.updateVolumeButton.enabled = state == "preview"
        if state != "click":
            self.ui.progressBar.visible = state in ("running", "updating")
        try:
            from ProtoSAM import readSetting

            self.ui.modelsLabel.text = _("Models: {dinov2} + {sam} (change them in the ProtoSAM module)").format(
                dinov2=readSetting("DINOv2"), sam=readSetting("SAM"))
        except ImportError:
            self.ui.modelsLabel.text = ""
