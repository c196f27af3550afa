"""First-run dependency checks and installation inside Slicer (no Qt here).

- torch and torchvision come only from the PyTorch extension (``PyTorchUtils``), installed
  with version bounds that pick the right CUDA build. An installed torch is never replaced:
  other extensions may depend on it. If it is too old the user is told how to update it.
- Other packages are listed in ``Resources/requirements.txt`` and installed with
  ``slicer.util.pip_install(... --no-deps)`` so that pip can never pull in (and replace) torch,
  numpy or anything else Slicer ships. The widget asks ONE confirmation listing all of them
  (InstallPlan.confirmationText) before calling ``install``.
- pip installs must run on the main thread (Slicer's pip helpers create Qt objects).

This module imports nothing beyond the standard library (and ``packaging``), so the widget can
use it before torch or the engine's other dependencies are installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import logging
import os
import pathlib
import re
from typing import Callable, List, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

#: torch >= 2.1: the engine loads checkpoints with torch.load(weights_only=True) and runs
#: DINOv2 attention through F.scaled_dot_product_attention, both stable from 2.1 on.
TORCH_MINIMUM = "2.1"
#: torchvision 0.16 is the release paired with torch 2.1; segment-anything imports it.
TORCHVISION_MINIMUM = "0.16"
#: Never installed with pip by ProtoSAM: owned by the PyTorch extension or shipped by Slicer.
NEVER_PIP_INSTALL = frozenset({"torch", "torchvision", "torchaudio", "numpy", "vtk", "simpleitk", "slicer",
                               "slicer-core", "pyside6", "qt"})
#: Packages published only as source that build against the installed torch: pip must see that
#: torch (no build isolation, which would download another torch into a build environment), and
#: the environment variables are set for the build. sam2: its optional CUDA extension only
#: fills holes in video masks, which ProtoSAM does not use, and needs a CUDA compiler.
SOURCE_BUILDS = {"sam2": ("--no-build-isolation", {"SAM2_BUILD_CUDA": "0"})}


def pipArguments(requirement: "Requirement") -> str:
    """What ``pip install`` gets for one requirement: always ``--no-deps``, plus the build
    options of :data:`SOURCE_BUILDS`."""
    options, _ = SOURCE_BUILDS.get(normalizeName(requirement.name), ("", {}))
    return f"{requirement} --no-deps" + (f" {options}" if options else "")


def defaultRequirementsPath() -> pathlib.Path:
    from . import resourcePath

    return resourcePath("requirements.txt")


_REQUIREMENT_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*((?:[<>=!~]=?\s*[0-9][0-9A-Za-z.*+!-]*\s*,?\s*)*)$")


@contextlib.contextmanager
def _environment(values: Mapping[str, str]):
    """Set ``values`` in ``os.environ`` for the block, then put back what was there (Slicer's
    process lives on after the install: a build switch must not leak into later work)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class DependencyError(RuntimeError):
    """A dependency is missing or unusable; the message says what the user should do.

    (Not a protosam error class on purpose: this module must import before torch exists.)
    """


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One pip requirement: distribution name and version specifier (e.g. "==1.0", ">=1.10")."""

    name: str
    specifier: str = ""

    def __str__(self) -> str:
        return f"{self.name}{self.specifier}"


def parseRequirements(text: str) -> List[Requirement]:
    """Requirements from requirements.txt text (names with optional specifiers, # comments).

    Raises ValueError for options, URLs, or packages ProtoSAM must never pip-install.
    """
    requirements = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _REQUIREMENT_LINE.match(line)
        if match is None:
            raise ValueError(f"requirements line {number} is not 'name<op>version': {raw!r}")
        name, specifier = match.group(1), re.sub(r"\s+", "", match.group(2))
        if normalizeName(name) in NEVER_PIP_INSTALL:
            raise ValueError(f"requirements line {number}: {name} must not be installed with pip by ProtoSAM")
        requirements.append(Requirement(name, specifier))
    return requirements


def normalizeName(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def readRequirements(path: Optional[pathlib.Path] = None) -> List[Requirement]:
    return parseRequirements(pathlib.Path(path or defaultRequirementsPath()).read_text(encoding="utf-8"))


def installedVersion(distribution: str) -> Optional[str]:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versionSatisfies(version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(version) in SpecifierSet(specifier) if specifier else True


def missingRequirements(requirements: Sequence[Requirement],
                        versionOf: Callable[[str], Optional[str]] = installedVersion) -> List[Requirement]:
    """Requirements not installed, or installed in a version outside their specifier."""
    missing = []
    for requirement in requirements:
        version = versionOf(requirement.name)
        if version is None or not versionSatisfies(version, requirement.specifier):
            missing.append(requirement)
    return missing


@dataclasses.dataclass(frozen=True)
class InstallPlan:
    """What a first run must install. ``torchBlocked``: why torch cannot be used as installed."""

    installTorch: bool
    torchBlocked: str
    packages: List[Requirement]

    @property
    def empty(self) -> bool:
        return not self.installTorch and not self.packages and not self.torchBlocked

    def confirmationText(self) -> str:
        """The text of the single confirmation dialog listing everything to install."""
        lines = ["ProtoSAM needs to install the following Python packages (this is done once):", ""]
        if self.installTorch:
            lines.append(f"- PyTorch (torch>={TORCH_MINIMUM}, torchvision>={TORCHVISION_MINIMUM}) through the "
                         "PyTorch extension, which picks the build matching your GPU driver (several GB)")
        lines.extend(f"- {requirement}" for requirement in self.packages)
        lines += ["", "Nothing already installed is replaced. Continue?"]
        return "\n".join(lines)


def installPlan(requirements: Optional[Sequence[Requirement]] = None,
                versionOf: Callable[[str], Optional[str]] = installedVersion) -> InstallPlan:
    """Compare what ProtoSAM needs with what is installed."""
    requirements = readRequirements() if requirements is None else list(requirements)
    torchVersion, visionVersion = versionOf("torch"), versionOf("torchvision")
    blocked = ""
    installTorch = torchVersion is None
    if torchVersion is not None and not versionSatisfies(torchVersion, f">={TORCH_MINIMUM}"):
        blocked = (f"PyTorch {torchVersion} is installed, but ProtoSAM needs {TORCH_MINIMUM} or newer. ProtoSAM does not "
                   "replace an installed PyTorch because other extensions may use it: update it in the PyTorch Utils "
                   "module (uninstall, restart Slicer, install), then restart Slicer.")
    elif torchVersion is not None and (visionVersion is None
                                       or not versionSatisfies(visionVersion, f">={TORCHVISION_MINIMUM}")):
        blocked = (f"PyTorch {torchVersion} is installed without a compatible torchvision "
                   f"({visionVersion or 'missing'}; ProtoSAM needs {TORCHVISION_MINIMUM} or newer). Reinstall PyTorch "
                   "with torchvision in the PyTorch Utils module, then restart Slicer.")
    return InstallPlan(installTorch=installTorch, torchBlocked=blocked,
                       packages=missingRequirements(requirements, versionOf))


def pytorchUtilsInstaller() -> Callable[[], object]:
    """A callable installing torch with ProtoSAM's bounds through the PyTorch extension."""
    try:
        import PyTorchUtils  # Slicer module of the PyTorch extension
    except ImportError as error:
        raise DependencyError("The PyTorch extension is not installed. Install 'PyTorch' from the Extensions "
                              "Manager, restart Slicer and try again.") from error

    def install():
        logic = PyTorchUtils.PyTorchUtilsLogic()
        try:
            return logic.installTorch(askConfirmation=False, torchVersionRequirement=f">={TORCH_MINIMUM}",
                                      torchvisionVersionRequirement=f">={TORCHVISION_MINIMUM}")
        except TypeError:  # PyTorch extension releases without torchvisionVersionRequirement
            return logic.installTorch(askConfirmation=False, torchVersionRequirement=f">={TORCH_MINIMUM}")

    return install


def install(plan: InstallPlan, pipInstall: Callable[[str], None], torchInstaller: Optional[Callable[[], object]] = None,
            versionOf: Callable[[str], Optional[str]] = installedVersion) -> None:
    """Carry out a confirmed plan (main thread). Raises DependencyError with what to do next."""
    if plan.torchBlocked:
        raise DependencyError(plan.torchBlocked)
    if plan.installTorch:
        installer = torchInstaller or pytorchUtilsInstaller()
        if installer() is None:
            raise DependencyError("PyTorch was not installed (cancelled or failed); ProtoSAM cannot run without it. "
                                  "Install it in the PyTorch Utils module and restart Slicer.")
    for requirement in plan.packages:
        if normalizeName(requirement.name) in NEVER_PIP_INSTALL:
            raise ValueError(f"refusing to pip-install {requirement.name}")
        logger.info("Installing %s", requirement)
        _, environment = SOURCE_BUILDS.get(normalizeName(requirement.name), ("", {}))
        with _environment(environment):  # pip's build subprocess inherits them, Slicer keeps its own
            pipInstall(pipArguments(requirement))
    importlib.invalidate_caches()
    stillMissing = missingRequirements(plan.packages, versionOf)
    if stillMissing:
        raise DependencyError("Installed " + ", ".join(map(str, plan.packages)) + " but "
                              + ", ".join(map(str, stillMissing)) + " is still not usable; restart Slicer and try again.")
