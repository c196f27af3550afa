"""The package's layout rules, read from the source with ``ast`` (nothing is imported).

The rules are docs/layout.md's table "Who may import whom", parsed here, so the page and the
check cannot drift apart:

* every ``protosam`` module belongs to a layer (core, serving, evaluation, cohorts, examples, cli, main)
  and imports only what its layer may; the Slicer library (layer ``slicer``) likewise;
* no import cycle among ``protosam`` modules;
* at most 18 top-level modules besides the packages and the deprecated shims, and a shim is
  exactly a warning plus re-exports; nothing in the repository imports a shim but its test.
"""
from __future__ import annotations

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "ProtoSAMLib" / "protosam"
REPOSITORY = PACKAGE_DIR.parents[1]
LAYOUT_DOC = REPOSITORY / "docs" / "layout.md"
SLICER_DIR = REPOSITORY / "ProtoSAMSlicer"
MAX_TOP_LEVEL_MODULES = 18


def _module_name(path: Path, root: Path = PACKAGE_DIR.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package_dir: Path = PACKAGE_DIR) -> Dict[str, Path]:
    return {_module_name(path, package_dir.parent): path for path in sorted(package_dir.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, name: str) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imported_names(path: Path, module: str = "") -> Set[str]:
    """Every module name the file imports, at any place in it (lazily or not); for
    ``from X import y`` both X and X.y (y may be a submodule)."""
    is_package = path.name == "__init__.py"
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def import_graph(package_dir: Path = PACKAGE_DIR, modules: Optional[Dict[str, Path]] = None) -> Dict[str, Set[str]]:
    """module -> the modules of the package it imports (at any place in the file, lazily or not).

    ``modules`` (name -> file) replaces the package's own list: the Slicer code's test passes
    the modules of the folders Slicer puts on ``sys.path``."""
    modules = _modules(package_dir) if modules is None else modules
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        targets: Set[str] = set()
        for name in imported_names(path, module):
            # The deepest module of the package the name refers to ("from . import x" imports
            # the submodule x when there is one).
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _find_cycle(graph: Dict[str, Set[str]], root: str = "protosam"):
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            # A package's __init__ is run before its submodules; the root package importing its
            # submodules and a submodule importing the root is Python's normal package
            # structure, not a cycle between modules.
            if target == root or node == root:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if state.get(target) is None:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


# ----------------------------------------------------------------------------- shims
def is_shim(path: Path) -> bool:
    """A deprecated alias module: a docstring, ``import warnings``, one DeprecationWarning and
    ``from <module> import *`` lines, nothing else."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if len(body) < 3:
        return False
    first, warn, reexports = body[0], body[1], body[2:]
    if not (isinstance(first, ast.Import) and [a.name for a in first.names] == ["warnings"]):
        return False
    if not (isinstance(warn, ast.Expr) and isinstance(warn.value, ast.Call)
            and ast.unparse(warn.value.func) == "warnings.warn"
            and any(ast.unparse(arg) == "DeprecationWarning" for arg in warn.value.args)):
        return False
    return all(isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == ["*"] for node in reexports)


def shims() -> Dict[str, Path]:
    return {module: path for module, path in _modules().items() if is_shim(path)}


# ----------------------------------------------------------------------------- layers
def layer_rules(text: Optional[str] = None) -> Dict[str, Set[str]]:
    """docs/layout.md's table between the layout-rules markers: layer -> layers it may import."""
    text = LAYOUT_DOC.read_text(encoding="utf-8") if text is None else text
    table = text.split("<!-- layout-rules", 1)[1].split("<!-- end layout-rules -->", 1)[0]
    rules = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("layer", "") and not set(cells[0]) <= set("-"):
            rules[cells[0]] = {name.strip() for name in cells[1].split(",")}
    return rules


def layer_of(module: str) -> str:
    """The layer of a protosam module (docs/layout.md); ``cli.common`` is its own name in the
    rules (cohorts may import it) and otherwise part of ``cli``."""
    parts = module.split(".")
    if module == "protosam.__main__":
        return "main"
    if len(parts) > 1 and parts[1] in ("serving", "evaluation", "cohorts", "cli", "examples"):
        return parts[1]
    return "core"


def _allowed(rules: Dict[str, Set[str]], source_layer: str, target: str) -> bool:
    allowed = rules[source_layer]
    return layer_of(target) in allowed or (target == "protosam.cli.common" and "cli.common" in allowed)


def layer_violations(graph: Dict[str, Set[str]], rules: Dict[str, Set[str]], shim_modules: Set[str]) -> List[str]:
    found = []
    for module, targets in sorted(graph.items()):
        if module in shim_modules:
            continue
        for target in sorted(targets):
            if target in shim_modules:
                found.append(f"{module} imports the deprecated shim {target}")
            elif not _allowed(rules, layer_of(module), target):
                found.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    return found


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "protosam.cli" in graph and "protosam.cli.common" in graph["protosam.cli"]
    assert "protosam.cli" in graph["protosam.__main__"]
    assert "protosam.serving.protocol" in graph["protosam.serving.worker_process"]


def test_no_import_cycle_among_protosam_modules():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "first.py").write_text("def f():\n    from . import second\n")
    (planted / "second.py").write_text("from .first import f\n")
    assert _find_cycle(import_graph(planted), root="planted") == ["planted.first", "planted.second", "planted.first"]


