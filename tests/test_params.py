"""Weights in/out: HF dir -> Decoder -> HF dir -> transformers, and GGUF (qwen2 / llama) read-back."""

from __future__ import annotations

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxkd.config import Arch, ConfigError, ModelConfig
from jaxkd.models import params
from jaxkd.models.decoder import Decoder

VOCAB = 257  # prime-sized dims catch transposes


def tiny_hf(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    common = dict(vocab_size=VOCAB, hidden_size=68, intermediate_size=97, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=18, max_position_embeddings=128)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**{**common, "hidden_size": 78, "num_attention_heads": 6,
                                          "num_key_value_heads": 3, "head_dim": 14},
                                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6, rms_norm_eps=1e-6,
                                       tie_word_embeddings=(kind == "qwen2_tied"))
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


IDS = np.array([[5, 17, 250, 3, 99, 101, 7, 42, 0, 256, 13]], dtype=np.int64)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def jax_logits(dec: Decoder) -> np.ndarray:
    ids = jnp.asarray(IDS, jnp.int32)
    logits, _ = dec(ids, jnp.arange(ids.shape[1], dtype=jnp.int32)[None])
    return np.asarray(logits)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_tied", "llama"])
def test_hf_dir_round_trip(kind, tmp_path):
    ref = tiny_hf(kind)
    ref.save_pretrained(tmp_path / "src")
    cfg, tensors = params.read_hf_dir(tmp_path / "src")
    assert cfg.arch == (Arch.LLAMA if kind == "llama" else Arch.QWEN2)
    assert cfg.tie_embeddings == (kind == "qwen2_tied")
    assert ("lm_head.weight" in tensors) == (kind != "qwen2_tied")
    dec = Decoder(cfg, rngs=nnx.Rngs(3))
    dec.load_hf_tensors(tensors)
    want = torch_logits(ref)
    got = jax_logits(dec)
    assert np.abs(got - want).max() < 1e-4

    out = params.write_hf_dir(cfg, dec.hf_tensors(), tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == cfg.arch.value
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert set(ref_sd) == set(back_sd)
    for name in ref_sd:
        assert torch.equal(ref_sd[name], back_sd[name]), name
    assert np.abs(torch_logits(back) - want).max() < 1e-4
    assert np.abs(torch_logits(back) - got).max() < 1e-4
    # and jaxkd reads its own export back to the same tensors
    cfg2, tensors2 = params.read_hf_dir(out)
    assert cfg2 == cfg
    assert all(np.array_equal(tensors2[k], v) for k, v in tensors.items())


def test_sharded_and_lazy_hf_dir(tmp_path):
    ref = tiny_hf("qwen2")
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / params.SAFETENSORS_INDEX).exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    cfg, tensors = params.read_hf_dir(tmp_path)
    _, lazy = params.read_hf_dir(tmp_path, lazy=True)
    sd = ref.state_dict()
    assert set(tensors) == set(lazy) == set(sd)
    for name, t in sd.items():
        assert np.array_equal(tensors[name], t.numpy()) and np.array_equal(lazy[name], t.numpy())


def test_write_hf_dir_shards_by_size(tmp_path):
    """A checkpoint over ``shard_bytes`` is written as HF shards + index that transformers and
    jaxkd (eager and lazy) read back bit-exactly; under it, one model.safetensors."""
    ref = tiny_hf("qwen2")
    ref.save_pretrained(tmp_path / "src")
    cfg, tensors = params.read_hf_dir(tmp_path / "src")
    out = params.write_hf_dir(cfg, params.read_hf_dir(tmp_path / "src", lazy=True)[1], tmp_path / "sharded",
                              shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / params.SAFETENSORS_INDEX).read_text())
    assert len(shards) > 2 and not (out / params.SAFETENSORS_FILE).exists()
    assert sorted(set(index["weight_map"].values())) == shards and set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    for lazy in (False, True):
        _, back = params.read_hf_dir(out, lazy=lazy)
        assert set(back) == set(tensors) and all(np.array_equal(back[k], v) for k, v in tensors.items())
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(torch_logits(back) - torch_logits(ref)).max() == 0
    one = params.write_hf_dir(cfg, tensors, tmp_path / "one")
    assert (one / params.SAFETENSORS_FILE).exists() and not (one / params.SAFETENSORS_INDEX).exists()


def test_hf_dir_errors(tmp_path):
    with pytest.raises(params.WeightsError, match="no config.json"):
        params.read_hf_dir(tmp_path)
    ref = tiny_hf("qwen2")
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(ConfigError, match="unknown architecture model_type='mamba'"):
        params.read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(params.WeightsError, match=r"missing \['model.layers.2"):
        params.read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(params.WeightsError, match="neither model.safetensors"):
        params.read_hf_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# GGUF: written here with gguf.GGUFWriter (F32), with names spelled out independently of params.py
# ---------------------------------------------------------------------------------------------

