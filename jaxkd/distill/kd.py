"""The KD recipe (``stage=kd``) on the generic trainer: loss, data, hooks, run directory.

The student sees only its own prompt (no grounding) followed by the teacher's answer tokens; the
loss (``kd_loss``) is ``kd_objective`` on the answer positions against the cached top-k teacher
distribution, computed by ``jaxkd.distill.fused.fused_kd_loss``: each batch carries its rows' loss
positions (``with_loss_index``), only those hidden states reach the lm-head, and CE, the top-k KL
and the tail bin share one chunked pass over the vocabulary (no ``[B, T, V]`` logits). Batches come from the grain pipeline of ``jaxkd.data.loader.kd_dataset``, with
examples drawn by the domain-aware ``DomainSampler``; its state (draws + weights) is the data
iterator's state and goes into every checkpoint, so ``--resume`` continues exactly. With
``replay.enabled`` a fixed ``replay.fraction`` of the rows are the base student's own answers to
general prompts (``jaxkd.distill.replay``), outside the re-weighting.

Hooks, in order: domain re-weighting before the step (every ``domain_sampling.every_steps``),
then after it NaN stop, loss record, metrics (+ parameter norm), progress, checkpoint, validation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.ckpt import BEST_DIR, RunCheckpointer
from jaxkd.config import DistillConfig, RunConfig
from jaxkd.data.loader import kd_dataset, kd_eval_batches
from jaxkd.distill.cache import KDExample, TeacherCache, kd_example, load_exported
from jaxkd.distill.fused import fused_kd_loss, gather_positions, head_stats, head_weight, loss_positions
from jaxkd.distill.losses import Divergence, TopK, _with_tail, align_vocab, divergence, kd_objective
from jaxkd.distill.replay import REPLAY_DOMAIN, REPLAY_SPLIT, replay_config, replay_records
from jaxkd.distill.sampling import DomainSampler, gaps_to_weights, per_domain_mean
from jaxkd.distill.teacher import answers_export_path, chat_ids, real_vocab_size, teacher_prompts
from jaxkd.train import hooks as H
from jaxkd.train import state as st
from jaxkd.train.metrics import MetricsLogger, per_domain_table
from jaxkd.train.run_meta import prepare_run_dir
from jaxkd.train.trainer import Hook, make_mesh, make_param_norm, make_train_step, mesh_context, run_loop


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------

# loss_index widths are rounded up to this: a few compiled step shapes, little padding
LOSS_INDEX_MULTIPLE = 32


def student_logits(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
                   batch: Mapping[str, jax.Array], vocab: int) -> jax.Array:
    model = nnx.merge(graphdef, params, frozen)
    logits_btv, _ = model(batch["input_ids"], batch["positions"], segment_ids_bt=batch["segment_ids"])
    return align_vocab(logits_btv, vocab)


def student_hidden(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
                   batch: Mapping[str, jax.Array], remat: str = "none") -> tuple[jax.Array, jax.Array]:
    """The student's final normed hidden states ``[B, T, D]`` (no lm-head) and its head weight."""
    model = nnx.merge(graphdef, params, frozen)
    h_btd, _ = model(batch["input_ids"], batch["positions"], segment_ids_bt=batch["segment_ids"],
                     return_hidden=True, remat=remat)
    return h_btd, head_weight(model)


def with_loss_index(batch: Mapping[str, np.ndarray], multiple: int = LOSS_INDEX_MULTIPLE) -> dict:
    """``batch`` plus ``loss_index`` (``fused.loss_positions`` of its ``loss_mask``): the rows'
    loss positions, so the step takes only those to the lm-head. Host-side, before the step."""
    return {**batch, "loss_index": loss_positions(batch["loss_mask"], multiple)}


def _loss_rows(batch: Mapping[str, jax.Array], h_btd: jax.Array) -> tuple[jax.Array, dict]:
    """Hidden states and per-position batch arrays at the loss positions only (``loss_index``,
    ``[B, C]``), or unchanged when the batch has no index. The prompt and padding (~45% of a KD
    row) then never reach the lm-head."""
    keys = ("targets", "loss_mask", "topk_ids", "topk_logprobs")
    rows = {k: batch[k] for k in keys if k in batch}
    if "loss_index" not in batch:
        return h_btd, rows
    idx = batch["loss_index"]
    rows = {k: gather_positions(v, idx) for k, v in rows.items()}
    rows["loss_mask"] = jnp.where(idx >= 0, rows["loss_mask"], 0)
    return gather_positions(h_btd, idx), rows