def test_the_layout_page_states_a_rule_for_every_layer():
    rules = layer_rules()
    assert set(rules) == {"core", "serving", "evaluation", "cohorts", "examples", "cli", "main", "slicer"}
    assert rules["core"] == {"core"}


def test_every_module_imports_only_what_its_layer_may():
    violations = layer_violations(import_graph(), layer_rules(), set(shims()))
    assert not violations, "docs/layout.md's rules are broken:\n" + "\n".join(violations)


def test_the_layer_check_finds_a_planted_violation():
    graph = {"protosam.engine": {"protosam.serving.protocol"}, "protosam.cohorts.batch": {"protosam.cli.common"},
             "protosam.serving.server": {"protosam.cli.serve"}, "protosam.cli": {"protosam.protocol"}}
    found = layer_violations(graph, layer_rules(), {"protosam.protocol"})
    assert found == ["protosam.cli imports the deprecated shim protosam.protocol",
                     "protosam.engine (core) imports protosam.serving.protocol (serving)",
                     "protosam.serving.server (serving) imports protosam.cli.serve (cli)"]


def test_the_rules_table_is_read_from_the_page():
    text = "x\n<!-- layout-rules -->\n| layer | may import |\n|---|---|\n| core | core |\n| cli | core, cli |\n<!-- end layout-rules -->"
    assert layer_rules(text) == {"core": {"core"}, "cli": {"core", "cli"}}


def test_the_slicer_library_imports_only_what_its_layer_may():
    rules = layer_rules()
    modules = set(_modules())
    violations = []
    for path in sorted(SLICER_DIR.rglob("*.py")):
        for name in sorted(imported_names(path)):
            if name != "protosam" and not name.startswith("protosam."):
                continue
            while name not in modules:
                name = name.rpartition(".")[0]
            if name in shims():
                violations.append(f"{path.relative_to(REPOSITORY)} imports the deprecated shim {name}")
            elif not _allowed(rules, "slicer", name):
                violations.append(f"{path.relative_to(REPOSITORY)} imports {name} ({layer_of(name)})")
    assert not violations, "\n".join(violations)


def test_the_top_level_keeps_the_algorithm():
    top_level = sorted(path.stem for path in PACKAGE_DIR.glob("*.py") if not is_shim(path))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, top_level
    packages = sorted(path.parent.name for path in PACKAGE_DIR.glob("*/__init__.py"))
    assert packages == ["cli", "cohorts", "evaluation", "examples", "models", "serving", "weights"]


