"""GRPO advantages, loss and step against NumPy implementations of the published formulas.

References (formulas only): DeepSeekMath (Shao et al. 2024) GRPO advantages, clipped surrogate,
per-sequence token mean and the k3 KL; Dr. GRPO (Liu et al. 2025) no std scaling and the constant
normaliser; DAPO (Yu et al. 2025) clip-higher and token-level mean; GSPO (Zheng et al. 2025)
length-normalised sequence ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.config import CONFIG_DIR, ConfigError, GRPOConfig, RunConfig, load
from jaxkd.rl import grpo as G

# ---------------------------------------------------------------------------------------------
# Fixed ragged data: 6 completions (2 prompts x K=3), padded to T=7; padding holds garbage.
# ---------------------------------------------------------------------------------------------

LENGTHS = [7, 3, 5, 1, 6, 4]
T = 7


def _data(seed: int = 0):
    rs = np.random.RandomState(seed)
    n = len(LENGTHS)
    mask = np.zeros((n, T), np.float32)
    for i, L in enumerate(LENGTHS):
        mask[i, :L] = 1
    old = rs.uniform(-4, -0.5, (n, T)).astype(np.float32)
    # ratios spread over both clip boundaries: log-ratio in [-0.6, 0.6]
    logp = (old + rs.uniform(-0.6, 0.6, (n, T))).astype(np.float32)
    ref = (old + rs.uniform(-0.5, 0.5, (n, T))).astype(np.float32)
    adv = np.array([1.3, -0.7, -0.6, 0.9, -1.1, 0.2], np.float32)
    # plant every case of the clip: A > 0 with r above 1 + eps_high (clipped) and below 1 - eps_low
    # (not clipped), A < 0 with r below 1 - eps_low (clipped) and above 1 + eps_high (not clipped)
    for (i, t), lr in {(0, 1): 0.5, (5, 2): 0.4, (0, 3): -0.45, (1, 0): -0.5, (2, 2): -0.35,
                       (4, 1): 0.45}.items():
        logp[i, t] = old[i, t] + lr
    pad = mask == 0
    old[pad], logp[pad], ref[pad] = np.nan, 1e3, -1e3  # must never reach the loss
    return logp, old, ref, adv, mask


def np_advantages(rewards, k, scaling, eps):
    out = np.zeros(len(rewards))
    for g in range(len(rewards) // k):
        r = np.asarray(rewards[g * k:(g + 1) * k], np.float64)
        mu = sum(r) / k
        sd = np.sqrt(sum((x - mu) ** 2 for x in r) / (k - 1))
        for j in range(k):
            if scaling == "group":
                out[g * k + j] = (r[j] - mu) / (sd + eps)
            elif scaling == "none":
                out[g * k + j] = r[j] - mu
    if scaling == "batch":
        all_r = np.asarray(rewards, np.float64)
        bs = np.sqrt(((all_r - all_r.mean()) ** 2).sum() / (len(all_r) - 1))
        for g in range(len(rewards) // k):
            mu = all_r[g * k:(g + 1) * k].mean()
            out[g * k:(g + 1) * k] = (all_r[g * k:(g + 1) * k] - mu) / (bs + eps)
    return out


def np_loss(logp, old, ref, adv, lengths, *, eps_low, eps_high, level, beta, mode, max_len):
    """Straight from the papers' sums, one token at a time (float64)."""
    per_seq_sum, per_seq_len = [], []
    clip_low = clip_high = ntok = 0
    for i, L in enumerate(lengths):
        lp, od, rf = (np.float64(x[i, :L]) for x in (logp, old, ref))
        s = np.exp(np.mean(lp - od)) if L else 1.0
        total = 0.0
        for t in range(L):
            r = np.exp(lp[t] - od[t]) if level == "token" else s
            c = min(max(r, 1 - eps_low), 1 + eps_high)
            loss_t = -min(r * adv[i], c * adv[i])
            kl = np.exp(rf[t] - lp[t]) - (rf[t] - lp[t]) - 1
            total += loss_t + beta * kl
            clip_low += r < 1 - eps_low and adv[i] < 0
            clip_high += r > 1 + eps_high and adv[i] > 0
            ntok += 1
        per_seq_sum.append(total)
        per_seq_len.append(L)
    live = [j for j, L in enumerate(per_seq_len) if L > 0]
    if mode == "token_mean":
        value = sum(per_seq_sum) / sum(per_seq_len)
    elif mode == "seq_mean_token_mean":
        value = sum(per_seq_sum[j] / per_seq_len[j] for j in live) / len(live)
    else:
        value = sum(per_seq_sum) / (len(live) * max_len)
    return value, clip_low / ntok, clip_high / ntok


