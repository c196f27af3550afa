"""A byte-bounded LRU cache for encoder outputs, so a re-run on the same volume and models
(another structure, a corrected support) skips DINOv2 and SAM image encoding."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Optional

import numpy as np
import torch

__all__ = ["EmbeddingCache", "volume_fingerprint"]


def volume_fingerprint(volume: np.ndarray) -> str:
    """Content hash of an array (shape, dtype and bytes): the cache key of a volume."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((volume.shape, volume.dtype.str)).encode())
    digest.update(np.ascontiguousarray(volume).data)
    return digest.hexdigest()


class EmbeddingCache:
    """Least-recently-used tensors, at most ``max_bytes`` in total; thread-safe.

    ``max_bytes=0`` disables caching (every ``get`` misses, ``put`` stores nothing).
    Tensors are kept on the device they were put from: on a GPU this trades VRAM for speed,
    so callers size ``max_bytes`` with that in mind.
    """

    def __init__(self, max_bytes: int = 0):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is cached (no hit or miss counted, recency unchanged)."""
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.element_size() * value.nelement()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.element_size() * old.nelement()
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.element_size() * evicted.nelement()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove the entries whose key satisfies ``predicate`` (e.g. one volume's); returns the bytes freed."""
        with self._lock:
            keys = [key for key in self._items if predicate(key)]
            freed = 0
            for key in keys:
                value = self._items.pop(key)
                freed += value.element_size() * value.nelement()
            self._bytes -= freed
            return freed

    def resize(self, max_bytes: int) -> None:
        """Change the bound in place (entries are kept, the least recently used evicted beyond it)."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        with self._lock:
            self.max_bytes = int(max_bytes)
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.element_size() * evicted.nelement()
