"""The module's self-test body (run by Slicer's ctest via slicer_add_python_unittest) on slicer-core."""

import pytest
from required_modules import require_slicer_core

require_slicer_core()

from ProtoSAMSlicerLib import selftest


def test_self_test_passes_and_cleans_up(scene, tmp_path):
    before = scene.GetNumberOfNodes()
    facts = selftest.runSelfTest(scene, tmp_path)
    assert facts["processedSlices"] == [0, 1, 3, 4]
    assert scene.GetNumberOfNodes() == before  # every node it created was removed
