"""The KD objective computed from hidden states and the head weight, without a ``[B, T, V]`` array.

``fused_kd_loss(h_btd, w_vd, ...)`` equals ``kd_objective(align_vocab(h_btd @ w_vd.T, vocab), ...)``
with a top-k teacher cache (or none: pure CE), value and gradients, but:

1. Only the loss positions reach the head: the masked positions are compacted into a
   fixed-capacity buffer ``h_nd`` (N static; padding rows carry no weight). Prompt and padding
   are ~45% of a KD batch: the head's matmuls shrink by as much.
2. Every loss term needs the logits only through a few numbers per position: the target logit
   and the k teacher-token logits (rows of w gathered and dotted with h: ``N * (k+1) * D`` work)
   and two normalisers, logsumexp(z) for CE and logsumexp(z / tau) for the KD term. Both
   normalisers (and the argmax for token accuracy) come from ONE pass over vocabulary chunks that
   shares each chunk's matmul: online max / rescaled sums, memory ``O(N * chunk)``.
3. A custom VJP recomputes each chunk's logits in the backward pass: the cotangent of the
   logits of chunk c is
       P_c = g1 * softmax(z_c) + (gt / tau) * softmax_tau(z_c) + scatter(g_sel at the selected ids)
   so ``dh += P_c @ w_c`` and ``dw[c] += P_c^T @ h``; the sparse (gathered-logit) cotangents are
   folded into P_c, so no separate ``[V, D]`` scatter buffer is built.
   When the head weight is not differentiated (trainable=no_embed: lm_head / tied embedding
   frozen), the forward pass instead also accumulates E1 = softmax(z) @ w and Et =
   softmax(z / tau) @ w online (rescaled like the sums), so that
       dL/dh = g1 * E1 + (gt / tau) * Et + sum_j g_sel_j * w[id_j]
   and the backward makes no pass over the vocabulary: 2 chunk matmuls instead of 3 at tau = 1.

Rows of w at or past ``vocab_size`` (checkpoint padding) never enter a normaliser and get zero
gradient, exactly as ``align_vocab`` slicing does. The last chunk is shifted back so that it ends
at ``vocab_size`` (its columns already seen are masked out): no padded copy of w is ever made.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxkd.distill.losses import Divergence, TopK, _masked_mean, _with_tail, divergence

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------


def loss_capacity(mask_bt: Any, multiple: int = 64) -> int:
    """The static capacity for ``mask_bt``'s loss positions: their count rounded up to
    ``multiple`` (a few compiled sizes, not one per batch), at most B * T. Call on the host
    (NumPy mask) before the jitted step and pass the result as a static argument."""
    mask = np.asarray(mask_bt)
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    count = int((mask > 0).sum())
    return int(min(max(math.ceil(count / multiple), 1) * multiple, mask.size))


def loss_positions(mask: Any, multiple: int = 32) -> np.ndarray:
    """Per row, the indices of ``mask``'s loss positions (mask > 0) along its last axis, in order,
    padded with -1: int32 ``[..., C]``, C = the largest row count rounded up to ``multiple`` (a
    few compiled widths), at most T. Host-side (NumPy); leading axes (batch, micro-batch) are kept,
    so the array splits over batch rows like every other batch array. ``gather_positions`` takes
    the rows' loss positions with it before the lm-head."""
    mask = np.asarray(mask)
    if mask.ndim < 1 or mask.shape[-1] < 1:
        raise ValueError(f"need a mask [..., T] with T >= 1, got shape {mask.shape}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    live = mask > 0
    t = mask.shape[-1]
    widest = int(live.sum(axis=-1).max()) if live.size else 0
    c = min(max(math.ceil(widest / multiple), 1) * multiple, t)
    # a stable sort puts the live positions first, in order; the rest become -1
    order = np.argsort(~live, axis=-1, kind="stable")[..., :c].astype(np.int32)
    taken = np.take_along_axis(live, order, axis=-1)
    return np.where(taken, order, -1).astype(np.int32)


def gather_positions(x_bt: Array, index_bc: Array) -> Array:
    """``x_bt[b, index_bc[b, c]]`` for arrays ``[B, T, ...]``; -1 (padding) slots give row b's
    position 0 (callers zero their mask with ``index_bc >= 0``)."""
    idx = jnp.maximum(index_bc, 0).astype(jnp.int32)
    idx = idx.reshape(idx.shape + (1,) * (x_bt.ndim - 2))
    return jnp.take_along_axis(x_bt, idx, axis=1)


def head_weight(model: Any) -> Array:
    """The ``[V, D]`` output projection of a ``Decoder``: ``lm_head.weight`` or, with tied
    embeddings, ``embed_tokens.weight`` (HF layout, rows = vocabulary)."""
    head = model.embed_tokens if model.lm_head is None else model.lm_head
    return head.weight[...]


# --------------------------------------------------------------------------------------------
# Chunked normalisers with a recomputing VJP
# --------------------------------------------------------------------------------------------


def _chunking(vocab: int, chunk: int) -> tuple[int, int]:
    c = min(chunk, vocab)
    return c, -(-vocab // c)


def _chunk(h_nd: Array, w_vd: Array, i: Array, vocab: int, c: int) -> tuple[Array, Array, Array]:
    """Logits of chunk i, ``[N, c]`` float32, columns already covered set to -inf; its start."""
    lo = i * c
    start = jnp.minimum(lo, vocab - c)  # the last chunk ends at `vocab`, overlapping its neighbour
    w_cd = jax.lax.dynamic_slice_in_dim(w_vd, start, c, axis=0).astype(h_nd.dtype)
    z_nc = jnp.einsum("nd,cd->nc", h_nd, w_cd, preferred_element_type=jnp.float32)
    fresh_c = start + jnp.arange(c) >= lo
    return jnp.where(fresh_c[None, :], z_nc, -jnp.inf), start, w_cd


def _stats_forward(h_nd, w_vd, ids_nj, temperature, vocab, chunk, expect=False):
    """The normalisers, gathered logits and argmax; with ``expect`` also the softmax-weighted
    head rows E1 = sum_v softmax(z)_v w_v and Et (same at temperature), ``[N, D]`` each: then
    dL/dh needs no second pass over the vocabulary (used when w is not differentiated)."""
    n, d = h_nd.shape
    c, n_chunks = _chunking(vocab, chunk)
    inv_t = 1.0 / temperature
    tempered = temperature != 1.0

    def body(i, carry):
        m_n, s1_n, st_n, arg_n, e1_nd, et_nd = carry
        z_nc, start, w_cd = _chunk(h_nd, w_vd, i, vocab, c)
        cmax_n = z_nc.max(axis=1)
        new_m = jnp.maximum(m_n, cmax_n)
        shifted = z_nc - new_m[:, None]
        decay1_n = jnp.exp(m_n - new_m)
        p1_nc = jnp.exp(shifted)
        s1_n = s1_n * decay1_n + p1_nc.sum(axis=1)
        if tempered:
            decayt_n = jnp.exp((m_n - new_m) * inv_t)
            pt_nc = jnp.exp(shifted * inv_t)
            st_n = st_n * decayt_n + pt_nc.sum(axis=1)
        if expect:  # online softmax-weighted sums of w rows, rescaled like the normalisers
            e1_nd = e1_nd * decay1_n[:, None] + jnp.einsum(
                "nc,cd->nd", p1_nc.astype(h_nd.dtype), w_cd, preferred_element_type=jnp.float32)
            if tempered:
                et_nd = et_nd * decayt_n[:, None] + jnp.einsum(
                    "nc,cd->nd", pt_nc.astype(h_nd.dtype), w_cd, preferred_element_type=jnp.float32)
        # strict `>`: ties keep the earlier (lower) id, as jnp.argmax over the full row does
        arg_n = jnp.where(cmax_n > m_n, start + jnp.argmax(z_nc, axis=1).astype(jnp.int32), arg_n)
        return new_m, s1_n, st_n, arg_n, e1_nd, et_nd

    e_nd = jnp.zeros((n, d), jnp.float32) if expect else None
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.int32), e_nd,
            e_nd if expect and tempered else None)
    m_n, s1_n, st_n, arg_n, e1_nd, et_nd = jax.lax.fori_loop(0, n_chunks, body, init)
    lse1_n = m_n + jnp.log(s1_n)
    lset_n = m_n * inv_t + jnp.log(st_n) if tempered else lse1_n

    ok_nj = (ids_nj >= 0) & (ids_nj < vocab)
    w_njd = _rows(w_vd, ids_nj, vocab, h_nd.dtype)
    sel_nj = jnp.einsum("nd,njd->nj", h_nd, w_njd, preferred_element_type=jnp.float32)
    # an id outside the real vocabulary is a corrupt batch: NaN, like take_along_axis on the
    # sliced logits in the reference, so the loop's finiteness check stops the run
    sel_nj = jnp.where(ok_nj, sel_nj, jnp.nan)
    out = (lse1_n, lset_n, sel_nj, arg_n)
    if not expect:
        return out
    e1_nd = e1_nd / s1_n[:, None]
    et_nd = et_nd / st_n[:, None] if tempered else e1_nd
    return out, (e1_nd, et_nd)


