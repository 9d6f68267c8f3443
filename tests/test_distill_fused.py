"""The fused KD loss equals the unfused reference (kd_objective on align_vocab(h @ w.T)), value
and gradients, and a jitted step that uses it holds no [*, V] buffer.

Tolerances (float32): loss and metrics rtol 1e-5; gradients rtol 1e-4 with atol 1e-4 * max|g_ref|
(an absolute floor scaled to the gradient, since single entries can be ~0). Measured on these
inputs: loss <= 2e-7 relative, gradients <= 1e-6 of max|g_ref|.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd.config import ModelConfig
from jaxkd.distill import losses as L
from jaxkd.distill.fused import fused_kd_loss, head_stats, head_weight, loss_capacity
from jaxkd.models.decoder import Decoder

# Prime-ish sizes; 101 head rows of which 89 are the real vocabulary (12 padding rows), chunks of
# 16 so the last chunk overlaps its neighbour (89 = 5 * 16 + 9).
B, T, D, V, VOCAB, K, CHUNK = 3, 7, 13, 101, 89, 5, 16
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
ALPHAS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    w = (rng.normal(size=(V, D)) * 0.7).astype(np.float32)
    y = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    m = np.ones((B, T), np.float32)
    m[0, :3] = 0
    m[1, 5:] = 0
    m[2] = 0                       # a fully masked row
    teacher = rng.normal(size=(B, T, VOCAB)).astype(np.float32) * 2
    return h, w, y, m, teacher


def capacity_with_padding(m):
    return int((m > 0).sum()) + 3  # 3 padded capacity rows


def reference(h, w, y, m, top, alpha, kind, tau, vocab=VOCAB):
    logits = L.align_vocab(jnp.einsum("btd,vd->btv", h, w), vocab)
    return L.kd_objective(logits, y, m, teacher_topk=top, alpha=alpha, kind=kind, temperature=tau,
                          beta=0.3)


def assert_grads_close(got, ref, what):
    got, ref = np.asarray(got), np.asarray(ref)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale, err_msg=what)


def assert_metrics_close(got, ref):
    assert set(got) == set(ref)
    for key in ref:
        np.testing.assert_allclose(float(got[key]), float(ref[key]), rtol=LOSS_RTOL, atol=1e-7, err_msg=key)


def value_and_grads(fn, *args):
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(*args)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("kind", [d.value for d in L.Divergence])
def test_matches_reference_with_gradients(data, kind, tau):
    h, w, y, m, teacher = data
    top = L.topk_from_logits(jnp.asarray(teacher), K, tau)
    cap = capacity_with_padding(m)

    # alpha is a traced argument: one compile serves the three values (the trainer passes a
    # Python float; both reach the same arithmetic, alpha * ce + (1 - alpha) * kd)
    @jax.jit
    def both(h, w, alpha):
        ref = value_and_grads(lambda h, w: reference(h, w, y, m, top, alpha, kind, tau), h, w)
        fus = value_and_grads(
            lambda h, w: fused_kd_loss(h, w, y, m, teacher_topk=top, alpha=alpha, kind=kind,
                                       temperature=tau, beta=0.3, vocab_size=VOCAB,
                                       chunk_size=CHUNK, capacity=cap), h, w)
        # differentiating h alone (a frozen head) takes the other backward path
        dh_frozen = jax.grad(lambda h: fused_kd_loss(
            h, w, y, m, teacher_topk=top, alpha=alpha, kind=kind, temperature=tau, beta=0.3,
            vocab_size=VOCAB, chunk_size=CHUNK, capacity=cap)[0])(h)
        return ref, fus, dh_frozen

    for alpha in ALPHAS:
        ((lr, mr), (dhr, dwr)), ((lf, mf), (dhf, dwf)), dh_frozen = both(h, w, alpha)
        np.testing.assert_allclose(float(lf), float(lr), rtol=LOSS_RTOL, err_msg=f"alpha {alpha}")
        assert_metrics_close(mf, mr)
        assert_grads_close(dhf, dhr, f"dL/dh alpha {alpha}")
        assert_grads_close(dh_frozen, dhr, f"dL/dh (head frozen) alpha {alpha}")
        assert_grads_close(dwf, dwr, f"dL/dw alpha {alpha}")
        assert np.all(np.asarray(dwf)[VOCAB:] == 0), "rows past the real vocabulary got gradient"
        assert np.all(np.asarray(dhf)[np.asarray(m) == 0] == 0), "masked positions got gradient"
        assert float(jnp.abs(dwf).max()) > 0


@pytest.mark.parametrize("chunk", [1, 89, 1000])
def test_chunk_sizes_agree(data, chunk):
    """One column per chunk, exactly the vocabulary, more than the vocabulary (the overlapping
    last chunk is covered by CHUNK above)."""
    h, w, y, m, teacher = data
    top = L.topk_from_logits(jnp.asarray(teacher), K, 2.0)
    (lr, mr), gr = jax.jit(lambda h, w: value_and_grads(
        lambda h, w: reference(h, w, y, m, top, 0.5, "jsd", 2.0), h, w))(h, w)
    (lf, mf), gf = jax.jit(lambda h, w: value_and_grads(
        lambda h, w: fused_kd_loss(h, w, y, m, teacher_topk=top, alpha=0.5, kind="jsd",
                                   temperature=2.0, beta=0.3, vocab_size=VOCAB, chunk_size=chunk),
        h, w))(h, w)
    np.testing.assert_allclose(float(lf), float(lr), rtol=LOSS_RTOL)
    assert_metrics_close(mf, mr)
    assert_grads_close(gf[0], gr[0], "dh")
    assert_grads_close(gf[1], gr[1], "dw")


@pytest.mark.parametrize("k", [None, 0])
def test_pure_ce_and_empty_topk(data, k):
    """No teacher (alpha 1: pure CE) and a k=0 cache (KD over the tail bin alone is 0)."""
    h, w, y, m, _ = data
    top = None if k is None else L.TopK(jnp.zeros((B, T, 0), jnp.int32), jnp.zeros((B, T, 0)))
    alpha = 1.0 if k is None else 0.5
    (lr, mr), gr = jax.jit(lambda h, w: value_and_grads(
        lambda h, w: reference(h, w, y, m, top, alpha, "forward_kl", 1.0), h, w))(h, w)
    (lf, mf), gf = jax.jit(lambda h, w: value_and_grads(
        lambda h, w: fused_kd_loss(h, w, y, m, teacher_topk=top, alpha=alpha, vocab_size=VOCAB,
                                   chunk_size=CHUNK, capacity=capacity_with_padding(m)), h, w))(h, w)
    np.testing.assert_allclose(float(lf), float(lr), rtol=LOSS_RTOL)
    assert_metrics_close(mf, mr)
    assert_grads_close(gf[0], gr[0], "dh")
    assert_grads_close(gf[1], gr[1], "dw")


def test_frozen_head_gradient_without_vocab_temporaries(data):
    """Differentiating h only (a frozen head) gives the reference dL/dh and builds no [V, *] or
    [*, V] temporary: no logits and no head gradient."""
    h, w, y, m, teacher = data
    top = L.topk_from_logits(jnp.asarray(teacher), K, 1.0)
    big_w = np.tile(w, (40, 1))  # 4040 rows: a [V, D] or [N, V] buffer dominates temp memory
    big_vocab = 4000

    def ref(h, w):
        return reference(h, w, y, m, top, 0.5, "reverse_kl", 1.0, vocab=big_vocab)[0]

    def fused(h, w):
        return fused_kd_loss(h, w, y, m, teacher_topk=top, alpha=0.5, kind="reverse_kl",
                             vocab_size=big_vocab, chunk_size=CHUNK)[0]

    ref_step, fused_step = jax.jit(jax.grad(ref)), jax.jit(jax.grad(fused))
    assert_grads_close(fused_step(h, big_w), ref_step(h, big_w), "dh, head frozen")
    temps = [f.lower(h, big_w).compile().memory_analysis().temp_size_in_bytes
             for f in (fused_step, ref_step)]
    assert temps[0] < big_w.nbytes / 2, temps
    assert temps[1] > big_w.nbytes / 2, temps  # the bound bites: the reference holds [B, T, V]


def test_garbage_at_masked_positions_is_ignored(data):
    h, w, y, m, teacher = data
    top = L.topk_from_logits(jnp.asarray(teacher), K, 1.0)
    dirty = h.copy()
    dirty[m == 0] = np.nan
    dirty_y = np.where(m > 0, y, 10**6).astype(np.int32)   # ids nowhere near the vocabulary

    @jax.jit
    def run(h, y):
        return jax.value_and_grad(lambda h, w: fused_kd_loss(
            h, w, y, m, teacher_topk=top, alpha=0.5, vocab_size=VOCAB, chunk_size=CHUNK)[0],
            argnums=(0, 1))(h, w)

    clean, dirty_out = run(h, y), run(dirty, dirty_y)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty_out)):
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_out_of_vocab_id_at_a_loss_position_is_nan(data):
    """Like the reference's gather from the sliced logits: a corrupt batch cannot train silently."""
    h, w, y, m, _ = data
    bad = y.copy()
    bad[0, 4] = VOCAB + 2  # a padding row of the head, outside the tokenizer's vocabulary
    loss, _ = fused_kd_loss(h, w, bad, m, alpha=1.0, vocab_size=VOCAB, chunk_size=CHUNK)
    ref, _ = reference(h, w, bad, m, None, 1.0, "forward_kl", 1.0)
    assert np.isnan(float(loss)) and np.isnan(float(ref))


