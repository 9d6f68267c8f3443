"""The KD training loop: a pure jitted step and a plain ``for step in range(start, n)`` loop.

step(state, batch, frozen) -> (state, metrics)
    state  = {"params": trainable nnx.State, "opt_state", "step", "rng"}  (donated)
    frozen = every other model variable (embeddings / lm_head under trainable=no_embed); never
             differentiated.
The student sees only its own prompt (no grounding) followed by the teacher's answer tokens; the
loss is ``kd_objective`` on the answer positions against the cached top-k teacher distribution.

Hooks, in order, at each step: domain re-weighting (every ``domain_sampling.every_steps``), the
update, a finiteness check (NaN/inf stops the run before anything is saved), logging,
checkpointing, validation.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd.config import DistillConfig, RunConfig, to_dict
from jaxkd.distill.cache import KDExample, TeacherCache, kd_example, load_exported, make_batch
from jaxkd.distill.losses import TopK, align_vocab, cross_entropy, kd_objective, soft_kd_topk
from jaxkd.distill.sampling import DomainSampler, gaps_to_weights, per_domain_mean
from jaxkd.distill.teacher import answers_export_path, chat_ids, real_vocab_size, teacher_prompts
from jaxkd.train import state as st
from jaxkd.train.metrics import MetricsLogger, markdown_table, per_domain_table


class NonFiniteLoss(FloatingPointError):
    """The loss (or gradient / parameter norm) became NaN or inf."""


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def student_logits(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
                   batch: Mapping[str, jax.Array], vocab: int) -> jax.Array:
    model = nnx.merge(graphdef, params, frozen)
    logits_btv, _ = model(batch["input_ids"], batch["positions"], segment_ids_bt=batch["segment_ids"])
    return align_vocab(logits_btv, vocab)


def _teacher(batch: Mapping[str, jax.Array]) -> TopK | None:
    return TopK(batch["topk_ids"], batch["topk_logprobs"]) if "topk_ids" in batch else None


def loss_fn(params: nnx.State, frozen: nnx.State, batch: Mapping[str, jax.Array], *,
            graphdef: nnx.GraphDef, dist: DistillConfig, vocab: int) -> tuple[jax.Array, dict]:
    logits_btv = student_logits(graphdef, params, frozen, batch, vocab)
    return kd_objective(logits_btv, batch["targets"], batch["loss_mask"], teacher_topk=_teacher(batch),
                        alpha=dist.alpha, kind=dist.loss, temperature=dist.temperature, beta=dist.beta)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, dist: DistillConfig,
                    vocab: int) -> Callable:
    """The jitted ``step(state, batch, frozen) -> (state, metrics)``; ``state`` is donated."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef, dist=dist, vocab=vocab),
                                 has_aux=True)

    def step(state: dict, batch: dict, frozen: nnx.State) -> tuple[dict, dict]:
        (loss, metrics), grads = grad_fn(state["params"], frozen, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                "rng": state["rng"]}, metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, vocab: int) -> Callable:
    """Per-example imitation metrics: forward KL to the teacher top-k (T=1) and CE, each ``[B]``."""

    def row(logits_tv, targets_t, mask_t, ids_tk, lp_tk):
        kl, _ = soft_kd_topk(logits_tv[None], TopK(ids_tk[None], lp_tk[None]), mask_t[None],
                             kind="forward_kl", temperature=1.0)
        ce, m = cross_entropy(logits_tv[None], targets_t[None], mask_t[None])
        return kl, ce, m["token_accuracy"]

    def evaluate(params, frozen, batch):
        logits_btv = student_logits(graphdef, params, frozen, batch, vocab)
        kl_b, ce_b, acc_b = jax.vmap(row)(logits_btv, batch["targets"], batch["loss_mask"],
                                          batch["topk_ids"], batch["topk_logprobs"])
        return {"kl": kl_b, "ce": ce_b, "token_accuracy": acc_b}

    return jax.jit(evaluate)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_kd_examples(cfg: RunConfig, split: str, tokenizer: Any, *, need_topk: bool,
                     records: Sequence[Mapping] | None = None) -> tuple[list[KDExample], int]:
    """Student examples for ``split`` from the teacher cache (or the committed text answers when
    only response KD is asked for). Returns (examples, prompts without a teacher answer)."""
    items = teacher_prompts(cfg, split, records=records)
    cache = TeacherCache(cfg.teacher.cache_dir)
    entries = {k: e for k, e in cache.entries().items()}
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
    out, missing = [], 0
    for it in items:
        entry = entries.get(it.key)
        if entry is None:
            missing += 1
            continue
        ids = chat_ids(tokenizer, entry.student_messages)
        out.append(kd_example(entry, ids, source if need_topk else None))
    return out, missing


