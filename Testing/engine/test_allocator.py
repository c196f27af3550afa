"""Freed-memory reuse during runs: large blocks stop being page-faulted anew, the memory is
handed back afterwards, and nothing changes when it is switched off."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from protosam.allocator import freed_memory_reuse_available, reuse_freed_memory

pytestmark = pytest.mark.skipif(
    not freed_memory_reuse_available(), reason="needs glibc (Linux) and PROTOSAM_REUSE_FREED_MEMORY not 0"
)

# Runs in a fresh interpreter so page-fault counts and the allocator state are its own.
_PROBE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from protosam.allocator import reuse_freed_memory

    def faults_per_block(count=10):
        out = []
        for _ in range(count):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = torch.empty(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold
            block.fill_(1.0)
            del block
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out

    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    report = {"outside": faults_per_block()}
    with reuse_freed_memory() as tuned:
        report["tuned"] = tuned
        with reuse_freed_memory():
            report["nested"] = faults_per_block(20)
        report["after_inner_exit"] = faults_per_block(3)
        report["resident_inside"] = resident_mib()
    report["resident_after"] = resident_mib()
    report["after_exit"] = faults_per_block(3)
    print(json.dumps(report))
    """
)


def _probe(**env):
    environment = dict(os.environ, **env)
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_large_blocks_are_reused_inside_and_returned_after():
    report = _probe()
    block_pages = 16 * 2**20 * 4 // 4096
    # Default glibc: every 64 MiB block is a fresh mapping, every page faulted again.
    assert min(report["outside"]) > 0.9 * block_pages
    assert report["tuned"] is True
    # Reused: after a few blocks (heap warm-up) no new pages are touched.
    assert max(report["nested"][-5:]) < 0.05 * block_pages
    # Still tuned after the inner of two nested runs ends.
    assert max(report["after_inner_exit"]) < 0.05 * block_pages
    # Defaults restored and the kept pages handed back.
    assert report["resident_after"] < report["resident_inside"] - 100
    assert min(report["after_exit"]) > 0.9 * block_pages


def test_environment_switch_leaves_the_allocator_alone():
    report = _probe(PROTOSAM_REUSE_FREED_MEMORY="0")
    block_pages = 16 * 2**20 * 4 // 4096
    assert report["tuned"] is False
    assert min(report["nested"]) > 0.9 * block_pages


def test_switch_is_read_at_each_run(monkeypatch):
    monkeypatch.setenv("PROTOSAM_REUSE_FREED_MEMORY", "off")
    with reuse_freed_memory() as tuned:
        assert tuned is False
    monkeypatch.setenv("PROTOSAM_REUSE_FREED_MEMORY", "1")
    with reuse_freed_memory() as tuned:
        assert tuned is True


def test_volume_results_do_not_depend_on_the_allocator(tiny_models, monkeypatch):
    import numpy as np

    from engine_helpers import blob_slice
    from protosam import Engine, segment_volume

    engine = Engine(tiny_models, preset="paper", device="cpu")
    slices = [blob_slice(48, center=(24, 20 + k), radius=8 + k, seed=k) for k in range(5)]
    volume = np.stack([image for image, _ in slices])
    mask = np.zeros(volume.shape, np.uint8)
    mask[2] = slices[2][1]
    results = []
    for switch in ("0", "1"):
        monkeypatch.setenv("PROTOSAM_REUSE_FREED_MEMORY", switch)
        results.append(segment_volume(engine, volume, None, {"s": mask}, auto_extent=False).masks["s"])
    assert results[0][[0, 1, 3, 4]].any()
    assert np.array_equal(results[0], results[1])
