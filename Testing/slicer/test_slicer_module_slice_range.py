"""#21 "stand-ins that must behave like the real thing": Slicer's parameter-node int connector
(Base/Python/slicer/parameterNodeWrapper/guiConnectors.py) opens a spin box to -2**31..2**31-1,
so the module's From-To slice range can be negative in Slicer: the logic must refuse it."""

import pytest

from protosam.errors import InputError
from test_slicer_module_widget import buildCase, openModule, selectInputs


def test_a_negative_slice_range_from_the_spin_boxes_is_refused(scene, slicerApp):
    volume, segmentation, ids, liver, other = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    selectInputs(widget, segmentation, [ids["liver"]])
    widget.ui.rangeComboBox.setCurrentIndex(list(ProtoSAM.RangeMode).index(ProtoSAM.RangeMode.FromTo))
    assert widget.ui.firstSliceSpinBox.minimum == -2**31  # as the real connector sets it
    widget.ui.firstSliceSpinBox.setValue(-4)
    widget.ui.lastSliceSpinBox.setValue(2)
    assert widget._parameterNode.firstSlice == -4
    with pytest.raises(InputError, match="Slice range"):
        widget.onApplyButton()  # the button's slot: tryWithErrorDisplay shows the error, then re-raises
    assert not widget.jobs and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    widget.exit()
    widget.cleanup()