_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Q/K rows for the llama architecture."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, arch: str, permute: bool) -> dict[str, np.ndarray]:
    c = model.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None)
                         else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()
          if not (k == "lm_head.weight" and c.tie_word_embeddings)}  # llama.cpp omits a tied head
    for name, arr in sd.items():
        rest = ""
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_LAYER[rest]}"
        else:
            gname = _GLOBAL[name]
        if permute and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads
            arr = llama_cpp_permute(arr, heads)
        w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_gguf_reads_back_exactly(kind, tmp_path):
    ref = tiny_hf(kind)
    path = tmp_path / f"{kind}.gguf"
    sd = write_tiny_gguf(path, ref, kind, permute=(kind == "llama"))
    cfg, tensors = params.read_gguf(path)
    assert set(tensors) == set(sd)
    for name, arr in sd.items():
        assert tensors[name].dtype == np.float32
        assert np.array_equal(tensors[name], arr), name
    hf_cfg = ModelConfig.from_hf(ref.config.to_dict())
    assert cfg.arch == hf_cfg.arch and cfg.qkv_bias == hf_cfg.qkv_bias
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_size", "rope_theta", "rms_norm_eps", "tie_embeddings"):
        assert getattr(cfg, field) == getattr(hf_cfg, field), field
    assert cfg.eos_token_ids == (2,)
    dec = Decoder(cfg, rngs=nnx.Rngs(0))
    dec.load_hf_tensors(tensors)
    assert np.abs(jax_logits(dec) - torch_logits(ref)).max() < 1e-4


def test_llama_unpermute_is_needed_and_qwen2_gets_none(tmp_path):
    ref = tiny_hf("llama")
    path = tmp_path / "unpermuted_llama.gguf"
    sd = write_tiny_gguf(path, ref, "llama", permute=False)  # a llama GGUF written without the permute
    _, tensors = params.read_gguf(path)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(tensors[q], sd[q])  # the reader un-permutes llama Q/K rows
    assert np.array_equal(params.unpermute_rope_rows(llama_cpp_permute(sd[q], 6), 6), sd[q])


def test_gguf_tied_and_errors(tmp_path):
    ref = tiny_hf("qwen2_tied")
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, ref, "qwen2", permute=False)
    cfg, tensors = params.read_gguf(path)
    assert cfg.tie_embeddings and "lm_head.weight" not in tensors

    bad = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(bad), arch="falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((5, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="unsupported GGUF architecture general.architecture='falcon'"):
        params.read_gguf(bad)

    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(params.WeightsError, match="truncated"):
        params.read_gguf(truncated)
    with pytest.raises(params.WeightsError, match="not found"):
        params.read_gguf(tmp_path / "nope.gguf")


def test_gguf_to_hf_dir_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXKD_CACHE", str(tmp_path / "cache"))
    ref = tiny_hf("qwen2")
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, ref, "qwen2", permute=False)
    out = params.gguf_to_hf_dir(path)
    assert out.parent == tmp_path / "cache" / "hf"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(torch_logits(back) - torch_logits(ref)).max() < 1e-4

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(params, "open_gguf", boom)
    assert params.gguf_to_hf_dir(path) == out  # second call: cache hit, keyed by the file's sha256
    path.write_bytes(path.read_bytes() + b"\0" * 32)  # a different file -> a different key
    with pytest.raises(AssertionError, match="converted again"):
        params.gguf_to_hf_dir(path)


def test_load_pretrained_hf_dir(tmp_path, monkeypatch):
    from test_tokenizer import tiny_tokenizer_dir

    from jaxkd import sharding as shd
    from jaxkd.config import ModelSpec, WeightSource
    from jaxkd.models import load_pretrained

    ref = tiny_hf("qwen2")
    ref.save_pretrained(tmp_path / "m")
    tiny_tokenizer_dir(tmp_path / "m")
    pre = load_pretrained(str(tmp_path / "m"))
    assert pre.spec.source == WeightSource.HF and pre.tokenizer.generation_eos_ids
    assert np.abs(jax_logits(pre.model) - torch_logits(ref)).max() < 1e-4

    mesh = shd.make_mesh(fsdp=2, tensor=2)
    sharded = load_pretrained(str(tmp_path / "m"), mesh=mesh)
    w = sharded.model.layers[0].mlp.gate_proj.weight[...]
    assert len(w.sharding.device_set) == 4 and not w.sharding.is_fully_replicated
    assert np.abs(jax_logits(sharded.model) - torch_logits(ref)).max() < 1e-4

    bf16 = load_pretrained(str(tmp_path / "m"), param_dtype="bfloat16")
    assert bf16.model.layers[0].mlp.gate_proj.weight[...].dtype == jnp.bfloat16

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(name="hub", source=WeightSource.HF, location="Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(ConfigError, match="'Qwen/Qwen2.5-7B-Instruct' is not a local directory.*local directory"):
        load_pretrained(spec)
    with pytest.raises(ConfigError, match="unknown model preset 'qwen9'"):
        load_pretrained("qwen9")
