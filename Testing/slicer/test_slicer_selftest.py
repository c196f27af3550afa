"""The module's self-test body (run by Slicer's ctest via slicer_add_python_unittest) on slicer-core."""

import subprocess
import sys

from ProtoSAMSlicerLib import selftest


def test_self_test_passes_and_cleans_up(scene, tmp_path):
    before = scene.GetNumberOfNodes()
    facts = selftest.runSelfTest(scene, tmp_path)
    assert facts["processedSlices"] == [0, 1, 3, 4]
    assert scene.GetNumberOfNodes() == before  # every node it created was removed


def test_setup_modules_import_without_torch():
    """The module must load in a Slicer without torch: first-run setup installs it."""
    code = ("import sys; sys.path.insert(0, 'ProtoSAMSlicer/ProtoSAM');"
            "import ProtoSAMSlicerLib, ProtoSAMSlicerLib.dependencies;"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'protosam', 'numpy', 'vtk')];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=str(selftest.__file__).rsplit("/ProtoSAMSlicer/", 1)[0])
    assert completed.returncode == 0, completed.stdout + completed.stderr