def batches(examples: Sequence[KDExample], size: int, max_len: int, top_k: int) -> list[dict]:
    """Fixed-size batches over ``examples`` in order (the last one padded with repeats, masked)."""
    out = []
    for i in range(0, len(examples), size):
        chunk = list(examples[i:i + size])
        real = len(chunk)
        chunk += [chunk[0]] * (size - real)
        b = make_batch(chunk, max_len, top_k)
        b["loss_mask"][real:] = 0.0
        b["rows"] = np.arange(size) < real
        out.append(b)
    return out


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


def evaluate_examples(eval_fn: Callable, params, frozen, val_batches: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-example val metrics (``kl``, ``ce``, ``token_accuracy``) over all real rows."""
    acc: dict[str, list] = {}
    for b in val_batches:
        feed = {k: v for k, v in b.items() if k != "rows"}
        out = jax.device_get(eval_fn(params, frozen, feed))
        for k, v in out.items():
            acc.setdefault(k, []).append(np.asarray(v)[b["rows"]])
    return {k: np.concatenate(v) for k, v in acc.items()}


def reweight_domains(eval_fn: Callable, params, frozen, val_batches: Sequence[dict],
                     val_domains: Sequence[str], sampler: DomainSampler, cfg: RunConfig) -> dict:
    """Measure the per-subdomain KL gap on val and re-weight ``sampler``; returns the log record.

    Subdomains without val examples keep their prior's share (their gap is unmeasured).
    """
    ds = cfg.domain_sampling
    per_ex = evaluate_examples(eval_fn, params, frozen, val_batches)
    gaps = per_domain_mean(per_ex["kl"].tolist(), list(val_domains))
    gaps = {d: g for d, g in gaps.items() if d in sampler.counts}
    weights = gaps_to_weights(gaps, sampler.counts, tau=ds.tau, floor=ds.floor, cap=ds.cap)
    sampler.set_weights(weights)
    prior = sampler.prior()
    return {"gaps": gaps, "weights": weights, "prior": prior, "val_kl": float(per_ex["kl"].mean())}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def make_run_mesh(cfg: RunConfig):
    """The (data, fsdp, tensor) mesh of ``cfg.mesh``; None for a single device."""
    m = cfg.mesh
    if m.data * m.fsdp * m.tensor == 1:
        return None
    from jaxkd import sharding as shd

    if cfg.train.batch_size % (m.data * m.fsdp):
        raise ValueError(f"train.batch_size {cfg.train.batch_size} must be a multiple of mesh.data x "
                         f"mesh.fsdp = {m.data * m.fsdp}")
    return shd.make_mesh(m.data, m.fsdp, m.tensor)


def _in_mesh(mesh):
    import contextlib

    if mesh is None:
        return contextlib.nullcontext()
    from jaxkd import sharding as shd

    return shd.mesh_context(mesh)


def _shard_batch(batch: Mapping[str, np.ndarray], mesh) -> Mapping[str, Any]:
    """Batch arrays split over the (data, fsdp) mesh axes along their leading (batch) axis."""
    if mesh is None:
        return batch
    from jax.sharding import NamedSharding, PartitionSpec

    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return {k: jax.device_put(v, spec) for k, v in batch.items()}


def _domains(examples: Sequence[KDExample], key: str) -> list[str]:
    return [str(ex.meta[key]) for ex in examples]


def run_kd(cfg: RunConfig, *, resume: bool = False, pretrained: Any = None,
           records: Mapping[str, Sequence[Mapping]] | None = None,
           batch_hook: Callable[[int, dict], dict] | None = None,
           log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Train the student (``stage=kd``). ``pretrained`` (model + tokenizer) and ``records``
    (split -> records) replace the preset / built data in tests; ``batch_hook(step, batch)`` may
    edit a batch before the step (tests plant bad values with it)."""
    tc, dc, dist = cfg.train, cfg.data, cfg.distill
    need_topk = dist.use_cache and dist.alpha < 1.0 or (dist.use_cache and cfg.teacher.top_k > 0)
    run_dir = cfg.run_dir
    mesh = make_run_mesh(cfg)
    if pretrained is None:
        from jaxkd.models import load_pretrained

        t0 = time.perf_counter()
        pretrained = load_pretrained(cfg.student, compute_dtype=tc.compute_dtype, mesh=mesh)
        log(f"loaded student {cfg.student} in {time.perf_counter() - t0:.0f}s")
    model, tokenizer = pretrained.model, pretrained.tokenizer
    vocab = real_vocab_size(tokenizer, model.cfg.vocab_size)
    top_k = cfg.teacher.top_k if need_topk else 0

    recs = records or {}
    train, miss_t = load_kd_examples(cfg, dc.train_split, tokenizer, need_topk=need_topk,
                                     records=recs.get(dc.train_split))
    val, miss_v = (load_kd_examples(cfg, dc.val_split, tokenizer, need_topk=True, records=recs.get(dc.val_split))
                   if top_k else ([], 0))
    if cfg.domain_sampling.val_examples:
        val = val[:cfg.domain_sampling.val_examples]
    log(f"KD data: {len(train)} train examples ({miss_t} prompts without a teacher answer), "
        f"{len(val)} val examples ({miss_v} without)")
    if not train:
        raise ValueError("no training examples with teacher answers")
    key = cfg.domain_sampling.key
    sampler = DomainSampler(_domains(train, key), seed=tc.seed)
    val_batches = batches(val, tc.batch_size, tc.max_len, top_k) if val else []

    if tc.trainable == "lora":
        model = st.apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.seed)
    graphdef, params, frozen = st.split_model(model, tc.trainable)
    tx = st.make_optimizer(tc)
    state = st.init_state(params, tx, tc.seed)
    log(f"trainable={tc.trainable}: {st.count(params):,} trainable / {st.count(frozen):,} frozen values")
    step_fn = make_train_step(graphdef, tx, dist, vocab)
    eval_fn = make_eval_step(graphdef, vocab) if val_batches else None

    ckpt = st.Checkpointer(run_dir / "ckpt", tc.keep)
    start = 0
    if resume:
        latest = ckpt.latest_step()
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.dir}")
        state, meta = ckpt.restore(latest, state)
        sampler.set_state(meta["sampler"])
        start = int(meta["step"])
        log(f"resumed from {ckpt.dir}/{latest} at step {start}")
    else:
        if ckpt.latest_step() is not None:
            raise FileExistsError(f"{ckpt.dir} already holds checkpoints; pass --resume to continue "
                                  f"or choose another name= / runs_dir=")
    st.save_run_config(run_dir, to_dict(cfg))
    logger = MetricsLogger(run_dir)

    iterator = range(start, tc.steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, initial=start, total=tc.steps, desc="kd", dynamic_ncols=True)
    t_loop, history = time.perf_counter(), []
    try:
        for step in iterator:
            if eval_fn is not None and cfg.domain_sampling.enabled and step % cfg.domain_sampling.every_steps == 0:
                rec = reweight_domains(eval_fn, state["params"], frozen, val_batches, _domains(val, key),
                                       sampler, cfg)
                logger.log(step, rec, prefix="reweight/")
                log(f"step {step}: re-weighted {key}: " + ", ".join(
                    f"{d} gap {rec['gaps'].get(d, float('nan')):.3f} w {w:.3f}" for d, w in rec["weights"].items()))
            t0 = time.perf_counter()
            for _ in range(tc.grad_accum):
                idx = sampler.next_indices(tc.batch_size)
                batch = make_batch([train[i] for i in idx], tc.max_len, top_k)
                if batch_hook is not None:
                    batch = batch_hook(step, batch)
                with _in_mesh(mesh):
                    state, metrics = step_fn(state, _shard_batch(batch, mesh), frozen)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            bad = [k for k in ("loss", "grad_norm", "param_norm") if not np.isfinite(metrics[k])]
            if bad:
                last = ckpt.latest_step()
                where = f"{ckpt.dir}/{last}" if last is not None else "none saved yet"
                raise NonFiniteLoss(
                    f"{', '.join(bad)} became {metrics[bad[0]]} at step {step} (loss {metrics['loss']}); "
                    f"stopped without saving. Last good checkpoint: {where}. Lower train.lr, check the "
                    f"teacher cache for NaNs, or resume from that checkpoint with --resume.")
            metrics["step_s"] = time.perf_counter() - t0
            metrics["lr"] = float(st.learning_rate(tc)(step))
            history.append({"step": step, **metrics})
            if step % tc.log_every == 0 or step == tc.steps - 1:
                logger.log(step, metrics, prefix="train/")
            if progress:
                iterator.set_postfix(loss=f"{metrics['loss']:.4f}", s=f"{metrics['step_s']:.1f}")
            done = step + 1
            if (tc.ckpt_every and done % tc.ckpt_every == 0) or done == tc.steps:
                ckpt.save(done, state, {"sampler": sampler.get_state(), "run": cfg.name})
            if eval_fn is not None and tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
                per_ex = evaluate_examples(eval_fn, state["params"], frozen, val_batches)
                logger.log(done, {k: float(v.mean()) for k, v in per_ex.items()}, prefix="val/")
    finally:
        logger.close()
        ckpt.close()

    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "steps": tc.steps, "resumed_from": start if resume else None,
        "train_examples": len(train), "val_examples": len(val), "trainable": tc.trainable,
        "trainable_params": st.count(state["params"]), "loop_s": round(time.perf_counter() - t_loop, 1),
        "losses": [h["loss"] for h in history], "sampler": sampler.get_state()}
    if eval_fn is not None:
        per_ex = evaluate_examples(eval_fn, state["params"], frozen, val_batches)
        summary["val"] = {k: float(v.mean()) for k, v in per_ex.items()}
        summary["val_per_domain"] = per_domain_table({k: v.tolist() for k, v in per_ex.items()},
                                                     _domains(val, key))
    summary["val_examples_list"] = val
    summary["tokenizer"] = tokenizer
    summary["final_params"] = state["params"]
    summary["frozen"] = frozen
    summary["graphdef"] = graphdef
    return summary


