"""KV cache layout and helpers: no per-step cache transposes, windowed attention, compaction and
slot insertion leave every row's tokens exactly as if it ran alone."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd.config import SamplingConfig
from jaxkd.models.generate import decode_fn, prefill_fn
from jaxkd.models.kvcache import init_cache, put_row, resize_cache, take_rows
from jaxkd.models.sampling import SamplerKind, row_keys, sampler_scalars
from test_generate import byte_tokenizer, hf_model, jax_generator

HLO_ARRAY = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (transpose|copy)\(")


def cache_moves(hlo: str, cache_shape: tuple[int, ...]) -> list[str]:
    """Transpose / copy instructions whose result has the cache's dims in any order."""
    out = []
    for line in hlo.splitlines():
        m = HLO_ARRAY.search(line)
        if m and m.group(2) and sorted(map(int, m.group(2).split(","))) == sorted(cache_shape):
            out.append(line.strip())
    return out


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def gen(tok):
    return jax_generator(hf_model("qwen2"), tok, prompt_bucket=8, max_seq_len=128)


def test_decode_step_never_transposes_or_copies_the_cache(gen):
    cfg = gen.model.cfg
    b, s = 3, 40
    cache = init_cache(cfg, b, s)
    shape = tuple(cache.k[0].shape)
    assert shape == (b, cfg.num_kv_heads, s, cfg.head_size)  # [B, K, S, H]
    kind = SamplerKind(greedy=True)
    params = nnx.state(gen.model)
    step = jax.jit(decode_fn, static_argnames=("graphdef", "kind", "capture"), donate_argnames=("cache",))
    compiled = step.lower(gen.graphdef, params, cache, jnp.zeros((b,), jnp.int32), row_keys(0, range(b)),
                          jnp.float32(1), jnp.float32(1), kind=kind).compile()
    hlo = compiled.as_text()
    assert cache_moves(hlo, shape) == [], cache_moves(hlo, shape)[:4]
    # every cache buffer (k and v of each layer) is updated in place: aliased input -> output
    header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
    assert header.count("may-alias") + header.count("must-alias") >= 2 * cfg.num_layers, header[:300]
    # the check can fail: the old [B, S, K, H] cache transposed inside attention is caught
    swapped = jax.jit(lambda c: jnp.einsum("bksh,bkh->bks", jnp.swapaxes(c, 1, 2) * 2,
                                           jnp.ones((b, cfg.num_kv_heads, cfg.head_size))))
    assert cache_moves(swapped.lower(jnp.zeros((b, s, cfg.num_kv_heads, cfg.head_size))).compile().as_text(),
                       shape)


def test_windowed_cache_equals_full_length_cache(gen, tok):
    """A cache grown in 8-slot windows (attention over the filled window only) gives the tokens and
    log-probs of one allocated at full length up front."""
    prompts = [[5, 77, 120], [200, 3, 9, 54, 31, 100, 2, 18, 250, 44, 61]]
    s = SamplingConfig(max_new_tokens=30, temperature=0.9, seed=2)
    small = jax_generator(hf_model("qwen2"), tok, prompt_bucket=8, max_seq_len=128, window_bucket=8)
    a = small.generate(prompts, s, return_logprobs=True)
    b = gen.generate(prompts, s, return_logprobs=True)
    assert small._resize._cache_size() >= 1 and small._decode._cache_size() >= 4  # really grew
    assert a.tokens == b.tokens
    for x, y in zip(a.logprobs, b.logprobs):
        assert np.abs(x - y).max() < 1e-5


def test_compaction_gives_every_row_its_tokens_alone(tok):
    """Long prompts near max_seq_len finish early; the short one keeps running after the batch is
    compacted 4 -> 2 -> 1 rows (greedy and sampled), as if each row ran alone."""
    model = hf_model("qwen2")
    on = jax_generator(model, tok, prompt_bucket=8, max_seq_len=48, window_bucket=16)
    off = jax_generator(model, tok, prompt_bucket=8, max_seq_len=48, window_bucket=16, compact=False)
    rs = np.random.RandomState(7)
    prompts = [list(rs.randint(0, 256, n)) for n in (40, 36, 5, 42)]  # budgets 8, 12, 20, 6
    for s in (SamplingConfig(max_new_tokens=20), SamplingConfig(max_new_tokens=20, temperature=1.0, seed=5)):
        on.eos_ids = off.eos_ids = frozenset()  # run every row to its budget
        got = on.generate(prompts, s, return_logprobs=True)
        ref = off.generate(prompts, s, return_logprobs=True)
        assert [len(t) for t in got.tokens] == [8, 12, 20, 6]
        assert got.tokens == ref.tokens
        for i, p in enumerate(prompts):
            alone = on.generate([p], s, row_ids=[i], return_logprobs=True)
            assert alone.tokens[0] == got.tokens[i], i
            assert np.abs(alone.logprobs[0] - got.logprobs[i]).max() < 1e-4  # batch 4 vs 1 matmul rounding
    assert on._take._cache_size() >= 2  # compacted to 2 rows and to 1