def test_fully_masked_batch(data):
    h, w, y, _, _ = data
    m = np.zeros((B, T), np.float32)
    loss, metrics = fused_kd_loss(h, w, y, m, alpha=1.0, vocab_size=VOCAB, capacity=4)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 1.0


def test_capacity_too_small_raises(data):
    h, w, y, m, _ = data
    count = int((m > 0).sum())
    with pytest.raises(ValueError, match=f"{count} loss positions exceed capacity={count - 1}"):
        fused_kd_loss(h, w, y, m, alpha=1.0, vocab_size=VOCAB, capacity=count - 1)
    # inside a jitted gradient step the mask is traced: the error comes from the compiled step
    step = jax.jit(jax.value_and_grad(lambda h, m: fused_kd_loss(
        h, w, y, m, alpha=1.0, vocab_size=VOCAB, capacity=count - 1)[0]))
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=f"{count} loss positions exceed capacity={count - 1}"):
        jax.block_until_ready(step(h, m))
    # exactly enough capacity is fine, and any capacity gives the same value
    exact = jax.jit(lambda h, m: fused_kd_loss(h, w, y, m, alpha=1.0, vocab_size=VOCAB,
                                               capacity=count)[0])(h, m)
    full = fused_kd_loss(h, w, y, m, alpha=1.0, vocab_size=VOCAB)[0]
    np.testing.assert_allclose(float(exact), float(full), rtol=1e-6)


