"""The package's layout rules, read from the source with ``ast`` (nothing is imported).

* No import cycle among ``protosam`` modules: the command modules share
  :mod:`protosam.cli.common` instead of importing each other.
* Only the command-line layer imports :mod:`protosam.evaluation`, and only ``__main__``
  imports :mod:`protosam.cli`.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "ProtoSAMLib" / "protosam"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, name: str) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> Dict[str, Set[str]]:
    """module -> the protosam modules it imports (at any place in the file, lazily or not)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module or "")
                # "from . import x" imports the submodule x when there is one.
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for name in names:
                # The deepest protosam module the name refers to.
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def _find_cycle(graph: Dict[str, Set[str]]):
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            # A package's __init__ is run before its submodules; "protosam" importing its
            # submodules and a submodule importing "protosam" is Python's normal package
            # structure, not a cycle between modules.
            if target == "protosam" or (node == "protosam"):
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


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "protosam.cli" in graph and "protosam.cli.common" in graph["protosam.cli"]
    assert "protosam.cli" in graph["protosam.__main__"]


def test_no_import_cycle_among_protosam_modules():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_command_line_imports_evaluation_and_only_main_imports_cli():
    graph = import_graph()
    for module, targets in graph.items():
        in_cli_layer = module.startswith(("protosam.evaluation", "protosam.cli")) or module.rpartition(".")[2] == "cli"
        if not in_cli_layer:
            evaluation = sorted(t for t in targets if t.startswith("protosam.evaluation"))
            assert not evaluation, f"{module} imports {evaluation}; only the command-line layer may"
        if module not in ("protosam.__main__", "protosam.cli_common") and not module.startswith("protosam.cli"):
            assert "protosam.cli" not in targets, f"{module} imports protosam.cli; import protosam.cli.common"


# ----------------------------------------------------------------------------- model catalogue
REPOSITORY = PACKAGE_DIR.parents[1]
#: The installed source: the engine package and the Slicer extension (not tests, benchmarks, docs).
INSTALLED_SOURCES = sorted(PACKAGE_DIR.rglob("*.py")) + sorted((REPOSITORY / "ProtoSAMSlicer").rglob("*.py"))


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

    assert set(DINOV2_ARCHITECTURES) == {m.name for m in catalogue.models_of("dinov2")}
    assert set(SAM_ARCHITECTURES) == {m.name for m in catalogue.models_of("sam")}
    for model in catalogue.MODELS:
        architecture = DINOV2_ARCHITECTURES.get(model.name) or SAM_ARCHITECTURES[model.name]
        assert architecture.test_only == model.test_only
        assert (model.name in REGISTRY) != model.test_only
        if model.name in REGISTRY:
            assert REGISTRY[model.name].family == model.family
    assert getattr(SAM_ARCHITECTURES[catalogue.MEDSAM_VIT_B], "medsam")
    assert dict(TEST_ONLY_ARCHITECTURES) == {m.name: m.family for m in catalogue.MODELS if m.test_only}
    default = ModelSelection()
    assert (default.dinov2, default.sam, default.input_size) == (
        catalogue.DEFAULT_DINOV2, catalogue.DEFAULT_SAM, catalogue.DEFAULT_INPUT_SIZE)