def kd_loss(params: nnx.State, batch: Mapping[str, jax.Array], extra: Mapping[str, Any], rng: jax.Array,
            *, graphdef: nnx.GraphDef, dist: DistillConfig, vocab: int,
            chunk_size: int = 2048, remat: str = "none") -> tuple[jax.Array, dict]:
    """The trainer's ``loss_fn`` for KD: ``extra["frozen"]`` holds the non-trainable variables.

    ``kd_objective`` on the student's logits, computed by ``fused_kd_loss`` from the hidden
    states at the loss positions (``batch["loss_index"]``, see ``with_loss_index``; without it all
    B x T positions) and the head weight, over vocabulary chunks: no ``[B, T, V]`` array.
    ``remat``: the decoder's layer rematerialisation (``train.remat``)."""
    del rng  # deterministic objective
    h_btd, w_vd = student_hidden(graphdef, params, extra["frozen"], batch, remat)
    h_bcd, rows = _loss_rows(batch, h_btd)
    teacher = TopK(rows["topk_ids"], rows["topk_logprobs"]) if "topk_ids" in rows else None
    return fused_kd_loss(h_bcd, w_vd, rows["targets"], rows["loss_mask"], teacher_topk=teacher,
                         alpha=dist.alpha, kind=dist.loss, temperature=dist.temperature, beta=dist.beta,
                         vocab_size=vocab, chunk_size=chunk_size)


def kd_loss_reference(params: nnx.State, batch: Mapping[str, jax.Array], extra: Mapping[str, Any],
                      rng: jax.Array, *, graphdef: nnx.GraphDef, dist: DistillConfig,
                      vocab: int) -> tuple[jax.Array, dict]:
    """``kd_loss`` the plain way (full ``[B, T, V]`` logits, ``kd_objective``): the tests' reference."""
    del rng
    logits_btv = student_logits(graphdef, params, extra["frozen"], batch, vocab)
    teacher = TopK(batch["topk_ids"], batch["topk_logprobs"]) if "topk_ids" in batch else None
    return kd_objective(logits_btv, batch["targets"], batch["loss_mask"], teacher_topk=teacher,
                        alpha=dist.alpha, kind=dist.loss, temperature=dist.temperature, beta=dist.beta)


def make_eval_step(graphdef: nnx.GraphDef, vocab: int, chunk_size: int = 2048) -> Callable:
    """Per-example imitation metrics: forward KL to the teacher top-k (T=1) and CE, each ``[B]``
    (and token accuracy), from the chunked head statistics: no ``[B, T, V]`` array either."""

    def evaluate(params, frozen, batch):
        h_btd, w_vd = student_hidden(graphdef, params, frozen, batch)
        b, t, d = h_btd.shape
        k = batch["topk_ids"].shape[-1]
        ids_nj = jnp.concatenate([batch["targets"][..., None], batch["topk_ids"]], axis=-1)
        lse_n, _, sel_nj, arg_n = head_stats(h_btd.reshape(b * t, d), w_vd, ids_nj.reshape(b * t, k + 1),
                                             vocab_size=vocab, chunk_size=chunk_size)
        live_bt = batch["loss_mask"] > 0
        count_b = jnp.maximum(live_bt.sum(axis=1), 1).astype(jnp.float32)

        def row_mean(values_n):  # `where`: garbage (even NaN) at masked positions stays out
            return jnp.where(live_bt, values_n.reshape(b, t), 0.0).sum(axis=1) / count_b

        logq = _with_tail(sel_nj[:, 1:] - lse_n[:, None])
        logp = _with_tail(batch["topk_logprobs"].reshape(b * t, k).astype(jnp.float32))
        return {"kl": row_mean(divergence(logp, logq, Divergence.FORWARD_KL, 0.5)),
                "ce": row_mean(lse_n - sel_nj[:, 0]),
                "token_accuracy": row_mean((arg_n == ids_nj.reshape(b * t, k + 1)[:, 0]).astype(jnp.float32))}

    return jax.jit(evaluate)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _find_key(tree: Any, key: str) -> Any:
    """The first value under ``key`` in nested dicts (a grain iterator state wraps its parent's)."""
    if isinstance(tree, Mapping):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def answer_rejection(entry: Any, record: Mapping[str, Any], question_index: int,
                     dist: DistillConfig) -> str | None:
    """Why a teacher answer should not be trained on under ``dist``'s checks, or None to keep it.

    ``truncated``: cut at max_new_tokens (no end-of-turn token to learn); ``missing_steps``: robust
    coverage of the record's reference steps below ``min_step_coverage``; ``unsafe``: advice the
    unsafe-advice rules flag; ``leaked_notes``: the answer refers to the grounded teacher's notes,
    which the student's user never sees."""
    if dist.drop_truncated and entry.eos_id is None:
        return "truncated"
    if dist.drop_leaked_notes:
        from jaxkd.rewards.rules import hidden_notes_mentions

        if hidden_notes_mentions(entry.answer):
            return "leaked_notes"
    if dist.min_step_coverage > 0 or dist.drop_unsafe:
        from jaxkd.rewards.combine import item_view, rule_scores

        scores = rule_scores(item_view(record, record["questions"][question_index]), entry.answer)
        if scores["steps"] < dist.min_step_coverage:
            return "missing_steps"
        if dist.drop_unsafe and scores["unsafe"]:
            return "unsafe"
    return None


