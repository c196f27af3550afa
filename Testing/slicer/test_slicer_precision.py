"""The Precision choice of the module's Advanced section: stored in the user's settings, sent in
the engine spec, and built by the real CPU worker process (real MRML, Qt offscreen, tiny models)."""

import dataclasses

import pytest
from required_modules import require_slicer_core

require_slicer_core()

from ProtoSAMSlicerLib import settings  # noqa: E402 (after the slicer-core check)
from test_slicer_settings import MemorySettings  # noqa: E402
from test_slicer_module_widget import buildCase, openModule, selectInputs  # noqa: E402


def test_the_precision_setting_goes_into_the_engine_spec():
    from ProtoSAMSlicerLib.logic import engineSpecFor

    store = MemorySettings()
    assert settings.processOptions(store).precision == "auto"
    # auto is the EngineSpec default, left out so that servers older than the option accept the spec.
    assert "precision" not in engineSpecFor(settings.processOptions(store), "cpu")
    settings.write(store, "Precision", "bf16")
    options = settings.processOptions(store)
    assert options.precision == "bf16" and engineSpecFor(options, "cpu")["precision"] == "bf16"
    settings.write(store, "Precision", "fp8")
    with pytest.raises(ValueError, match="Unknown precision 'fp8'.*Advanced section"):
        settings.processOptions(store)


def test_the_combo_box_choice_reaches_the_worker_engine(scene, slicerApp, caplog):
    import qt

    from protosam.serving import protocol
    from ProtoSAMSlicerLib import worker_client

    volume, segmentation, ids, liver, other = buildCase(scene)
    ProtoSAM, module, widget = openModule()
    combo = widget.ui.precisionComboBox
    assert [combo.itemData(index) for index in range(combo.count)] == ["auto", "fp32", "bf16", "fp16"]
    assert combo.currentData == "auto"
    selectInputs(widget, segmentation, [ids["liver"]])

    combo.setCurrentIndex(combo.findData("bf16"))
    assert qt.QSettings().value("ProtoSAM/Precision") == "bf16"
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    assert len(widget.results) == 1 and widget.results[0].options.precision == "bf16"
    options = widget.results[0].options
    status = worker_client.workerForDevice("cpu").request(protocol.ModelsStatusRequest(
        id=protocol.new_id(), models=dataclasses.asdict(options.models)))
    assert [engine["precision"] for engine in status.loaded] == ["bf16"]
    widget.ui.discardButton.click()

    # fp16 on the CPU: the worker refuses it, the user reads why and what to choose instead.
    combo.setCurrentIndex(combo.findData("fp16"))
    widget.ui.applyButton.click()
    slicerApp.runEventLoopUntil(lambda: not widget.jobs)
    assert widget.results == [] and "fp16 runs only on NVIDIA GPUs" in caplog.text
    assert "choose precision fp32" in caplog.text
    widget.cleanup()
