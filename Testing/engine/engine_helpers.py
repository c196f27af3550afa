"""Small synthetic inputs shared by the engine tests."""
import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread for a test module (import it there: autouse then applies to that module):
    local runs then compute as each 1-CPU Ray worker does, and tiny models gain nothing from two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def benchmark_module(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (its functions are tested)."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def blob_slice(size: int = 64, center=(32, 32), radius: int = 10, seed: int = 0):
    """A noisy 2-D slice with a bright disc -> (image float32 [H, W], mask uint8 [H, W])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2).astype(np.uint8)
    image = (rng.normal(0, 0.3, (size, size)) + 2.0 * mask).astype(np.float32)
    return image, mask


def box_volume(slices: int = 6, size: int = 40, seed: int = 0):
    """A bright box on noise through every slice, painted on the middle slice only ->
    (volume float32 [N, H, W], mask uint8 [N, H, W]); the server tests' case."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(100.0, 20.0, size=(slices, size, size)).astype(np.float32)
    volume[:, size // 4:size * 3 // 4, size // 4:size * 3 // 4] += 80.0
    mask = np.zeros(volume.shape, np.uint8)
    mask[slices // 2, size // 4:size * 3 // 4, size // 4:size * 3 // 4] = 1
    return volume, mask


def cpu_engine_spec(models, cache_bytes: int = 0):
    """The protocol.EngineSpec dict of the ``default`` preset on the CPU with ``models``."""
    import dataclasses

    from protosam.serving import protocol

    return dataclasses.asdict(protocol.EngineSpec(models=dataclasses.asdict(models), preset="default", device="cpu",
                                                  cache_bytes=cache_bytes))


def segment_volume_request(models, volume, mask, cache_bytes: int = 0):
    """A ``segment_volume`` job (protocol.JobSubmit) for structure "1" on ``models``, CPU."""
    from protosam.serving import protocol

    kwargs = dict(query_volume=volume, support_volume=None, support_masks={"1": mask}, axis=0, support_slices=None,
                  slice_range=None, modality="auto", auto_extent=None)
    return protocol.JobSubmit(id=protocol.new_id(), operation="segment_volume", kwargs=kwargs,
                              engine=cpu_engine_spec(models, cache_bytes))


def bearer(server, user: str = "alice"):
    """HTTP headers authenticating ``user`` on a protosam.testing.start_server process."""
    return {"Authorization": f"Bearer {server.tokens[user]}"}


def run_cli(argv):
    """``protosam.cli.main(argv)`` -> (exit code, what it printed on stdout)."""
    import contextlib
    import io

    from protosam.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def csv_rows(path):
    """The rows of a CSV file with a header, as dicts."""
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
