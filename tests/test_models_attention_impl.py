"""``train.attention``: training passes through ``jax.nn.dot_product_attention`` compute what the
einsum attention computes (packed segments and padding included), gradients too; decode with a
cache is untouched; bad values and 'cudnn' without a GPU fail with a clear error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd.config import ConfigError, TrainConfig, from_dict
from jaxkd.models.kvcache import init_cache
from jaxkd.train import state as st
from test_train_fixtures import tiny_decoder


def _packed_batch(t: int = 24):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (2, t)).astype(np.int32)
    # row 0: two packed segments (positions restart) then padding; row 1: one segment then padding
    seg = np.array([[1] * 10 + [2] * 9 + [0] * (t - 19), [1] * 15 + [0] * (t - 15)], np.int32)
    pos = np.zeros_like(seg)
    for r in range(2):
        for s in (1, 2):
            idx = np.flatnonzero(seg[r] == s)
            pos[r, idx] = np.arange(len(idx))
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)


def _loss(model, ids, pos, seg):
    logits, _ = model(ids, pos, segment_ids_bt=seg)
    real = (seg != 0)[..., None]
    return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0)) / jnp.sum(real)


def test_xla_attention_matches_the_einsum_on_packed_padded_rows_with_gradients():
    ids, pos, seg = _packed_batch()
    ref_model, model = tiny_decoder(seed=3), tiny_decoder(seed=3)
    model.set_attention("xla")
    ref_logits, _ = ref_model(ids, pos, segment_ids_bt=seg)
    logits, _ = model(ids, pos, segment_ids_bt=seg)
    assert np.isfinite(np.asarray(logits)).all()  # padding rows included
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], rtol=1e-5, atol=1e-5)

    def grads(m):
        g, p, rest = nnx.split(m, nnx.Param, ...)
        return jax.grad(lambda p: _loss(nnx.merge(g, p, rest), ids, pos, seg))(p)

    ga, gb = jax.tree.leaves(grads(model)), jax.tree.leaves(grads(ref_model))
    assert all(np.isfinite(np.asarray(x)).all() for x in ga)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_xla_attention_under_layer_remat_matches_too():
    ids, pos, seg = _packed_batch()
    ref_model, model = tiny_decoder(seed=4), tiny_decoder(seed=4)
    model.set_attention("xla")
    a, _ = ref_model(ids, pos, segment_ids_bt=seg, remat="dots")
    b, _ = model(ids, pos, segment_ids_bt=seg, remat="dots")
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], rtol=1e-5, atol=1e-5)


def test_a_cache_pass_keeps_the_einsum():
    ids, pos, seg = _packed_batch()
    ids, pos, seg = ids[1:], pos[1:], seg[1:]
    ref_model, model = tiny_decoder(seed=5), tiny_decoder(seed=5)
    model.set_attention("xla")
    cache = init_cache(model.cfg, 1, 32, jnp.float32)
    a, _ = ref_model(ids, pos, cache=cache, segment_ids_bt=seg)
    b, _ = model(ids, pos, cache=init_cache(model.cfg, 1, 32, jnp.float32), segment_ids_bt=seg)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_implementations_are_refused():
    model = tiny_decoder()
    with pytest.raises(ValueError, match="allowed"):
        model.set_attention("flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            model.set_attention("cudnn")
    with pytest.raises(ConfigError, match="allowed values"):
        from_dict(TrainConfig, {"attention": "flash"})


def test_prepare_model_sets_train_attention():
    model = st.prepare_model(tiny_decoder(), TrainConfig(attention="xla"))
    assert {layer.self_attn.implementation for layer in model.layers} == {"xla"}
    # the implementation is static: it travels in the graphdef through split / merge
    g, p = nnx.split(model)
    assert {layer.self_attn.implementation for layer in nnx.merge(g, p).layers} == {"xla"}