def _jax_loss(logp, old, ref, adv, mask, *, mode="token_mean", level="token", beta=0.0,
              eps_low=0.2, eps_high=0.28, max_len=9, weights=None):
    w = G.loss_weights(mask, mode, max_len) if weights is None else weights
    return G.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask) > 0,
                       jnp.asarray(w), eps_low=eps_low, eps_high=eps_high, ratio_level=level, beta=beta,
                       ref_logp_bt=jnp.asarray(ref) if beta > 0 else None)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["group", "batch", "none"])
def test_advantages_match_numpy(scaling):
    rewards = np.array([0.1, 0.9, 0.4, 0.7, 0.7, 0.7, 2.0, -1.0, 0.5, 3.0, 3.0, 1.0])
    group = np.repeat(np.arange(4), 3)
    got = G.group_advantages(rewards, group, scaling=scaling, eps=1e-4)
    np.testing.assert_allclose(got, np_advantages(rewards, 3, scaling, 1e-4), rtol=1e-6, atol=1e-6)
    assert np.all(got[3:6] == 0)  # an all-equal group gives no signal in every mode
    if scaling == "group":  # each group standardised: mean 0, unit (Bessel) std up to eps
        for g in (0, 2, 3):
            assert abs(got[g * 3:(g + 1) * 3].mean()) < 1e-6
            assert abs(got[g * 3:(g + 1) * 3].std(ddof=1) - 1) < 1e-3


def test_zero_variance_groups_and_group_errors():
    rewards = np.array([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(G.zero_variance_groups(rewards, np.repeat(np.arange(3), 3)),
                                  [True, False, True])
    with pytest.raises(ValueError, match="group 1 has 1 completion"):
        G.group_advantages(np.ones(3), np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="unknown advantage scaling"):
        G.group_advantages(np.ones(4), np.array([0, 0, 1, 1]), scaling="global")


def test_combine_rewards_and_overlong_penalty():
    comps = {"tech": np.array([1.0, 0.0, 0.5]), "lang": np.array([0.0, 1.0, 0.5]), "extra": np.ones(3)}
    np.testing.assert_allclose(G.combine_rewards(comps, {"tech": 0.6, "lang": 0.4}), [0.6, 0.4, 0.5])
    np.testing.assert_allclose(G.combine_rewards(comps, {"tech": 1.0, "lang": 0.0}), comps["tech"])
    with pytest.raises(KeyError, match="'tech'"):
        G.combine_rewards({"lang": np.ones(2)}, {"tech": 0.6, "lang": 0.4})
    with pytest.raises(ValueError, match="non-finite"):
        G.combine_rewards({"tech": np.array([np.nan, 1.0])}, {"tech": 1.0})
    # DAPO soft overlong punishment: 0 until max - buffer, linear to -penalty at max
    np.testing.assert_allclose(G.overlong_penalty(np.array([10, 12, 14, 16, 20]), 20, 8, 1.0),
                               [0, 0, -0.25, -0.5, -1.0])
    assert not G.overlong_penalty(np.array([20]), 20, 0, 1.0).any()


# ---------------------------------------------------------------------------------------------
# Loss: ratio, clipping, KL, aggregation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_numpy(mode, level, beta):
    logp, old, ref, adv, mask = _data()
    loss, m = _jax_loss(logp, old, ref, adv, mask, mode=mode, level=level, beta=beta, max_len=9)
    want, low, high = np_loss(logp, old, ref, adv, LENGTHS, eps_low=0.2, eps_high=0.28, level=level,
                              beta=beta, mode=mode, max_len=9)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(float(m["clip_frac_low"]), low, atol=1e-7)
    np.testing.assert_allclose(float(m["clip_frac_high"]), high, atol=1e-7)
    if level == "token":  # the fixed data really exercises both sides of the clip
        assert low > 0 and high > 0
    if beta:
        kl = np.mean([np.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
                      for i, L in enumerate(LENGTHS) for t in range(L)])
        np.testing.assert_allclose(float(m["kl_ref"]), kl, rtol=1e-5)


def test_token_ratio_gradient_is_zero_exactly_where_the_clip_is_active():
    logp, old, ref, adv, mask = _data(1)
    w = G.loss_weights(mask, "token_mean", 9)
    beta = 0.04

    def f(lp):
        return G.grpo_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask) > 0, jnp.asarray(w),
                           eps_low=0.2, eps_high=0.28, beta=beta, ref_logp_bt=jnp.asarray(ref))[0]

    g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
    want = np.zeros_like(g)
    n_clipped = 0
    for i, L in enumerate(LENGTHS):
        for t in range(L):
            r = np.exp(np.float64(logp[i, t]) - old[i, t])
            a = adv[i]
            clipped = (a > 0 and r > 1.28) or (a < 0 and r < 0.8)
            n_clipped += clipped
            d_pg = 0.0 if clipped else -r * a                           # d/dlogp of -r A
            d_kl = -np.exp(ref[i, t] - logp[i, t]) + 1.0                  # d/dlogp of k3
            want[i, t] = w[i, t] * (d_pg + beta * d_kl)
    assert n_clipped >= 4
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)
    assert np.all(g[mask == 0] == 0)