def load_kd_examples(cfg: RunConfig, split: str, tokenizer: Any, *, need_topk: bool,
                     records: Sequence[Mapping] | None = None) -> tuple[list[KDExample], int, dict[str, int]]:
    """Student examples for ``split`` from the teacher cache (or the committed text answers when
    only response KD is asked for). Returns (examples, prompts without a teacher answer, answers
    dropped by ``cfg.distill``'s checks per reason)."""
    items = teacher_prompts(cfg, split, records=records)
    cache = TeacherCache(cfg.teacher.cache_dir)
    entries = dict(cache.entries())
    source: TeacherCache | None = cache
    if not any(it.key in entries for it in items):
        exported = answers_export_path(cfg)
        if need_topk or not exported.exists():
            raise FileNotFoundError(
                f"no teacher answers for split {split!r} in {cache.dir} (teacher {cfg.teacher.preset}, "
                f"grounding={cfg.teacher.grounding}); run `python -m jaxkd.train --config ... stage=teacher` "
                + ("first" if need_topk else f"first, or commit {exported}"))
        entries = load_exported(exported)[1]
        source = None
    else:
        exported = answers_export_path(cfg)
        committed = set(load_exported(exported)[1]) if exported.exists() else set()
        lacking = [it.example_id for it in items if it.key not in entries and it.key in committed]
        if lacking:  # committed answers whose top-k was never rebuilt here: training would skip them
            raise ValueError(
                f"split {split!r}: {len(lacking)} prompts have a committed answer in {exported} but none in "
                f"the teacher cache {cache.dir} (e.g. {lacking[:3]}); run `python -m jaxkd.train --config ... "
                "stage=teacher` first, which rebuilds their top-k by rescoring")
    out, missing, dropped = [], 0, {}
    for it in items:
        entry = entries.get(it.key)
        if entry is None:
            missing += 1
            continue
        reason = answer_rejection(entry, it.record, it.question_index, cfg.distill)
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        out.append(kd_example(entry, chat_ids(tokenizer, entry.student_messages), source if need_topk else None))
    return out, missing, dropped


def trained_system_prompt(examples: Sequence[KDExample]) -> str | None:
    """The one system prompt of the student's training prompts (None: they have no system turn)."""
    prompts = {(ex.student_messages[0]["content"] if ex.student_messages and
                ex.student_messages[0]["role"] == "system" else None) for ex in examples}
    if len(prompts) != 1:
        raise ValueError(f"the training prompts use {len(prompts)} different system prompts; a student "
                         "is served with one, so train it with one")
    return prompts.pop()


