"""Everything the Slicer extension installs runs on Python 3.10, the engine's ``requires-python``
(Slicer 5.10, the minimum, ships 3.12; a pip install of the engine elsewhere may bring 3.10).

The file list is the extension's own (ProtoSAMFiles.cmake: module, effect and engine scripts);
vermin checks syntax, standard-library APIs and evaluated annotations against 3.10.
"""

import subprocess
import sys

from test_slicer_cmake import BASES, FILES_CMAKE, cmakeSets

INSTALLED_SCRIPTS = ("PROTOSAM_MODULE_SCRIPTS", "PROTOSAM_EFFECT_SCRIPTS", "PROTOSAM_ENGINE_SCRIPTS")


def vermin(paths):
    command = [sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())",
               "--target=3.10-", "--violations", "--no-tips", "--eval-annotations", "--no-parse-comments"]
    return subprocess.run(command + [str(p) for p in paths], capture_output=True, text=True, timeout=300)


def test_installed_python_files_need_at_most_python_3_10():
    lists = cmakeSets(FILES_CMAKE.read_text())
    files = [BASES[v] / entry for v in INSTALLED_SCRIPTS for entry in lists[v] if entry.endswith(".py")]
    assert len(files) > 40 and all(path.is_file() for path in files)
    result = vermin(files)
    assert result.returncode == 0, f"Python 3.11+ constructs in installed files:\n{result.stdout}{result.stderr}"


def test_the_checker_catches_python_3_11_code(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("import tomllib\n\n\ndef f():\n    try:\n        pass\n    except* ValueError:\n        pass\n")
    result = vermin([newer])
    assert result.returncode != 0 and "3.11" in result.stdout
