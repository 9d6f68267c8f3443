"""Sharded Decoder on 8 fake CPU devices; real-size configs via jax.eval_shape (no memory)."""

from __future__ import annotations

import dataclasses
import math
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxkd.config import ModelConfig, SamplingConfig
from jaxkd.models import abstract_decoder, build_decoder
from jaxkd.models.generate import Generator
from jaxkd.sharding import (LOGICAL_RULES, constrain, count_params, logical_to_spec,
                            make_mesh, mesh_context, param_specs, sharding_problems)

TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=16, qkv_bias=True, tie_embeddings=False, eos_token_ids=(255,))

# Values from the public config.json files of Qwen/Qwen2.5-1.5B-Instruct and Qwen/Qwen2.5-7B-Instruct.
QWEN25_1_5B = ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                          num_heads=12, num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                          qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768,
                          bos_token_id=151643, eos_token_ids=(151645,))
QWEN25_7B = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                        num_heads=28, num_kv_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6,
                        qkv_bias=True, tie_embeddings=False, max_position_embeddings=32768,
                        bos_token_id=151643, eos_token_ids=(151645,))


def test_eight_fake_devices():
    assert len(jax.devices()) == 8


def test_make_mesh_axes_are_auto():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(fsdp=16)


def test_logical_rules_table_and_constrain():
    rules = dict(LOGICAL_RULES)
    assert len(rules) == len(LOGICAL_RULES)  # one entry per name
    assert set(v for v in rules.values() if isinstance(v, str)) <= {"data", "fsdp", "tensor"}
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("batch", "length", "act_vocab")) == P(("data", "fsdp"), None, "tensor")
    # an axis that does not divide its dimension is replicated instead of failing
    assert logical_to_spec(("batch", "act_vocab"), (1, 6), mesh) == P(None, "tensor")
    x = jnp.ones((4, 6))
    assert constrain(x, ("batch", "act_vocab")) is x  # no mesh: no-op
    with mesh_context(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "act_vocab")))(x)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    with pytest.raises(ValueError, match="not in jaxkd.sharding.LOGICAL_RULES"):
        logical_to_spec(("batchh",))


@pytest.fixture(scope="module")
def sharded_and_local():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    local = build_decoder(TINY, None, seed=3)
    sharded = build_decoder(TINY, mesh, seed=3)
    return mesh, sharded, local


def test_sharded_params_have_expected_specs(sharded_and_local):
    mesh, sharded, local = sharded_and_local
    layer = sharded.layers[1]
    expect = [
        (sharded.embed_tokens.weight, P("tensor", "fsdp")),
        (sharded.lm_head.weight, P("tensor", "fsdp")),
        (sharded.norm.weight, P(None)),
        # projections are stored [out, in] (HF's layout, head axes split out)
        (layer.self_attn.q_proj.weight, P("tensor", None, "fsdp")),
        (layer.self_attn.q_proj.bias, P("tensor", None)),
        (layer.self_attn.k_proj.weight, P("tensor", None, "fsdp")),
        (layer.self_attn.o_proj.weight, P("fsdp", "tensor", None)),
        (layer.mlp.gate_proj.weight, P("tensor", "fsdp")),
        (layer.mlp.down_proj.weight, P("fsdp", "tensor")),
    ]
    for var, spec in expect:
        arr = var[...]
        assert arr.sharding.spec == spec, (var.get_metadata()["out_sharding"], arr.sharding.spec)
        assert arr.sharding.mesh.shape == mesh.shape
    # a q_proj shard really is a quarter of the weight (fsdp x tensor), replicated over data
    q = layer.self_attn.q_proj.weight[...]
    assert q.shape == (4, 16, 64) and q.addressable_shards[0].data.shape == (2, 16, 32)
    # same values as the unsharded build from the same seed
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(local))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_sharded_logits_equal_unsharded(sharded_and_local):
    mesh, sharded, local = sharded_and_local
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(0, 256, (4, 24)))
    pos = jnp.broadcast_to(jnp.arange(24), (4, 24))
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], 4, 0))

    def fwd(graphdef, state, ids, pos, seg):
        return nnx.merge(graphdef, state)(ids, pos, segment_ids_bt=seg)[0]

    gd, st = nnx.split(local)
    ref = jax.jit(fwd, static_argnums=0)(gd, st, ids, pos, seg)
    gd, st = nnx.split(sharded)
    with mesh_context(mesh):
        out = jax.jit(fwd, static_argnums=0)(gd, st, ids, pos, seg)
    assert len(out.sharding.device_set) == 8
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 2e-6


def test_sharded_generation_equals_unsharded(sharded_and_local):
    mesh, sharded, local = sharded_and_local

    class Tok:
        eos_token_id, pad_token_id = 255, 255

    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]
    s = SamplingConfig(max_new_tokens=8)
    ref = Generator(local, Tok(), prompt_bucket=8, max_seq_len=64).generate(prompts, s, return_logprobs=True)
    with mesh_context(mesh):
        out = Generator(sharded, Tok(), prompt_bucket=8, max_seq_len=64).generate(prompts, s, return_logprobs=True)
    assert out.tokens == ref.tokens
    for a, b in zip(out.logprobs, ref.logprobs):
        assert np.abs(a - b).max() < 1e-5


def _qwen2_param_count(c: ModelConfig) -> int:
    d, f, h = c.hidden_size, c.intermediate_size, c.head_size
    attn = d * c.num_heads * h * 2 + d * c.num_kv_heads * h * 2 + (c.num_heads + 2 * c.num_kv_heads) * h
    layer = attn + 3 * d * f + 2 * d
    return c.vocab_size * d * (1 if c.tie_embeddings else 2) + c.num_layers * layer + d


@pytest.mark.parametrize("cfg,expected", [(QWEN25_1_5B, 1_543_714_304), (QWEN25_7B, 7_615_616_512)],
                         ids=["1.5B", "7B"])
def test_real_configs_param_count_and_divisibility_without_memory(cfg, expected):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = abstract_decoder(cfg, param_dtype=jnp.bfloat16)
    leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert count_params(model) == expected == _qwen2_param_count(cfg)
    specs = param_specs(model)
    assert specs["layers.0.self_attn.k_proj.weight"] == ((cfg.num_kv_heads, 128, cfg.hidden_size),
                                                         ("kv_heads", "head_dim", "embed"))
    assert ("lm_head.weight" in specs) == (not cfg.tie_embeddings)
    for mesh in (make_mesh(fsdp=8), make_mesh(fsdp=4, tensor=2)):
        assert sharding_problems(model, mesh) == []
    # the check can fail: 8-way tensor parallelism does not divide 2 or 4 kv heads
    problems = sharding_problems(model, make_mesh(tensor=8))
    assert any("k_proj.weight" in p and "kv_heads" in p for p in problems)
    # nothing near the model's size was allocated (ru_maxrss is in KiB)
    grown_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert grown_bytes < 0.05 * expected * 2
