"""Hidden module that registers the ProtoSAM Segment Editor effect when Slicer has started."""

import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from slicer.i18n import tr as _


class SegmentEditorProtoSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorProtoSAM"  # not shown: the module is hidden
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["ProtoSAM developers"]
        self.parent.hidden = True
        self.parent.helpText = _("Registers the ProtoSAM effect in the Segment Editor.")
        self.parent.acknowledgementText = _(
            "ProtoSAM method: Ayzenberg et al., 'ProtoSAM - One-Shot Medical Image Segmentation With "
            "Foundational Models'. Uses DINOv2 and Segment Anything (Meta AI) and MedSAM (Ma et al.).")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), "SegmentEditorProtoSAMLib", "SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


class SegmentEditorProtoSAMTest(ScriptedLoadableModuleTest):
    """The effect is registered with the Segment Editor."""

    def runTest(self):
        self.test_EffectRegistered()

    def test_EffectRegistered(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        factory = effects.qSlicerSegmentEditorEffectFactory.instance()
        names = [effect.name for effect in factory.registeredEffects()]
        self.assertIn("ProtoSAM", names)