def _replay_examples(cfg: RunConfig, tokenizer: Any, need_topk: bool,
                     log: Callable[[str], None]) -> tuple[list[KDExample], dict[str, Any] | None]:
    """The general replay rows (``jaxkd.distill.replay``) when ``replay.enabled``, else none."""
    if not cfg.replay.enabled:
        return [], None
    rcfg = replay_config(cfg)
    try:
        rows, missing, dropped = load_kd_examples(rcfg, REPLAY_SPLIT, tokenizer, need_topk=need_topk,
                                                  records=replay_records(cfg))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"replay.enabled: {e}") from None
    if not rows:
        raise ValueError(f"replay.enabled but none of the replay answers in {rcfg.teacher.cache_dir} can be "
                         f"trained on ({missing} prompts without an answer, dropped {dropped}); rerun stage=teacher")
    log(f"replay: {len(rows)} answers of the base student to general prompts, {cfg.replay.fraction:.0%} of the "
        f"rows drawn ({missing} prompts without an answer, dropped {sum(dropped.values())} {dropped})")
    return rows, {"examples": len(rows), "without_answer": missing, "dropped": dropped,
                  "fraction": cfg.replay.fraction,
                  "cut_by_max_len": sum(len(ex.ids) > cfg.train.max_len for ex in rows)}


def _domains(examples: Sequence[KDExample], key: str) -> list[str]:
    return [str(ex.meta[key]) for ex in examples]


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


def evaluate_examples(eval_fn: Callable, params, frozen, val_batches: Sequence[dict],
                      mesh: Any = None) -> dict[str, np.ndarray]:
    """Per-example val metrics (``kl``, ``ce``, ``token_accuracy``) over all real rows."""
    acc: dict[str, list] = {}
    for b in val_batches:
        feed = {k: v for k, v in b.items() if k != "rows"}
        with mesh_context(mesh):
            out = jax.device_get(eval_fn(params, frozen, feed))
        for k, v in out.items():
            acc.setdefault(k, []).append(np.asarray(v)[b["rows"]])
    return {k: np.concatenate(v) for k, v in acc.items()}


def reweight_domains(eval_fn: Callable, params, frozen, val_batches: Sequence[dict],
                     val_domains: Sequence[str], sampler: DomainSampler, cfg: RunConfig,
                     mesh: Any = None) -> dict:
    """Measure the per-subdomain KL gap on val and re-weight ``sampler``; returns the log record.

    Subdomains without val examples keep their prior's share (their gap is unmeasured).
    """
    ds = cfg.domain_sampling
    per_ex = evaluate_examples(eval_fn, params, frozen, val_batches, mesh)
    gaps = per_domain_mean(per_ex["kl"].tolist(), list(val_domains))
    prior = sampler.prior()   # over the domains whose share is not fixed: replay keeps its share
    gaps = {d: g for d, g in gaps.items() if d in prior}
    sampler.set_weights(gaps_to_weights(gaps, prior, tau=ds.tau, floor=ds.floor, cap=ds.cap))
    return {"gaps": gaps, "weights": sampler.weights, "prior": prior,
            "val_kl": float(per_ex["kl"].mean())}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KDResult:
    """A finished KD run: ``summary`` (JSON-able, what summary.json holds) and the live state."""

    summary: dict[str, Any]
    state: dict
    graphdef: nnx.GraphDef
    frozen: nnx.State
    tokenizer: Any
    val_examples: list[KDExample]

    def model(self) -> Any:
        """The trained student (a Decoder sharing the final parameters)."""
        return nnx.merge(self.graphdef, self.state["params"], self.frozen)


