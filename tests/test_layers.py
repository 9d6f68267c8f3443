"""Layer building blocks against transformers / NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from jaxkd.config import ModelConfig
from jaxkd.models.layers import (Projection, RMSNorm, apply_rope, make_param, normal_init, relayout_projections,
                                 rope_cos_sin, rope_inv_freq)
from jaxkd.sharding import make_mesh

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_frequencies_and_tables_match_transformers(scaling):
    hf = transformers.LlamaConfig(hidden_size=96, num_attention_heads=4, head_dim=24, rope_theta=500000.0,
                                  rope_scaling=SCALINGS[scaling], vocab_size=11, intermediate_size=7)
    cfg = ModelConfig.from_hf(hf.to_dict())
    ours = rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
    rot = LlamaRotaryEmbedding(hf)
    np.testing.assert_allclose(ours, rot.inv_freq.numpy(), rtol=2e-7, atol=0)
    pos = np.array([[0, 1, 2, 17, 100, 511]])
    cos_ref, sin_ref = rot(torch.zeros(1), torch.tensor(pos))
    cos, sin = rope_cos_sin(jnp.asarray(pos), ours)
    assert np.abs(np.asarray(cos) - cos_ref.numpy()).max() < 1e-5
    assert np.abs(np.asarray(sin) - sin_ref.numpy()).max() < 1e-5
    if scaling == "llama3":  # all three bands occur: kept, smoothed and divided frequencies
        base = rope_inv_freq(cfg.head_size, cfg.rope_theta, None)
        ratio = ours / base
        assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / 8).any()
        assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()


def test_apply_rope_matches_rotate_half():
    rs = np.random.RandomState(0)
    q = rs.randn(2, 5, 3, 8).astype(np.float32)  # b t n h
    pos = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    inv = rope_inv_freq(8, 10000.0, None)
    cos, sin = rope_cos_sin(jnp.asarray(pos), inv)
    ours = np.asarray(apply_rope(jnp.asarray(q), cos, sin))
    qt = torch.tensor(q).transpose(1, 2)  # HF: b n t h
    ref, _ = apply_rotary_pos_emb(qt, qt, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    assert np.abs(ours - ref.transpose(1, 2).numpy()).max() < 1e-6


def test_rmsnorm_matches_numpy():
    norm = RMSNorm(13, 1e-5, rngs=nnx.Rngs(0))
    w = np.linspace(0.5, 1.5, 13).astype(np.float32)
    norm.weight[...] = jnp.asarray(w)
    x = np.random.RandomState(1).randn(2, 3, 13).astype(np.float32) * 3
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert np.abs(np.asarray(norm(jnp.asarray(x))) - ref).max() < 1e-5


def test_projection_hf_layout_round_trip_and_math():
    proj = Projection((7,), (3, 5), ("q_heads", "head_dim", "embed"), use_bias=True, rngs=nnx.Rngs(0),
                      param_dtype=jnp.float32, compute_dtype=jnp.float32)
    w_hf = np.random.RandomState(2).randn(15, 7).astype(np.float32)  # [out, in] like torch Linear
    assert proj.hf_weight_shape() == (15, 7)
    mine = proj.from_hf(w_hf)
    assert mine.shape == (3, 5, 7) and proj.weight.shape == (3, 5, 7)  # out_shape + in_shape
    np.testing.assert_array_equal(mine[1, 2], w_hf[1 * 5 + 2])  # head 1, dim 2 is HF row 7
    np.testing.assert_array_equal(proj.to_hf(mine), w_hf)
    proj.weight[...] = jnp.asarray(mine)
    proj.bias[...] = jnp.arange(15, dtype=jnp.float32).reshape(3, 5)
    x = np.random.RandomState(3).randn(2, 4, 7).astype(np.float32)
    y = np.asarray(proj(jnp.asarray(x), "btd,nhd->btnh")).reshape(2, 4, 15)
    assert np.abs(y - (x @ w_hf.T + np.arange(15))).max() < 1e-5
    # a multi-axis input side (o_proj: nh -> d) flattens the same way as HF's [d, n*h]
    o = Projection((3, 5), (7,), ("embed", "q_heads", "head_dim"), use_bias=False, rngs=nnx.Rngs(0),
                   param_dtype=jnp.float32, compute_dtype=jnp.float32)
    w_o = np.random.RandomState(4).randn(7, 15).astype(np.float32)
    o.weight[...] = jnp.asarray(o.from_hf(w_o))
    h = np.random.RandomState(5).randn(2, 4, 3, 5).astype(np.float32)
    assert np.abs(np.asarray(o(jnp.asarray(h), "btnh,dnh->btd")) - h.reshape(2, 4, 15) @ w_o.T).max() < 1e-5


def test_params_carry_logical_names_and_need_rules_under_a_mesh():
    p = make_param(nnx.Rngs(0), normal_init, (4, 6), ("embed", "mlp"), jnp.float32)
    assert p.get_metadata()["out_sharding"] == ("embed", "mlp")
    with pytest.raises(ValueError, match="3 logical names"):
        make_param(nnx.Rngs(0), normal_init, (4, 6), ("embed", "mlp", None), jnp.float32)
    with jax.set_mesh(make_mesh(fsdp=2, tensor=2)):
        with pytest.raises(ValueError, match="mesh_context"):
            make_param(nnx.Rngs(0), normal_init, (4, 6), ("embed", "mlp"), jnp.float32)


def test_relayout_projections_round_trip_and_same_outputs():
    p = Projection((3, 4), (5,), ("embed", "q_heads", "head_dim"), use_bias=True, rngs=nnx.Rngs(1),
                   param_dtype=jnp.float32, compute_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(2), (2, 7, 3, 4))
    w, y = np.asarray(p.weight[...]), np.asarray(p(x, "btnh,dnh->btd"))
    assert relayout_projections(p, "io") == 1 and relayout_projections(p, "io") == 0
    assert p.weight.shape == (3, 4, 5) and p.weight.get_metadata()["out_sharding"] == ("q_heads", "head_dim", "embed")
    np.testing.assert_array_equal(np.asarray(p.weight[...]), np.transpose(w, (1, 2, 0)))
    np.testing.assert_allclose(np.asarray(p(x, "btnh,dnh->btd")), y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="stored \\[out, in\\] layout"):
        p.to_hf(p.weight[...])
    relayout_projections(p, "oi")
    np.testing.assert_array_equal(np.asarray(p.weight[...]), w)
    with pytest.raises(ValueError, match="unknown projection layout"):
        relayout_projections(p, "xy")