def final_generation(summary: Mapping[str, Any], val: Sequence[KDExample], tokenizer: Any, n: int,
                     max_new_tokens: int, batch_size: int = 8) -> dict[str, Any]:
    """The trained student answers ``n`` val prompts greedily; ROUGE-L / exact match to the teacher."""
    from jaxkd.config import SamplingConfig
    from jaxkd.models.generate import Generator
    from jaxkd.train.metrics import exact_match, rouge_l

    model = nnx.merge(summary["graphdef"], summary["final_params"], summary["frozen"])
    gen = Generator(model, tokenizer, max_seq_len=1024, prompt_bucket=64)
    chosen = list(val[:n])
    answers: list[str] = []
    for i in range(0, len(chosen), batch_size):
        answers += gen.chat([ex.student_messages for ex in chosen[i:i + batch_size]],
                            SamplingConfig(max_new_tokens=max_new_tokens))
    refs = [ex.answer for ex in chosen]
    rl, em = rouge_l(answers, refs), exact_match(answers, refs)
    return {"n": len(chosen), "rougeL": float(np.mean(rl)), "exact_match": float(np.mean(em)),
            "samples": [{"id": ex.example_id, "student": a, "teacher": r}
                        for ex, a, r in zip(chosen[:4], answers, refs)]}


def plain_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items()
            if k not in ("final_params", "frozen", "graphdef", "val_examples_list", "tokenizer")}


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """summary.json (scalars) and summary.md (per-subdomain table) in ``run_dir``."""
    import json

    plain = plain_summary(summary)
    (run_dir / "summary.json").write_text(json.dumps(plain, indent=1, default=str))
    if "val_per_domain" in plain:
        (run_dir / "summary.md").write_text(
            f"# KD run {run_dir.name}\n\nval: {plain['val']}\n\n"
            + markdown_table(plain["val_per_domain"]))
