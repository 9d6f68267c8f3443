"""AdamW with the first moment stored in bfloat16 (``train.adam_mu_dtype``): float32 AdamW's second
moment exactly, its first moment and update within bfloat16 rounding, optax's state layout; and
exactly optax's AdamW when the moment stays float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd.config import TrainConfig
from jaxkd.train import state as ST

RNG = np.random.default_rng(0)
PARAMS = {"w": jnp.asarray(RNG.normal(size=(64, 48)), jnp.float32), "b": jnp.asarray(RNG.normal(size=(48,)), jnp.float32)}
GRADS = [jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape) * 0.1, jnp.float32), PARAMS) for _ in range(4)]


def run(tx):
    state, params, updates = tx.init(PARAMS), PARAMS, []
    for g in GRADS:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
    return params, state, updates


def test_stored_bf16_moment_is_float32_adamw_within_rounding():
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.01, adam_mu_dtype="bfloat16")
    f32_tx = optax.adamw(ST.learning_rate(cfg), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
    p, s, u = run(ST.make_optimizer(cfg))
    rp, rs, ru = run(f32_tx)
    adam, ref = s[0], rs[0]
    for k in PARAMS:
        assert adam.mu[k].dtype == jnp.bfloat16 and adam.nu[k].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(adam.nu[k]), np.asarray(ref.nu[k]))
        # one bfloat16 rounding (relative 2^-9) per step, four steps
        mu, ref_mu = np.asarray(adam.mu[k], np.float32), np.asarray(ref.mu[k])
        np.testing.assert_allclose(mu, ref_mu, rtol=2 ** -7, atol=2 ** -9 * np.abs(ref_mu).max())
        assert not np.array_equal(mu, ref_mu)   # it really is stored rounded
        for a, b in zip(u, ru):
            # Adam normalises each element: a small moment's rounding error is relatively larger,
            # so the floor is a share of the largest update (about lr)
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=2 ** -7,
                                       atol=2 ** -7 * np.abs(np.asarray(b[k])).max())
    assert jax.tree.structure(s) == jax.tree.structure(  # checkpoints keep optax's state layout
        optax.adamw(ST.learning_rate(cfg), mu_dtype=jnp.bfloat16).init(PARAMS))


def test_float32_moment_is_optax_adamw():
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.01)
    ref_tx = optax.adamw(ST.learning_rate(cfg), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
    p, _, _ = run(ST.make_optimizer(cfg))
    rp, _, _ = run(ref_tx)
    for k in PARAMS:
        np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(rp[k]))
