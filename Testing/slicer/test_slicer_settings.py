"""User settings shared by the module and the effect (ProtoSAMSlicerLib.settings)."""

import pytest
from required_modules import require_slicer_core

require_slicer_core()

from ProtoSAMSlicerLib import settings


class MemorySettings:
    """The two QSettings methods the settings module uses, over a dict."""

    def __init__(self):
        self.values = {}

    def value(self, key):
        return self.values.get(key)

    def setValue(self, key, value):
        self.values[key] = value


def test_defaults_round_trip_and_options():
    store = MemorySettings()
    assert settings.read(store, "SAM") == "vit_b"
    options = settings.processOptions(store)
    assert options.models.dinov2 == "dinov2_vitb14" and options.models.sam_checkpoint is None
    assert options.device == "auto" and options.weightsHome is None and options.autoExtent is None
    settings.write(store, "SAM", "medsam_vit_b")
    settings.write(store, "SAMCheckpoint", "/data/medsam_finetuned.pth")
    settings.write(store, "WeightsFolder", "/shared/protosam")
    settings.write(store, "Device", "cpu")
    assert store.values["ProtoSAM/SAM"] == "medsam_vit_b"
    options = settings.processOptions(store, autoExtent=False)
    assert options.models.sam == "medsam_vit_b" and options.models.sam_checkpoint == "/data/medsam_finetuned.pth"
    assert options.weightsHome == "/shared/protosam" and options.device == "cpu" and options.autoExtent is False


def test_propagation_setting_and_its_refusal_with_a_sam_refiner():
    store = MemorySettings()
    assert settings.processOptions(store).propagation == "per-slice"
    settings.write(store, "SAM", "sam2.1_hiera_tiny")
    settings.write(store, "Propagation", "memory")
    assert settings.processOptions(store).propagation == "memory"
    settings.write(store, "SAM", "vit_b")
    with pytest.raises(ValueError, match="needs a SAM 2 refiner.*Advanced section"):
        settings.processOptions(store)


def test_unknown_names_and_bad_models_are_refused():
    store = MemorySettings()
    with pytest.raises(ValueError):
        settings.read(store, "Nope")
    with pytest.raises(ValueError):
        settings.write(store, "Nope", 1)
    settings.write(store, "DINOv2", "dinov2_huge")
    with pytest.raises(ValueError, match="Unknown DINOv2"):
        settings.processOptions(store)


def test_the_cache_budget_follows_the_chosen_refiner():
    """64 slices of the chosen models, as the engine's session default: a SAM 2 refiner keeps two
    more feature levels per slice, so a budget sized for SAM ViT-B held 33 of its slices."""
    store = MemorySettings()
    vitB = settings.processOptions(store).cacheBytes
    assert vitB == 64 * (4 * 768 * 48 * 48 + 4 * 256 * 64 * 64)  # 0.72 GB, the former fixed default
    settings.write(store, "SAM", "sam2.1_hiera_tiny")
    hieraT = settings.processOptions(store).cacheBytes
    sam2Slice = 4 * (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128)
    assert hieraT == 64 * (4 * 768 * 48 * 48 + sam2Slice)
    settings.write(store, "SAM", "medsam2")  # SAM 2.1 Hiera-T at 512 px: SAM's size per slice
    assert settings.processOptions(store).cacheBytes == vitB
    settings.write(store, "DINOv2", "dinov2_vitl14")
    assert settings.processOptions(store).cacheBytes == 64 * (4 * 1024 * 48 * 48 + 4 * 256 * 64 * 64)