def test_gspo_sequence_ratio_objective_and_gradient():
    """GSPO: J = 1/G sum_i min(s_i A_i, clip(s_i) A_i), s_i = (prod_t pi/pi_old)^(1/|o_i|); the
    gradient flows through every token as s_i A_i / |o_i| (zero for a clipped sequence)."""
    logp, old, ref, adv, mask = _data(2)
    w = G.loss_weights(mask, "seq_mean_token_mean", 9)

    def f(lp):
        return G.grpo_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask) > 0, jnp.asarray(w),
                           eps_low=0.05, eps_high=0.05, ratio_level="sequence")[0]

    loss, g = jax.value_and_grad(f)(jnp.asarray(logp))
    s = np.array([np.exp(np.mean(np.float64(logp[i, :L]) - old[i, :L])) for i, L in enumerate(LENGTHS)])
    clip = np.clip(s, 0.95, 1.05)
    np.testing.assert_allclose(float(loss), -np.mean(np.minimum(s * adv, clip * adv)), rtol=1e-6)
    G_ = len(LENGTHS)
    clipped = ((adv > 0) & (s > 1.05)) | ((adv < 0) & (s < 0.95))
    assert clipped.any() and (~clipped).any()
    for i, L in enumerate(LENGTHS):
        expect = 0.0 if clipped[i] else -s[i] * adv[i] / L / G_
        np.testing.assert_allclose(np.asarray(g)[i, :L], expect, rtol=1e-5, atol=1e-8)


def test_all_masked_rows_and_padding_garbage_are_harmless():
    logp, old, ref, adv, mask = _data()
    mask2 = mask.copy()
    mask2[1] = 0  # a dropped completion (e.g. masked truncation)
    for mode in ("token_mean", "seq_mean_token_mean", "dr_grpo"):
        loss, _ = _jax_loss(logp, old, ref, adv, mask2, mode=mode, beta=0.04)
        lengths = [L if i != 1 else 0 for i, L in enumerate(LENGTHS)]
        want, _, _ = np_loss(logp, old, ref, adv, lengths, eps_low=0.2, eps_high=0.28, level="token",
                             beta=0.04, mode=mode, max_len=9)
        np.testing.assert_allclose(float(loss), want, rtol=2e-6)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_micro_batch_losses_sum_to_the_full_batch_loss(mode):
    logp, old, ref, adv, mask = _data(3)
    full_w = G.loss_weights(mask, mode, 9)
    full, _ = _jax_loss(logp, old, ref, adv, mask, mode=mode, beta=0.04, weights=full_w)
    grad_full = jax.grad(lambda lp: _jax_loss(lp, old, ref, adv, mask, mode=mode, beta=0.04,
                                              weights=full_w)[0])(jnp.asarray(logp))
    parts, naive, grads = 0.0, 0.0, []
    for s in (slice(0, 2), slice(2, 4), slice(4, 6)):  # 10, 6 and 10 tokens: unequal micro-batches
        args = (logp[s], old[s], ref[s], adv[s], mask[s])
        parts += float(_jax_loss(*args, mode=mode, beta=0.04, weights=full_w[s])[0])
        naive += float(_jax_loss(*args, mode=mode, beta=0.04)[0])  # normalised per micro-batch
        grads.append(np.asarray(jax.grad(lambda lp: _jax_loss(lp, *args[1:], mode=mode, beta=0.04,
                                                              weights=full_w[s])[0])(jnp.asarray(logp[s]))))
    np.testing.assert_allclose(parts, float(full), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(grad_full), rtol=1e-6, atol=1e-9)
    assert abs(naive - float(full)) > 0.05 * abs(float(full))  # why the global weights are needed


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(num_generations=1), r"grpo.num_generations \(K\) must be >= 2"),
    (dict(eps_low=0.0), r"grpo.eps_low must be in \(0, 1\)"),
    (dict(eps_low=1.2), r"grpo.eps_low must be in \(0, 1\)"),
    (dict(eps_high=-0.1), r"grpo.eps_high must be > 0"),
    (dict(aggregation="mean"), r"grpo.aggregation: 'mean' is not allowed; allowed values: "
                               r"\['token_mean', 'seq_mean_token_mean', 'dr_grpo'\]"),
    (dict(ratio_level="seq"), r"grpo.ratio_level: 'seq' is not allowed"),
    (dict(adv_scaling="std"), r"grpo.adv_scaling: 'std' is not allowed"),
    (dict(temperature=0.0), r"grpo.temperature must be > 0"),
    (dict(beta=-1.0), r"grpo.beta must be >= 0"),
    (dict(mu=0), r"grpo.mu must be >= 1"),
    (dict(top_p=0.0), r"grpo.top_p must be in \(0, 1\]"),
    (dict(overlong_buffer=128), r"grpo.overlong_buffer must be in \[0, max_new_tokens=128\)"),
    (dict(w_tech=0.0, w_lang=0.0), r"grpo.w_tech and grpo.w_lang are both 0"),
])
def test_config_errors_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        GRPOConfig(**kw)


