"""The extension build lists every file that exists, and its metadata is consistent.

Reads the real file tree: a new engine, module, effect or resource file fails these tests until
it is listed in ProtoSAMSlicer/ProtoSAMFiles.cmake.
"""

import json
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FILES_CMAKE = REPO / "ProtoSAMSlicer" / "ProtoSAMFiles.cmake"
# variable -> folder its entries are relative to, and the files that must be listed there
BASES = {
    "PROTOSAM_MODULE_SCRIPTS": REPO / "ProtoSAMSlicer" / "ProtoSAM",
    "PROTOSAM_EFFECT_SCRIPTS": REPO / "ProtoSAMSlicer" / "SegmentEditorProtoSAM",
    "PROTOSAM_ENGINE_SCRIPTS": REPO / "ProtoSAMLib",
    "PROTOSAM_ENGINE_RESOURCES": REPO / "ProtoSAMLib",
    "PROTOSAM_SHARED_RESOURCES": REPO,
    "PROTOSAM_NOT_INSTALLED": REPO,
}


def cmakeArguments(text):
    """[(command, [arguments])] of a CMake file: quoted arguments kept whole, comments dropped."""
    tokens = re.finditer(r'"((?:[^"\\]|\\.)*)"|#[^\n]*|([A-Za-z_][A-Za-z0-9_]*)\s*\(|\)|([^\s()"#]+)', text)
    commands, current, depth = [], None, 0
    for token in tokens:
        quoted, command, bare = token.group(1), token.group(2), token.group(3)
        raw = token.group(0)
        if raw.startswith("#"):
            continue
        if command is not None:
            if current is None:
                current, depth = (command, []), 1
            else:
                depth += 1
                current[1].append(command + "(")
        elif raw == ")":
            depth -= 1
            if depth == 0 and current is not None:
                commands.append(current)
                current = None
        elif current is not None:
            current[1].append(quoted if quoted is not None else bare)
    return commands


def cmakeSets(text):
    """{variable: [entries]} of every set(...) in a CMake file, ${VAR} expanded from earlier sets."""
    values = {}
    for command, arguments in cmakeArguments(text):
        if command == "set" and arguments:
            expand = lambda value: re.sub(r"\$\{(\w+)\}", lambda m: " ".join(values.get(m.group(1), [])), value)  # noqa: E731
            values[arguments[0]] = [expand(a) for a in arguments[1:]]
    return values


def filesUnder(folder, suffix=None, exclude_suffix=None):
    found = set()
    for path in folder.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or path.name.startswith("."):
            continue
        if path.suffix == ".pyc" or (suffix and path.suffix != suffix) or (exclude_suffix and path.suffix == exclude_suffix):
            continue
        found.add(path)
    return found


@pytest.fixture(scope="module")
def lists():
    return cmakeSets(FILES_CMAKE.read_text())


def listed(lists, variable):
    return {BASES[variable] / entry for entry in lists[variable]}


def test_every_file_that_exists_is_listed_exactly_once(lists):
    expected = {
        "PROTOSAM_MODULE_SCRIPTS": {BASES["PROTOSAM_MODULE_SCRIPTS"] / "ProtoSAM.py"}
        | filesUnder(BASES["PROTOSAM_MODULE_SCRIPTS"] / "ProtoSAMSlicerLib"),
        "PROTOSAM_EFFECT_SCRIPTS": {BASES["PROTOSAM_EFFECT_SCRIPTS"] / "SegmentEditorProtoSAM.py"}
        | filesUnder(BASES["PROTOSAM_EFFECT_SCRIPTS"] / "SegmentEditorProtoSAMLib"),
        "PROTOSAM_ENGINE_SCRIPTS": filesUnder(REPO / "ProtoSAMLib" / "protosam", suffix=".py"),
        "PROTOSAM_ENGINE_RESOURCES": filesUnder(REPO / "ProtoSAMLib" / "protosam", exclude_suffix=".py"),
    }
    for variable, files in expected.items():
        have = listed(lists, variable)
        assert len(have) == len(lists[variable]), f"{variable} lists a file twice"
        missing = sorted(str(p.relative_to(BASES[variable])) for p in files - have)
        stale = sorted(str(p.relative_to(BASES[variable])) for p in have - files)
        assert not missing, f"add to {variable} in {FILES_CMAKE.name}: {missing}"
        assert not stale, f"remove from {variable} in {FILES_CMAKE.name} (no such file): {stale}"
    resources = filesUnder(REPO / "Resources")
    accounted = listed(lists, "PROTOSAM_SHARED_RESOURCES") | listed(lists, "PROTOSAM_NOT_INSTALLED")
    assert not listed(lists, "PROTOSAM_SHARED_RESOURCES") & listed(lists, "PROTOSAM_NOT_INSTALLED")
    missing = sorted(str(p.relative_to(REPO)) for p in resources - accounted)
    stale = sorted(str(p.relative_to(REPO)) for p in accounted - resources)
    assert not missing, f"add to PROTOSAM_SHARED_RESOURCES (or PROTOSAM_NOT_INSTALLED): {missing}"
    assert not stale, f"listed but missing: {stale}"


def test_runtime_resources_are_all_installed(lists):
    shared = set(lists["PROTOSAM_SHARED_RESOURCES"])
    for needed in ("Resources/UI/ProtoSAM.ui", "Resources/UI/SegmentEditorProtoSAM.ui",
                   "Resources/Icons/ProtoSAM.png", "Resources/Icons/SegmentEditorProtoSAM.png",
                   "Resources/requirements.txt"):
        assert needed in shared


