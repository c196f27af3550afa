"""First-run dependency plan and install (ProtoSAMSlicerLib.dependencies)."""

import os
import pathlib
import subprocess
import sys

import pytest

from ProtoSAMSlicerLib import dependencies
from ProtoSAMSlicerLib.dependencies import DependencyError, Requirement
from required_modules import require_slicer_core


def versions(**installed):
    table = {dependencies.normalizeName(k): v for k, v in installed.items()}
    return lambda name: table.get(dependencies.normalizeName(name))


def test_shipped_requirements_file_parses_and_is_satisfied_here():
    requirements = dependencies.readRequirements()
    names = {dependencies.normalizeName(r.name) for r in requirements}
    assert "segment-anything" in names
    assert not names & dependencies.NEVER_PIP_INSTALL
    # This environment runs the engine, so everything the extension would install is present.
    assert dependencies.missingRequirements(requirements) == []


@pytest.mark.parametrize("text", ["torch>=2.1", "numpy", "--index-url https://x", "git+https://x/y.git", "a b"])
def test_requirements_refuse_owned_packages_options_and_urls(text):
    with pytest.raises(ValueError):
        dependencies.parseRequirements(text)


def test_requirements_parsing():
    parsed = dependencies.parseRequirements("# c\nsegment-anything==1.0  # pinned\n\nscipy >= 1.10, <2\n")
    assert parsed == [Requirement("segment-anything", "==1.0"), Requirement("scipy", ">=1.10,<2")]
    assert dependencies.missingRequirements(parsed, versions(**{"segment-anything": "1.0", "scipy": "2.1"})) == [
        Requirement("scipy", ">=1.10,<2")]


def test_plan_without_torch_installs_it_through_pytorch_utils_and_lists_everything_once():
    plan = dependencies.installPlan([Requirement("segment-anything", "==1.0")], versions())
    assert plan.installTorch and not plan.torchBlocked and plan.packages == [Requirement("segment-anything", "==1.0")]
    text = plan.confirmationText()
    assert "PyTorch" in text and "segment-anything==1.0" in text and "Nothing already installed is replaced" in text
    pipCalls, torchCalls = [], []
    after = versions(**{"segment-anything": "1.0"})
    dependencies.install(plan, pipCalls.append, torchInstaller=lambda: torchCalls.append(1) or "torch", versionOf=after)
    assert torchCalls == [1]
    assert pipCalls == ["segment-anything==1.0 --no-deps"]


def test_old_torch_is_never_replaced():
    plan = dependencies.installPlan([], versions(torch="1.13.1", torchvision="0.14.1"))
    assert not plan.installTorch and "does not replace" in plan.torchBlocked and "PyTorch Utils" in plan.torchBlocked
    with pytest.raises(DependencyError, match="does not replace"):
        dependencies.install(plan, pipInstall=lambda s: pytest.fail("pip must not run"),
                             torchInstaller=lambda: pytest.fail("torch must not be installed"))


def test_missing_torchvision_with_torch_is_reported():
    plan = dependencies.installPlan([], versions(torch="2.3.0"))
    assert "torchvision" in plan.torchBlocked and not plan.installTorch


def test_good_torch_and_packages_mean_nothing_to_do():
    plan = dependencies.installPlan([Requirement("scipy", ">=1.10")],
                                    versions(torch="2.14.1", torchvision="0.29.1", scipy="1.17.1"))
    assert plan.empty


def test_cancelled_torch_install_and_still_missing_package_raise_with_instructions():
    plan = dependencies.installPlan([Requirement("segment-anything", "==1.0")], versions())
    with pytest.raises(DependencyError, match="PyTorch was not installed"):
        dependencies.install(plan, lambda s: None, torchInstaller=lambda: None, versionOf=versions())
    plan = dependencies.installPlan([Requirement("segment-anything", "==1.0")],
                                    versions(torch="2.14.1", torchvision="0.29.1"))
    with pytest.raises(DependencyError, match="restart Slicer"):
        dependencies.install(plan, lambda s: None, versionOf=versions(torch="2.14.1", torchvision="0.29.1"))


def test_pytorch_utils_absent_gives_instructions():
    with pytest.raises(DependencyError, match="Extensions Manager"):
        dependencies.pytorchUtilsInstaller()


def test_setup_modules_import_without_torch():
    """The module must load in a Slicer without torch: first-run setup installs it. Of the
    engine package only the torch-free model catalogue, the precision names the settings offer,
    the errors (and the package's lazy __init__) load."""
    code = ("import sys; sys.path.insert(0, 'ProtoSAMSlicer/ProtoSAM');"
            "import ProtoSAMSlicerLib, ProtoSAMSlicerLib.dependencies, ProtoSAMSlicerLib.settings;"
            "light = ('protosam', 'protosam.catalogue', 'protosam.errors', 'protosam.precision');"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'protosam', 'numpy', 'vtk')"
            " and m not in light];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    assert completed.returncode == 0, completed.stdout + completed.stderr