def test_config_loader_and_defaults():
    for other in ("cpu_corpus.yaml", "qwen2.5-7b-to-1.5b.yaml"):  # configs without a grpo section
        assert load(RunConfig, CONFIG_DIR / other).grpo == GRPOConfig()
    cfg = load(RunConfig, CONFIG_DIR / "cpu_default.yaml")
    g = cfg.grpo  # cpu_default's grpo section: from the KD run, judged by the base 0.5B preset
    assert g.init == "runs/kd-cpu" and g.judge.model == "qwen2.5-coder-0.5b-instruct" and g.rows == 8
    assert g.train.steps % g.mu == 0 and g.train.trainable == "no_embed"
    # a partly overridden section keeps the field's own defaults (the judge stays the 0.5B preset)
    assert GRPOConfig().judge.model == "qwen2.5-coder-0.5b-instruct"
    assert load(RunConfig, None, ["grpo.judge.batch_size=4"]).grpo.judge.model == "qwen2.5-coder-0.5b-instruct"
    with pytest.raises(ConfigError, match=r"set grpo.w_tech / grpo.w_lang"):
        load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["grpo.reward.w_lang=0"])
    with pytest.raises(ConfigError, match=r"multiples of grpo.mu \(2\)"):
        load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["grpo.mu=2", "grpo.train.steps=5"])
    d = GRPOConfig()
    assert d.top_k == 0 and d.top_p == 1.0 and d.aggregation == "token_mean" and d.beta == 0.0
    cfg = load(RunConfig, CONFIG_DIR / "cpu_default.yaml",
               ["grpo.num_generations=8", "grpo.w_lang=0", "grpo.diagnostics.max_kl=0.2"])
    assert cfg.grpo.num_generations == 8 and cfg.grpo.w_lang == 0 and cfg.grpo.diagnostics.max_kl == 0.2
    with pytest.raises(ConfigError, match=r"grpo.aggregation: 'sum' is not allowed"):
        load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["grpo.aggregation=sum"])
    with pytest.raises(ConfigError, match=r"grpo.num_generations \(K\) must be >= 2"):
        load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["grpo.num_generations=1"])
    with pytest.raises(ConfigError, match=r"unknown config key grpo.epsilon_low"):
        load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["grpo.epsilon_low=0.2"])


# ---------------------------------------------------------------------------------------------
# The update step on a tiny model
# ---------------------------------------------------------------------------------------------


def _tiny_step_setup(seed=0, n=4, t=24, prompt=8):
    from test_train_fixtures import tiny_decoder
    from jaxkd.train import state as st

    model = tiny_decoder(seed=seed)
    graphdef, params, frozen = st.split_model(model, "all")
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, 256, (n, t)).astype(np.int32)
    mask = np.zeros((n, t), np.float32)
    for i, L in enumerate([16, 9, 12, 5][:n]):
        mask[i, prompt - 1:prompt - 1 + L] = 1
    batch = {"input_ids": ids, "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1)),
             "segment_ids": np.ones((n, t), np.int32), "targets": np.roll(ids, -1, axis=1),
             "completion_mask": mask, "advantages": np.array([1.0, -0.5, 0.8, -1.3], np.float32)[:n]}
    return graphdef, params, frozen, batch