# ----------------------------------------------------------------------------- deprecated shims
#: old module -> the new modules it re-exports (docs/layout.md's table)
MOVED = {
    "protosam.protocol": ["protosam.serving.protocol"],
    "protosam.worker_process": ["protosam.serving.worker_process"],
    "protosam.server": ["protosam.serving.server", "protosam.serving.scheduler", "protosam.serving.tokens",
                        "protosam.cli.serve"],
    "protosam.server_client": ["protosam.serving.client"],
    "protosam.batch": ["protosam.cohorts.batch"],
    "protosam.batch_ray": ["protosam.cohorts.ray_cluster"],
    "protosam.batch_cli": ["protosam.cli.batch"],
    "protosam.cli_common": ["protosam.cli.common"],
    "protosam.evaluation.cli": ["protosam.cli.evaluate"],
    "protosam.weights.cli": ["protosam.cli.weights"],
}


def test_the_shims_are_exactly_the_moved_modules_and_the_page_lists_them():
    assert set(shims()) == set(MOVED)
    page = LAYOUT_DOC.read_text(encoding="utf-8")
    for old in MOVED:
        assert f"| `{old}` |" in page


def test_the_shape_check_tells_a_shim_from_a_module(tmp_path):
    shim = tmp_path / "shim.py"
    shim.write_text('"""Moved."""\nimport warnings\n\nwarnings.warn("moved", DeprecationWarning, stacklevel=2)\n\n'
                    "from .new import *  # noqa\n")
    assert is_shim(shim)
    shim.write_text(shim.read_text() + "\ndef extra():\n    return 1\n")
    assert not is_shim(shim)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_gives_the_same_objects(old):
    for name in [old] + [m for m in list(sys.modules) if m == old]:
        sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shim = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    exported = 0
    for new in MOVED[old]:
        module = importlib.import_module(new)
        public = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for name in public:
            assert getattr(shim, name) is getattr(module, name), f"{old}.{name}"
            exported += 1
    assert exported > 0


def test_nothing_in_the_repository_imports_a_shim():
    shim_names = set(MOVED)
    this_file = Path(__file__).resolve()
    users = []
    for folder in ("ProtoSAMLib", "ProtoSAMSlicer", "Testing", "benchmarks", "docs", "Resources"):
        for path in sorted((REPOSITORY / folder).rglob("*.py")):
            if path.resolve() == this_file or is_shim(path):
                continue
            module = _module_name(path, PACKAGE_DIR.parent) if PACKAGE_DIR in path.parents else ""
            for name in imported_names(path, module):
                if name in shim_names:
                    users.append(f"{path.relative_to(REPOSITORY)}: {name}")
    # The worker bootstrap is a string: it must name the new module too.
    bootstrap = (SLICER_DIR / "ProtoSAM" / "ProtoSAMSlicerLib" / "worker_client.py").read_text(encoding="utf-8")
    if re.search(r"from protosam\.worker_process import", bootstrap):
        users.append("worker_client.py's bootstrap names protosam.worker_process")
    assert not users, "import the new paths (docs/layout.md):\n" + "\n".join(users)


# ----------------------------------------------------------------------------- model catalogue
#: The installed source (the engine package and the Slicer extension) and the benchmarks, whose
#: defaults must be the catalogue's (not tests or docs).
INSTALLED_SOURCES = (sorted(PACKAGE_DIR.rglob("*.py")) + sorted((REPOSITORY / "ProtoSAMSlicer").rglob("*.py"))
                     + sorted((REPOSITORY / "benchmarks").glob("*.py")))


