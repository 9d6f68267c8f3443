"""GRPO: group-relative advantages, the clipped policy loss and the pure update step.

Notation: a rollout batch holds G prompts x K completions o_i; r_i is a completion's reward,
pi the policy being trained, pi_old the policy that sampled (fixed for the ``mu`` updates of a
batch), pi_ref the frozen reference (the initial policy). Per completion token t:

  advantage   A_i = (r_i - mean_group(r)) / (std_group(r) + eps)      (DeepSeekMath GRPO, 2024)
                    std over the whole batch instead ("batch"), or no division ("none", Dr. GRPO)
  ratio       w_it = exp(log pi(o_it) - log pi_old(o_it))                       (token level)
              s_i  = exp(mean_t [log pi(o_it) - log pi_old(o_it)])    (GSPO 2025: sequence level)
  surrogate   -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A)       (eps_high > eps_low: DAPO)
  k3 KL       exp(ref - logp) - (ref - logp) - 1        (unbiased, always >= 0; DeepSeekMath)
  per token   l_it = surrogate + beta * KL

Aggregation of l_it into one number (``aggregation``):
  token_mean           sum_it l_it / sum_i |o_i|                         (DAPO token-level)
  seq_mean_token_mean  1/G' sum_i (1/|o_i|) sum_t l_it                   (original GRPO)
  dr_grpo              sum_it l_it / (G' * max_new_tokens)               (Dr. GRPO constant)
with G' the number of completions that are in the loss (masked-out ones, e.g. truncated with
``mask_truncated`` or dropped zero-variance groups, do not count). Each mode is a per-token weight
``w_it`` computed once over the whole rollout batch (``loss_weights``), so a micro-batch's loss
``sum w_it l_it`` over its own rows adds up over micro-batches to the full-batch loss exactly;
that is what makes gradient accumulation exact.

Log-probs are those of the distribution the sampler draws from (``jaxkd.models.sampling``:
temperature, then top-k / top-p, over the tokenizer's real vocabulary), so the importance ratio
compares the trainer's policy with exactly the policy that sampled.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd.config import GRPOConfig
from jaxkd.models.sampling import SamplerKind
from jaxkd.models.sampling import policy_logprobs as sampler_policy_logprobs

Array = jax.Array
Aggregation = Literal["token_mean", "seq_mean_token_mean", "dr_grpo"]


# --------------------------------------------------------------------------------------------
# Teacher-forced log-probs
# --------------------------------------------------------------------------------------------


def token_logprobs(logits_btv: Array, targets_bt: Array, temperature: float,
                   with_entropy: bool = False, *, vocab: int = 0, top_k: int = 0,
                   top_p: float = 1.0) -> tuple[Array, Array | None]:
    """log pi(target) ``[B, T]`` (float32) under the sampling policy: ``softmax(logits /
    temperature)`` restricted to the first ``vocab`` logits (0: all) and to the top-k / top-p set
    (``jaxkd.models.sampling.process_logits``, the sampler's own function), and that policy's
    entropy per position (no gradient) when asked."""
    kind = SamplerKind(greedy=False, top_k=top_k, use_top_p=top_p < 1.0, vocab=vocab)
    logp_btv = sampler_policy_logprobs(logits_btv, jnp.float32(temperature), jnp.float32(top_p), kind)
    logp_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy_bt = None
    if with_entropy:
        # Reuses the log-softmax above: one extra elementwise pass over [B, T, V], no new matmul.
        # Tokens outside the policy's support are -inf: they add 0 (not 0 * -inf = NaN).
        lp = jax.lax.stop_gradient(logp_btv)
        entropy_bt = -jnp.sum(jnp.where(jnp.isfinite(lp), jnp.exp(lp) * lp, 0.0), axis=-1)
    return logp_bt, entropy_bt


def policy_logprobs(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
                    batch: Mapping[str, Array], temperature: float,
                    with_entropy: bool = False, *, vocab: int = 0, top_k: int = 0,
                    top_p: float = 1.0) -> tuple[Array, Array | None]:
    """Teacher-forced per-token log-probs of ``batch["targets"]`` (position t predicts token t+1)
    under the model ``merge(graphdef, params, frozen)`` and the sampling policy of
    ``token_logprobs``."""
    model = nnx.merge(graphdef, params, frozen)
    logits_btv, _ = model(batch["input_ids"], batch["positions"], segment_ids_bt=batch["segment_ids"])
    return token_logprobs(logits_btv, batch["targets"], temperature, with_entropy, vocab=vocab, top_k=top_k,
                          top_p=top_p)


# --------------------------------------------------------------------------------------------
# Rewards -> advantages (host side: rewards are host data)
# --------------------------------------------------------------------------------------------


def combine_rewards(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """R = sum_k weights[k] * components[k]; a weighted name missing from ``components`` is an error
    (a silent zero would hide a broken scorer). Components without a weight are logged only."""
    missing = [k for k, w in weights.items() if w != 0 and k not in components]
    if missing:
        raise KeyError(f"reward components {missing} have non-zero weights but the reward function "
                       f"returned only {sorted(components)}")
    n = {len(np.asarray(v)) for v in components.values()}
    if len(n) > 1:
        raise ValueError(f"reward components differ in length: { {k: len(v) for k, v in components.items()} }")
    total = np.zeros(n.pop() if n else 0, np.float64)
    for k, w in weights.items():
        if w != 0:
            v = np.asarray(components[k], np.float64)
            if not np.isfinite(v).all():
                raise ValueError(f"reward component {k!r} has non-finite values: {v}")
            total = total + w * v
    return total


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int, penalty: float) -> np.ndarray:
    """DAPO's soft overlong punishment (<= 0): nothing up to ``max_new_tokens - buffer`` tokens,
    then linear down to ``-penalty`` at ``max_new_tokens``. ``buffer`` 0 switches it off."""
    lengths = np.asarray(lengths, np.float64)
    if buffer <= 0:
        return np.zeros_like(lengths)
    start = max_new_tokens - buffer
    return -penalty * np.clip((lengths - start) / buffer, 0.0, 1.0)


def zero_variance_groups(rewards: np.ndarray, group: np.ndarray, atol: float = 1e-6) -> np.ndarray:
    """Bool per group id (``0..G-1``): all K rewards equal, so every advantage in it is 0."""
    rewards, group = np.asarray(rewards, np.float64), np.asarray(group)
    n = int(group.max()) + 1 if group.size else 0
    out = np.zeros(n, bool)
    for g in range(n):
        r = rewards[group == g]
        out[g] = r.size > 0 and float(r.max() - r.min()) <= atol
    return out


def group_advantages(rewards: np.ndarray, group: np.ndarray, *, scaling: str = "group",
                     eps: float = 1e-4) -> np.ndarray:
    """Per-completion advantages (float32). ``group[i]`` is completion i's prompt (0..G-1).

    scaling "group": (r - group mean) / (group std + eps); "batch": (r - group mean) / (batch std
    + eps); "none": r - group mean (Dr. GRPO). Standard deviations use Bessel's correction (as
    TRL does; DeepSeekMath leaves it unstated).
    """
    rewards, group = np.asarray(rewards, np.float64), np.asarray(group)
    if rewards.shape != group.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and group {group.shape} must be equal 1-D shapes")
    if scaling not in ("group", "batch", "none"):
        raise ValueError(f"unknown advantage scaling {scaling!r}; allowed: ['group', 'batch', 'none']")
    mean = np.zeros_like(rewards)
    std = np.zeros_like(rewards)
    for g in np.unique(group):
        sel = group == g
        if sel.sum() < 2:
            raise ValueError(f"group {g} has {int(sel.sum())} completion(s); GRPO needs >= 2 per prompt")
        r = rewards[sel]
        # all-equal rewards: exactly zero advantage (a float mean can miss r by 1 ulp)
        mean[sel] = r[0] if r.min() == r.max() else r.mean()
        std[sel] = r.std(ddof=1)
    if scaling == "group":
        adv = (rewards - mean) / (std + eps)
    elif scaling == "batch":
        adv = (rewards - mean) / (rewards.std(ddof=1) + eps)
    else:
        adv = rewards - mean
    return adv.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def aggregation_weights(mask_bt: Array | np.ndarray, mode: Aggregation, *, n_seqs: Any, n_tokens: Any,
                        max_len: int) -> Array:
    """Per-token weights ``[B, T]`` whose dot product with per-token losses is the aggregated loss.

    ``n_seqs`` / ``n_tokens`` are the counts over the WHOLE rollout batch (not this slice of it),
    so slices of one weight array sum to the full-batch value.
    """
    mask = jnp.asarray(mask_bt, jnp.float32)
    if mode == "token_mean":
        return mask / jnp.maximum(jnp.float32(n_tokens), 1.0)
    if mode == "seq_mean_token_mean":
        len_b1 = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
        return mask / len_b1 / jnp.maximum(jnp.float32(n_seqs), 1.0)
    if mode == "dr_grpo":
        return mask / (jnp.maximum(jnp.float32(n_seqs), 1.0) * jnp.float32(max_len))
    raise ValueError(f"unknown grpo.aggregation {mode!r}; allowed: ['token_mean', 'seq_mean_token_mean', "
                     f"'dr_grpo']")


def loss_weights(mask_bt: np.ndarray, mode: Aggregation, max_len: int) -> np.ndarray:
    """``aggregation_weights`` for a whole rollout batch (counts taken from ``mask_bt`` itself)."""
    mask = np.asarray(mask_bt, np.float32)
    n_seqs = int((mask.sum(-1) > 0).sum())
    return np.asarray(aggregation_weights(mask, mode, n_seqs=n_seqs, n_tokens=float(mask.sum()),
                                          max_len=max_len))


def _masked_mean(x: Array, mask: Array) -> Array:
    return jnp.where(mask, x, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def grpo_loss(logp_bt: Array, old_logp_bt: Array, advantages_b: Array, mask_bt: Array,
              weights_bt: Array, *, eps_low: float, eps_high: float,
              ratio_level: Literal["token", "sequence"] = "token", beta: float = 0.0,
              ref_logp_bt: Array | None = None) -> tuple[Array, dict]:
    """Clipped-surrogate GRPO loss (+ beta x k3 KL) aggregated with ``weights_bt``; float32.

    ``mask_bt`` marks completion tokens in the loss, ``weights_bt`` comes from
    ``aggregation_weights`` (zero off the mask). Returns ``(loss, metrics)``; metrics are means
    over this batch's masked tokens.
    """
    mask = mask_bt > 0
    logp = logp_bt.astype(jnp.float32)
    old = old_logp_bt.astype(jnp.float32)
    adv_b1 = advantages_b.astype(jnp.float32)[:, None]
    # `where` first: padded positions may hold anything, and exp() of it must not reach a sum.
    log_ratio_bt = jnp.where(mask, logp - old, 0.0)
    if ratio_level == "sequence":
        len_b1 = jnp.maximum(mask.sum(-1, keepdims=True), 1)
        log_ratio_bt = jnp.broadcast_to(log_ratio_bt.sum(-1, keepdims=True) / len_b1, logp.shape)
    elif ratio_level != "token":
        raise ValueError(f"unknown grpo.ratio_level {ratio_level!r}; allowed: ['token', 'sequence']")
    ratio_bt = jnp.exp(log_ratio_bt)
    clipped_bt = jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high)
    pg_bt = -jnp.minimum(ratio_bt * adv_b1, clipped_bt * adv_b1)
    per_token_bt = pg_bt
    metrics: dict[str, Array] = {}
    if beta > 0.0:
        if ref_logp_bt is None:
            raise ValueError("grpo.beta > 0 needs the reference log-probs (ref_logp_bt)")
        d_bt = jnp.where(mask, ref_logp_bt.astype(jnp.float32) - logp, 0.0)
        kl_bt = jnp.exp(d_bt) - d_bt - 1.0
        per_token_bt = per_token_bt + beta * kl_bt
        metrics["kl_ref"] = _masked_mean(kl_bt, mask)
    w = weights_bt.astype(jnp.float32)
    loss = jnp.where(mask, per_token_bt * w, 0.0).sum()
    d_old = jnp.where(mask, old - logp, 0.0)
    low = (ratio_bt < 1.0 - eps_low) & (adv_b1 < 0)   # the clip is active: no gradient there
    high = (ratio_bt > 1.0 + eps_high) & (adv_b1 > 0)
    metrics.update({
        "pg_loss": jnp.where(mask, pg_bt * w, 0.0).sum(),
        "clip_frac_low": _masked_mean(low.astype(jnp.float32), mask),
        "clip_frac_high": _masked_mean(high.astype(jnp.float32), mask),
        "ratio_mean": _masked_mean(ratio_bt, mask),
        "ratio_min": jnp.min(jnp.where(mask, ratio_bt, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(mask, ratio_bt, -jnp.inf)),
        # KL(pi_old || pi) estimated (k3) on the sampled tokens: how far the updates have moved.
        "approx_kl_old": _masked_mean(jnp.exp(d_old) - d_old - 1.0, mask),
        "tokens": mask.sum().astype(jnp.float32),
    })
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    return loss, metrics


# --------------------------------------------------------------------------------------------
# The update step
# --------------------------------------------------------------------------------------------

def grpo_objective(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, ref_params: nnx.State | None,
                   batch: Mapping[str, Array], cfg: GRPOConfig, *, vocab: int = 0,
                   ref_graphdef: nnx.GraphDef | None = None) -> tuple[Array, dict]:
    """``(loss, metrics)`` of one (micro-)batch: the policy forward (+ the reference forward only
    when ``cfg.beta`` > 0), ``grpo_loss`` and the policy entropy on completion tokens.

    ``ref_graphdef`` (LoRA): the policy's graphdef with its adapters off
    (``jaxkd.models.lora.lora_graphdef(model, False)``); the reference is then the base model,
    computed from the policy's own state, and ``ref_params`` is not needed."""
    sampler = dict(vocab=vocab, top_k=cfg.top_k, top_p=cfg.top_p)
    logp_bt, entropy_bt = policy_logprobs(graphdef, params, frozen, batch, cfg.temperature,
                                          with_entropy=True, **sampler)
    ref_logp_bt = None
    if cfg.beta > 0.0:
        ref_def = graphdef
        if ref_graphdef is not None:
            ref_def, ref_params = ref_graphdef, jax.lax.stop_gradient(params)  # adapters off: unread
        elif ref_params is None:
            raise ValueError("grpo.beta > 0 needs the reference params (extra['ref_params'])")
        ref_logp_bt, _ = policy_logprobs(ref_def, ref_params, frozen, batch, cfg.temperature, **sampler)
        ref_logp_bt = jax.lax.stop_gradient(ref_logp_bt)
    mask = batch["completion_mask"] > 0
    loss, metrics = grpo_loss(logp_bt, batch["old_logp"], batch["advantages"], mask,
                              batch["loss_weights"], eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                              ratio_level=cfg.ratio_level, beta=cfg.beta, ref_logp_bt=ref_logp_bt)
    metrics["entropy"] = _masked_mean(entropy_bt, mask)
    return loss, metrics


