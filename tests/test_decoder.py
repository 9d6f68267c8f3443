"""Decoder parity against transformers (torch CPU, float32) on tiny random Qwen2 / Llama models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxkd.config import Arch, ModelConfig
from jaxkd.models import abstract_decoder
from jaxkd.models.decoder import Decoder, init_cache
from jaxkd.sharding import count_params

VOCAB = 257


def hf_config(kind: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=68, intermediate_size=97, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=10000.0, rms_norm_eps=1e-6,
                                        tie_word_embeddings=False)
    if kind == "qwen2_tied":
        return transformers.Qwen2Config(**common, rope_theta=1000000.0,
                                        rms_norm_eps=1e-6, tie_word_embeddings=True)
    if kind == "llama":
        # llama3 scaling with a short original context so all three frequency bands occur.
        return transformers.LlamaConfig(
            **{**common, "hidden_size": 78, "num_hidden_layers": 5, "num_attention_heads": 6,
               "num_key_value_heads": 3},
            rope_theta=500000.0, rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    raise ValueError(kind)


def hf_model(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny HF model whose every tensor (biases and norms too) is random."""
    cfg = hf_config(kind)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def jax_model(model: transformers.PreTrainedModel) -> Decoder:
    cfg = ModelConfig.from_hf(model.config.to_dict())
    dec = Decoder(cfg, rngs=nnx.Rngs(1))
    dec.load_hf_tensors({k: v.numpy() for k, v in model.state_dict().items()})
    return dec


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen2_tied"])
def pair(request):
    model = hf_model(request.param)
    return request.param, model, jax_model(model)


def test_config_flags(pair):
    kind, model, dec = pair
    cfg = dec.cfg
    assert cfg.arch == (Arch.LLAMA if kind == "llama" else Arch.QWEN2)
    assert cfg.qkv_bias == (kind != "llama")
    assert cfg.tie_embeddings == (kind == "qwen2_tied")
    assert (dec.lm_head is None) == cfg.tie_embeddings
    assert (dec.layers[0].self_attn.q_proj.bias is None) == (kind == "llama")
    if kind == "llama":
        assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3"


def test_whole_model_logits_match_transformers(pair):
    _, model, dec = pair
    ids = np.random.RandomState(0).randint(0, VOCAB, (3, 41))
    ref = torch_logits(model, ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    out, cache = dec(jnp.asarray(ids), jnp.asarray(pos))
    assert cache is None and out.dtype == jnp.float32 and out.shape == ref.shape
    assert np.abs(np.asarray(out) - ref).max() < 1e-4


def test_one_layer_matches_transformers(pair):
    _, model, dec = pair
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        hs = model(torch.tensor(ids), output_hidden_states=True).hidden_states
    x_in, ref = hs[0].numpy(), hs[1].numpy()
    from jaxkd.models.layers import rope_cos_sin

    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    cos, sin = rope_cos_sin(pos, dec.inv_freq)
    mask = jnp.tril(jnp.ones((ids.shape[1],) * 2, bool))[None].repeat(2, 0)
    out, _ = dec.layers[0](jnp.asarray(x_in), cos, sin, mask)
    assert np.abs(np.asarray(out) - ref).max() < 1e-5
    # The embedding lookup itself is exact.
    assert np.array_equal(np.asarray(dec.embed_tokens(jnp.asarray(ids))), x_in)


def test_return_hidden_and_logits_from_hidden(pair):
    _, _, dec = pair
    ids = jnp.asarray(np.random.RandomState(2).randint(0, VOCAB, (2, 7)))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    h, _ = dec(ids, pos, return_hidden=True)
    assert h.shape == (2, 7, dec.cfg.hidden_size)
    logits, _ = dec(ids, pos)
    np.testing.assert_array_equal(np.asarray(dec.logits_from_hidden(h)), np.asarray(logits))


def test_padded_and_packed_batches_match_unpadded(pair):
    _, _, dec = pair
    rs = np.random.RandomState(3)
    a, b = rs.randint(0, VOCAB, 9), rs.randint(0, VOCAB, 5)

    def alone(x):
        out, _ = dec(jnp.asarray(x[None]), jnp.arange(len(x))[None])
        return np.asarray(out[0])

    la, lb = alone(a), alone(b)
    # row 0: left-padded b; row 1: a and b packed; row 2: right-padded b
    ids = np.zeros((3, 14), np.int64)
    seg = np.zeros((3, 14), np.int32)
    pos = np.zeros((3, 14), np.int32)
    ids[0, 9:], seg[0, 9:], pos[0, 9:] = b, 1, np.arange(5)
    ids[1, :9], seg[1, :9], pos[1, :9] = a, 1, np.arange(9)
    ids[1, 9:], seg[1, 9:], pos[1, 9:] = b, 2, np.arange(5)
    ids[2, :5], seg[2, :5], pos[2, :5] = b, 1, np.arange(5)
    out, _ = dec(jnp.asarray(ids), jnp.asarray(pos), segment_ids_bt=jnp.asarray(seg))
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert np.abs(out[0, 9:] - lb).max() < 1e-5
    assert np.abs(out[1, :9] - la).max() < 1e-5
    assert np.abs(out[1, 9:] - lb).max() < 1e-5
    assert np.abs(out[2, :5] - lb).max() < 1e-5
    # without segment ids the packed row would see its neighbour: the mask really matters
    out_nomask, _ = dec(jnp.asarray(ids), jnp.asarray(pos))
    assert np.abs(np.asarray(out_nomask)[1, 9:] - lb).max() > 1e-3


def test_cache_prefill_then_decode_matches_full_forward(pair):
    _, _, dec = pair
    rs = np.random.RandomState(4)
    ids = rs.randint(0, VOCAB, (2, 12))
    pos = np.broadcast_to(np.arange(12), (2, 12))
    full, _ = dec(jnp.asarray(ids), jnp.asarray(pos))
    cache = init_cache(dec.cfg, 2, 20)
    pre, cache = dec(jnp.asarray(ids[:, :7]), jnp.asarray(pos[:, :7]), cache=cache)
    steps = [np.asarray(pre)]
    for t in range(7, 12):
        out, cache = dec(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]), cache=cache)
        steps.append(np.asarray(out))
    np.testing.assert_array_equal(np.asarray(cache.index), [12, 12])
    assert np.abs(np.concatenate(steps, 1) - np.asarray(full)).max() < 1e-5