def _literals_in(path: Path):
    """(line, value) of every str and int constant in the file's code (docstrings included:
    a docstring that is exactly a model name is as much a copy as any other)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)) and not isinstance(node.value, bool):
            yield node.lineno, node.value


def test_the_catalogue_is_the_only_place_a_model_name_or_default_is_written():
    from protosam import catalogue

    names = {model.name for model in catalogue.MODELS}
    defaults = {catalogue.DEFAULT_INPUT_SIZE}
    copies = []
    for path in INSTALLED_SOURCES:
        if path == PACKAGE_DIR / "catalogue.py":
            continue
        for line, value in _literals_in(path):
            if value in names or (isinstance(value, int) and value in defaults):
                copies.append(f"{path.relative_to(REPOSITORY)}:{line}: {value!r}")
    assert not copies, "write these through protosam.catalogue:\n" + "\n".join(copies)


def test_the_check_sees_a_copied_name(tmp_path):
    copied = tmp_path / "copy.py"
    copied.write_text('DEFAULT = "dinov2_vitb14"\nSIZE = 672\n', encoding="utf-8")
    assert [value for _, value in _literals_in(copied)] == ["dinov2_vitb14", 672]


def test_the_catalogue_imports_only_the_standard_library():
    tree = ast.parse((PACKAGE_DIR / "catalogue.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "dataclasses", "types", "typing"}, imported


def test_engine_weights_and_slicer_agree_with_the_catalogue():
    from protosam import catalogue
    from protosam.models.dinov2 import DINOV2_ARCHITECTURES
    from protosam.models.sam import SAM_ARCHITECTURES
    from protosam.engine import ModelSelection
    from protosam.weights.registry import REGISTRY, TEST_ONLY_ARCHITECTURES

    from protosam.models.sam2_refiner import SAM2_ARCHITECTURES

    assert catalogue.FAMILIES == ("dinov2", "sam", "sam2") and catalogue.REFINER_FAMILIES == ("sam", "sam2")
    assert set(DINOV2_ARCHITECTURES) == {m.name for m in catalogue.models_of("dinov2")}
    assert set(SAM_ARCHITECTURES) == {m.name for m in catalogue.models_of("sam")}
    assert set(SAM2_ARCHITECTURES) == {m.name for m in catalogue.models_of("sam2")}
    for model in catalogue.MODELS:
        architecture = (DINOV2_ARCHITECTURES.get(model.name) or SAM_ARCHITECTURES.get(model.name)
                        or SAM2_ARCHITECTURES[model.name])
        assert architecture.test_only == model.test_only
        # Refiners say which prompts they take, how their input is prepared and their cache size.
        refiner = model.family in catalogue.REFINER_FAMILIES
        assert refiner == bool(model.prompts) == bool(model.input) == (model.cache_bytes > 0)
        if model.family == "sam2":
            assert architecture.box_only == model.box_only and architecture.source
        assert (model.name in REGISTRY) != model.test_only
        if model.name in REGISTRY:
            assert REGISTRY[model.name].family == model.family
    assert getattr(SAM_ARCHITECTURES[catalogue.MEDSAM_VIT_B], "medsam")
    # Box-only refiners (MedSAM, MedSAM2) are the ones marked medsam (the engine's box-only switch).
    assert {m.name for m in catalogue.MODELS if m.prompts and m.box_only} == {
        m.name for m in catalogue.MODELS if m.medsam} == {catalogue.MEDSAM_VIT_B, catalogue.MEDSAM2, catalogue.TINY_MEDSAM}
    # Slicer's refiner list offers both refiner families.
    assert {name for name, _ in catalogue.choices("sam")} == {
        m.name for m in catalogue.MODELS if m.family in catalogue.REFINER_FAMILIES and not m.test_only}
    assert dict(TEST_ONLY_ARCHITECTURES) == {m.name: m.family for m in catalogue.MODELS if m.test_only}
    default = ModelSelection()
    assert (default.dinov2, default.sam, default.input_size) == (
        catalogue.DEFAULT_DINOV2, catalogue.DEFAULT_SAM, catalogue.DEFAULT_INPUT_SIZE)
