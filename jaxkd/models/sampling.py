"""The one sampler: sampling math as pure, jittable functions over logits ``[..., V]``.

- ``process_logits`` turns raw logits into the logits of the distribution actually sampled from
  (temperature, then top-k, then top-p, as transformers orders them; removed entries are -inf;
  greedy is the point mass on the argmax). ``policy_logprobs`` is its log-softmax: the
  *policy* log-probs, which GRPO's importance ratio and its sampler-vs-trainer check need.
- ``sample_tokens`` samples from it with one key per row (``row_keys`` / ``step_keys``), so a
  row's tokens do not depend on which other rows share its batch: a row compacted into a smaller
  batch, or run alone with the same row id, draws the same tokens.
- ``topk_logprobs``: top-k ids and log-probs at a given temperature over the tokenizer's real
  vocabulary (rows of a padded embedding past it are never produced): the teacher's soft targets.
- ``completion_logprobs``: the teacher-forced, differentiable recomputation of per-token policy
  (or base) log-probs of given sequences under the same settings.

Shape suffixes as in ``jaxkd.models.layers`` (B batch, T length, V vocab, K top-k width).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.config import SamplingConfig


@dataclasses.dataclass(frozen=True)
class SamplerKind:
    """The static (compile-time) part of a ``SamplingConfig``; temperature and top-p are traced.

    ``vocab`` > 0 restricts the policy to the first ``vocab`` logits: the tokenizer's real
    vocabulary (a padded embedding's extra rows are never sampled).
    """

    greedy: bool
    top_k: int = 0
    use_top_p: bool = False
    vocab: int = 0

    @classmethod
    def of(cls, sampling: SamplingConfig, vocab: int) -> "SamplerKind":
        """The sampler of ``sampling`` over a ``vocab``-token vocabulary."""
        if sampling.temperature == 0.0:  # top-k / top-p do not change an argmax: one compile
            return cls(greedy=True, vocab=vocab)
        return cls(greedy=False, top_k=min(sampling.top_k, vocab), use_top_p=sampling.top_p < 1.0,
                   vocab=vocab)


def sampler_scalars(sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """(temperature, top_p) as float32 scalars (the traced part of a SamplingConfig)."""
    return jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p)


def process_logits(logits_bv: jax.Array, temperature: jax.Array, top_p: jax.Array,
                   kind: SamplerKind) -> jax.Array:
    """float32 logits of the distribution sampled from; tokens it never samples are -inf.

    top-k keeps every token tied with the k-th value; top-p then keeps the tokens whose
    probability mass strictly above them (within the top-k, if set) is below ``top_p``.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    vocab_v = jnp.arange(logits_bv.shape[-1])
    if 0 < kind.vocab < logits_bv.shape[-1]:
        logits_bv = jnp.where(vocab_v < kind.vocab, logits_bv, -jnp.inf)
    if kind.greedy:
        best = jnp.argmax(logits_bv, axis=-1)
        return jnp.where(vocab_v == best[..., None], 0.0, -jnp.inf)
    scaled_bv = logits_bv / temperature
    # The kept set is piecewise constant in the logits: no gradient flows through the thresholds.
    frozen_bv = jax.lax.stop_gradient(scaled_bv)
    sorted_bk = None
    if kind.top_k > 0:
        sorted_bk, _ = jax.lax.top_k(frozen_bv, kind.top_k)  # descending
        scaled_bv = jnp.where(frozen_bv < sorted_bk[..., -1:], -jnp.inf, scaled_bv)
    elif kind.use_top_p:
        sorted_bk = -jnp.sort(-frozen_bv, axis=-1)
    if kind.use_top_p:
        probs_bk = jax.nn.softmax(sorted_bk, axis=-1)
        before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk  # mass strictly above each token
        threshold_b1 = jnp.min(jnp.where(before_bk < top_p, sorted_bk, jnp.inf), axis=-1, keepdims=True)
        scaled_bv = jnp.where(frozen_bv < threshold_b1, -jnp.inf, scaled_bv)
    return scaled_bv


def policy_logprobs(logits_bv: jax.Array, temperature: jax.Array, top_p: jax.Array,
                    kind: SamplerKind) -> jax.Array:
    """Log-probs ``[..., V]`` under the policy that samples (temperature / top-k / top-p applied)."""
    return jax.nn.log_softmax(process_logits(logits_bv, temperature, top_p, kind), axis=-1)


def base_logprobs(logits_bv: jax.Array) -> jax.Array:
    """Log-probs ``[..., V]`` of the model itself (temperature 1, nothing removed)."""
    return jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)