def run_kd(cfg: RunConfig, *, resume: bool = False, pretrained: Any = None,
           records: Mapping[str, Sequence[Mapping]] | None = None,
           batch_hook: Callable[[int, dict], dict] | None = None,
           log: Callable[[str], None] = print, progress: bool = True) -> KDResult:
    """Train the student (``stage=kd``) into ``cfg.run_dir``. ``pretrained`` (model + tokenizer)
    and ``records`` (split -> records) replace the preset / built data in tests;
    ``batch_hook(step, batch)`` may edit a batch before the step (tests plant bad values)."""
    tc, dc, dist = cfg.train, cfg.data, cfg.distill
    need_topk = dist.use_cache and dist.alpha < 1.0 or (dist.use_cache and cfg.teacher.top_k > 0)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, tc.batch_size)
    if pretrained is None:
        from jaxkd.models import load_pretrained

        t0 = time.perf_counter()
        pretrained = load_pretrained(cfg.student, compute_dtype=tc.compute_dtype, mesh=mesh)
        log(f"loaded student {cfg.student} in {time.perf_counter() - t0:.0f}s")
    model, tokenizer = pretrained.model, pretrained.tokenizer
    vocab = real_vocab_size(tokenizer, model.cfg.vocab_size)
    top_k = cfg.teacher.top_k if need_topk else 0

    recs = records or {}
    train, miss_t, drop_t = load_kd_examples(cfg, dc.train_split, tokenizer, need_topk=need_topk,
                                             records=recs.get(dc.train_split))
    val, miss_v, drop_v = (load_kd_examples(cfg, dc.val_split, tokenizer, need_topk=True,
                                            records=recs.get(dc.val_split)) if top_k else ([], 0, {}))
    if cfg.domain_sampling.val_examples:
        val = val[:cfg.domain_sampling.val_examples]
    log(f"KD data: {len(train)} train examples ({miss_t} prompts without a teacher answer, dropped "
        f"{sum(drop_t.values())} {drop_t}), {len(val)} val examples ({miss_v} without, dropped "
        f"{sum(drop_v.values())} {drop_v})")
    cut = sum(len(ex.ids) > tc.max_len for ex in train)
    if cut:
        log(f"warning: {cut} of {len(train)} train examples are longer than train.max_len={tc.max_len} "
            f"(longest {max(len(ex.ids) for ex in train)} tokens): their answers are cut, so the student "
            "never sees their end-of-turn token; raise train.max_len")
    if not train:
        raise ValueError("no training examples with teacher answers")
    replay, replay_info = _replay_examples(cfg, tokenizer, need_topk, log)
    replay_val: list[KDExample] = []
    if replay and cfg.replay.val:
        if cfg.replay.val >= len(replay):
            raise ValueError(f"replay.val={cfg.replay.val} holds out every one of the {len(replay)} replay answers "
                             "kept; lower it")
        replay, replay_val = replay[:-cfg.replay.val], replay[-cfg.replay.val:]
        replay_info.update(examples=len(replay), val_examples=len(replay_val))
    key = cfg.domain_sampling.key
    sampler = DomainSampler(_domains(train, key) + [REPLAY_DOMAIN] * len(replay), seed=tc.seed,
                            fixed={REPLAY_DOMAIN: cfg.replay.fraction} if replay else None)
    data = iter(kd_dataset(train + replay, sampler, batch_size=tc.batch_size, max_len=tc.max_len, top_k=top_k,
                           grad_accum=tc.grad_accum, pack=tc.pack))
    # one example per row, padded to the longest one (not to a long packing max_len)
    eval_len = lambda exs: min(tc.max_len, -(-max(len(ex.ids) for ex in exs) // 64) * 64)
    val_batches = kd_eval_batches(val, tc.batch_size, eval_len(val), top_k) if val else []
    # measured inside the domain validation, so only where there is one
    replay_val_batches = kd_eval_batches(replay_val, tc.batch_size, eval_len(replay_val), top_k) \
        if replay_val and val_batches else []

    model = st.prepare_model(model, tc)
    graphdef, params, frozen = st.split_model(model, tc.trainable)
    tx = st.make_optimizer(tc)
    state = st.init_state(params, tx, tc.seed, mesh)
    log(f"trainable={tc.trainable}: {st.count(params):,} trainable / {st.count(frozen):,} frozen values")
    step_fn = make_train_step(functools.partial(kd_loss, graphdef=graphdef, dist=dist, vocab=vocab,
                                                remat=tc.remat), tx,
                              clip_norm=tc.clip_norm, grad_accum=tc.grad_accum, mesh=mesh)
    eval_fn = make_eval_step(graphdef, vocab) if val_batches else None
    if tc.keep_best and eval_fn is None:
        raise ValueError(f"train.keep_best={tc.keep_best!r} chooses a step by val {tc.keep_best}, but split "
                         f"{dc.val_split!r} has no examples with teacher top-k; run the teacher stage on it "
                         f"or unset train.keep_best")

    run_dir = cfg.run_dir
    ckpt = RunCheckpointer(run_dir, keep=tc.keep, create=True)
    state, extras, start = ckpt.start(state, resume=resume, log=log)
    if extras is not None:
        data.set_state(extras["data"])
    best = H.BestTracker(tc.keep_best, tc.early_stop) if tc.keep_best else None
    best_ck = None
    if best is not None:
        best_ck = RunCheckpointer(run_dir, keep=1, create=True, subdir=BEST_DIR)
        if extras is None:
            try:
                best_ck.refuse_existing()
            except FileExistsError:
                ckpt.close()
                best_ck.close()
                raise
        else:
            best.load_state(extras.get("best"))
            best_ck.delete_after(start)   # saved after the resumed step: the resumed run recomputes them
    system_prompt = trained_system_prompt(train + replay)
    prepare_run_dir(cfg, recipe="kd", pretrained=pretrained, model_cfg=model.cfg, tokenizer=tokenizer,
                    system_prompt=system_prompt)

    logger = MetricsLogger(run_dir)
    losses: list[float] = []
    hooks: list[Hook] = []
    if eval_fn is not None and cfg.domain_sampling.enabled:
        def reweight(info):
            rec = reweight_domains(eval_fn, info.state["params"], frozen, val_batches, _domains(val, key),
                                   sampler, cfg, mesh)
            logger.log(info.step, rec, prefix="reweight/")
            log(f"step {info.step}: re-weighted {key}: " + ", ".join(
                f"{d} gap {rec['gaps'].get(d, float('nan')):.3f} w {w:.3f}" for d, w in rec["weights"].items()))
        hooks.append(Hook(reweight, every=cfg.domain_sampling.every_steps, before=True, name="reweight"))
    hooks += [H.stop_on_non_finite(ckpt), H.record(losses),
              H.log_metrics(logger, every=tc.log_every, lr=st.learning_rate(tc), param_norm=make_param_norm(),
                            ckpt=ckpt)]
    close_bar = None
    if progress:
        bar, close_bar = H.progress_bar(start, tc.steps, "kd")
        hooks.append(bar)
    # per-example val metrics of the latest evaluation and of the best one, reused by the summary
    last_val: dict[str, Any] = {}
    best_val: dict[str, Any] = {}
    if eval_fn is not None and tc.eval_every:
        def validate(info):
            per_ex = evaluate_examples(eval_fn, info.state["params"], frozen, val_batches, mesh)
            last_val.update(step=info.step, per_ex=per_ex)
            if info.step < info.last:  # the final validation goes into the summary
                logger.log(info.step, {k: float(v.mean()) for k, v in per_ex.items()}, prefix="val/")
                if replay_val_batches:
                    rv = evaluate_examples(eval_fn, info.state["params"], frozen, replay_val_batches, mesh)
                    logger.log(info.step, {k: float(v.mean()) for k, v in rv.items()}, prefix="val_replay/")
            if best is None:
                return
            value = float(per_ex[best.metric].mean())
            if best.update(info.step, value):
                best_ck.save(info.step, {"params": info.state["params"]}, {"metric": best.metric, "value": value})
                best_val.update(step=info.step, per_ex=per_ex)
                log(f"step {info.step}: lowest val {best.metric} so far, {value:.4f}: kept as {best_ck.step_dir(info.step)}")
            elif best.exhausted:
                log(f"step {info.step}: early stop: {best.stop_reason()}")
                info.request_stop(best.stop_reason())

        # before the checkpoint hook, so that a checkpoint holds the tracker's state of its own step
        hooks.append(Hook(validate, every=tc.eval_every, at_end=best is not None, name="val"))
    hooks.append(H.save_checkpoints(ckpt, every=tc.ckpt_every, extras=lambda: {
        "data": data.get_state(), **({"best": best.state()} if best is not None else {})}))

    def source(step: int, _state: dict) -> dict:
        batch = next(data) if batch_hook is None else batch_hook(step, next(data))
        return with_loss_index(batch)

    t_loop = time.perf_counter()
    try:
        state = run_loop(step_fn, state, source=source, extra={"frozen": frozen}, start=start,
                         steps=tc.steps, hooks=hooks)
    finally:
        logger.close()
        ckpt.close()
        if best_ck is not None:
            best_ck.close()
        if close_bar is not None:
            close_bar()

    done = int(jax.device_get(state["step"]))
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "steps": done, "resumed_from": start if resume else None,
        "train_examples": len(train), "val_examples": len(val), "trainable": tc.trainable,
        **({"replay": replay_info} if replay_info else {}),
        "teacher_answers_dropped": {"train": drop_t, "val": drop_v},
        "train_examples_cut_by_max_len": sum(len(ex.ids) > tc.max_len for ex in train),
        "trainable_params": st.count(state["params"]), "loop_s": round(time.perf_counter() - t_loop, 1),
        "losses": losses, "sampler": sampler.get_state(), "system_prompt": system_prompt}
    if tc.pack:  # examples per step vary: how many were trained on (drawn since step 0, less those waiting)
        trained = sampler.get_state()["draws"] - len(_find_key(data.get_state(), "carry") or [])
        summary["packed"] = {"examples_trained": trained, "per_step": round(trained / max(done, 1), 2)}
    if done < tc.steps:
        summary["stopped_early"] = {"planned_steps": tc.steps, "reason": best.stop_reason() if best else None}
    if eval_fn is not None:
        per_ex = (last_val["per_ex"] if last_val.get("step") == done else
                  evaluate_examples(eval_fn, state["params"], frozen, val_batches, mesh))
        if best is not None and best.step is not None:
            # the summary, the final generation and the caller describe what is served: the best step
            summary["best"] = {**best.state(), "served_from": str(best_ck.step_dir(best.step))}
            if best.step != done:
                summary["val_last_step"] = {k: float(v.mean()) for k, v in per_ex.items()}
                with RunCheckpointer(run_dir, subdir=BEST_DIR) as bc:
                    state = {**state, "params": bc.restore_params(best.step, state["params"])}
                per_ex = (best_val["per_ex"] if best_val.get("step") == best.step else   # before a resume
                          evaluate_examples(eval_fn, state["params"], frozen, val_batches, mesh))
        summary["val"] = {k: float(v.mean()) for k, v in per_ex.items()}
        if replay_val_batches:   # of the parameters served, as summary["val"]
            rv = evaluate_examples(eval_fn, state["params"], frozen, replay_val_batches, mesh)
            summary["replay"]["val"] = {k: float(v.mean()) for k, v in rv.items()}
        summary["val_per_domain"] = per_domain_table({k: v.tolist() for k, v in per_ex.items()},
                                                     _domains(val, key))
    return KDResult(summary=summary, state=state, graphdef=graphdef, frozen=frozen, tokenizer=tokenizer,
                    val_examples=val)


def final_generation(result: KDResult, n: int, max_new_tokens: int, batch_size: int = 8) -> dict[str, Any]:
    """The trained student answers ``n`` val prompts greedily; ROUGE-L / exact match to the teacher."""
    from jaxkd.config import SamplingConfig
    from jaxkd.models.generate import Generator
    from jaxkd.train.metrics import exact_match, rouge_l

    gen = Generator(result.model(), result.tokenizer, max_seq_len=1024, prompt_bucket=64)
    chosen = list(result.val_examples[:n])
    answers: list[str] = []
    for i in range(0, len(chosen), batch_size):
        answers += gen.chat([ex.student_messages for ex in chosen[i:i + batch_size]],
                            SamplingConfig(max_new_tokens=max_new_tokens))
    refs = [ex.answer for ex in chosen]
    rl, em = rouge_l(answers, refs), exact_match(answers, refs)
    return {"n": len(chosen), "rougeL": float(np.mean(rl)), "exact_match": float(np.mean(em)),
            "samples": [{"id": ex.example_id, "student": a, "teacher": r}
                        for ex, a, r in zip(chosen[:4], answers, refs)]}


def write_summary(run_dir: Any, summary: Mapping[str, Any]) -> None:
    """summary.json (scalars) and summary.md (per-subdomain table) in ``run_dir``."""
    import json

    from jaxkd.train.metrics import markdown_table

    run_dir = Path(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(dict(summary), indent=1, default=str))
    if "val_per_domain" in summary:
        head = f"# KD run {run_dir.name}\n\n"
        if "best" in summary:
            b = summary["best"]
            head += (f"Served: step {b['step']} of {summary['steps']}, the evaluated step with the lowest val "
                     f"{b['metric']} ({b['value']:.4f}; train.keep_best)")
            stopped = summary.get("stopped_early")
            head += (f"; stopped early, planned {stopped['planned_steps']} steps: {stopped['reason']}.\n\n"
                     if stopped else ".\n\n")
            if "val_last_step" in summary:
                head += f"val at the last step ({summary['steps']}): {summary['val_last_step']}\n\n"
        (run_dir / "summary.md").write_text(
            head + f"val: {summary['val']}\n\n" + markdown_table(summary["val_per_domain"]))


__all__ = ["KDResult", "answer_rejection", "final_generation", "kd_loss", "kd_loss_reference", "load_kd_examples", "make_eval_step",
           "reweight_domains", "run_kd", "student_hidden", "student_logits", "trained_system_prompt",
           "with_loss_index", "write_summary"]
