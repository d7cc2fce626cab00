"""Per-sequence KV caches, a prefix cache of finished conversations, and an image-feature cache.

Each sequence owns preallocated K/V tensors sized for its prompt plus its token budget, so decode
writes by position and never reallocates. Finished sequences can be kept (LRU, byte budget) so a
follow-up turn that starts with the same tokens (and the same images) copies that prefix instead of
recomputing it; image features are kept by (image content, preprocessing options).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from ..config import TextConfig


class KVCache:
    def __init__(self, cfg: TextConfig, capacity: int, dtype: torch.dtype):
        shape = (cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(cfg.n_layers)]
        self.capacity = capacity
        self.length = 0  # tokens written

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    def copy_prefix(self, other: KVCache, n: int) -> None:
        for dst, src in zip(self.k + self.v, other.k + other.v, strict=True):
            dst[:, :n] = src[:, :n]
        self.length = n


def common_prefix(a: list[Any], b: list[Any]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Finished sequences' caches keyed by their token keys; LRU under a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, tuple[list[Any], KVCache]] = OrderedDict()
        self._next = 0
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, c in self.entries.values())

    def lookup(self, key: list[Any]) -> tuple[KVCache | None, int]:
        best, best_n, best_id = None, 0, None
        for entry_id, (entry_key, cache) in self.entries.items():
            n = min(common_prefix(entry_key, key), cache.length)
            if n > best_n:
                best, best_n, best_id = cache, n, entry_id
        if best_id is not None:
            self.entries.move_to_end(best_id)
            self.hits += 1
        else:
            self.misses += 1
        return best, best_n

    def store(self, key: list[Any], cache: KVCache) -> None:
        if self.max_bytes <= 0 or cache.nbytes > self.max_bytes or cache.length == 0:
            return
        # an entry whose key is a prefix of the new one is now redundant
        for entry_id in [i for i, (k, c) in self.entries.items() if common_prefix(k, key) >= c.length]:
            del self.entries[entry_id]
        self.entries[self._next] = (key[: cache.length], cache)
        self._next += 1
        while self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


class FeatureCache:
    """Image key → connector features (N, 196, D); LRU under a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return features

    def put(self, key: tuple, features: torch.Tensor) -> None:
        if self.max_bytes <= 0 or features.nbytes > self.max_bytes:
            return
        self.entries[key] = features
        while sum(f.nbytes for f in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)