def test_loss_capacity_buckets():
    m = np.zeros((4, 100), np.float32)
    m[:, :33] = 1                                   # 132 positions
    assert loss_capacity(m, 64) == 192
    assert loss_capacity(np.zeros((2, 10)), 64) == 20  # never below one bucket, never above B * T
    assert loss_capacity(np.ones((2, 10)), 8) == 20


def test_bad_inputs_name_the_problem(data):
    h, w, y, m, _ = data
    with pytest.raises(ValueError, match="alpha < 1 needs a top-k teacher"):
        fused_kd_loss(h, w, y, m, alpha=0.5)
    with pytest.raises(ValueError, match="vocab_size 500 must be in"):
        fused_kd_loss(h, w, y, m, alpha=1.0, vocab_size=500)
    with pytest.raises(ValueError, match="need h_btd"):
        fused_kd_loss(h, w[:, :5], y, m, alpha=1.0)
    with pytest.raises(ValueError, match="unknown distillation loss"):
        fused_kd_loss(h, w, y, m, alpha=1.0, kind="kl")


def test_head_stats_argmax_and_normalisers(data):
    h, w, _, _, _ = data
    h_nd = jnp.asarray(h.reshape(-1, D))
    ids = jnp.asarray(np.arange(B * T * 2).reshape(-1, 2) % VOCAB)
    lse1, lse2, sel, arg = head_stats(h_nd, jnp.asarray(w), ids, temperature=2.0, vocab_size=VOCAB,
                                      chunk_size=CHUNK)
    z = np.asarray(h_nd, np.float64) @ np.asarray(w, np.float64)[:VOCAB].T
    np.testing.assert_allclose(lse1, np.log(np.exp(z).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(lse2, np.log(np.exp(z / 2).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(sel, np.take_along_axis(z, np.asarray(ids), -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(arg, z.argmax(-1))


# -- a whole jitted step on a tiny model with a large vocabulary: no [*, V] buffer --------------

BIG_V, SMALL_D = 40009, 16
_SHAPE = re.compile(r"\b(?:f32|bf16|f16|s32|pred)\[([\d,]+)\]")


def _vocab_buffers(hlo: str) -> list[int]:
    """Element counts of every array in ``hlo`` that has a vocabulary-sized dimension."""
    sizes = []
    for dims in _SHAPE.findall(hlo):
        shape = [int(x) for x in dims.split(",") if x]
        if BIG_V in shape:
            sizes.append(int(np.prod(shape)))
    return sizes


def test_jitted_step_has_no_vocab_sized_activation():
    cfg = ModelConfig(vocab_size=BIG_V, hidden_size=SMALL_D, intermediate_size=24, num_layers=1,
                      num_heads=2, num_kv_heads=1, tie_embeddings=True)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    b, t, k = 2, 128, 4
    rng = np.random.default_rng(1)
    ids = rng.integers(0, BIG_V, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[:, 60:] = 1
    batch = {"input_ids": ids, "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             "segment_ids": np.ones((b, t), np.int32), "targets": np.roll(ids, -1, 1),
             "loss_mask": mask, "topk_ids": rng.integers(0, BIG_V, (b, t, k)).astype(np.int32),
             "topk_logprobs": np.full((b, t, k), -3.0, np.float32)}
    cap = loss_capacity(mask)

    def make_step(fused: bool):
        def loss(p, batch):
            model = nnx.merge(graphdef, p)
            top = L.TopK(batch["topk_ids"], batch["topk_logprobs"])
            if fused:
                h_btd, _ = model(batch["input_ids"], batch["positions"],
                                 segment_ids_bt=batch["segment_ids"], return_hidden=True)
                return fused_kd_loss(h_btd, head_weight(model), batch["targets"], batch["loss_mask"],
                                     teacher_topk=top, alpha=0.5, temperature=2.0, chunk_size=1024,
                                     capacity=cap)
            logits, _ = model(batch["input_ids"], batch["positions"], segment_ids_bt=batch["segment_ids"])
            return L.kd_objective(logits, batch["targets"], batch["loss_mask"], teacher_topk=top,
                                  alpha=0.5, temperature=2.0)

        def step(p, batch):
            (l, metrics), g = jax.value_and_grad(loss, has_aux=True)(p, batch)
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), metrics

        return jax.jit(step)

    compiled = {f: make_step(f).lower(params, batch).compile() for f in (True, False)}
    param_elems = BIG_V * SMALL_D
    fused_sizes, plain_sizes = (_vocab_buffers(compiled[f].as_text()) for f in (True, False))
    assert fused_sizes and max(fused_sizes) <= param_elems, max(fused_sizes)
    assert max(plain_sizes) >= b * t * BIG_V  # the unfused step does hold [B, T, V]: the check bites
    logits_bytes = cap * BIG_V * 4  # one [N, V] float32 array
    temp = compiled[True].memory_analysis().temp_size_in_bytes
    assert temp < logits_bytes / 2, (temp, logits_bytes)
    # and the two steps agree on the loss
    out = {f: compiled[f](params, batch)[1] for f in (True, False)}
    np.testing.assert_allclose(float(out[True]["loss"]), float(out[False]["loss"]), rtol=LOSS_RTOL)
