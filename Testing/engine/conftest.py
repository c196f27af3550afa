"""Shared fixtures for the engine tests: tiny random-weight checkpoints and real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


def blob_slice(size: int = 64, center=(32, 32), radius: int = 10, seed: int = 0):
    """A noisy 2-D slice with a bright disc -> (image float32 [H, W], mask uint8 [H, W])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2).astype(np.uint8)
    image = (rng.normal(0, 0.3, (size, size)) + 2.0 * mask).astype(np.float32)
    return image, mask
