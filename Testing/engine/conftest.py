"""Shared fixtures for the engine tests: tiny random-weight checkpoints and real data."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Testing/support holds helpers shared by Testing/engine and Testing/slicer (required_modules).
# Only that folder goes on sys.path: with Testing/ itself there, Testing/slicer would shadow the
# real ``slicer`` package (test modules imported as slicer.test_*).
_SUPPORT = str(Path(__file__).resolve().parents[1] / "support")
if _SUPPORT not in sys.path:
    sys.path.insert(0, _SUPPORT)

COLIN27_DIR = Path("/usr/share/mricron/templates")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """ModelSelection with tiny DINOv2 + SAM checkpoints in the official formats (S = 112)."""
    from protosam.testing import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_models"), input_size=112)


@pytest.fixture(scope="session")
def colin27():
    """Paths of the Colin27 T1 MRI and the AAL atlas on the same grid (Debian mricron-data)."""
    image, labels = COLIN27_DIR / "ch2.nii.gz", COLIN27_DIR / "aal.nii.gz"
    if not (image.is_file() and labels.is_file()):
        pytest.fail("Colin27/AAL not found: install Debian's mricron-data (apt-get install mricron-data); .ci/run does.")
    return image, labels


@pytest.fixture(scope="session")
def sample():
    """Colin27/AAL as the evaluation code finds it (``protosam.evaluation.sample_data``)."""
    from protosam.evaluation.sample_data import find_installed_sample

    found = find_installed_sample()
    if found is None:
        pytest.fail("Colin27/AAL not found: install Debian's mricron-data (apt-get install mricron-data).")
    return found


@pytest.fixture
def one_thread():
    """The tiny models' small kernels run faster on one thread (and suffer less from busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
