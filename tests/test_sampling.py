"""jaxkd.models.sampling: the policy distribution, and sampler log-probs == teacher-forced ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd.config import SamplingConfig
from jaxkd.models.sampling import (SamplerKind, completion_logprobs, policy_logprobs, process_logits,
                                   sampler_scalars, topk_logprobs)
from test_generate import PROMPTS, byte_tokenizer, hf_model, jax_generator


def numpy_policy(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Reference: transformers' order (temperature, top-k, top-p), float64, -inf outside."""
    x = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order][0])
        p /= p.sum()
        above = np.cumsum(p) - p
        keep = np.zeros_like(x, bool)
        keep[order[above < top_p]] = True
        x = np.where(keep, x, -np.inf)
    m = x[np.isfinite(x)].max()
    return x - m - np.log(np.exp(x - m).sum())


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8),
                                                     (2.0, 20, 0.9)])
def test_policy_logprobs_match_a_numpy_reference(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(3, 101).astype(np.float32) * 3
    s = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    kind = SamplerKind.of(s, 101)
    ours = np.asarray(policy_logprobs(jnp.asarray(logits), *sampler_scalars(s), kind))
    for row, ref in zip(ours, (numpy_policy(x, temperature, top_k, top_p) for x in logits)):
        np.testing.assert_array_equal(np.isfinite(row), np.isfinite(ref))
        assert np.abs(row[np.isfinite(ref)] - ref[np.isfinite(ref)]).max() < 1e-5
        assert abs(np.exp(row[np.isfinite(row)]).sum() - 1) < 1e-5
        assert np.isfinite(row).sum() < 101 or (top_k == 0 and top_p == 1.0)


def test_greedy_policy_is_the_argmax_and_topk_is_restricted_to_the_vocab():
    logits = jnp.asarray(np.random.RandomState(1).randn(2, 30).astype(np.float32))
    kind = SamplerKind.of(SamplingConfig(temperature=0.0, top_k=3), 30)
    assert kind == SamplerKind(greedy=True, vocab=30)
    proc = np.asarray(process_logits(logits, jnp.float32(1), jnp.float32(1), kind))
    assert (np.argmax(proc, -1) == np.argmax(np.asarray(logits), -1)).all()
    assert (np.isfinite(proc).sum(-1) == 1).all()
    # a padded vocabulary: rows past the real vocab are never the argmax nor in a sampled support
    big = logits.at[:, 25].set(100.0)
    for s in (SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, top_p=0.9)):
        proc = np.asarray(process_logits(big, *sampler_scalars(s), SamplerKind.of(s, 20)))
        assert np.isinf(proc[:, 20:]).all() and np.isfinite(proc[:, :20]).any(-1).all()
    ids, lp = topk_logprobs(logits, 4, 20, 2.0)
    ref = np.asarray(jax.nn.log_softmax(logits[:, :20] / 2.0))
    assert np.asarray(ids).max() < 20
    np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(ref, np.asarray(ids), 1), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-ref, 1)[:, :4])


@pytest.fixture(scope="module")
def gen():
    return jax_generator(hf_model("qwen2"), byte_tokenizer(), prompt_bucket=8, max_seq_len=128)


SETTINGS = [SamplingConfig(max_new_tokens=14, temperature=0.7, seed=1),
            SamplingConfig(max_new_tokens=14, temperature=1.5, top_k=6, seed=2),
            SamplingConfig(max_new_tokens=14, temperature=1.2, top_p=0.7, seed=3),
            SamplingConfig(max_new_tokens=14, temperature=2.0, top_k=40, top_p=0.9, seed=4)]


@pytest.mark.parametrize("s", SETTINGS, ids=["temp", "top_k", "top_p", "top_k+top_p"])
def test_sampler_policy_logprobs_equal_teacher_forced_recomputation(gen, s):
    out = gen.generate(PROMPTS, s, return_logprobs=True, return_policy_logprobs=True)
    # one right-padded batch of prompt + completion (EOS included when the row ended with it)
    seqs = [p + t + ([e] if e is not None else []) for p, t, e in zip(PROMPTS, out.tokens, out.eos_tokens)]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    seg = np.zeros_like(ids)
    for i, q in enumerate(seqs):
        ids[i, :len(q)], seg[i, :len(q)] = q, 1
    kind = SamplerKind.of(s, gen.vocab)
    graphdef, params = nnx.split(gen.model)

    @jax.jit
    def both(params, ids, seg):
        model = nnx.merge(graphdef, params)
        kw = dict(kind=kind, temperature=jnp.float32(s.temperature), top_p=jnp.float32(s.top_p),
                  segment_ids_bt=seg, first=min(map(len, PROMPTS)))
        return (completion_logprobs(model, ids, **kw),
                completion_logprobs(model, ids, policy=False, **kw))

    policy, base = map(np.asarray, both(params, jnp.asarray(ids), jnp.asarray(seg)))
    for i, p in enumerate(PROMPTS):
        n = len(seqs[i]) - len(p)
        assert len(out.policy_logprobs[i]) == n and len(out.logprobs[i]) == len(out.tokens[i])
        np.testing.assert_allclose(out.policy_logprobs[i], policy[i, len(p):len(p) + n], atol=1e-4)
        np.testing.assert_allclose(out.logprobs[i], base[i, len(p):len(p) + len(out.tokens[i])], atol=1e-4)
        assert np.isfinite(policy[i, len(p):len(p) + n]).all()
        assert (policy[i, len(seqs[i]):] == 0).all()  # padding reports 0
    # the policy is not the base model: temperature / truncation changed the numbers
    diffs = [np.abs(a[:len(b)] - b).max() for a, b in zip(out.policy_logprobs, out.logprobs) if len(b)]
    assert max(diffs) > 1e-2


def test_completion_logprobs_is_differentiable_in_the_parameters(gen):
    s = SETTINGS[3]
    kind = SamplerKind.of(s, gen.vocab)
    graphdef, params = nnx.split(gen.model)
    out = gen.generate(PROMPTS[:1], s)
    ids = jnp.asarray([PROMPTS[0] + out.tokens[0]], jnp.int32)

    def loss(params):
        model = nnx.merge(graphdef, params)
        lp = completion_logprobs(model, ids, kind=kind, temperature=jnp.float32(s.temperature),
                                 top_p=jnp.float32(s.top_p), first=len(PROMPTS[0]))
        return lp.sum()

    grads = jax.jit(jax.grad(loss))(params)
    leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0