STEP_BATCH_KEYS = ("input_ids", "positions", "segment_ids", "targets", "completion_mask",
                   "loss_weights", "old_logp", "advantages")


def make_grpo_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: GRPOConfig, *,
                   accum_steps: int = 1, vocab: int = 0) -> Callable[[dict, Mapping[str, Array], Mapping[str, Any]],
                                                     tuple[dict, dict]]:
    """The pure ``step(state, batch, extra) -> (state, metrics)``; jit it with ``donate_argnums=0``.

    state  {"params", "opt_state", "step", "rng"} as in ``jaxkd.train.state.init_state``.
    batch  the ``STEP_BATCH_KEYS`` of a (micro-)batch from ``rollout.pack_batch`` + ``loss_weights``.
    extra  {"frozen": non-trainable model state, "ref_params": reference trainable params (only
           read when cfg.beta > 0; without it no reference forward is traced)}; never differentiated.
    ``accum_steps``: micro-batches per optimizer update. Their losses already sum to the full
    batch loss; ``optax.MultiSteps`` averages gradients, so the gradient is scaled by
    ``accum_steps`` to make that average equal the full-batch gradient (the ``grad_norm``
    metric is of that scaled micro-batch gradient). ``metrics["loss"]`` is the micro-batch's
    share: summed over the micro-batches of one update it is the full-batch loss.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

    def loss_fn(params, frozen, ref_params, batch):
        loss, metrics = grpo_objective(graphdef, params, frozen, ref_params, batch, cfg, vocab=vocab)
        return loss * accum_steps, (loss, metrics)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: dict, batch: Mapping[str, Array], extra: Mapping[str, Any]) -> tuple[dict, dict]:
        ref_params = None
        if cfg.beta > 0.0:
            ref_params = extra.get("ref_params")
            if ref_params is None:
                raise ValueError("grpo.beta > 0: pass the reference params as extra['ref_params']")
        feed = {k: batch[k] for k in STEP_BATCH_KEYS}
        (_, (loss, metrics)), grads = grad_fn(state["params"], extra["frozen"], ref_params, feed)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                "rng": state["rng"]}, metrics

    return step
