"""GRPO rollouts (K rows a prompt in one batch, packing, sampler vs trainer log-probs), the
reward-hacking diagnostics, and the loop's dynamic sampling / truncation masking."""

from __future__ import annotations

import numpy as np
import pytest

from jaxkd.config import GRPOConfig, GRPODiagnosticsConfig, TrainConfig
from jaxkd.models.generate import Generator
from jaxkd.rl import diagnostics as D
from jaxkd.rl import rollout as ro
from jaxkd.train import state as st
from test_train_fixtures import ENDOFTEXT, IM_END, byte_tokenizer, tiny_decoder

QUESTIONS = ["how do I pair my earbuds?", "why is the speaker quiet?"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=3)


@pytest.fixture(scope="module")
def gen(model, tok):
    return Generator(model, tok, max_seq_len=256, prompt_bucket=64)


def _prompts(tok, qs=QUESTIONS):
    return [ro.chat_prompt(tok, [{"role": "user", "content": q}], {"question": q, "id": i})
            for i, q in enumerate(qs)]


def test_k_rows_of_a_prompt_are_distinct_samples_and_seeds_reproduce(gen, tok):
    cfg = GRPOConfig(num_generations=8, prompts_per_step=2, max_new_tokens=12)
    prompts = _prompts(tok)
    a = ro.generate_rollouts(gen, prompts, cfg, seed=5)
    assert a.rows == 16 and a.group.tolist() == [0] * 8 + [1] * 8
    for g in (0, 1):
        rows = {tuple(a.completion_ids[i]) for i in np.flatnonzero(a.group == g)}
        assert len(rows) == 8  # every row of the same prompt drew its own sample
    assert ro.identical_group_frac(a) == 0.0
    b = ro.generate_rollouts(gen, prompts, cfg, seed=5)
    c = ro.generate_rollouts(gen, prompts, cfg, seed=6)
    assert b.completion_ids == a.completion_ids
    assert sum(x != y for x, y in zip(c.completion_ids, a.completion_ids)) >= 14
    # finished rows end with the EOS the policy drew; truncated rows used the whole budget
    eos = {IM_END, ENDOFTEXT}
    assert a.truncated.any() and (~a.truncated).any()  # seed 5 gives both kinds (deterministic)
    for ids, trunc, lp in zip(a.completion_ids, a.truncated, a.sampler_logprobs):
        assert len(lp) == len(ids) and not any(t in eos for t in ids[:-1])
        assert (ids[-1] in eos) != trunc and (not trunc or len(ids) == 12)
    assert a.meta[9]["question"] == QUESTIONS[1]