def test_take_resize_put_row_helpers():
    from test_train_fixtures import tiny_config

    cfg = tiny_config(num_layers=1)
    cache = init_cache(cfg, 3, 8)
    k = jnp.arange(np.prod(cache.k[0].shape), dtype=jnp.float32).reshape(cache.k[0].shape)
    cache = dataclasses.replace(cache, k=[k], v=[-k], index=jnp.asarray([3, 5, 7], jnp.int32))
    two = take_rows(cache, jnp.asarray([2, 0]))
    np.testing.assert_array_equal(np.asarray(two.k[0]), np.asarray(k)[[2, 0]])
    np.testing.assert_array_equal(np.asarray(two.index), [7, 3])
    grown = resize_cache(two, 16)
    assert grown.max_len == 16 and not np.asarray(grown.k[0][:, :, 8:]).any()
    np.testing.assert_array_equal(np.asarray(resize_cache(grown, 8).v[0]), np.asarray(two.v[0]))
    row = dataclasses.replace(init_cache(cfg, 1, 4), index=jnp.asarray([2], jnp.int32))
    row.k[0] = jnp.full(row.k[0].shape, 9.0)
    put = put_row(cache, row, 1)
    np.testing.assert_array_equal(np.asarray(put.index), [3, 2, 7])
    assert (np.asarray(put.k[0][1, :, :4]) == 9).all()
    np.testing.assert_array_equal(np.asarray(put.k[0])[[0, 2]], np.asarray(k)[[0, 2]])
    with pytest.raises(ValueError, match="resize_cache the batch first"):
        put_row(init_cache(cfg, 2, 4), take_rows(cache, jnp.asarray([0])), 0)  # 8 slots into 4
    with pytest.raises(ValueError, match="one-row cache"):
        put_row(cache, cache, 0)


def test_a_request_prefilled_alone_joins_a_running_batch(gen):
    """Serving: rows A and B decode; C is prefilled alone into a one-row cache and put into B's
    slot mid-run. A and C then produce exactly the tokens each produces alone (sampled)."""
    s = SamplingConfig(max_new_tokens=12, temperature=1.1, top_k=30, seed=9)
    a_ids, b_ids, c_ids = [5, 77, 120, 8], [200, 3, 9, 54, 31], [65, 66, 67, 68, 69, 70, 71]
    eos, gen.eos_ids = gen.eos_ids, frozenset()  # every row runs its full budget
    try:
        alone_a = gen.generate([a_ids], s, row_ids=[0]).tokens[0]
        alone_c = gen.generate([c_ids], s, row_ids=[7]).tokens[0]
    finally:
        gen.eos_ids = eos
    kind = SamplerKind.of(s, gen.vocab)
    temp, top_p = sampler_scalars(s)
    params = nnx.state(gen.model)
    jit = dict(static_argnames=("graphdef", "kind", "capture"), donate_argnames=("cache",))
    prefill, decode = jax.jit(prefill_fn, **jit), jax.jit(decode_fn, **jit)

    def right_padded(prompts, t):
        ids = np.zeros((len(prompts), t), np.int32)
        seg = np.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, :len(p)], seg[i, :len(p)] = p, 1
        return jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), ids.shape), jnp.asarray(seg)

    keys = row_keys(s.seed, [0, 1])
    tok, _, cache = prefill(gen.graphdef, params, init_cache(gen.model.cfg, 2, 32),
                            *right_padded([a_ids, b_ids], 8), keys, temp, top_p, kind=kind)
    got_a = [int(tok[0])]
    for _ in range(3):
        tok, _, cache = decode(gen.graphdef, params, cache, tok, keys, temp, top_p, kind=kind)
        got_a.append(int(tok[0]))
    c_key = row_keys(s.seed, [7])
    c_tok, _, c_cache = prefill(gen.graphdef, params, init_cache(gen.model.cfg, 1, 16),
                                *right_padded([c_ids], 8), c_key, temp, top_p, kind=kind)
    cache = put_row(cache, c_cache, 1)
    tok = tok.at[1].set(c_tok[0])
    keys = keys.at[1].set(c_key[0])
    got_c = [int(c_tok[0])]
    for _ in range(8):
        tok, _, cache = decode(gen.graphdef, params, cache, tok, keys, temp, top_p, kind=kind)
        got_a.append(int(tok[0]))
        got_c.append(int(tok[1]))
    np.testing.assert_array_equal(np.asarray(cache.index), [len(a_ids) + 11, len(c_ids) + 8])  # tokens fed so far
    assert got_a == alone_a[:12]
    assert got_c == alone_c[:9]


def test_shared_prefix_is_prefilled_once_with_the_same_tokens(gen, tok):
    """Prompts starting with the same tokens (a system prompt; one prompt sampled K times) get the
    tokens and log-probs they get when every row prefills its whole prompt."""
    model = hf_model("qwen2")
    share = jax_generator(model, tok, prompt_bucket=8, max_seq_len=128, min_shared_prefix=8)
    system = list(range(40, 52))
    prompts = [system + [5, 77, 120], system + [200, 3, 9, 54, 31, 100, 2], system + [65], system + [65]]
    s = SamplingConfig(max_new_tokens=10, temperature=0.8, seed=4)
    assert share._shared_prefix(prompts) == 12 and share._shared_prefix(prompts[2:]) == 12
    got = share.generate(prompts, s, return_logprobs=True)
    ref = gen.generate(prompts, s, return_logprobs=True)  # min_shared_prefix=32 > 12: no sharing
    assert share._take._cache_size() >= 1  # the prefix cache was copied to the rows
    assert got.tokens == ref.tokens and got.tokens[2] != got.tokens[3]  # same prompt, own samples
    for a, b in zip(got.logprobs, ref.logprobs):
        assert np.abs(a - b).max() < 1e-4
