"""Generator: greedy parity with transformers.generate, sampling, logprobs, streaming, chat."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxkd.config import ModelConfig, SamplingConfig
from jaxkd.models.decoder import Decoder
from jaxkd.models.generate import Generator, TextDeltas

VOCAB = 257  # 256 byte tokens + <|end|>
END = 256
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer: token i < 256 is byte i, 256 is <|end|> (EOS and pad)."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2 byte->unicode map: reproduce it to give byte i the id i.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    assert set(vocab) == set(byte_chars)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    assert fast.eos_token_id == END and len(fast) == VOCAB
    return fast


def hf_model(kind: str, eos: int = END) -> transformers.PreTrainedModel:
    common = dict(vocab_size=VOCAB, hidden_size=68, intermediate_size=97, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=eos,
                  pad_token_id=END, max_position_embeddings=512)
    if kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common, tie_word_embeddings=False), transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger-than-default weights: peaked, non-repetitive greedy paths
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


def jax_generator(model, tokenizer, **kw) -> Generator:
    cfg = ModelConfig.from_hf(model.config.to_dict())
    dec = Decoder(cfg, rngs=nnx.Rngs(0))
    dec.load_hf_tensors({k: v.numpy() for k, v in model.state_dict().items()})
    return Generator(dec, tokenizer, **kw)


def hf_greedy(model, prompt: list[int], n: int, eos: int) -> tuple[list[int], str]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                             eos_token_id=eos, pad_token_id=END)[0, len(prompt):].tolist()
    if eos in out:
        return out[:out.index(eos)], "eos"
    return out, "length"


PROMPTS = [[5, 77, 120], [200, 3, 9, 54, 31, 100, 2, 18, 250, 44, 61], [65, 66, 67, 68, 69, 70]]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def qwen(tokenizer):
    model = hf_model("qwen2")
    return model, jax_generator(model, tokenizer, prompt_bucket=8, max_seq_len=128)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_greedy_batch_matches_transformers(kind, tokenizer):
    model = hf_model(kind)
    # make EOS a token greedy decoding really emits for prompt 1, so per-row stopping is tested
    free_run, _ = hf_greedy(model, PROMPTS[1], 24, eos=END)
    eos = free_run[6]
    model = hf_model(kind, eos=eos)
    gen = jax_generator(model, tokenizer, prompt_bucket=8, max_seq_len=128)
    assert eos in gen.eos_ids and END in gen.eos_ids
    out = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=24), return_logprobs=True)
    for i, prompt in enumerate(PROMPTS):
        ref, reason = hf_greedy(model, prompt, 24, eos=eos)
        # transformers stops at either id too (tokenizer EOS and model EOS)
        if END in ref:
            ref, reason = ref[:ref.index(END)], "eos"
        assert out.tokens[i] == ref, (i, out.tokens[i], ref)
        assert out.finish_reasons[i] == reason
        assert len(out.logprobs[i]) == len(out.tokens[i])
    assert out.finish_reasons[1] == "eos" and len(out.tokens[1]) == free_run.index(eos)
    assert out.new_tokens == sum(len(t) + (r == "eos") for t, r in zip(out.tokens, out.finish_reasons))
    # each row alone gives the same tokens as in the batch
    for i, prompt in enumerate(PROMPTS):
        assert gen.generate([prompt], SamplingConfig(max_new_tokens=24)).tokens[0] == out.tokens[i]


def full_logprobs(gen: Generator, prompt: list[int], new: list[int]) -> np.ndarray:
    ids = np.asarray([prompt + new])
    logits, _ = gen.model(jnp.asarray(ids), jnp.arange(ids.shape[1])[None])
    logp = np.asarray(jax_log_softmax(np.asarray(logits[0], np.float64)))
    return np.array([logp[len(prompt) - 1 + j, t] for j, t in enumerate(new)])


def jax_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_sampling_seeded_and_logprobs_match_forward(qwen):
    _, gen = qwen
    s = SamplingConfig(max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95, seed=7)
    a = gen.generate(PROMPTS, s, return_logprobs=True)
    b = gen.generate(PROMPTS, s, return_logprobs=True)
    c = gen.generate(PROMPTS, dataclasses.replace(s, seed=8))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    greedy = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=16))
    assert a.tokens != greedy.tokens
    for i, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(a.logprobs[i], b.logprobs[i])
        ref = full_logprobs(gen, prompt, a.tokens[i])
        assert np.abs(a.logprobs[i] - ref).max() < 1e-4


def test_top_k_one_and_tiny_top_p_equal_greedy(qwen):
    _, gen = qwen
    greedy = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=12)).tokens
    assert gen.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=5.0, top_k=1, seed=3)).tokens == greedy
    assert gen.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=5.0, top_p=1e-6, seed=3)).tokens == greedy


def test_top_k_and_top_p_restrict_the_support(qwen):
    _, gen = qwen
    for s, check in [
        (SamplingConfig(max_new_tokens=16, temperature=3.0, top_k=3, seed=1), "k"),
        (SamplingConfig(max_new_tokens=16, temperature=3.0, top_p=0.5, seed=1), "p"),
    ]:
        out = gen.generate(PROMPTS, s, return_logprobs=True)
        for i, prompt in enumerate(PROMPTS):
            ids = np.asarray([prompt + out.tokens[i]])
            logits, _ = gen.model(jnp.asarray(ids), jnp.arange(ids.shape[1])[None])
            logits = np.asarray(logits[0], np.float64) / s.temperature
            for j, tok in enumerate(out.tokens[i]):
                row = logits[len(prompt) - 1 + j]
                order = np.argsort(-row)
                rank = int(np.where(order == tok)[0][0])
                if check == "k":
                    assert rank < 3
                else:
                    p = np.exp(jax_log_softmax(row))[order]
                    assert p[:rank].sum() < 0.5 + 1e-6  # mass strictly above it is below top_p


def test_max_new_tokens_and_no_recompiles(qwen):
    _, gen = qwen
    s = SamplingConfig(max_new_tokens=5)
    gen.warmup(s, batch_sizes=(3,))
    n_prefill, n_decode = gen._prefill._cache_size(), gen._decode._cache_size()
    out = gen.generate([[1, 2], [3, 4, 5, 6, 7], [9]], s)  # other lengths, same bucket
    assert all(len(t) <= 5 for t in out.tokens)
    assert [len(t) for t, r in zip(out.tokens, out.finish_reasons) if r == "length"] == \
        [5] * out.finish_reasons.count("length")
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == (n_prefill, n_decode)
    assert out.prefill_s > 0 and out.decode_s > 0


def test_bad_prompts_raise(qwen):
    _, gen = qwen
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1], []], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_seq_len is 128"):
        gen.generate([[1] * 200], SamplingConfig(max_new_tokens=2))


def test_text_deltas_never_split_a_character(tokenizer):
    text = "ok é€ 😀 done"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256  # one token per byte
    deltas = TextDeltas(tokenizer)
    parts = [deltas.push(t) for t in ids]
    parts.append(deltas.flush())
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)
    assert parts.count("") >= len("é€😀".encode()) - 3  # multi-byte chars were held back


def test_stream_equals_generate(qwen, tokenizer):
    _, gen = qwen
    s = SamplingConfig(max_new_tokens=20, temperature=0.8, seed=5)
    prompt = PROMPTS[1]
    deltas = list(gen.stream(prompt, s))
    tokens = gen.generate([prompt], s).tokens[0]
    assert "".join(deltas) == tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(deltas) > 1


def test_chat_and_stream_chat(qwen, tokenizer):
    _, gen = qwen
    s = SamplingConfig(max_new_tokens=10)
    convs = [[{"role": "user", "content": "my earbuds won't pair"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reset?"}]]
    answers = gen.chat(convs, s)
    for conv, answer in zip(convs, answers):
        ids = tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in conv) + "assistant:")
        expect = gen.generate([ids], s).tokens[0]
        assert answer == tokenizer.decode(expect, skip_special_tokens=True)
    assert "".join(gen.stream_chat(convs[0], s)) == answers[0]


def test_io_weight_layout_matches_the_stored_layout(tokenizer):
    """Decoding from the [in, out] copy (every step, or only steps wider than one row) gives the
    stored layout's tokens, log-probs and top-k; the model keeps its [out, in] weights, and the
    copy follows weights replaced after the Generator was built."""
    from jaxkd.models.layout import LayoutChoice

    kw = dict(prompt_bucket=8, max_seq_len=128)
    oi = jax_generator(hf_model("qwen2"), tokenizer, weight_layout="oi", **kw)
    io = Generator(oi.model, tokenizer, weight_layout="io", **kw)
    mixed = Generator(oi.model, tokenizer, weight_layout="oi", **kw)
    mixed.layouts = LayoutChoice("oi", "io", "test")  # prefill + wide steps io, one-row steps oi
    assert not oi.layouts.needs_copy and (io.layouts.one_row, io.layouts.many_rows) == ("io", "io")
    q = oi.model.layers[0].self_attn.q_proj
    assert q.layout == "oi" and q.weight.shape == q.out_shape + q.in_shape

    def check(ref_gen):
        s = SamplingConfig(max_new_tokens=16, temperature=1.3, top_p=0.95, seed=7)
        ref = ref_gen.generate(PROMPTS, s, return_logprobs=True, topk=4)
        for gen in (io, mixed):
            for prompts in (PROMPTS, PROMPTS[1:2]):
                out = gen.generate(prompts, s, return_logprobs=True, topk=4)
                want = ref if len(prompts) > 1 else ref_gen.generate(prompts, s, return_logprobs=True, topk=4)
                assert out.tokens == want.tokens
                for i in range(len(prompts)):
                    # f32 sums in another order: the tolerance of the log-probs-vs-forward test above
                    assert np.abs(out.logprobs[i] - want.logprobs[i]).max() < 1e-4
                    np.testing.assert_array_equal(out.topk_ids[i], want.topk_ids[i])
        return ref.tokens

    before = check(oi)
    copy = io.leaves_for("io")
    assert any(x.shape == q.in_shape + q.out_shape and x.shape != q.weight.shape for x in copy)
    assert io.leaves_for("io") is copy  # made once while the weights stay
    q.weight.set_value(q.weight[...] * -1.0)
    assert check(oi) != before  # the new weights change the answer, and both copies follow them
    with pytest.raises(ValueError, match="weight layout 'xy'"):
        Generator(oi.model, tokenizer, weight_layout="xy")


def test_batched_bf16_steps_equal_a_bf16_model_and_keep_one_row_steps(tokenizer, monkeypatch):
    """``batched_dtype="bfloat16"``: prefill and every step over more than one row compute on a
    bf16 copy of the weights, exactly as a model held and run in bf16 would (the KV cache stays
    f32, which holds bf16 keys and values exactly); one-row steps stay on the f32 weights; the copy
    follows weights replaced after the Generator was built."""
    from jaxkd.models.generate import BATCHED_DTYPE_ENV, set_compute_dtype

    kw = dict(prompt_bucket=8, max_seq_len=128, weight_layout="oi", compact=False)
    f32 = jax_generator(hf_model("qwen2"), tokenizer, **kw)
    mixed = Generator(f32.model, tokenizer, batched_dtype="bfloat16", **kw)
    assert mixed.step_weights(1) == ("oi", None) and mixed.step_weights(2) == ("oi", "bfloat16")
    assert f32.step_weights(2) == ("oi", None)

    def bf16_model():
        graphdef, state = nnx.split(f32.model)
        model = nnx.merge(graphdef, jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
        set_compute_dtype(model, jnp.bfloat16)
        return model

    s = SamplingConfig(max_new_tokens=12, temperature=1.3, top_p=0.95, seed=7)
    got = mixed.generate(PROMPTS, s, return_logprobs=True, topk=4)
    want = Generator(bf16_model(), tokenizer, **kw).generate(PROMPTS, s, return_logprobs=True, topk=4)
    full = f32.generate(PROMPTS, s, return_logprobs=True)
    assert got.tokens == want.tokens
    for i in range(len(PROMPTS)):
        np.testing.assert_allclose(got.logprobs[i], want.logprobs[i], atol=1e-5)
        np.testing.assert_array_equal(got.topk_ids[i], want.topk_ids[i])
    # bf16 is not f32: the log-probs of the same first token differ (the copy is really bf16)
    assert got.tokens[0][0] == full.tokens[0][0]
    assert 1e-5 < abs(got.logprobs[0][0] - full.logprobs[0][0]) < 0.1

    copy = mixed.leaves_for("oi", "bfloat16")
    floating = [x for x in copy if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floating and all(x.dtype == jnp.bfloat16 for x in floating)
    assert mixed.leaves_for("oi", "bfloat16") is copy  # made once while the weights stay
    # a one-row generation decodes on the f32 weights after the (bf16) prompt prefill
    seen, decode = [], mixed._decode
    mixed._decode = lambda *a, **k: seen.append((k["dtype"], a[0][0].dtype)) or decode(*a, **k)
    one = mixed.generate(PROMPTS[:1], s, return_logprobs=True)
    mixed._decode = decode
    assert set(seen) == {(None, np.dtype("float32"))} and len(seen) == len(one.tokens[0]) - 1
    assert one.tokens[0][:4] == f32.generate(PROMPTS[:1], s).tokens[0][:4]
    q = f32.model.layers[0].self_attn.q_proj
    q.weight.set_value(q.weight[...] * -1.0)
    assert mixed.leaves_for("oi", "bfloat16") is not copy
    assert mixed.generate(PROMPTS, s).tokens != got.tokens

    monkeypatch.setenv(BATCHED_DTYPE_ENV, "bfloat16")
    assert Generator(f32.model, tokenizer, **kw).step_weights(3) == ("oi", "bfloat16")
    # the batched steps take the layout measured for their own dtype
    import jaxkd.models.generate as G
    from jaxkd.models.layout import LayoutChoice

    monkeypatch.setattr(G, "choose_layout", lambda cfg, dtype, mode: LayoutChoice(
        "oi", "io" if jnp.dtype(dtype) == jnp.bfloat16 else "oi", f"fake {jnp.dtype(dtype).name}"))
    auto = Generator(f32.model, tokenizer, **{**kw, "weight_layout": "auto"})
    assert auto.step_weights(1) == ("oi", None) and auto.step_weights(2) == ("io", "bfloat16")
    assert auto.layouts.source == "fake float32; bfloat16: fake bfloat16"
    monkeypatch.setenv(BATCHED_DTYPE_ENV, "float16")
    with pytest.raises(ValueError, match="batched_dtype 'float16'"):
        Generator(f32.model, tokenizer, **kw)
