"""LoRA adapters on the decoder's projections (jaxkd.models.lora): the adapted model starts equal
to the base, adapters off is exactly the base, merging gives the adapter forward, and GRPO's
reference under LoRA is the base (adapters off) without a copy of the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd.config import GRPOConfig
from jaxkd.models import lora as L
from jaxkd.rl import grpo as G
from jaxkd.train import state as st
from test_train_fixtures import tiny_decoder

IDS = jnp.asarray([[5, 77, 31, 200, 9, 140, 66, 12], [3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
POS = jnp.tile(jnp.arange(IDS.shape[1], dtype=jnp.int32)[None], (2, 1))
# merged (W + s*B@A summed in float32) vs adapter (W x + s*B(A x)) forward: a float32 reordering
MERGE_ATOL = MERGE_RTOL = 1e-5


def _jit_logits(graphdef, *states):
    return np.asarray(jax.jit(lambda *s: nnx.merge(graphdef, *s)(IDS, POS)[0])(*states))


def _trained_like(model, seed=1):
    """Give every adapter non-zero values, as training would."""
    g, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(lora))))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), lora)
    nnx.update(model, lora)
    return model


def test_adapters_start_at_the_base_switch_off_exactly_and_merge_to_the_adapter_forward():
    base_model = tiny_decoder(seed=0)
    base = _jit_logits(*nnx.split(base_model))
    base_hf = base_model.hf_tensors()
    model = L.apply_lora(tiny_decoder(seed=0), 4, 8.0, seed=3)
    g, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    np.testing.assert_array_equal(_jit_logits(g, lora, rest), base)  # B = 0: exactly the base

    _trained_like(model)
    g, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    adapted = _jit_logits(g, lora, rest)
    assert np.abs(adapted - base).max() > 1e-2
    # adapters off: the same state under the graphdef with the flag off is exactly the base
    np.testing.assert_array_equal(_jit_logits(L.lora_graphdef(model, False), lora, rest), base)
    with L.adapters_off(model):
        np.testing.assert_array_equal(np.asarray(model(IDS, POS)[0]), np.asarray(base_model(IDS, POS)[0]))
    np.testing.assert_array_equal(_jit_logits(*nnx.split(model, nnx.LoRAParam, ...)), adapted)  # restored

    with pytest.raises(ValueError, match="merge_lora"):
        model.hf_tensors()
    proj = model.layers[1].self_attn.o_proj
    want_o = np.asarray(proj.weight[...]) + np.asarray(proj.lora_delta())
    L.merge_lora(model)
    assert not L.has_lora(model) and not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_array_equal(np.asarray(proj.weight[...]), want_o.astype(np.float32))
    merged = _jit_logits(*nnx.split(model))
    np.testing.assert_allclose(merged, adapted, atol=MERGE_ATOL, rtol=MERGE_RTOL)
    # merged HF tensors: the biases, norms and embeddings are the base's, the projections moved
    hf = model.hf_tensors()
    for name, w in base_hf.items():
        moved = name.endswith("proj.weight")
        assert np.array_equal(hf[name], w) != moved, name


def test_targets_rank_and_errors():
    model = L.apply_lora(tiny_decoder(seed=0), 2, 4.0, targets=("q_proj", "v_proj"))
    paths = [p for p, _ in L.lora_projections(model)]
    assert sorted(paths) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                             "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    q = model.layers[0].self_attn.q_proj
    # A [r] + in_shape, B out_shape + [r] (PEFT's lora_A [r, in] / lora_B [out, r], axes split)
    assert q.lora_a.shape == (2, 36) and q.lora_b.shape == (3, 12, 2) and q.lora_scale == 2.0
    assert st.count(st.split_model(model, "lora")[1]) == 2 * (2 * 36 + 3 * 12 * 2 + 2 * 36 + 1 * 12 * 2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        L.apply_lora(model, 2, 4.0)
    with pytest.raises(ValueError, match="non-empty subset"):
        L.apply_lora(tiny_decoder(seed=0), 2, 4.0, targets=("qkv_proj",))
    with pytest.raises(ValueError, match="rank > 0"):
        L.apply_lora(tiny_decoder(seed=0), 0, 4.0)


def test_grpo_reference_under_lora_is_the_base_with_adapters_off():
    """beta > 0 under LoRA: the reference forward reads the policy's own state through the
    adapters-off graphdef (no ref_params copy) and gives the base model's log-probs."""
    from test_grpo import _count_prims, _tiny_step_setup, _with_old_logp

    _, _, _, batch = _tiny_step_setup()
    model = _trained_like(L.apply_lora(tiny_decoder(seed=0), 4, 8.0))
    g, lora, rest = st.split_model(model, "lora")
    g_off = L.lora_graphdef(model, False)
    cfg = GRPOConfig(beta=0.05, max_new_tokens=16)
    feed = {k: jnp.asarray(v) for k, v in _with_old_logp(g, lora, rest, batch, cfg, cfg.aggregation).items()}
    logp = jax.jit(lambda d, p, f: G.policy_logprobs(d, p, f, feed, 1.0)[0], static_argnums=0)
    g_base, base_params, base_rest = st.split_model(tiny_decoder(seed=0), "all")
    np.testing.assert_array_equal(np.asarray(logp(g_off, lora, rest)), np.asarray(logp(g_base, base_params, base_rest)))

    # the objective with ref_graphdef vs with an explicit reference: the adapters with B = 0 (the
    # base, exactly) as ref_params; same loss, KL and gradient
    zero_b = jax.tree_util.tree_map_with_path(
        lambda k, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(k) else x, lora)
    def obj(ref_graphdef, ref_params):
        fn = lambda p: G.grpo_objective(g, p, rest, ref_params, feed, cfg, ref_graphdef=ref_graphdef)
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(lora)
    (loss, m), grad = obj(g_off, None)
    (want_loss, want_m), want_grad = obj(None, zero_b)
    # rtol: the two programs fuse (and so round) differently; a wrong reference is off by far more
    assert float(m["kl_ref"]) > 1e-4
    np.testing.assert_allclose(float(m["kl_ref"]), float(want_m["kl_ref"]), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="reference params"):
        G.grpo_objective(g, lora, rest, None, feed, cfg)
    # the reference forward has no adapter matmuls: fewer dot_generals than the policy forward
    count = lambda d: _count_prims(jax.make_jaxpr(lambda p: G.policy_logprobs(d, p, rest, feed, 1.0)[0])(lora).jaxpr,
                                   "dot_general")
    assert count(g) - count(g_off) == 2 * 7 * 2  # two adapter matmuls on each of 7 projections x 2 layers