def test_pack_batch_layout_by_hand():
    prompts = [ro.Prompt(ids=(1, 2, 3), meta={}), ro.Prompt(ids=(4, 5, 6, 7, 8), meta={})]
    roll = ro.Rollout(prompts=prompts, group=np.array([0, 0, 1, 1]),
                      completion_ids=[[10, 11, IM_END], [12], [13, 14], [ENDOFTEXT]],
                      completion_text=["", "", "", ""], truncated=np.array([False, True, True, False]),
                      sampler_logprobs=[np.array([-1, -2, -3.]), np.array([-4.]), np.array([-5, -6.]),
                                        np.array([-7.])], sampler_logprob_kind="policy")
    b = ro.pack_batch(roll, pad_id=0, bucket=8)
    assert b["input_ids"].shape == (4, 8)
    np.testing.assert_array_equal(b["input_ids"][0], [1, 2, 3, 10, 11, IM_END, 0, 0])
    np.testing.assert_array_equal(b["targets"][0, :5], [2, 3, 10, 11, IM_END])
    np.testing.assert_array_equal(b["completion_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["sampler_logp"][0], [0, 0, -1, -2, -3, 0, 0, 0])
    np.testing.assert_array_equal(b["segment_ids"][2], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["positions"][2, :7], np.arange(7))
    np.testing.assert_array_equal(b["completion_mask"][2], [0, 0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(b["targets"][2, 4:6], [13, 14])
    np.testing.assert_array_equal(b["completion_mask"][3], [0, 0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["lengths"], [3, 1, 2, 1])
    np.testing.assert_array_equal(b["truncated"], [False, True, True, False])
    # every masked position's target is the completion token, in order
    for i in range(4):
        np.testing.assert_array_equal(b["targets"][i][b["completion_mask"][i] > 0], roll.completion_ids[i])
    with pytest.raises(ValueError, match="seq_len is 5"):
        ro.pack_batch(roll, pad_id=0, seq_len=5)
    sub = roll.select_groups([1])
    assert sub.group.tolist() == [0, 0] and sub.completion_ids == [[13, 14], [ENDOFTEXT]]
    both = ro.concat_rollouts([sub, roll.select_groups([0])])
    assert both.group.tolist() == [0, 0, 1, 1] and both.prompts[1] == prompts[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_the_teacher_forced_recomputation(gen, tok, model, temperature):
    cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_new_tokens=12, temperature=temperature)
    roll = ro.generate_rollouts(gen, _prompts(tok), cfg, seed=1)
    batch = ro.pack_batch(roll, pad_id=gen.pad_id)
    graphdef, params, frozen = st.split_model(model, "all")
    assert gen.vocab == 259 < model.cfg.vocab_size  # the sampler never draws the padded rows
    pol, base = ro.recompute_logprobs(ro.make_logprob_fn(graphdef, temperature, vocab=gen.vocab), params,
                                      frozen, batch, 4)
    m = batch["completion_mask"]
    # the sampler reports the log-prob under the policy it drew from (tempered, real vocabulary)
    assert roll.sampler_logprob_kind == "policy" and not ro.needs_recompute(cfg, "policy")
    assert ro.needs_recompute(GRPOConfig(mu=2), "policy") and ro.needs_recompute(GRPOConfig(top_k=20), "policy")
    gap = ro.logprob_gap(batch["sampler_logp"], pol, m)
    assert gap["logprob_gap_max"] < 1e-4, gap  # KV-cache sampler == full forward, token for token
    # ... and not the untempered full-vocabulary log-prob, which is measurably different
    assert ro.logprob_gap(batch["sampler_logp"], base, m)["logprob_gap_mean"] > 1e-3
    if temperature != 1.0:
        assert np.abs(pol - base)[m > 0].mean() > 0.01  # near-uniform random model
    # the check can fail: the same numbers one position off (interior tokens only) are far apart
    inner = m * np.roll(m, 1, axis=1)
    shifted = ro.logprob_gap(np.roll(batch["sampler_logp"], 1, axis=1), pol, inner)
    assert shifted["logprob_gap_mean"] > 100 * gap["logprob_gap_max"] and shifted["logprob_gap_mean"] > 1e-2


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_text_diagnostics_by_hand():
    g = np.array([0, 0, 1, 1])
    same = ["please contact our support team for more help today"] * 4
    assert D.boilerplate(same, g, 4) == (1.0, 1.0)
    diff = ["alpha beta gamma delta eps", "zeta eta theta iota kappa", "lam mu nu xi omicron",
            "pi rho sigma tau upsilon"]
    assert D.boilerplate(diff, g, 4) == (0.0, 0.0)
    np.testing.assert_allclose(D.distinct_n(["a b c", "a b d", "x y", "x y"], g, 1), (4 / 6 + 2 / 4) / 2)
    np.testing.assert_allclose(D.distinct_n(["a b c", "a b d", "x y", "x y"], g, 2), (3 / 4 + 1 / 2) / 2)
    np.testing.assert_allclose(D.self_repetition(["x y x y x y", "a b c"], 2), (0.6 + 0.0) / 2)
    np.testing.assert_allclose(D.overlap(["Unplug the router."], ["How do I reset my router?"]), 0.5)
    assert np.isnan(D.overlap(["anything"], [None]))
    lengths = np.array([3, 9, 4, 12])
    batch_corr, group_corr = D.length_reward_correlation(lengths, lengths * 0.1, g)
    assert batch_corr == pytest.approx(1.0) and group_corr == pytest.approx(1.0)
    _, anti = D.length_reward_correlation(lengths, -lengths * 0.1, g)
    assert anti == pytest.approx(-1.0)
    rec = D.rollout_diagnostics(same, g, np.array([1.0, 2, 3, 4]), np.array([9, 9, 9, 9]),
                                np.array([True, False, False, False]), questions=["support team?"] * 4,
                                zero_variance_frac=0.5)
    assert rec["truncation_rate"] == 0.25 and rec["question_overlap"] == 1.0 and rec["zero_variance_frac"] == 0.5
    assert np.isnan(rec["length_reward_corr"]) and np.isnan(rec["reference_overlap"])


def test_thresholds_warn_naming_the_check_and_the_tracker_summarises():
    cfg = GRPODiagnosticsConfig(min_entropy=0.05, max_kl=None)
    warns = D.check_thresholds({"entropy": 0.01, "kl_ref": 50.0, "clip_frac": float("nan"),
                                "length_reward_corr_group": 0.9}, cfg)
    assert warns == [
        "verbosity: length_reward_corr_group = 0.9 above max 0.6 (grpo.diagnostics.max_length_reward_corr)",
        "entropy: entropy = 0.01 below min 0.05 (grpo.diagnostics.min_entropy)"]  # kl off, NaN skipped
    tr = D.DiagnosticsTracker(cfg)
    assert tr.update(0, {"entropy": 1.0, "truncation_rate": 0.1}) == []
    assert len(tr.update(1, {"entropy": 0.02, "truncation_rate": 0.9})) == 2
    s = tr.summary()
    assert s["warnings"] == {"entropy": [1], "truncation": [1]}
    assert s["metrics"]["entropy"] == {"first": 1.0, "last": 0.02, "mean": 0.51, "min": 0.02, "max": 1.0}
    assert "| entropy | entropy | min 0.05 |" in tr.markdown()


# ---------------------------------------------------------------------------------------------
# The loop: dynamic sampling and truncation masking
# ---------------------------------------------------------------------------------------------


def _lowercase_reward(meta, texts):
    # prompt 0 always scores 0 (a zero-variance group); prompt 1 counts lowercase letters
    return {"toy": np.array([0.0 if m["id"] == 0 else sum(c.islower() and c.isascii() for c in t) / 8
                             for m, t in zip(meta, texts)])}


@pytest.mark.parametrize("mode, mask_truncated", [("off", False), ("drop", False), ("resample", False),
                                                  ("off", True)])
def test_loop_dynamic_sampling_and_masking(tok, mode, mask_truncated):
    from jaxkd.rl.loop import cycle_prompts, run_grpo

    cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_new_tokens=8, dynamic_sampling=mode,
                     mask_truncated=mask_truncated, max_resample_rounds=2,
                     diagnostics=GRPODiagnosticsConfig(max_zero_variance_frac=0.25))
    train = TrainConfig(steps=2, lr=1e-3, warmup_steps=0, trainable="all")
    lines: list[str] = []
    out = run_grpo(tiny_decoder(seed=3), tok, cycle_prompts(_prompts(tok), 0), _lowercase_reward, cfg, train,
                   steps=2, reward_weights={"toy": 1.0}, max_seq_len=256, log=lines.append)
    for h in out["history"]:
        assert np.isfinite(h["loss"]) and h["identical_group_frac"] == 0.0
        if mode == "resample":
            assert h["resample_rounds"] >= 1 and h["zero_variance_frac"] == 0.0 and h["rows_in_loss"] == 8
        else:
            assert h["zero_variance_frac"] == 0.5 and h["resample_rounds"] == 0
        if mode == "drop":
            assert h["rows_in_loss"] == 4
        if mode == "off":
            kept = round(8 * (1 - h["truncation_rate"])) if mask_truncated else 8
            assert h["rows_in_loss"] == kept
    warned = [x for x in lines if x.startswith("WARNING grpo step") and "zero_variance_groups" in x]
    assert len(warned) == (0 if mode == "resample" else 2)
    assert "zero_variance_frac = 0.5 above max 0.25" in "".join(warned) or mode == "resample"


def test_loop_under_lora_trains_only_adapters_with_the_base_as_reference(tok):
    """run_grpo with trainable=lora and beta > 0: adapters are attached, only they change, and the
    KL is measured against the base (adapters off; no ref_params copy)."""
    import jax
    from flax import nnx

    from jaxkd.models.lora import has_lora
    from jaxkd.rl.loop import cycle_prompts, run_grpo

    cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_new_tokens=8, beta=0.05)
    train = TrainConfig(steps=2, lr=1e-2, warmup_steps=0, trainable="lora", lora_rank=2)
    model = tiny_decoder(seed=3)
    base = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    out = run_grpo(model, tok, cycle_prompts(_prompts(tok), 0), _lowercase_reward, cfg, train, steps=2,
                   reward_weights={"toy": 1.0}, max_seq_len=256, log=lambda s: None)
    assert has_lora(model)
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))
             if isinstance(x, jax.Array)]
    assert len(after) == len(base) and all(np.array_equal(a, b) for a, b in zip(base, after))
    # step 0's policy is the base (B = 0): its KL to the reference is 0; after an update it is not
    kls = [h["kl_ref"] for h in out["history"]]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[1] > 0


def test_bf16_rollouts_take_log_pi_old_from_the_trainer(tok):
    """grpo.rollout_dtype=bfloat16: the rollouts' batched steps run on a bf16 copy, so the
    sampler's log-probs are not the f32 policy's; the loop recomputes log pi_old with the trainer's
    forward pass and logs the gap (absent, and not needed, with f32 rollouts)."""
    from jaxkd.rl.loop import cycle_prompts, run_grpo

    train = TrainConfig(steps=1, lr=1e-3, warmup_steps=0, trainable="all")
    gaps = {}
    for dtype in (None, "bfloat16"):
        cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_new_tokens=8, rollout_dtype=dtype)
        out = run_grpo(tiny_decoder(seed=3), tok, cycle_prompts(_prompts(tok), 0), _lowercase_reward, cfg, train,
                       steps=1, reward_weights={"toy": 1.0}, max_seq_len=256, log=lambda s: None)
        h = out["history"][0]
        assert np.isfinite(h["loss"])
        gaps[dtype] = h.get("logprob_gap_mean")
    assert gaps[None] is None
    assert 1e-4 < gaps["bfloat16"] < 0.5