def _rows(w_vd, ids_nj, vocab, dtype):
    return jnp.take(w_vd, jnp.clip(ids_nj, 0, vocab - 1), axis=0).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _head_stats(h_nd: Array, w_vd: Array, ids_nj: Array, temperature: float, vocab: int,
                chunk: int) -> tuple[Array, Array, Array, Array]:
    """(logsumexp(z), logsumexp(z / tau), z[ids], argmax z) per row, z = h @ w[:vocab].T."""
    return _stats_forward(h_nd, w_vd, ids_nj, temperature, vocab, chunk)


def _head_stats_fwd(h_nd, w_vd, ids_nj, temperature, vocab, chunk):
    h, w, ids = h_nd.value, w_vd.value, ids_nj.value
    if not w_vd.perturbed:
        # frozen head: carry the softmax-weighted rows through the forward pass (one extra
        # matmul per chunk) instead of recomputing every chunk's logits in the backward (two)
        out, expected = _stats_forward(h, w, ids, temperature, vocab, chunk, expect=True)
        return out, (h, w, ids, expected, None)
    out = _stats_forward(h, w, ids, temperature, vocab, chunk)
    return out, (h, w, ids, None, (out[0], out[1]))


def _zero_if_symbolic(g: Any, shape: tuple[int, ...]) -> Array:
    return jnp.zeros(shape, jnp.float32) if isinstance(g, SymbolicZero) else g.astype(jnp.float32)