def test_module_cmakelists_use_the_lists_and_register_self_tests():
    module = (REPO / "ProtoSAMSlicer" / "ProtoSAM" / "CMakeLists.txt").read_text()
    effect = (REPO / "ProtoSAMSlicer" / "SegmentEditorProtoSAM" / "CMakeLists.txt").read_text()
    for text in (module, effect):
        assert "include(${CMAKE_CURRENT_SOURCE_DIR}/../ProtoSAMFiles.cmake)" in text
        assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS", text, re.S)
        assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    assert "SCRIPTS ${PROTOSAM_MODULE_SCRIPTS}" in module and "SCRIPTS ${PROTOSAM_EFFECT_SCRIPTS}" in effect
    engine = re.search(r"ctkMacroCompilePythonScript\((.*?)\n  \)", module, re.S).group(1)
    assert '"${PROTOSAM_ENGINE_SCRIPTS}"' in engine and "SOURCE_DIR ${PROJECT_SOURCE_DIR}/ProtoSAMLib" in engine
    assert "NO_INSTALL_SUBDIR" in engine
    assert "foreach(resource IN LISTS PROTOSAM_SHARED_RESOURCES)" in module
    assert "GLOB" not in module + effect  # explicit lists only
    assert "ProtoSAMTest" in (REPO / "ProtoSAMSlicer" / "ProtoSAM" / "ProtoSAM.py").read_text()


@pytest.fixture(scope="module")
def topLevel():
    return cmakeSets((REPO / "CMakeLists.txt").read_text())


def test_top_level_cmake_metadata(topLevel):
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(ProtoSAM\)", text, re.M)
    assert topLevel["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert topLevel["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert topLevel["PROTOSAM_REPOSITORY_URL"][0].endswith("/SlicerProtoSAM")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert topLevel[variable][0].startswith("https://"), variable
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        # The URLs point into this repository: the files they name must exist.
        relative = topLevel[variable][0].split("/main/", 1)[1]
        assert (REPO / relative).is_file(), f"{variable} names {relative}, which does not exist"
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    for module in ("ProtoSAMSlicer/ProtoSAM", "ProtoSAMSlicer/SegmentEditorProtoSAM"):
        assert f"add_subdirectory({module})" in text
    assert text.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})") < text.index("include(${Slicer_EXTENSION_CPACK})")


# slicer-extension-catalog-entry-schema-v1.0.1 (Slicer/Schemas): required keys, allowed keys, types.
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def test_extensions_index_entry_matches_schema_and_cmake(topLevel):
    entry = json.loads((REPO / "ProtoSAM.json").read_text())
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.")
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert set(entry) <= set(SCHEMA_PROPERTIES), f"not allowed by the schema: {set(entry) - set(SCHEMA_PROPERTIES)}"
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_PROPERTIES[key]), key
    assert entry.get("scm_type", "git") in ("git", "local")
    assert entry.get("tier", 5) in (1, 3, 5)
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    # Consistent with CMake: same category, dependencies and repository.
    assert entry["category"] == topLevel["EXTENSION_CATEGORY"][0]
    assert sorted(entry["build_dependencies"]) == sorted(topLevel["EXTENSION_DEPENDS"])
    assert entry["scm_url"].removesuffix(".git") == topLevel["PROTOSAM_REPOSITORY_URL"][0]
    assert entry["build_subdirectory"] == topLevel["EXTENSION_BUILD_SUBDIRECTORY"][0]


def test_extensions_index_checker_reads_literal_urls_and_finds_the_license():
    """The Extensions Index checker reads EXTENSION_ICONURL / EXTENSION_SCREENSHOTURLS from the raw
    CMakeLists.txt with a regex (no CMake variable expansion) and requires a LICENSE file."""
    text = (REPO / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        match = re.search(r'^set\(' + variable + r'\s+"([^"]*)"\)', text, re.M)
        assert match, f"{variable} is not set to a quoted literal"
        for url in match.group(1).split():
            assert re.fullmatch(r"https://[^\s${}]+\.(png|jpg|jpeg|gif)", url), f"{variable}: {url!r} is not a literal URL"
    license = (REPO / "LICENSE").read_text()
    assert "Apache License" in license and "Version 2.0" in license
    pyproject = (REPO / "ProtoSAMLib" / "pyproject.toml").read_text()
    assert re.search(r'^license = \{ text = "Apache-2.0" \}', pyproject, re.M)  # the same license as the package


def test_stated_minimum_slicer_version_is_5_10():
    """Slicer 5.10 is the minimum: the first with slicer.vtkSlicerSegmentEditorLogic (mrml_io edits
    through it) and Python 3.12; the Extensions Index's 5.8 branch is frozen. The build refuses
    older Slicer, the README and the Slicer guide say 5.10, the engine needs Python 3.10, and no
    code keeps fallbacks for older Slicer."""
    readme = (REPO / "README.md").read_text()
    guide = (REPO / "docs" / "slicer.md").read_text()
    assert "3D Slicer 5.10 or later" in readme and "3D Slicer 5.10 or later" in guide
    assert "Slicer 5.8 or later" not in readme + guide and "Slicer 5.6 or later" not in readme + guide
    sets = cmakeSets((REPO / "CMakeLists.txt").read_text())
    assert sets["PROTOSAM_MINIMUM_SLICER_VERSION"] == ["5.10"]
    assert re.search(r'VERSION_LESS PROTOSAM_MINIMUM_SLICER_VERSION\)\s*message\(FATAL_ERROR',
                     (REPO / "CMakeLists.txt").read_text())
    pyproject = (REPO / "ProtoSAMLib" / "pyproject.toml").read_text()
    assert re.search(r'^requires-python = ">=3.10"$', pyproject, re.M)
    for path in (REPO / "ProtoSAMSlicer").rglob("*.py"):
        text = path.read_text()
        assert "Slicer < 5" not in text and "GetMasterVolumeNode" not in text, path