def _with_old_logp(graphdef, params, frozen, batch, cfg, mode):
    lp, _ = G.policy_logprobs(graphdef, params, frozen, {k: jnp.asarray(v) for k, v in batch.items()},
                              cfg.temperature)
    return {**batch, "old_logp": np.asarray(lp), "loss_weights": G.loss_weights(batch["completion_mask"], mode,
                                                                                 cfg.max_new_tokens)}


def _count_prims(jaxpr, name: str) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_prims(inner, name)
    return n


def test_no_reference_forward_when_beta_is_zero():
    graphdef, params, frozen, batch = _tiny_step_setup()
    tx = optax.sgd(0.1)
    counts = {}
    for beta in (0.0, 0.05):
        cfg = GRPOConfig(beta=beta, max_new_tokens=16)
        b = _with_old_logp(graphdef, params, frozen, batch, cfg, cfg.aggregation)
        step = G.make_grpo_step(graphdef, tx, cfg)
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                 "rng": jnp.zeros((2,), jnp.uint32)}
        extra = {"frozen": frozen} if beta == 0 else {"frozen": frozen, "ref_params": params}
        counts[beta] = _count_prims(jax.make_jaxpr(step)(state, b, extra).jaxpr, "dot_general")
        if beta:
            with pytest.raises(ValueError, match=r"extra\['ref_params'\]"):
                jax.make_jaxpr(step)(state, b, {"frozen": frozen})
    fwd = _count_prims(jax.make_jaxpr(lambda p: G.policy_logprobs(graphdef, p, frozen, batch, 1.0)[0])(
        params).jaxpr, "dot_general")
    assert fwd > 0 and counts[0.05] - counts[0.0] == fwd  # exactly one extra (reference) forward


def test_grad_accumulation_with_multisteps_equals_the_full_batch_update():
    graphdef, params, frozen, batch = _tiny_step_setup(seed=1)
    for mode in ("token_mean", "seq_mean_token_mean", "dr_grpo"):
        cfg = GRPOConfig(aggregation=mode, beta=0.02, max_new_tokens=16)
        b = _with_old_logp(graphdef, params, frozen, batch, cfg, mode)
        b["old_logp"] = b["old_logp"] + np.float32(0.1) * np.sign(b["advantages"])[:, None]  # r != 1
        extra = {"frozen": frozen, "ref_params": params}

        def run(tx, accum, slices):
            state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                     "rng": jnp.zeros((2,), jnp.uint32)}
            step = jax.jit(G.make_grpo_step(graphdef, tx, cfg, accum_steps=accum))
            losses = []
            for s in slices:
                state, m = step(state, {k: v[s] for k, v in b.items()}, extra)
                losses.append(float(m["loss"]))
            return state["params"], sum(losses)

        p_full, l_full = run(optax.sgd(1.0), 1, [slice(0, 4)])
        p_acc, l_acc = run(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2), 2, [slice(0, 2), slice(2, 4)])
        np.testing.assert_allclose(l_acc, l_full, rtol=1e-5)
        moved = 0.0
        for a, c, p0 in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_full), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=2e-7)
            moved = max(moved, float(np.abs(np.asarray(c) - np.asarray(p0)).max()))
        assert moved > 1e-4  # the update is not trivially zero


def test_mu_inner_updates_keep_old_logprobs_fixed():
    """First update: ratio exactly 1 (old = current policy); second: the policy has moved."""
    graphdef, params, frozen, batch = _tiny_step_setup(seed=2)
    cfg = GRPOConfig(mu=2, max_new_tokens=16)
    b = _with_old_logp(graphdef, params, frozen, batch, cfg, cfg.aggregation)
    tx = optax.adam(3e-2)
    state = {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32)}
    step = jax.jit(G.make_grpo_step(graphdef, tx, cfg), donate_argnums=(0,))
    ms = []
    for _ in range(cfg.mu):
        state, m = step(state, b, {"frozen": frozen})
        ms.append({k: float(v) for k, v in m.items()})
    assert max(abs(ms[0]["ratio_max"] - 1), abs(ms[0]["ratio_min"] - 1)) < 1e-5
    assert ms[0]["approx_kl_old"] < 1e-9 and ms[0]["clip_frac"] == 0
    assert ms[1]["ratio_max"] - ms[1]["ratio_min"] > 0.05 and ms[1]["approx_kl_old"] > 1e-4
    assert ms[1]["loss"] < ms[0]["loss"]  # the surrogate improved
    assert 0 < ms[0]["entropy"] <= np.log(263) + 1e-4
