"""The C heap (protosam.heap): freed memory goes back to the system before each SAM embedding,
and temporaries freed and allocated again (SAM decoding's, per prompt set) reuse resident pages."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

# In a fresh process: 200 MiB of 64 KiB blocks (below glibc's mmap threshold, so on the heap),
# touched, then a small block after them that keeps the heap's top in use, then the big blocks
# freed. glibc keeps their pages resident until malloc_trim.
_FRAGMENTED_HEAP = textwrap.dedent("""
    import ctypes, os
    from protosam.heap import return_free_heap
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    blocks = [libc.malloc(64 * 1024) for _ in range(3200)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    pinned = libc.malloc(64)
    for block in blocks:
        libc.free(block)
    before = resident_mib()
    trimmed = return_free_heap()
    print(trimmed, before, resident_mib())
""")


def test_return_free_heap_gives_freed_pages_back_on_glibc():
    if not sys.platform.startswith("linux"):
        from protosam.heap import return_free_heap

        assert return_free_heap() is False
        return
    out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    trimmed, before, after = out.stdout.split()
    assert trimmed == "True"
    assert float(before) - float(after) > 150, out.stdout  # of the 200 MiB freed


def test_engine_returns_free_heap_before_each_sam_embedding(tiny_models, monkeypatch):
    from protosam import Engine, engine as engine_module

    engine = Engine(tiny_models, device="cpu", download=False)
    calls = []
    monkeypatch.setattr(engine_module, "return_free_heap", lambda: calls.append("trim"))
    image = torch.rand(3, engine.input_size, engine.input_size)
    engine.sam_embedding(image)
    engine.sam_embedding(image)
    assert calls == ["trim", "trim"]


# In a fresh process: SAM decoding's pattern, several megabyte-sized temporaries per prompt set
# (24 MiB in 4 MiB blocks), written, freed, and allocated again for the next set; the minor page
# faults per round after two warm-up rounds. protosam.heap is loaded from its file alone and the
# blocks come from malloc directly: importing torch frees blocks of its own, which moves glibc's
# dynamic thresholds by amounts that vary, while a bare interpreter starts them where glibc does
# (blocks from 128 KiB on mapped afresh), so the default's behaviour is fixed: each round's blocks
# are mapped and faulted in again, zero-filled.
_DECODE_LIKE_ROUNDS = textwrap.dedent("""
    import ctypes, importlib.util, resource, sys
    spec = importlib.util.spec_from_file_location("protosam_heap", sys.argv[2])
    heap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(heap)
    tuned = heap.reuse_freed_heap_blocks() if sys.argv[1] == "tuned" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def one_round():
        blocks = [libc.malloc(4 * 2**20) for _ in range(6)]
        for block in blocks:
            ctypes.memset(block, 1, 4 * 2**20)
        for block in blocks:
            libc.free(block)
    for _ in range(2):
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_round()
    print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults_per_round(mode: str, env):
    import protosam.heap

    out = subprocess.run([sys.executable, "-c", _DECODE_LIKE_ROUNDS, mode, protosam.heap.__file__],
                         capture_output=True, text=True, check=True, env=env)
    tuned, faults = out.stdout.split()
    return tuned, float(faults)


def _environment_without_malloc_settings():
    return {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                         "PROTOSAM_MALLOC_DEFAULTS")}


def test_reused_heap_blocks_are_not_faulted_in_again_on_glibc():
    if not sys.platform.startswith("linux"):
        from protosam.heap import reuse_freed_heap_blocks

        assert reuse_freed_heap_blocks() is False
        return
    env = _environment_without_malloc_settings()
    _, default_faults = _faults_per_round("default", env)
    tuned, tuned_faults = _faults_per_round("tuned", env)
    # 24 MiB is 6,144 pages of 4 KiB: with glibc's own thresholds all of them are faulted in again
    # every round (6,112 measured), with the fixed ones none.
    assert default_faults > 3000, default_faults
    assert tuned == "True"
    assert tuned_faults < 100, tuned_faults


def test_a_users_own_malloc_settings_are_kept():
    from protosam.heap import user_chose_heap_settings

    assert not user_chose_heap_settings({})
    assert not user_chose_heap_settings({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert user_chose_heap_settings({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert user_chose_heap_settings({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert user_chose_heap_settings({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert user_chose_heap_settings({"PROTOSAM_MALLOC_DEFAULTS": "1"})
    assert not user_chose_heap_settings({"PROTOSAM_MALLOC_DEFAULTS": "0"})
    if sys.platform.startswith("linux"):
        for setting in ({"MALLOC_TRIM_THRESHOLD_": "0"}, {"PROTOSAM_MALLOC_DEFAULTS": "1"}):
            tuned, faults = _faults_per_round("tuned", dict(_environment_without_malloc_settings(), **setting))
            assert tuned == "False"
            if "PROTOSAM_MALLOC_DEFAULTS" in setting:
                assert faults > 3000, faults  # glibc's own behaviour, as without the call


def test_engine_keeps_freed_heap_blocks_for_reuse(tiny_models, monkeypatch):
    from protosam import Engine, engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "reuse_freed_heap_blocks", lambda: calls.append("reuse"))
    Engine(tiny_models, device="cpu", download=False)
    assert calls == ["reuse"]
