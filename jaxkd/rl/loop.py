"""A minimal GRPO loop: rollout -> reward -> advantages -> ``mu`` updates, with diagnostics.

Each iteration samples ``grpo.prompts_per_step`` prompts x K completions in one generation batch,
scores them with ``reward_fn(prompts_meta, completions_text) -> {name: [N] array}``, combines the
components with ``reward_weights`` (default ``{"tech": w_tech, "lang": w_lang}``), optionally
re-samples or drops zero-variance groups, builds group-relative advantages, and runs ``mu``
optimizer updates over the batch, each from ``train.grad_accum`` micro-batches.

This is the stand-alone loop for tests and small runs; the run-level facilities (checkpoints,
resume, metrics files) belong to the shared trainer, which calls the same pieces.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd.config import GRPOConfig, TrainConfig
from jaxkd.models.generate import Generator
from jaxkd.rl import rollout as ro
from jaxkd.rl.diagnostics import DiagnosticsTracker, rollout_diagnostics
from jaxkd.rl.grpo import (combine_rewards, group_advantages, loss_weights, make_grpo_step,
                           overlong_penalty, zero_variance_groups)
from jaxkd.sharding import mesh_context
from jaxkd.train import state as st

RewardFn = Callable[[list[Mapping[str, Any]], list[str]], Mapping[str, np.ndarray]]


def cycle_prompts(prompts: Sequence[ro.Prompt], seed: int) -> Callable[[int], list[ro.Prompt]]:
    """``next_prompts(n)``: prompts in a fresh seeded shuffle each pass over the list."""
    if not prompts:
        raise ValueError("no prompts to train on")
    rng = np.random.default_rng(seed)
    order: list[int] = []

    def next_prompts(n: int) -> list[ro.Prompt]:
        out = []
        for _ in range(n):
            if not order:
                order.extend(rng.permutation(len(prompts)).tolist())
            out.append(prompts[order.pop(0)])
        return out

    return next_prompts


def _score(roll: ro.Rollout, reward_fn: RewardFn) -> None:
    comps = reward_fn(list(roll.meta), list(roll.completion_text))
    roll.rewards = {k: np.asarray(v, np.float64) for k, v in comps.items()}
    for k, v in roll.rewards.items():
        if v.shape != (roll.rows,):
            raise ValueError(f"reward component {k!r} has shape {v.shape}; expected ({roll.rows},)")


def _total(roll: ro.Rollout, weights: Mapping[str, float], cfg: GRPOConfig) -> np.ndarray:
    return combine_rewards(roll.rewards, weights) + overlong_penalty(
        roll.lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)


def _resample(roll: ro.Rollout, sample: Callable[[int], ro.Rollout], weights: Mapping[str, float],
              cfg: GRPOConfig) -> tuple[ro.Rollout, int]:
    """DAPO dynamic sampling: replace zero-variance groups by informative groups of fresh rollout
    batches (same shape, so nothing recompiles), for up to ``max_resample_rounds`` rounds."""
    rounds = 0
    while rounds < cfg.max_resample_rounds:
        zero = zero_variance_groups(_total(roll, weights, cfg), roll.group)
        if not zero.any():
            break
        rounds += 1
        fresh = sample(rounds)
        good = np.flatnonzero(~zero_variance_groups(_total(fresh, weights, cfg), fresh.group))
        slots = np.flatnonzero(zero)
        take = min(len(good), len(slots))
        keep = np.flatnonzero(~zero).tolist() + slots[take:].tolist()
        roll = ro.concat_rollouts([roll.select_groups(keep), fresh.select_groups(good[:take].tolist())])
    return roll, rounds


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for k in rows[0]:
        vals = [float(r[k]) for r in rows]
        out[k] = min(vals) if k == "ratio_min" else max(vals) if k == "ratio_max" else float(np.mean(vals))
    return out


def run_grpo(model: nnx.Module, tokenizer: Any, next_prompts: Callable[[int], list[ro.Prompt]],
             reward_fn: RewardFn, cfg: GRPOConfig, train: TrainConfig, *, steps: int,
             reward_weights: Mapping[str, float] | None = None, mesh: Any = None,
             advantage_sign: float = 1.0, max_seq_len: int = 1024, prompt_bucket: int = 64,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` rollout batches. Returns ``history`` (one dict per
    step), ``diagnostics`` (summary), ``warnings`` and the final ``state``.

    ``advantage_sign`` -1 flips every advantage (a control: it should unlearn the reward).
    """
    k, n_rows = cfg.num_generations, cfg.rows
    if n_rows % train.grad_accum:
        raise ValueError(f"grpo rows per step ({cfg.prompts_per_step} prompts x K={k} = {n_rows}) must "
                         f"be a multiple of train.grad_accum={train.grad_accum}")
    micro = n_rows // train.grad_accum
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if micro % shards:
            raise ValueError(f"micro-batch of {micro} rows must be a multiple of mesh data x fsdp = {shards}")
    weights = dict(reward_weights) if reward_weights is not None else {"tech": cfg.w_tech, "lang": cfg.w_lang}
    ctx = contextlib.nullcontext() if mesh is None else mesh_context(mesh)

    graphdef, params, frozen = st.split_model(model, train.trainable)
    # This loop's step (make_grpo_step) is not the trainer's TrainStep yet: it takes clipping and
    # gradient accumulation from the optimizer, which st.make_optimizer no longer includes (the
    # trainer step does both, with one gradient norm). Until stage=grpo runs on the trainer,
    # rebuild the chain this loop was written and tested with.
    tx = st.make_optimizer(train)
    if train.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.clip_norm), tx)
    if train.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train.grad_accum)
    state = st.init_state(params, tx, train.seed)
    extra: dict[str, Any] = {"frozen": frozen}
    if cfg.beta > 0:
        # The reference is the initial policy; copied because the state's buffers get donated.
        extra["ref_params"] = jax.tree.map(jnp.copy, params)
    gen = Generator(model, tokenizer, max_seq_len=max_seq_len, prompt_bucket=prompt_bucket)
    step_fn = jax.jit(make_grpo_step(graphdef, tx, cfg, accum_steps=train.grad_accum, vocab=gen.vocab),
                      donate_argnums=(0,))
    logprob_fn = ro.make_logprob_fn(graphdef, cfg.temperature, vocab=gen.vocab, top_k=cfg.top_k, top_p=cfg.top_p)
    pad_id = gen.pad_id
    tracker = DiagnosticsTracker(cfg.diagnostics)
    history: list[dict[str, Any]] = []

    for it in range(steps):
        t0 = time.perf_counter()
        nnx.update(model, state["params"])  # the sampler must see the current policy

        def sample(round_: int) -> ro.Rollout:
            # a distinct, reproducible sampler stream per (run seed, step, re-sampling round)
            seed = int(np.random.SeedSequence([cfg.seed, it, round_]).generate_state(1)[0])
            r = ro.generate_rollouts(gen, next_prompts(cfg.prompts_per_step), cfg, seed=seed)
            _score(r, reward_fn)
            return r

        with ctx:
            roll = sample(0)
            rounds = 0
            if cfg.dynamic_sampling == "resample":
                roll, rounds = _resample(roll, sample, weights, cfg)
        t_roll = time.perf_counter() - t0
        total = _total(roll, weights, cfg)
        zero = zero_variance_groups(total, roll.group)
        adv = group_advantages(total, roll.group, scaling=cfg.adv_scaling, eps=cfg.adv_eps) * advantage_sign

        batch = ro.pack_batch(roll, pad_id=pad_id)
        full_mask = batch["completion_mask"].copy()
        mask = full_mask.copy()
        if cfg.mask_truncated:
            mask[batch["truncated"]] = 0.0
        if cfg.dynamic_sampling != "off":
            mask[zero[batch["group"]]] = 0.0
        batch["completion_mask"] = mask
        batch["loss_weights"] = loss_weights(mask, cfg.aggregation, cfg.max_new_tokens)
        batch["advantages"] = adv.astype(np.float32)

        put = (lambda b: ro.to_device(b, mesh))
        rec: dict[str, Any] = {}
        with ctx:
            if ro.needs_recompute(cfg, roll.sampler_logprob_kind):
                pol, base = ro.recompute_logprobs(logprob_fn, state["params"], frozen, batch, micro, put)
                batch["old_logp"] = pol
                ref = pol if roll.sampler_logprob_kind == "policy" else base
                rec.update(ro.logprob_gap(batch["sampler_logp"], ref, full_mask))
            else:
                batch["old_logp"] = batch["sampler_logp"]
            step_rows, epoch_losses = [], []
            for _ in range(cfg.mu):
                losses = []
                for s in range(0, n_rows, micro):
                    feed = put({k_: batch[k_][s:s + micro] for k_ in
                                ("input_ids", "positions", "segment_ids", "targets", "completion_mask",
                                 "loss_weights", "old_logp", "advantages")})
                    state, m = step_fn(state, feed, extra)
                    m = {k_: float(v) for k_, v in jax.device_get(m).items()}
                    losses.append(m["loss"])
                    step_rows.append(m)
                epoch_losses.append(float(np.sum(losses)))
        upd = _mean_metrics(step_rows)
        if not np.isfinite(epoch_losses).all() or not np.isfinite(upd["grad_norm"]):
            raise FloatingPointError(f"GRPO loss {epoch_losses} / grad norm {upd['grad_norm']} not finite "
                                     f"at step {it}; lower train.lr or check the rewards")
        rec.update(upd)
        rec["loss"] = epoch_losses[0]  # the full-batch loss of the first update
        rec["loss_last_update"] = epoch_losses[-1]
        rec.update({"reward_mean": float(total.mean()), "reward_std": float(total.std()),
                    "adv_mean": float(adv.mean()), "adv_abs_mean": float(np.abs(adv).mean()),
                    "identical_group_frac": ro.identical_group_frac(roll), "resample_rounds": rounds,
                    "rows_in_loss": int((mask.sum(-1) > 0).sum()),
                    "rollout_s": t_roll, "step_s": time.perf_counter() - t0})
        for name, v in roll.rewards.items():
            rec[f"reward/{name}_mean"], rec[f"reward/{name}_std"] = float(v.mean()), float(v.std())
        meta = roll.meta
        rec.update(rollout_diagnostics(
            roll.completion_text, roll.group, total, roll.lengths, roll.truncated,
            questions=[m.get("question") for m in meta], references=[m.get("reference") for m in meta],
            ngram=cfg.diagnostics.ngram, zero_variance_frac=float(zero.mean())))
        for w in tracker.update(it, rec):
            log(f"WARNING grpo step {it}: {w}")
        history.append({"step": it, **rec})
        log(f"grpo step {it}: reward {rec['reward_mean']:.4f} loss {rec['loss']:.4f} "
            f"clip {rec['clip_frac']:.3f} entropy {rec['entropy']:.3f} len {rec['mean_length']:.1f} "
            f"({rec['step_s']:.1f}s)")

    nnx.update(model, state["params"])
    return {"history": history, "diagnostics": tracker.summary(), "diagnostics_md": tracker.markdown(),
            "warnings": [m for _, _, m in tracker.warnings], "state": state, "graphdef": graphdef,
            "frozen": frozen}