def test_hf_tensors_round_trip(pair):
    _, model, dec = pair
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    out = dec.hf_tensors()
    if dec.cfg.tie_embeddings:  # torch lists the tied head; safetensors and jaxkd do not
        np.testing.assert_array_equal(sd.pop("lm_head.weight"), sd["model.embed_tokens.weight"])
    assert sorted(out) == sorted(sd)
    for k in sd:
        assert out[k].dtype == np.float32 and out[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(out[k], sd[k], err_msg=k)


def test_load_hf_tensors_errors_name_the_problem():
    model = hf_model("qwen2")
    dec = jax_model(model)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    before = np.asarray(dec.embed_tokens.weight[...]).copy()

    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        dec.load_hf_tensors(bad)
    bad = dict(sd, **{"model.layers.9.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.9.mlp.up_proj.weight'\]"):
        dec.load_hf_tensors(bad)
    bad = dict(sd, **{"model.layers.2.self_attn.k_proj.weight": np.zeros((32, 67), np.float32),
                      "model.embed_tokens.weight": np.zeros_like(sd["model.embed_tokens.weight"])})
    with pytest.raises(ValueError, match=r"model.layers.2.self_attn.k_proj.weight.*\(32, 68\).*\(32, 67\)"):
        dec.load_hf_tensors(bad)
    # a failed load changes nothing
    np.testing.assert_array_equal(np.asarray(dec.embed_tokens.weight[...]), before)


def test_bfloat16_params_cast_on_load():
    model = hf_model("qwen2")
    cfg = ModelConfig.from_hf(model.config.to_dict())
    dec = Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    dec.load_hf_tensors({k: v.numpy() for k, v in model.state_dict().items()})
    assert dec.layers[0].mlp.gate_proj.weight[...].dtype == jnp.bfloat16
    ids = np.random.RandomState(0).randint(0, VOCAB, (1, 16))
    out, _ = dec(jnp.asarray(ids), jnp.arange(16)[None])
    ref = torch_logits(model, ids)
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - ref).max()
    assert 1e-4 < err < 0.25 * np.abs(ref).max()  # really ran in bf16, and still close


def test_count_params_without_allocating():
    for kind in ("qwen2", "qwen2_tied", "llama"):
        model = hf_model(kind)
        cfg = ModelConfig.from_hf(model.config.to_dict())
        assert count_params(abstract_decoder(cfg)) == sum(p.numel() for p in model.parameters()), kind