def _head_stats_bwd(temperature, vocab, chunk, res, cts):
    # which of the two residual slots is filled (static pytree structure) picks the path
    h_nd, w_vd, ids_nj, expected, normalisers = res
    n, d = h_nd.shape
    c, n_chunks = _chunking(vocab, chunk)
    inv_t = 1.0 / temperature
    g1_n = _zero_if_symbolic(cts[0], (n,))
    gt_n = _zero_if_symbolic(cts[1], (n,))
    gsel_nj = _zero_if_symbolic(cts[2], ids_nj.shape)
    # an out-of-vocabulary id's logit was NaN (not a function of w): no gradient flows to it
    gsel_nj = jnp.where((ids_nj >= 0) & (ids_nj < vocab), gsel_nj, 0.0)
    if temperature == 1.0:  # one softmax serves both normalisers
        g1_n, gt_n = g1_n + gt_n, None
    if expected is not None:  # w frozen: dL/dh = g1 E1 + gt/tau Et + sum_j gsel_j w[ids_j]
        e1_nd, et_nd = expected
        dh_nd = g1_n[:, None] * e1_nd + jnp.einsum(
            "nj,njd->nd", gsel_nj, _rows(w_vd, ids_nj, vocab, jnp.float32))
        if gt_n is not None:
            dh_nd = dh_nd + (gt_n * inv_t)[:, None] * et_nd
        return dh_nd.astype(h_nd.dtype), None, None
    lse1_n, lset_n = normalisers
    rows_nj = jnp.broadcast_to(jnp.arange(n)[:, None], ids_nj.shape)

    def body(i, carry):
        dh_nd, dw_vd = carry
        z_nc, start, w_cd = _chunk(h_nd, w_vd, i, vocab, c)
        p_nc = g1_n[:, None] * jnp.exp(z_nc - lse1_n[:, None])
        if gt_n is not None:
            p_nc = p_nc + (gt_n * inv_t)[:, None] * jnp.exp(z_nc * inv_t - lset_n[:, None])
        # d z[ids] / d z_c: scatter the gathered-logit cotangents into this chunk's columns
        # (only ids first covered by this chunk; others are dropped as out of bounds)
        local_nj = ids_nj - start
        mine = (ids_nj >= i * c) & (local_nj < c)
        p_nc = p_nc.at[rows_nj, jnp.where(mine, local_nj, c)].add(gsel_nj, mode="drop")
        p_nc = p_nc.astype(h_nd.dtype)
        dh_nd = dh_nd + jnp.einsum("nc,cd->nd", p_nc, w_cd, preferred_element_type=jnp.float32)
        dw_cd = jnp.einsum("nc,nd->cd", p_nc, h_nd, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(dw_vd, start, c, axis=0)
        dw_vd = jax.lax.dynamic_update_slice_in_dim(dw_vd, old + dw_cd, start, axis=0)
        return dh_nd, dw_vd

    init = (jnp.zeros((n, d), jnp.float32), jnp.zeros(w_vd.shape, jnp.float32))
    dh_nd, dw_vd = jax.lax.fori_loop(0, n_chunks, body, init)
    return dh_nd.astype(h_nd.dtype), dw_vd.astype(w_vd.dtype), None


_head_stats.defvjp(_head_stats_fwd, _head_stats_bwd, symbolic_zeros=True)


def head_stats(h_nd: Array, w_vd: Array, ids_nj: Array, *, temperature: float = 1.0,
               vocab_size: int | None = None, chunk_size: int = 2048
               ) -> tuple[Array, Array, Array, Array]:
    """Per row of ``h_nd``: ``(logsumexp(z), logsumexp(z / temperature), z[ids_nj], argmax(z))``
    with ``z = h_nd @ w_vd[:vocab_size].T``, never materialising z; differentiable in h and w."""
    vocab = int(w_vd.shape[0] if vocab_size is None else vocab_size)
    return _head_stats(h_nd, w_vd, ids_nj.astype(jnp.int32), float(temperature), vocab,
                       int(chunk_size))


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def _check_capacity(count: Array, capacity: int) -> None:
    if count > capacity:
        raise ValueError(f"fused_kd_loss: {int(count)} loss positions exceed capacity={capacity}; "
                         f"pick the capacity per batch with loss_capacity(mask) (or pass None)")


def fused_kd_loss(h_btd: Array, w_vd: Array, targets_bt: Array, mask_bt: Array, *,
                  teacher_topk: TopK | None = None, alpha: float = 0.5,
                  kind: Divergence | str = Divergence.FORWARD_KL, temperature: float = 1.0,
                  beta: float = 0.5, vocab_size: int | None = None, chunk_size: int = 2048,
                  capacity: int | None = None) -> tuple[Array, dict]:
    """``kd_objective(align_vocab(h_btd @ w_vd.T, vocab_size), targets_bt, mask_bt,
    teacher_topk=..., alpha=..., kind=..., temperature=..., beta=...)`` without the logits.

    h_btd: final normed hidden states (``Decoder(..., return_hidden=True)``); w_vd: the head
    weight ``[V, D]`` (``head_weight(model)``); mask_bt > 0 marks loss positions; capacity: static
    number of loss positions the head sees (``loss_capacity(mask)``; None = B * T). More loss
    positions than ``capacity`` is an error (raised at once for a concrete mask, from inside the
    compiled step otherwise; the loss is also NaN then). Same metrics as ``kd_objective``.
    chunk_size: vocabulary rows per pass step; on the 2-core CPU 512..8192 measured the same
    within noise and 16384+ slower (evals/results/bench_kd_loss.md); 2048 keeps the per-chunk
    [N, chunk] buffers small.
    """
    kind = Divergence.parse(kind)
    h_btd, w_vd, targets_bt, mask_bt = map(jnp.asarray, (h_btd, w_vd, targets_bt, mask_bt))
    if h_btd.ndim != 3 or w_vd.ndim != 2 or h_btd.shape[-1] != w_vd.shape[-1]:
        raise ValueError(f"need h_btd [B, T, D] and w_vd [V, D]; got {h_btd.shape} and {w_vd.shape}")
    b, t, _ = h_btd.shape
    if targets_bt.shape != (b, t) or mask_bt.shape != (b, t):
        raise ValueError(f"targets {targets_bt.shape} and mask {mask_bt.shape} must be {(b, t)}")
    vocab = int(w_vd.shape[0] if vocab_size is None else vocab_size)
    if not 0 < vocab <= w_vd.shape[0]:
        raise ValueError(f"vocab_size {vocab} must be in [1, {w_vd.shape[0]}] (rows of the head weight)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if teacher_topk is None and alpha != 1.0:
        raise ValueError("alpha < 1 needs a top-k teacher cache")
    if teacher_topk is not None and teacher_topk.ids.shape[:2] != (b, t):
        raise ValueError(f"teacher top-k {teacher_topk.ids.shape} must be [B, T, k] with B, T = {(b, t)}")
    if teacher_topk is not None:
        teacher_topk = TopK(jnp.asarray(teacher_topk.ids), jnp.asarray(teacher_topk.logprobs))
    n = b * t if capacity is None else int(capacity)
    if n < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    n = min(n, b * t)

    live = (mask_bt > 0).reshape(-1)
    count = live.sum()
    try:
        concrete = int(count)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        concrete = None
    if concrete is not None:
        _check_capacity(concrete, n)
    elif n < b * t:
        # a traced mask: the error surfaces (JaxRuntimeError naming it) when the step's result
        # is read; the NaN below is a second stop for runtimes that drop host callbacks
        jax.debug.callback(_check_capacity, count, n)
    idx_n = jnp.nonzero(live, size=n, fill_value=0)[0]
    valid_n = jnp.arange(n) < count
    h_nd = jnp.where(valid_n[:, None], h_btd.reshape(b * t, -1)[idx_n], 0)
    ids = [targets_bt.reshape(-1)[idx_n][:, None]]
    if teacher_topk is not None:
        k = teacher_topk.ids.shape[-1]
        ids.append(teacher_topk.ids.reshape(b * t, k)[idx_n])
        tlp_nk = teacher_topk.logprobs.reshape(b * t, k)[idx_n].astype(jnp.float32)
    ids_nj = jnp.where(valid_n[:, None], jnp.concatenate(ids, axis=1).astype(jnp.int32), 0)

    lse1_n, lset_n, sel_nj, arg_n = head_stats(h_nd, w_vd, ids_nj, temperature=temperature,
                                               vocab_size=vocab, chunk_size=chunk_size)
    # _masked_mean over the N slots: valid slots are exactly the loss positions, so the sum is
    # the same; the denominator is the full mask's sum, as in the reference
    denom = jnp.maximum(mask_bt.astype(jnp.float32).sum(), 1.0)

    def mean(values_n):
        return jnp.where(valid_n, values_n, 0.0).sum() / denom

    poison = jnp.where(count > n, jnp.nan, 0.0)
    ce = mean(lse1_n - sel_nj[:, 0]) + poison
    acc = mean((arg_n == ids_nj[:, 0]).astype(jnp.float32))
    metrics = {"ce": ce, "token_accuracy": acc, "tokens": denom}
    if teacher_topk is None:
        return ce, {**metrics, "loss": ce}
    logq_nj = _with_tail(sel_nj[:, 1:] / temperature - lset_n[:, None])
    logp_nj = _with_tail(tlp_nk)
    raw = mean(divergence(logp_nj, logq_nj, kind, beta)) + poison
    kd = raw * temperature**2
    head_mass, _ = _masked_mean(jnp.exp(jax.nn.logsumexp(teacher_topk.logprobs, axis=-1)), mask_bt)
    loss = alpha * ce + (1.0 - alpha) * kd
    return loss, {**metrics, f"kd_{kind.value}": raw, "kd": kd, "teacher_topk_mass": head_mass,
                  "loss": loss}
