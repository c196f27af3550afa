"""Freed heap memory goes back to the system before each SAM embedding (protosam.heap)."""
from __future__ import annotations

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
