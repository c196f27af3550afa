"""The Slicer code's layout rules, read from the source with ``ast`` (nothing is imported):
no import cycle among the module, its library and the effect (lazy imports inside functions
included), and the worker process client never imports the deprecated thread worker.

The import graph and the cycle search are the engine's own (Testing/engine/test_layout.py),
loaded from its file; the graph here spans the folders
Slicer puts on ``sys.path`` (ProtoSAMSlicer/ProtoSAM and ProtoSAMSlicer/SegmentEditorProtoSAM).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, Iterable, Set

SLICER_DIR = Path(__file__).resolve().parents[2] / "ProtoSAMSlicer"
ROOTS = (SLICER_DIR / "ProtoSAM", SLICER_DIR / "SegmentEditorProtoSAM")


def _engineLayout():
    path = Path(__file__).resolve().parents[1] / "engine" / "test_layout.py"
    spec = importlib.util.spec_from_file_location("protosam_engine_layout_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_layout = _engineLayout()
findCycle = _layout._find_cycle


def modulesUnder(roots: Iterable[Path]) -> Dict[str, Path]:
    """module name -> file, for every ``.py`` under each folder on ``sys.path`` in ``roots``."""
    modules = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def importGraph(roots: Iterable[Path] = ROOTS) -> Dict[str, Set[str]]:
    """module -> the modules of ``roots`` it imports (at any place in the file, lazily or not)."""
    return _layout.import_graph(modules=modulesUnder(roots))


def test_the_graph_sees_the_slicer_code():
    graph = importGraph()
    assert {"ProtoSAM", "SegmentEditorProtoSAM", "SegmentEditorProtoSAMLib.SegmentEditorEffect",
            "ProtoSAMSlicerLib.jobs", "ProtoSAMSlicerLib.worker_client"} <= set(graph)
    assert "ProtoSAMSlicerLib.worker_client" in graph["ProtoSAMSlicerLib.logic"]
    assert "ProtoSAMSlicerLib.effect_session" in graph["SegmentEditorProtoSAMLib.SegmentEditorEffect"]
    assert "ProtoSAMSlicerLib.worker" in graph["ProtoSAMSlicerLib.logic"]  # a lazy import is seen


def test_no_import_cycle_in_the_slicer_code():
    cycle = findCycle(importGraph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    package = tmp_path / "plantedlib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "first.py").write_text("from .second import thing\n")
    (package / "second.py").write_text("def thing():\n    from . import first  # lazy, still a cycle\n")
    (tmp_path / "user.py").write_text("import plantedlib.first\n")
    graph = importGraph([tmp_path])
    assert graph["user"] == {"plantedlib.first"}
    assert findCycle(graph) in (["plantedlib.first", "plantedlib.second", "plantedlib.first"],
                                ["plantedlib.second", "plantedlib.first", "plantedlib.second"])


def test_the_worker_process_is_the_one_compute_path():
    graph = importGraph()
    lib = "ProtoSAMSlicerLib."
    # What the client and the deprecated thread worker share imports neither.
    assert not graph[lib + "jobs"] & {lib + "worker", lib + "worker_client"}
    assert lib + "worker" not in graph[lib + "worker_client"]
    # Only the logic reaches the deprecated thread worker (for workerKind="thread"), lazily.
    assert {module for module, targets in graph.items() if lib + "worker" in targets} == {lib + "logic"}
