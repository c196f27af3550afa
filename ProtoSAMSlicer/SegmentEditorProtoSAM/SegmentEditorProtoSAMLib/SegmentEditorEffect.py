"""ProtoSAM Segment Editor effect: propagate the selected segment from its painted slice(s).

Thin Qt layer: widgets, a QTimer that polls the background worker, the correction tools' mouse
events and their drawing in the slice view (GesturePipeline), and two Segment Editor operations
(undo state, masked segment modification) handed to the Qt-free
ProtoSAMSlicerLib.effect_session.EffectSession, which holds the behaviour (World points to
voxels, the correction session, the undo stack).
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
        self.clickRunning = False  # a correction (click or gesture) is being answered
        self.gesture = None  # GesturePipeline of the box, scribble or lasso being drawn
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
            "<b>3.</b> Fix slices of the preview in that view with the tool chosen under <b>Correct with</b>: "
            "<b>Click</b> (left adds what is missing, right or Shift removes what is wrong), <b>Box</b> (drag round "
            "the structure), <b>Scribble</b> (drag along what is / across what is not the structure), "
            "<b>Lasso</b> (drag round a region to add or remove); <b>Remove</b> makes the left button remove. "
            "<b>Undo correction</b>, <b>Clear slice</b>; <b>Update volume</b> propagates again with the fixed "
            "slices as examples. <b>Other segments as \"not this\"</b> keeps the other visible segments out.<br>"
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
        self.ui.propagateFromBankButton.connect("clicked()", self.onPropagateFromBank)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.undoCorrectionButton.connect("clicked()", self.onUndoCorrection)
        self.ui.clearSliceButton.connect("clicked()", self.onClearSlice)
        self.ui.updateVolumeButton.connect("clicked()", self.onUpdateVolume)

    def activate(self):
        self.updateGUI()

    def tool(self) -> str:
        """The correction tool chosen (effect_session.CLICK, BOX, SCRIBBLE or LASSO)."""
        from ProtoSAMSlicerLib.effect_session import BOX, CLICK, LASSO, SCRIBBLE

        if self.ui is None:
            return CLICK
        for kind, button in ((BOX, self.ui.boxToolButton), (SCRIBBLE, self.ui.scribbleToolButton),
                             (LASSO, self.ui.lassoToolButton)):
            if button.checked:
                return kind
        return CLICK

    def deactivate(self):
        self._endGesture()
        # Leaving the effect (another effect, segment or segmentation, Esc, another module)
        # cancels a run, but the timer keeps polling until its "finished" event has arrived:
        # that event alone returns the session to idle. A preview is kept, as in Slicer's own
        # preview effects, so the user can look elsewhere and come back to Apply or Cancel.
        if self.session is not None:
            self.session.stopRun()
        self.updateGUI()

    def cleanup(self):
        self._endGesture()
        if self.session is not None:
            self.session.stopRun()
        self.pollTimer.stop()
        self.pollTimer.disconnect("timeout()", self.onPoll)

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        # Remember the slice view the user works in. While a preview is shown, the chosen tool
        # corrects the slice under the mouse (its events are consumed); other events pass through.
        if viewWidget is None or viewWidget.className() != "qMRMLSliceWidget":
            return False
        if self.gesture is not None:
            if viewWidget.mrmlSliceNode() is not self.gesture.sliceWidget.mrmlSliceNode():
                return False  # a gesture belongs to the view it started in
            return self._continueGesture(callerInteractor, eventId, viewWidget)
        self.lastSliceNode = viewWidget.mrmlSliceNode()
        if self.session is None or self.session.state not in ("preview", "updating"):
            return False
        if eventId not in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.RightButtonPressEvent):
            return False
        if self.clickRunning or self.session.state == "updating":
            # A correction still being answered, or an update running (events are processed
            # meanwhile): the press is consumed and ignored.
            return True
        from ProtoSAMSlicerLib.effect_session import BOX, CLICK

        tool = self.tool()
        removes = eventId == vtk.vtkCommand.RightButtonPressEvent or callerInteractor.GetShiftKey()
        positive = not removes and not self.ui.removeModeButton.checked
        if tool == BOX and eventId == vtk.vtkCommand.RightButtonPressEvent:
            return False  # a box has no sign: the right button keeps its usual role (zoom)
        point_World = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        if tool == CLICK:
            self._click(point_World, positive)
        else:
            self.gesture = GesturePipeline(self.scriptedEffect, viewWidget, tool, positive, eventId)
            self.gesture.addPoint(point_World)
        return True

    def _continueGesture(self, callerInteractor, eventId, viewWidget):
        """Mouse moves add points to the gesture being drawn; the release sends it."""
        gesture = self.gesture
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            gesture.addPoint(self.xyToRas(callerInteractor.GetEventPosition(), gesture.sliceWidget))
            return True
        if eventId == gesture.releaseEventId:
            gesture.addPoint(self.xyToRas(callerInteractor.GetEventPosition(), gesture.sliceWidget))
            self._endGesture()
            self._sendGesture(gesture)
            return True
        if eventId == vtk.vtkCommand.KeyPressEvent and callerInteractor.GetKeySym() == "Escape":
            self._endGesture()  # the gesture is dropped, nothing is sent
            self.ui.statusLabel.text = _("Drawing cancelled.")
            return True
        return eventId in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.RightButtonPressEvent)

    def _endGesture(self):
        if self.gesture is not None:
            self.gesture.remove()
            self.gesture = None

    def _sliceNormal(self):
        from ProtoSAMSlicerLib.logic import sliceViewGeometry

        return sliceViewGeometry(self.lastSliceNode)[0]

    def _click(self, point_World, positive):
        normal_World = self._sliceNormal()

        def correct(showEncoding):
            sliceIndex = self.session.clickTarget(point_World, normal_World)[0]
            showEncoding.sliceIndex = sliceIndex
            self.session.addClick(point_World, normal_World, positive, progressCallback=showEncoding)
            return _("Slice {index} corrected ({count} click(s)); Update volume to use it everywhere.").format(
                index=sliceIndex, count=len(self.session.clicks(sliceIndex)))

        self._correct(_("The click could not correct the preview."), correct)

    def _sendGesture(self, gesture):
        from ProtoSAMSlicerLib.effect_session import BOX, LASSO

        normal_World = self._sliceNormal()
        points = gesture.points()
        names = {BOX: _("box"), LASSO: _("lasso")}

        def correct(showEncoding):
            showEncoding.sliceIndex = None
            if gesture.tool == BOX:
                sliceIndex = self.session.addBox(points[0], points[-1], normal_World, progressCallback=showEncoding)
            elif gesture.tool == LASSO:
                sliceIndex = self.session.addLasso(points, normal_World, gesture.positive)
            else:
                sliceIndex = self.session.addScribble(points, normal_World, gesture.positive,
                                                      progressCallback=showEncoding)
            return _("Slice {index} corrected by the {gesture}; Update volume to use it everywhere.").format(
                index=sliceIndex, gesture=names.get(gesture.tool, _("scribble")))

        self._correct(_("The {gesture} could not correct the preview.").format(
            gesture=names.get(gesture.tool, _("scribble"))), correct)

    def _correct(self, failure, correct):
        """Run one correction (``correct(progress)`` returns the status text). A refusal (the
        view is oblique or across the axis, the model takes boxes only...) is shown as it is,
        with the preview and the segments untouched."""
        from protosam.errors import InputError

        def showEncoding(done, total):
            # A slice without a cached SAM embedding is encoded first (seconds on a CPU). After
            # encoding, the correction is still decoded: the label must not keep saying
            # "Encoding" once the bar is gone.
            self.ui.progressBar.visible = done < total
            self.ui.progressBar.maximum = 0  # one step of unknown length: a busy bar
            index = showEncoding.sliceIndex
            if done < total:
                self.ui.statusLabel.text = (_("Encoding slice {index} for the click...").format(index=index)
                                            if index is not None else _("Encoding the slice..."))
            else:
                self.ui.statusLabel.text = (_("Correcting slice {index}...").format(index=index)
                                            if index is not None else _("Correcting the slice..."))

        showEncoding.sliceIndex = None
        self.clickRunning = True
        self.updateGUI()
        try:
            with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
                try:
                    self.ui.statusLabel.text = correct(showEncoding)
                except InputError as error:
                    # The user's input, not a failure: shown in the panel and in a dialog, never raised
                    # into the view's event handling.
                    self.ui.statusLabel.text = str(error)
                    from ProtoSAM import showError

                    showError(f"{failure}\n\n{error}", windowTitle=_("ProtoSAM"))
        finally:
            self.clickRunning = False
            self.updateGUI()

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

    def _otherSegmentsOption(self):
        if self.session is not None:
            self.session.otherSegmentsAsNegatives = bool(self.ui.otherSegmentsCheckBox.checked)

    def _modifySegment(self, labelmap, segmentId):
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        self.scriptedEffect.modifySegmentByLabelmap(
            segmentationNode, segmentId, labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd)

    def onPropagate(self, fromBank=False):
        if not self._ensureSession():
            return
        from ProtoSAM import optionsFromSettings, readSetting

        self._otherSegmentsOption()
        with slicer.util.tryWithErrorDisplay(_("ProtoSAM could not start."), waitCursor=True):
            parameterSetNode = self.scriptedEffect.parameterSetNode()
            sliceNode = self.lastSliceNode or slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
            options = optionsFromSettings(autoExtent=self.ui.extentComboBox.currentData == "automatic")
            # From the bank: the examples of the structure named as the segment (segment name = structure name).
            self.session.start(parameterSetNode.GetSourceVolumeNode(), parameterSetNode.GetSegmentationNode(),
                               parameterSetNode.GetSelectedSegmentID(), sliceNode, options=options,
                               onFinished=self.onFinished, bankFolder=readSetting("ExampleBank") if fromBank else None)
            text = _("Propagating from the example bank along the {view} view...") if fromBank else _(
                "Propagating along the {view} view...")
            self.ui.statusLabel.text = text.format(view=sliceNode.GetName())
            self.pollTimer.start()
        self.updateGUI()

    def onPropagateFromBank(self):
        self.onPropagate(fromBank=True)

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

    def onUndoCorrection(self):
        with slicer.util.tryWithErrorDisplay(_("Undoing the correction failed.")):
            undone = self.session.undoCorrection()
            if undone is not None:
                sliceIndex, kind = undone
                self.ui.statusLabel.text = _("Last correction ({kind}) on slice {index} undone.").format(
                    kind=kind, index=sliceIndex)
        self.updateGUI()

    def onClearSlice(self):
        from ProtoSAMSlicerLib.logic import sliceViewGeometry

        with slicer.util.tryWithErrorDisplay(_("Clearing the slice's corrections failed.")):
            normal_World, point_World = sliceViewGeometry(self.lastSliceNode or
                                                          slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed"))
            sliceIndex = self.session.clickTarget(point_World, normal_World)[0]
            self.session.clearSliceCorrections(sliceIndex)
            self.ui.statusLabel.text = _("Corrections of slice {index} cleared.").format(index=sliceIndex)
        self.updateGUI()

    def onUpdateVolume(self):
        def showProgress(done, total):
            self.ui.progressBar.maximum = total
            self.ui.progressBar.value = done

        from protosam.errors import CancelledError

        # The update runs in the worker process; the logic processes events while it waits, and
        # the session's "updating" state (stateChanged -> updateGUI) leaves only Cancel enabled.
        self._otherSegmentsOption()
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
        self.ui.propagateFromBankButton.enabled = state == "idle"
        self.ui.applyButton.enabled = state == "preview"
        self.ui.cancelButton.enabled = state in ("running", "preview", "updating")
        hasCorrections = state == "preview" and self.session.hasCorrections
        self.ui.undoCorrectionButton.enabled = hasCorrections
        self.ui.clearSliceButton.enabled = hasCorrections
        self.ui.updateVolumeButton.enabled = state == "preview"
        if state != "click":
            self.ui.progressBar.visible = state in ("running", "updating")
        try:
            from ProtoSAM import readSetting

            self.ui.modelsLabel.text = _("Models: {dinov2} + {sam} (change them in the ProtoSAM module)").format(
                dinov2=readSetting("DINOv2"), sam=readSetting("SAM"))
        except ImportError:
            self.ui.modelsLabel.text = ""


class GesturePipeline:
    """The box, scribble or lasso being drawn in one slice view, as Slicer's Draw effect draws
    its outline (SegmentEditorDrawEffect.DrawPipeline): World points, shown by a 2-D polydata
    actor in the view's renderer in the view's XY (pixel) frame, redrawn at each point."""

    def __init__(self, scriptedEffect, sliceWidget, tool, positive, pressEventId):
        from ProtoSAMSlicerLib.effect_session import BOX

        self.scriptedEffect, self.sliceWidget, self.tool, self.positive = scriptedEffect, sliceWidget, tool, positive
        self.releaseEventId = (vtk.vtkCommand.RightButtonReleaseEvent
                               if pressEventId == vtk.vtkCommand.RightButtonPressEvent
                               else vtk.vtkCommand.LeftButtonReleaseEvent)
        self.closed = tool != "scribble"
        self.isBox = tool == BOX
        self.worldPoints = []
        self.xyPoints = vtk.vtkPoints()
        self.polyData = vtk.vtkPolyData()
        self.polyData.SetPoints(self.xyPoints)
        self.polyData.SetLines(vtk.vtkCellArray())
        mapper = vtk.vtkPolyDataMapper2D()
        mapper.SetInputData(self.polyData)
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(mapper)
        # Yellow adds (as Slicer's Draw outline), cyan removes.
        self.actor.GetProperty().SetColor(*((1.0, 1.0, 0.0) if positive else (0.0, 1.0, 1.0)))
        self.actor.GetProperty().SetLineWidth(2)
        self.scriptedEffect.addActor2D(sliceWidget, self.actor)

    def addPoint(self, point_World):
        self.worldPoints.append([float(v) for v in point_World[:3]])
        self.update()

    def points(self):
        return [list(p) for p in self.worldPoints]

    def outline_XY(self):
        """The drawn outline in the view's XY frame: the rectangle of a box (from the press to
        the mouse), the path of a scribble, the path closed back to its start for a lasso."""
        matrix = self.sliceWidget.mrmlSliceNode().GetXYToRAS()
        rasToXy = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(matrix, rasToXy)
        xy = [rasToXy.MultiplyPoint(list(p) + [1.0])[:2] for p in self.worldPoints]
        if self.isBox and xy:
            (x0, y0), (x1, y1) = xy[0], xy[-1]
            xy = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        return xy

    def update(self):
        outline = self.outline_XY()
        self.xyPoints.Reset()
        lines = vtk.vtkCellArray()
        for x, y in outline:
            self.xyPoints.InsertNextPoint(x, y, 0.0)
        count = len(outline)
        for n in range(1, count):
            lines.InsertNextCell(2, (n - 1, n))
        if self.closed and count > 2:
            lines.InsertNextCell(2, (count - 1, 0))
        self.polyData.SetLines(lines)
        self.polyData.Modified()
        self.sliceWidget.sliceView().scheduleRender()

    def remove(self):
        self.scriptedEffect.removeActor2D(self.sliceWidget, self.actor)
        self.sliceWidget.sliceView().scheduleRender()
