"""Real weights: the packaged Qwen2.5-Coder-0.5B-Instruct GGUF in jaxkd vs transformers on the same file.

Slow tests (marked): run them alone, e.g. ``flock /tmp/jaxkd-bigmem.lock pytest -m slow
tests/test_real_weights.py``. One model is in memory at a time (jaxkd first, then transformers),
so the peak stays near 4 GB.
"""

from __future__ import annotations

import gc

import gguf
import numpy as np
import pytest

from jaxkd.config import ConfigError, load_model_spec

PRESET = "qwen2.5-coder-0.5b-instruct"
QUESTION = "My Bluetooth earbuds keep disconnecting from my laptop every few minutes. How do I fix it?"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def runs():
    """Last-token logits and 32 greedy tokens from jaxkd, then from transformers."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from jaxkd import assets
    from jaxkd.config import SamplingConfig
    from jaxkd.models import load_pretrained
    from jaxkd.models.generate import Generator

    spec = load_model_spec(PRESET)
    gguf_path = assets.verify(spec.location)  # full size + sha256 check of the assembled file
    pre = load_pretrained(PRESET)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": QUESTION}]
    ids = pre.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
    x = jnp.asarray([ids], jnp.int32)
    logits, _ = pre.model(x, jnp.arange(len(ids), dtype=jnp.int32)[None])
    jax_last = np.asarray(logits[0, -1], np.float32)
    gen = Generator(pre.model, pre.tokenizer, max_seq_len=512)
    out = gen.generate([ids], SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0))
    jax_tokens, eos = out.tokens[0], set(pre.tokenizer.generation_eos_ids)
    tokenizer, hf_dir = pre.tokenizer, pre.hf_dir
    del pre, gen, logits, x
    gc.collect()

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    with torch.inference_mode():
        t_ids = torch.tensor([ids])
        hf_last = model(t_ids).logits[0, -1].float().numpy()
        seq = model.generate(t_ids, attention_mask=torch.ones_like(t_ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=sorted(eos),
                             pad_token_id=tokenizer.pad_token_id)
    hf_tokens = [int(t) for t in seq[0, len(ids):]]
    while hf_tokens and hf_tokens[-1] in eos:  # jaxkd cuts at EOS; transformers keeps it
        hf_tokens.pop()
    del model
    gc.collect()
    return dict(jax_last=jax_last, hf_last=hf_last, jax_tokens=jax_tokens, hf_tokens=hf_tokens,
                tokenizer=tokenizer, hf_dir=hf_dir, gguf_path=gguf_path, prompt=ids)


@pytest.mark.slow
def test_last_token_logits_match_transformers(runs):
    diff = float(np.abs(runs["jax_last"] - runs["hf_last"]).max())
    print(f"\nmax |jaxkd - transformers| last-token logits (f32, same GGUF): {diff:.3e}")
    # measured here 2026-11-24: see the test report line above; target < 1e-4 in float32
    assert diff < 1e-4, diff
    assert int(np.argmax(runs["jax_last"])) == int(np.argmax(runs["hf_last"]))


@pytest.mark.slow
def test_greedy_32_tokens_identical(runs):
    tok = runs["tokenizer"]
    print("\njaxkd:", repr(tok.decode(runs["jax_tokens"])))
    assert len(runs["jax_tokens"]) == NEW_TOKENS  # the answer is longer than 32 tokens
    assert runs["jax_tokens"] == runs["hf_tokens"]


@pytest.mark.slow
def test_tokenizer_from_gguf_matches_cached_dir(runs):
    from jaxkd.models.tokenizer import tokenizer_from_gguf

    direct = tokenizer_from_gguf(runs["gguf_path"])
    cached = runs["tokenizer"]
    for text in (QUESTION, "Hold the pairing button for 7 s until the LED flashes white 🎧.", "  ünïcødé\n\tx"):
        assert direct.encode(text) == cached.encode(text)
    assert direct.generation_eos_ids == cached.generation_eos_ids
    assert set(cached.generation_eos_ids) == set(cached.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    msgs = [{"role": "user", "content": QUESTION}]
    assert direct.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        cached.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    from jaxkd.models import params

    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), arch="gemma3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((7, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"unsupported GGUF architecture general.architecture='gemma3'; "
                                          r"jaxkd reads \['qwen2', 'llama'\]"):
        params.read_gguf(path)


def test_config_key_typo_is_a_clear_error(tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text("name: x\nsource: packaged\nlocaton: qwen2.5-coder-0.5b-instruct-q4_k_m\n")
    with pytest.raises(ConfigError, match=r"unknown config key locaton \(did you mean 'location'\?\)"):
        load_model_spec(preset)