TORCH_BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'segment_anything'):
            raise ImportError(f'{name} imported in Slicer\\'s process')
        return None
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, 'ProtoSAMSlicer/ProtoSAM')
"""


def test_every_slicer_library_module_imports_and_works_without_torch():
    """Slicer's process never imports torch (it would freeze the UI for seconds and may create a
    CUDA context there): every module of ProtoSAMSlicerLib loads with torch made unimportable, and
    what the GUI does before a run (the device "auto", the model choices, the weights status, a
    run's request) works, asking the worker process where torch is needed."""
    require_slicer_core()
    library = pathlib.Path(__file__).resolve().parents[2] / "ProtoSAMSlicer" / "ProtoSAM" / "ProtoSAMSlicerLib"
    names = sorted(path.stem for path in library.glob("*.py") if path.stem != "__init__")
    assert {"logic", "worker_client", "effect_session", "models", "results", "server_session"} <= set(names)
    code = TORCH_BLOCKER + f"""
import importlib
for name in {names!r}:
    importlib.import_module('ProtoSAMSlicerLib.' + name)
from ProtoSAMSlicerLib import logic, models, worker_client
selection = models.modelSelection('dinov2_vits14', 'vit_b')
assert [s.status for s in models.weightsStatus(selection, 'weights-home-that-does-not-exist')] == ['missing', 'missing']
device = logic.resolveDevice('auto')
assert device == worker_client.availableDevices().auto and device in ('cuda', 'mps', 'cpu'), device
assert worker_client.workerForDevice(device) is worker_client.workerForDevice('auto')  # one process
assert logic.deviceChoices()[-1] == ('cpu', 'CPU')
worker_client.shutdownAllWorkers()
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'segment_anything'))
print('heavy:', heavy)
sys.exit(1 if heavy else 0)
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]


def test_the_slicer_model_selection_mirrors_the_engines():
    """models.ModelSelection is the engine's own class, from the torch-free catalogue (no copy)."""
    import protosam
    import protosam.engine
    from protosam import catalogue
    from protosam.models.dinov2 import DINOV2_ARCHITECTURES
    from protosam.models.sam import SAM_ARCHITECTURES
    from ProtoSAMSlicerLib import models

    assert models.ModelSelection is protosam.ModelSelection is protosam.engine.ModelSelection
    assert models.ModelSelection.__dataclass_params__.frozen
    with pytest.raises(ValueError, match="input_size"):
        models.ModelSelection(input_size=8)
    assert {m.name for m in catalogue.models_of("dinov2")} == set(DINOV2_ARCHITECTURES)
    assert {m.name for m in catalogue.models_of("sam")} == set(SAM_ARCHITECTURES)


def test_sam2_is_built_against_the_installed_torch_without_cuda(monkeypatch):
    """sam2 is source only: pip gets --no-build-isolation (so the build sees the installed torch
    instead of downloading another) and SAM2_BUILD_CUDA=0; every package keeps --no-deps."""
    monkeypatch.delenv("SAM2_BUILD_CUDA", raising=False)
    requirements = dependencies.readRequirements()
    names = [dependencies.normalizeName(r.name) for r in requirements]
    assert names[-1] == "sam2" and {"hydra-core", "omegaconf", "iopath"} <= set(names)
    plan = dependencies.installPlan(requirements, versions(torch="2.14.1", torchvision="0.29.1"))
    seen = []

    def pip(arguments):
        seen.append((arguments, os.environ.get("SAM2_BUILD_CUDA")))

    pinned = {dependencies.normalizeName(r.name): (r.specifier.lstrip("=<>~!") or "99") for r in requirements}
    dependencies.install(plan, pip, versionOf=versions(torch="2.14.1", torchvision="0.29.1", **pinned))
    assert all(arguments.split()[1] == "--no-deps" for arguments, _ in seen)
    assert seen[-1] == ("sam2==1.1.0 --no-deps --no-build-isolation", "0")
    # Only sam2's build sees the switch, and Slicer's environment is left as it was.
    assert all(value is None for _, value in seen[:-1])
    assert "SAM2_BUILD_CUDA" not in os.environ
    monkeypatch.setenv("SAM2_BUILD_CUDA", "1")  # a user's own setting survives the install too
    seen.clear()
    dependencies.install(plan, pip, versionOf=versions(torch="2.14.1", torchvision="0.29.1", **pinned))
    assert seen[-1][1] == "0" and os.environ["SAM2_BUILD_CUDA"] == "1"
