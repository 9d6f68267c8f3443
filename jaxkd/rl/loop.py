"""GRPO on the generic trainer: the rollout batch source, the loss, the per-rollout record hook.

Each rollout batch samples ``grpo.prompts_per_step`` prompts x K completions in one generation
batch, scores them with ``reward_fn(prompts_meta, completions_text) -> {name: [N] array}``,
combines the components with ``reward_weights`` (default ``{"tech": w_tech, "lang": w_lang}``),
optionally re-samples or drops zero-variance groups, and builds group-relative advantages. The
trainer (``jaxkd.train.trainer.run_loop``) then runs ``mu`` optimizer updates on it: trainer step
s uses rollout batch ``s // mu`` (``RolloutSource``, generated with the current parameters when
``s % mu == 0``), each update from ``train.grad_accum`` micro-batches with one clipped gradient.

``run_grpo`` is the whole thing without a run directory (tests, small experiments);
``jaxkd.rl.recipe`` (``stage=grpo``) adds checkpoints, exact resume, metrics files and the report
from the same pieces.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd.config import GRPOConfig, TrainConfig
from jaxkd.models.generate import Generator
from jaxkd.models.lora import has_lora, lora_graphdef
from jaxkd.rl import rollout as ro
from jaxkd.rl.diagnostics import DiagnosticsTracker, rollout_diagnostics
from jaxkd.rl.grpo import (STEP_BATCH_KEYS, combine_rewards, group_advantages, grpo_objective, loss_weights,
                           overlong_penalty, zero_variance_groups)
from jaxkd.sharding import mesh_context
from jaxkd.train import state as st
from jaxkd.train.trainer import Hook, StepInfo, make_train_step, run_loop

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


def grpo_loss_fn(params: Any, batch: Mapping[str, jax.Array], extra: Mapping[str, Any], rng: jax.Array, *,
                 graphdef: nnx.GraphDef, cfg: GRPOConfig, vocab: int, grad_accum: int,
                 ref_graphdef: nnx.GraphDef | None = None) -> tuple[jax.Array, dict]:
    """The trainer's ``loss_fn`` for GRPO. ``extra``: ``frozen`` (+ ``ref_params`` when beta > 0,
    unless ``ref_graphdef``, the LoRA policy with adapters off, is the reference).

    The per-token weights are normalised over the WHOLE rollout batch, so micro-batch losses add
    up to the full-batch loss; the trainer averages micro-batch gradients, hence the factor
    ``grad_accum`` (the reported ``loss`` / ``pg_loss`` / ``tokens`` are then full-batch values;
    ratios, clip fractions and entropy are means over micro-batches).
    """
    del rng  # the objective is deterministic
    loss, metrics = grpo_objective(graphdef, params, extra["frozen"], extra.get("ref_params"), batch, cfg,
                                   vocab=vocab, ref_graphdef=ref_graphdef)
    for k in ("pg_loss", "tokens"):
        metrics[k] = metrics[k] * grad_accum
    return loss * grad_accum, metrics


class RolloutSource:
    """``source(step, state) -> batch`` for ``run_loop``: a fresh rollout batch every ``mu`` steps
    (sampled with ``state["params"]``), the same batch for the updates in between.

    Rollout r samples with seed ``SeedSequence([grpo.seed, r, round])``: with the prompt
    sampler's state and the parameters restored, a resumed run draws exactly what the
    uninterrupted one drew. ``record`` holds the current batch's rollout-side log record.
    """

    def __init__(self, model: nnx.Module, tokenizer: Any, next_prompts: Callable[[int], list[ro.Prompt]],
                 reward_fn: RewardFn, cfg: GRPOConfig, *, weights: Mapping[str, float], graphdef: nnx.GraphDef,
                 frozen: Any, grad_accum: int, mesh: Any = None, advantage_sign: float = 1.0, max_seq_len: int = 1024,
                 prompt_bucket: int = 64):
        if cfg.rows % grad_accum:
            raise ValueError(f"grpo rows per step ({cfg.prompts_per_step} prompts x K={cfg.num_generations} = "
                             f"{cfg.rows}) must be a multiple of train.grad_accum={grad_accum}")
        self.model, self.next_prompts, self.reward_fn, self.cfg = model, next_prompts, reward_fn, cfg
        self.weights, self.frozen, self.grad_accum, self.mesh = dict(weights), frozen, grad_accum, mesh
        self.advantage_sign = advantage_sign
        self.gen = Generator(model, tokenizer, max_seq_len=max_seq_len, prompt_bucket=prompt_bucket,
                             batched_dtype=cfg.rollout_dtype)
        self.logprob_fn = ro.make_logprob_fn(graphdef, cfg.temperature, vocab=self.gen.vocab, top_k=cfg.top_k,
                                             top_p=cfg.top_p)
        self.batch: dict[str, np.ndarray] | None = None
        self.record: dict[str, Any] = {}
        self.rollout: ro.Rollout | None = None

    @property
    def vocab(self) -> int:
        return self.gen.vocab

    def __call__(self, step: int, state: dict) -> dict[str, np.ndarray]:
        if step % self.cfg.mu == 0 or self.batch is None:
            if step % self.cfg.mu:
                raise RuntimeError(f"step {step} is inside rollout batch {step // self.cfg.mu}, which is gone "
                                   f"(a run resumes only at multiples of grpo.mu={self.cfg.mu})")
            self.batch = self._rollout_batch(step // self.cfg.mu, state)
        return self.batch

    def _rollout_batch(self, it: int, state: dict) -> dict[str, np.ndarray]:
        cfg, weights = self.cfg, self.weights
        t0 = time.perf_counter()
        nnx.update(self.model, state["params"])  # the sampler must see the current policy
        ctx = contextlib.nullcontext() if self.mesh is None else mesh_context(self.mesh)
        timing = {"generate_s": 0.0, "reward_s": 0.0}

        def sample(round_: int) -> ro.Rollout:
            # a distinct, reproducible sampler stream per (run seed, rollout, re-sampling round)
            seed = int(np.random.SeedSequence([cfg.seed, it, round_]).generate_state(1)[0])
            t = time.perf_counter()
            r = ro.generate_rollouts(self.gen, self.next_prompts(cfg.prompts_per_step), cfg, seed=seed)
            timing["generate_s"] += time.perf_counter() - t
            t = time.perf_counter()
            _score(r, self.reward_fn)
            timing["reward_s"] += time.perf_counter() - t
            return r

        with ctx:
            roll = sample(0)
            rounds = 0
            if cfg.dynamic_sampling == "resample":
                roll, rounds = _resample(roll, sample, weights, cfg)
        t_roll = time.perf_counter() - t0
        total = _total(roll, weights, cfg)
        zero = zero_variance_groups(total, roll.group)
        adv = group_advantages(total, roll.group, scaling=cfg.adv_scaling, eps=cfg.adv_eps) * self.advantage_sign

        batch = ro.pack_batch(roll, pad_id=self.gen.pad_id)
        full_mask = batch["completion_mask"].copy()
        mask = full_mask.copy()
        if cfg.mask_truncated:
            mask[batch["truncated"]] = 0.0
        if cfg.dynamic_sampling != "off":
            mask[zero[batch["group"]]] = 0.0
        batch["completion_mask"] = mask
        batch["loss_weights"] = loss_weights(mask, cfg.aggregation, cfg.max_new_tokens)
        batch["advantages"] = adv.astype(np.float32)

        rec: dict[str, Any] = {}
        # a sampler computing in another dtype than the trainer is not the policy being trained
        if ro.needs_recompute(cfg, roll.sampler_logprob_kind) or self.gen.batched_dtype is not None:
            micro = cfg.rows // self.grad_accum
            with ctx:
                pol, _ = ro.recompute_logprobs(self.logprob_fn, state["params"], self.frozen, batch, micro,
                                               lambda b: ro.to_device(b, self.mesh))
            batch["old_logp"] = pol
            rec.update(ro.logprob_gap(batch["sampler_logp"], pol, full_mask))
        else:
            batch["old_logp"] = batch["sampler_logp"]
        rec.update({"reward_mean": float(total.mean()), "reward_std": float(total.std()),
                    "adv_mean": float(adv.mean()), "adv_abs_mean": float(np.abs(adv).mean()),
                    "identical_group_frac": ro.identical_group_frac(roll), "resample_rounds": rounds,
                    "rows_in_loss": int((mask.sum(-1) > 0).sum()), "rollout_s": t_roll, **timing})
        for name, v in roll.rewards.items():
            v = np.asarray(v, np.float64)
            ok = v[np.isfinite(v)]  # a rule score is NaN where the item has nothing to score against
            rec[f"reward/{name}_mean"] = float(ok.mean()) if ok.size else float("nan")
            rec[f"reward/{name}_std"] = float(ok.std()) if ok.size else float("nan")
        meta = roll.meta
        rec.update(rollout_diagnostics(
            roll.completion_text, roll.group, total, roll.lengths, roll.truncated,
            questions=[m.get("question") for m in meta], references=[m.get("reference") for m in meta],
            ngram=cfg.diagnostics.ngram, zero_variance_frac=float(zero.mean())))
        self.record, self.rollout = rec, roll
        feed = {k: batch[k] for k in STEP_BATCH_KEYS}
        if self.grad_accum > 1:  # the trainer's layout: [micro-batches, rows, ...]
            feed = {k: v.reshape(self.grad_accum, -1, *v.shape[1:]) for k, v in feed.items()}
        return feed


class RolloutRecords:
    """After-step hook: collects the ``mu`` updates of each rollout batch and, after the last one,
    merges them with the rollout record, runs the diagnostics (warnings name the check), and
    hands the record to ``sink`` (history list, metrics file, log line).

    Update metrics are averaged over the ``mu`` updates (ratio_min / ratio_max: min / max);
    ``loss`` is the first update's full-batch loss, ``loss_last_update`` the last one's.
    """

    def __init__(self, source: RolloutSource, tracker: DiagnosticsTracker, *, mu: int,
                 sink: Callable[[int, int, dict], None], log: Callable[[str], None] = print):
        self.source, self.tracker, self.mu, self.sink, self.log = source, tracker, mu, sink, log
        self.updates: list[dict[str, float]] = []
        self.started: float | None = None

    def __call__(self, info: StepInfo) -> None:
        if not self.updates:
            self.started = info.started
        self.updates.append(dict(info.host_metrics()))
        if info.step % self.mu:
            return
        it = info.step // self.mu - 1
        losses = [u["loss"] for u in self.updates]
        if not np.isfinite(losses).all():
            raise FloatingPointError(f"GRPO loss {losses} not finite at rollout {it}; lower train.lr or check "
                                     f"the rewards")
        rec = {**self.source.record, **_mean_metrics(self.updates), "loss": losses[0],
               "loss_last_update": losses[-1], "step_s": time.perf_counter() - self.started}
        self.updates = []
        for w in self.tracker.update(it, rec):
            self.log(f"WARNING grpo step {it}: {w}")
        self.sink(it, info.step, rec)
        self.log(f"grpo step {it}: reward {rec['reward_mean']:.4f} loss {rec['loss']:.4f} "
                 f"clip {rec['clip_frac']:.3f} entropy {rec['entropy']:.3f} len {rec['mean_length']:.1f} "
                 f"({rec['step_s']:.1f}s: generate {rec['generate_s']:.1f}, reward {rec['reward_s']:.1f})")

    def hook(self) -> Hook:
        return Hook(self, every=1, name="grpo_records")


def lora_reference(model: nnx.Module, trainable: str, beta: float) -> nnx.GraphDef | None:
    """Under LoRA with beta > 0 the reference model is the base: the policy's graphdef with its
    adapters off (no copy of any weight; ``grpo_objective``'s ``ref_graphdef``). None otherwise."""
    return lora_graphdef(model, False) if trainable == "lora" and beta > 0 else None


def build_optimizer_step(graphdef: nnx.GraphDef, cfg: GRPOConfig, train: TrainConfig, *, vocab: int,
                         mesh: Any = None, ref_graphdef: nnx.GraphDef | None = None,
                         ) -> tuple[optax.GradientTransformation, Any]:
    """(tx, the trainer's jitted step) for GRPO under ``train``'s optimizer / clip / accumulation."""
    tx = st.make_optimizer(train)
    loss = functools.partial(grpo_loss_fn, graphdef=graphdef, cfg=cfg, vocab=vocab, grad_accum=train.grad_accum,
                             ref_graphdef=ref_graphdef)
    return tx, make_train_step(loss, tx, clip_norm=train.clip_norm, grad_accum=train.grad_accum, mesh=mesh)


def run_grpo(model: nnx.Module, tokenizer: Any, next_prompts: Callable[[int], list[ro.Prompt]],
             reward_fn: RewardFn, cfg: GRPOConfig, train: TrainConfig, *, steps: int,
             reward_weights: Mapping[str, float] | None = None, mesh: Any = None,
             advantage_sign: float = 1.0, max_seq_len: int = 1024, prompt_bucket: int = 64,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` rollout batches (``steps x mu`` trainer updates), no
    run directory. Returns ``history`` (one dict per rollout batch), ``diagnostics`` (summary),
    ``warnings`` and the final ``state``.

    ``advantage_sign`` -1 flips every advantage (a control: it should unlearn the reward).
    """
    n_rows = cfg.rows
    if n_rows % train.grad_accum:
        raise ValueError(f"grpo rows per step ({cfg.prompts_per_step} prompts x K={cfg.num_generations} = {n_rows}) "
                         f"must be a multiple of train.grad_accum={train.grad_accum}")
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if (n_rows // train.grad_accum) % shards:
            raise ValueError(f"micro-batch of {n_rows // train.grad_accum} rows must be a multiple of mesh "
                             f"data x fsdp = {shards}")
    weights = dict(reward_weights) if reward_weights is not None else {"tech": cfg.w_tech, "lang": cfg.w_lang}
    if train.trainable == "lora" and not has_lora(model):
        st.apply_lora(model, train.lora_rank, train.lora_alpha, train.seed, train.lora_targets)
    graphdef, params, frozen = st.split_model(model, train.trainable)
    ref_graphdef = lora_reference(model, train.trainable, cfg.beta)
    source = RolloutSource(model, tokenizer, next_prompts, reward_fn, cfg, weights=weights, graphdef=graphdef,
                           frozen=frozen,
                           grad_accum=train.grad_accum, mesh=mesh, advantage_sign=advantage_sign,
                           max_seq_len=max_seq_len, prompt_bucket=prompt_bucket)
    tx, step_fn = build_optimizer_step(graphdef, cfg, train, vocab=source.vocab, mesh=mesh,
                                       ref_graphdef=ref_graphdef)
    state = st.init_state(params, tx, train.seed, mesh)
    extra: dict[str, Any] = {"frozen": frozen}
    if cfg.beta > 0 and ref_graphdef is None:
        # The reference is the initial policy; copied because the state's buffers get donated.
        extra["ref_params"] = jax.tree.map(jnp.copy, params)
    tracker = DiagnosticsTracker(cfg.diagnostics)
    history: list[dict[str, Any]] = []
    records = RolloutRecords(source, tracker, mu=cfg.mu, log=log,
                             sink=lambda it, step, rec: history.append({"step": it, **rec}))
    state = run_loop(step_fn, state, source=source, extra=extra, start=0, steps=steps * cfg.mu,
                     hooks=[records.hook()])
    nnx.update(model, state["params"])
    return {"history": history, "diagnostics": tracker.summary(), "diagnostics_md": tracker.markdown(),
            "warnings": [m for _, _, m in tracker.warnings], "state": state, "graphdef": graphdef,
            "frozen": frozen}
