"""GRPO learns a toy reward on a tiny random model, and the same run with the advantage sign
flipped unlearns it: the rise comes from the policy gradient, not from chance or drift.

Toy reward: lower-case ASCII letters in a 12-token completion / 12. A random tiny Qwen2 (vocab
263, byte tokenizer) scores ~0.11 (26 of 263 tokens are lower-case letters). The policy is
measured on held-out samples (fixed sampler seeds never used in training, 64 completions =
768 tokens; the binomial std of that mean is ~0.011) before and after 15 GRPO steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxkd.config import GRPOConfig, TrainConfig
from jaxkd.models.generate import Generator
from jaxkd.rl import rollout as ro
from jaxkd.rl.loop import cycle_prompts, run_grpo
from test_train_fixtures import byte_tokenizer, tiny_decoder

QUESTIONS = ["how do I pair it?", "why is it quiet?", "reset steps?", "light blinks red"]
CFG = GRPOConfig(num_generations=8, prompts_per_step=4, max_new_tokens=12, temperature=1.0)
TRAIN = TrainConfig(steps=15, lr=1e-2, warmup_steps=0, schedule="constant", trainable="all",
                    clip_norm=1.0, seed=0)
STEPS = 15
EVAL_SEEDS = (990_001, 990_002)  # sampler seeds no training step uses


def toy_reward(meta, texts):
    return {"toy": np.array([sum(c.islower() and c.isascii() for c in t) / 12.0 for t in texts])}


def _held_out_reward(model, tok, prompts) -> float:
    gen = Generator(model, tok, max_seq_len=256, prompt_bucket=64)
    texts = [t for s in EVAL_SEEDS for t in ro.generate_rollouts(gen, prompts, CFG, seed=s).completion_text]
    return float(toy_reward(None, texts)["toy"].mean())


@pytest.fixture(scope="module")
def runs():
    tok = byte_tokenizer()
    prompts = [ro.chat_prompt(tok, [{"role": "user", "content": q}], {"question": q}) for q in QUESTIONS]
    before = _held_out_reward(tiny_decoder(seed=3), tok, prompts)
    out = {"before": before}
    for name, sign in (("grpo", 1.0), ("flipped", -1.0)):
        model = tiny_decoder(seed=3)
        res = run_grpo(model, tok, cycle_prompts(prompts, 0), toy_reward, CFG, TRAIN, steps=STEPS,
                       reward_weights={"toy": 1.0}, advantage_sign=sign, max_seq_len=256,
                       log=lambda s: None)
        out[name] = {"history": [h["reward_mean"] for h in res["history"]],
                     "after": _held_out_reward(model, tok, prompts), "res": res}
    return out


def test_grpo_raises_the_mean_reward_by_a_clear_margin(runs):
    before, after = runs["before"], runs["grpo"]["after"]
    hist = runs["grpo"]["history"]
    print(f"held-out reward before {before:.3f} after GRPO {after:.3f}; train curve {np.round(hist, 3)}")
    assert 0.05 < before < 0.2                      # the random policy's level, as expected
    assert after > before + 0.25                    # > 20 binomial std of the held-out mean
    assert np.mean(hist[-3:]) > np.mean(hist[:3]) + 0.25
    d = runs["grpo"]["res"]["diagnostics"]["metrics"]
    assert d["entropy"]["last"] < d["entropy"]["first"]  # the policy sharpened onto the reward


def test_flipped_advantages_do_not_raise_it(runs):
    before, after = runs["before"], runs["flipped"]["after"]
    hist = runs["flipped"]["history"]
    print(f"held-out reward before {before:.3f} after flipped GRPO {after:.3f}; curve {np.round(hist, 3)}")
    assert after < before - 0.05                    # it falls (same data, same seeds, sign flipped)
    assert np.mean(hist[-3:]) < np.mean(hist[:3])
