"""Distillation losses against plain NumPy and torch references on fixed tensors."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from jaxkd.distill import losses as L

B, T, V = 2, 5, 11
TOL = 1e-5


@pytest.fixture(scope="module")
def tensors():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    t = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    y = rng.integers(0, V, size=(B, T)).astype(np.int32)
    m = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], np.float32)
    return s, t, y, m


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(logp, logq):
    p = np.exp(logp)
    return (p * (logp - logq)).sum(-1)


def np_ref(kind, s, t, m, tau, beta):
    logq, logp = np_log_softmax(s / tau), np_log_softmax(t / tau)
    p, q = np.exp(logp), np.exp(logq)
    if kind == "forward_kl":
        d = np_kl(logp, logq)
    elif kind == "reverse_kl":
        d = np_kl(logq, logp)
    elif kind == "jsd":
        mix = np.log(beta * p + (1 - beta) * q)
        d = beta * np_kl(logp, mix) + (1 - beta) * np_kl(logq, mix)
    elif kind == "skew_forward_kl":
        d = np_kl(logp, np.log(beta * p + (1 - beta) * q))
    elif kind == "skew_reverse_kl":
        d = np_kl(logq, np.log(beta * q + (1 - beta) * p))
    return (d * m).sum() / m.sum() * tau**2


@pytest.mark.parametrize("kind", [d.value for d in L.Divergence])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_kd_matches_numpy(tensors, kind, tau):
    s, t, _, m = tensors
    loss, metrics = L.soft_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(m), kind=kind,
                              temperature=tau, beta=0.3)
    ref = np_ref(kind, s.astype(np.float64), t.astype(np.float64), m, tau, 0.3)
    np.testing.assert_allclose(float(loss), ref, rtol=TOL, atol=TOL)
    assert float(metrics["tokens"]) == m.sum()


def test_forward_kl_matches_torch_kl_div(tensors):
    s, t, _, m = tensors
    tau = 2.0
    per_tok = torch.nn.functional.kl_div(
        torch.log_softmax(torch.tensor(s) / tau, -1), torch.log_softmax(torch.tensor(t) / tau, -1),
        reduction="none", log_target=True).sum(-1)
    ref = (per_tok * torch.tensor(m)).sum() / torch.tensor(m).sum() * tau**2
    loss, _ = L.soft_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(m), temperature=tau)
    np.testing.assert_allclose(float(loss), ref.item(), rtol=TOL, atol=TOL)


def test_cross_entropy_matches_torch(tensors):
    s, _, y, m = tensors
    per_tok = torch.nn.functional.cross_entropy(
        torch.tensor(s).reshape(-1, V), torch.tensor(y, dtype=torch.long).reshape(-1),
        reduction="none").reshape(B, T)
    ref = (per_tok * torch.tensor(m)).sum() / torch.tensor(m).sum()
    loss, metrics = L.cross_entropy(jnp.asarray(s), jnp.asarray(y), jnp.asarray(m))
    np.testing.assert_allclose(float(loss), ref.item(), rtol=TOL, atol=TOL)
    acc = ((s.argmax(-1) == y) * m).sum() / m.sum()
    np.testing.assert_allclose(float(metrics["token_accuracy"]), acc, rtol=1e-6)


@pytest.mark.parametrize("kind", [d.value for d in L.Divergence])
def test_padded_positions_change_nothing(tensors, kind):
    s, t, y, m = tensors
    s2, t2 = s.copy(), t.copy()
    pad = m == 0
    s2[pad] = np.nan  # garbage in padded slots, even NaN, must not reach the loss
    t2[pad] = 1e4
    base = L.kd_objective(jnp.asarray(s), jnp.asarray(y), jnp.asarray(m),
                          teacher_logits_btv=jnp.asarray(t), alpha=0.4, kind=kind, temperature=1.5)[0]
    dirty = L.kd_objective(jnp.asarray(s2), jnp.asarray(y), jnp.asarray(m),
                           teacher_logits_btv=jnp.asarray(t2), alpha=0.4, kind=kind, temperature=1.5)[0]
    assert np.isfinite(float(dirty))
    np.testing.assert_allclose(float(dirty), float(base), rtol=1e-6)


def test_identical_distributions_have_zero_divergence(tensors):
    s, _, _, m = tensors
    for kind in L.Divergence:
        loss, _ = L.soft_kd(jnp.asarray(s), jnp.asarray(s), jnp.asarray(m), kind=kind)
        assert abs(float(loss)) < 1e-6, kind


def test_temperature_squared_scaling(tensors):
    s, t, _, m = tensors
    loss, metrics = L.soft_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(m), temperature=3.0)
    np.testing.assert_allclose(float(loss), 9.0 * float(metrics["kd_forward_kl"]), rtol=1e-6)


def test_topk_with_full_k_equals_full_kl(tensors):
    s, t, _, m = tensors
    for kind in L.Divergence:
        full, _ = L.soft_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(m), kind=kind, temperature=2.0)
        cache = L.topk_from_logits(jnp.asarray(t), k=V, temperature=2.0)
        topk, metrics = L.soft_kd_topk(jnp.asarray(s), cache, jnp.asarray(m), kind=kind,
                                       temperature=2.0)
        np.testing.assert_allclose(float(topk), float(full), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(metrics["teacher_topk_mass"]), 1.0, rtol=1e-5)


def test_topk_tail_bin_matches_numpy(tensors):
    s, t, _, m = tensors
    k = 3
    cache = L.topk_from_logits(jnp.asarray(t), k=k)
    loss, _ = L.soft_kd_topk(jnp.asarray(s), cache, jnp.asarray(m))
    logp, logq = np_log_softmax(t.astype(np.float64)), np_log_softmax(s.astype(np.float64))
    ids = np.argsort(-logp, -1)[..., :k]
    pk, qk = np.take_along_axis(np.exp(logp), ids, -1), np.take_along_axis(np.exp(logq), ids, -1)
    p = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], -1)
    q = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], -1)
    ref = ((p * (np.log(p) - np.log(q))).sum(-1) * m).sum() / m.sum()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_alpha_mix(tensors):
    s, t, y, m = tensors
    ce, _ = L.cross_entropy(jnp.asarray(s), jnp.asarray(y), jnp.asarray(m))
    kd, _ = L.soft_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(m), kind="reverse_kl", temperature=2.0)
    mixed, metrics = L.kd_objective(jnp.asarray(s), jnp.asarray(y), jnp.asarray(m),
                                    teacher_logits_btv=jnp.asarray(t), alpha=0.25,
                                    kind="reverse_kl", temperature=2.0)
    np.testing.assert_allclose(float(mixed), 0.25 * float(ce) + 0.75 * float(kd), rtol=1e-6)
    assert set(metrics) >= {"ce", "kd", "loss", "token_accuracy"}


def test_unknown_loss_lists_allowed():
    with pytest.raises(ValueError, match="allowed: .*forward_kl.*reverse_kl.*jsd"):
        L.Divergence.parse("kl_forward")


def test_pure_ce_requires_alpha_one(tensors):
    s, _, y, m = tensors
    with pytest.raises(ValueError, match="alpha < 1 needs teacher"):
        L.kd_objective(jnp.asarray(s), jnp.asarray(y), jnp.asarray(m), alpha=0.5)


def test_align_vocab_slices_to_tokenizer():
    x = jnp.arange(2 * 3 * 10, dtype=jnp.float32).reshape(2, 3, 10)
    assert L.align_vocab(x, 7).shape == (2, 3, 7)
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        L.align_vocab(x, 12)