def take_token(logp_bv: jax.Array, tok_b: jax.Array) -> jax.Array:
    """``logp_bv[..., tok]`` per row."""
    return jnp.take_along_axis(logp_bv, tok_b[..., None].astype(jnp.int32), axis=-1)[..., 0]


def row_keys(seed: int, row_ids: Sequence[int] | np.ndarray) -> jax.Array:
    """One PRNG key per row: row ``r`` of any batch run with ``seed`` draws from the same stream."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(row_ids, jnp.uint32))


def step_keys(keys_b: jax.Array, positions_b: jax.Array) -> jax.Array:
    """The key each row samples its token at ``positions_b`` with (independent of the step count,
    so a row that joined a batch late, or was moved to another slot, draws the same)."""
    return jax.vmap(jax.random.fold_in)(keys_b, positions_b.astype(jnp.uint32))


def sample_tokens(logits_bv: jax.Array, keys_b: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  kind: SamplerKind) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[B]`` (one key per row, ``keys_b``) and their policy log-probs ``[B]``."""
    processed_bv = process_logits(logits_bv, temperature, top_p, kind)
    if kind.greedy:
        tok_b = jnp.argmax(processed_bv, axis=-1).astype(jnp.int32)
    else:
        tok_b = jax.vmap(jax.random.categorical)(keys_b, processed_bv).astype(jnp.int32)
    return tok_b, take_token(jax.nn.log_softmax(processed_bv, axis=-1), tok_b)


def topk_logprobs(logits_bv: jax.Array, k: int, vocab: int, temperature: float | jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` ids (int32) and log-probs (float32) of ``softmax(logits[..., :vocab] / temperature)``."""
    logp_bv = jax.nn.log_softmax(logits_bv[..., :vocab].astype(jnp.float32) / temperature, axis=-1)
    values_bk, ids_bk = jax.lax.top_k(logp_bv, k)
    return ids_bk.astype(jnp.int32), values_bk


def completion_logprobs(model: Any, ids_bt: jax.Array, *, kind: SamplerKind, temperature: jax.Array,
                        top_p: jax.Array, segment_ids_bt: jax.Array | None = None,
                        positions_bt: jax.Array | None = None, first: int = 1,
                        policy: bool = True) -> jax.Array:
    """Teacher-forced per-token log-probs ``[B, T]``: entry ``t`` is log p(ids[t] | ids[:t]) under
    the sampling policy (``policy=False``: the base model), for ``t >= first``; 0 before.

    ``model`` is a ``Decoder`` (merge it from a graphdef inside ``jax.jit`` / ``jax.grad``: the
    function is pure and differentiable in the parameters). Rows are right-padded token ids
    (``segment_ids_bt`` 0 marks padding; positions default to 0..T-1). ``first`` (static) skips
    the lm-head at positions that predict no wanted token, e.g. the shortest prompt's length.
    Callers mask out the prompt; padding positions (segment id 0) are 0. A token outside the
    policy's support (e.g. one the sampler never kept) gets -inf: mask before summing.
    """
    b, t = ids_bt.shape
    if not 1 <= first < t:
        raise ValueError(f"completion_logprobs: first={first} must be in [1, {t})")
    if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h_btd, _ = model(ids_bt, positions_bt, segment_ids_bt=segment_ids_bt, return_hidden=True)
    logits_btv = model.logits_from_hidden(h_btd[:, first - 1:-1])
    if policy:
        logp_btv = policy_logprobs(logits_btv, temperature, top_p, kind)
    else:
        logp_btv = base_logprobs(logits_btv)
    out_bt = jnp.pad(take_token(logp_btv, ids_bt[:, first:]), ((0, 0), (first, 0)))
    if segment_ids_bt is not None:  # padding is outside any support (-inf): report it as 0
        out_bt = jnp.where(segment_ids_bt != 0, out_bt, 0.0)
    return out_bt
