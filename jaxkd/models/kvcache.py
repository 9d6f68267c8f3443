"""The decoder's KV cache and small pure helpers to reshape a batch of them.

Layout: one key and one value array per layer, ``[B, K, S, H]`` (kv heads before slots, so the
attention contractions read the cache as stored: no per-step transpose), and ``index: int32[B]``,
each row's next free slot. Rows hold their tokens from slot 0 on (prompts are right-padded), so a
row's slot is its token position and everything before ``index[b]`` is that row's real context;
slots at or after it are never attended to (stale values there are harmless). That makes rows
independent:

- ``take_rows`` gathers some rows (compaction of a batch whose other rows are done, or a split);
- ``put_row`` writes a one-row cache (a request prefilled alone) into slot ``i`` of a running
  batch, which a serving engine uses to join a new request at a step boundary;
- ``resize_cache`` grows (or trims) the slot axis: generation keeps the cache as long as the
  filled window rounded up to a few bucket sizes, so attention reads the filled window only and
  only a handful of shapes are ever compiled.

All helpers are pure and jittable (shapes depend only on static arguments); donate the input
cache when jitting them so the old buffers are reused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.config import ModelConfig
from jaxkd.sharding import constrain

CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys/values ``[B, K, S, H]`` and each row's next slot ``index: int32[B]``."""

    k: list[jax.Array]
    v: list[jax.Array]
    index: jax.Array      # int32[B]: next slot to write = tokens held = next position, per row

    @property
    def max_len(self) -> int:
        return int(self.k[0].shape[2])

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt + new)."""
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_size)
    zeros = lambda: constrain(jnp.zeros(shape, dtype), CACHE_AXES)  # noqa: E731
    return KVCache(k=[zeros() for _ in range(cfg.num_layers)], v=[zeros() for _ in range(cfg.num_layers)],
                   index=jnp.zeros((batch_size,), jnp.int32))


def take_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache of rows ``rows`` (int array ``[n]``; repeats allowed), in that order."""
    rows = jnp.asarray(rows, jnp.int32)
    take = lambda a: constrain(jnp.take(a, rows, axis=0), CACHE_AXES)  # noqa: E731
    return KVCache(k=[take(a) for a in cache.k], v=[take(a) for a in cache.v],
                   index=jnp.take(cache.index, rows, axis=0))


def put_row(cache: KVCache, row: KVCache, slot: jax.Array | int) -> KVCache:
    """``cache`` with row ``slot`` replaced by the one-row cache ``row`` (its slots copied from 0
    on; its length may be shorter than ``cache``'s, never longer)."""
    if row.batch_size != 1:
        raise ValueError(f"put_row takes a one-row cache, got {row.batch_size} rows")
    if row.max_len > cache.max_len:
        raise ValueError(f"put_row: the row's cache has {row.max_len} slots, the batch only "
                         f"{cache.max_len}; resize_cache the batch first")
    if len(row.k) != len(cache.k) or row.k[0].shape[1:2] + row.k[0].shape[3:] != \
            cache.k[0].shape[1:2] + cache.k[0].shape[3:]:
        raise ValueError("put_row: the row's cache belongs to another model shape")
    slot = jnp.asarray(slot, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    put = lambda big, one: jax.lax.dynamic_update_slice(  # noqa: E731
        big, one.astype(big.dtype), (slot, zero, zero, zero))
    return KVCache(k=[put(a, b) for a, b in zip(cache.k, row.k)],
                   v=[put(a, b) for a, b in zip(cache.v, row.v)],
                   index=cache.index.at[slot].set(row.index[0]))


def resize_cache(cache: KVCache, new_len: int) -> KVCache:
    """The same rows with ``new_len`` slots: zero slots appended, or trailing slots dropped (the
    caller makes sure no row holds more than ``new_len`` tokens)."""
    s = cache.max_len
    if new_len == s:
        return cache
    if new_len > s:
        fit = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, new_len - s), (0, 0)))  # noqa: E731
    else:
        fit = lambda a: a[:, :, :new_len]  # noqa: E731
    return KVCache(k=[constrain(fit(a), CACHE_AXES) for a in cache.k],
                   v=[constrain(fit(a), CACHE_AXES) for a in cache.v], index=cache.index)
