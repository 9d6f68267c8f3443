"""The GRPO recipe (``stage=grpo``) on the generic trainer: policy, prompts, reward, hooks, report.

- Policy: ``grpo.init`` (a trained run such as ``runs/kd-cpu``, or any model spec) through
  ``jaxkd.serving.load_model``; "" or a run directory that does not exist yet falls back to the
  ``student`` preset, said so in the log. A frozen reference copy exists only when ``grpo.beta`` > 0.
- Prompts: the (record, question) prompts of ``data.train_split`` with the policy's system prompt,
  drawn by the domain-aware ``DomainSampler`` (``grpo.domain_balance``: every
  ``domain_sampling.key`` value equally likely); its state goes into every checkpoint.
- Reward: ``R = grpo.w_tech * R_tech + grpo.w_lang * R_lang`` from ``jaxkd.rewards.combined_rewards``
  with the LLM judge ``grpo.judge`` (a separate model, the base 0.5B preset by default, never the
  policy) or rule-only (``grpo.reward.use_judge: false``). Every component's mean / std is logged.
- Trainer: ``jaxkd.rl.loop.RolloutSource`` feeds ``run_loop``; hooks, in order: NaN stop, the
  per-rollout record (diagnostics with warnings naming the check, metrics JSONL under ``grpo/``),
  progress, checkpoints (standard run format: ``run.json`` + ``ckpt/``, so ``serving.load_model``
  and ``python -m jaxkd.generate --model runs/<name>`` serve the result). ``--resume`` continues
  exactly: parameters, optimizer, prompt sampler state, and rollout seeds derived from the step.
- Report: ``grpo_report`` rebuilds ``grpo_<name>.png`` (total / R_tech / R_lang / length / KL
  curves) and ``grpo_<name>.json`` / ``.md`` (per-step components + diagnostics summary) from the
  run's ``metrics.jsonl`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.ckpt import RunCheckpointer
from jaxkd.config import ConfigError, GRPOConfig, RunConfig, to_dict
from jaxkd.rl import rollout as ro
from jaxkd.rl.diagnostics import CHECKS, DiagnosticsTracker
from jaxkd.rl.loop import RolloutRecords, RolloutSource, build_optimizer_step, lora_reference
from jaxkd.train import hooks as H
from jaxkd.train import state as st
from jaxkd.train.metrics import MetricsLogger
from jaxkd.train.run_meta import prepare_run_dir
from jaxkd.train.trainer import make_mesh, run_loop

PREFIX = "grpo/"


# --------------------------------------------------------------------------------------------
# Policy, prompts, reward
# --------------------------------------------------------------------------------------------


def _same_path(a: Any, b: Any) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (TypeError, OSError):
        return False


def load_policy(cfg: RunConfig, log: Callable[[str], None]) -> Any:
    """The policy to start from (a ``serving.LoadedModel``): ``grpo.init`` or the student preset."""
    from jaxkd.ckpt import is_run_dir
    from jaxkd.serving import load_model

    init = cfg.grpo.init
    if init and _same_path(init, cfg.run_dir):
        raise ConfigError(f"grpo.init={init} is this run's own directory; GRPO must start from another run "
                          f"(e.g. runs/kd-cpu) or a preset, and write to name=<new name>")
    looks_like_run = bool(init) and (Path(init).parent != Path(".") or init.startswith("runs"))
    if not init or (looks_like_run and not is_run_dir(init)):
        why = "grpo.init is empty" if not init else f"grpo.init={init} is not a trained run (no run.json there)"
        log(f"NOTE: {why}; GRPO starts from the base student preset {cfg.student} instead. Train the KD "
            f"student first (stage=kd) to start from it.")
        init = cfg.student
    t0 = time.perf_counter()
    policy = load_model(init, compute_dtype=cfg.grpo.train.compute_dtype)
    log(f"policy {policy.name} loaded in {time.perf_counter() - t0:.0f}s from {policy.source}")
    return policy


def train_prompts(cfg: RunConfig, tokenizer: Any, system_prompt: str | None,
                  records: Sequence[Mapping[str, Any]] | None = None) -> list[ro.Prompt]:
    """Every (record, question) prompt of the train split (``data.questions``), chat-encoded."""
    from jaxkd.data.formatting import example_id, prompt_messages
    from jaxkd.distill.teacher import select_prompts

    if records is None:
        from jaxkd.data.store import load_records

        records = load_records(cfg.data.train_split, built_dir=cfg.data.built_dir)
    key = cfg.domain_sampling.key
    out = []
    for rec, qi in select_prompts(records, cfg.data.questions, 0):
        messages = prompt_messages(dict(rec), qi, system_prompt)
        out.append(ro.chat_prompt(tokenizer, messages, {
            "id": example_id(rec["id"], qi), "question": rec["questions"][qi], "record": rec,
            "domain": str(rec.get(key, "")), "reference": " ".join(rec.get("steps") or ())}))
    if not out:
        raise ValueError(f"no prompts in split {cfg.data.train_split!r}")
    return out


def prompt_sampler(prompts: Sequence[ro.Prompt], cfg: RunConfig) -> Any:
    """A ``DomainSampler`` over the prompts' domains (uniform over domains with domain_balance)."""
    from jaxkd.distill.sampling import DomainSampler

    domains = [p.meta["domain"] for p in prompts]
    sampler = DomainSampler(domains, seed=cfg.grpo.seed)
    if cfg.grpo.domain_balance:
        sampler.set_weights({d: 1.0 for d in sampler.names})
    return sampler


def reward_weights(g: GRPOConfig) -> dict[str, float]:
    """The weights ``jaxkd.rl.grpo.combine_rewards`` applies to the reward function's components."""
    return {"r_tech": g.w_tech, "r_lang": g.w_lang}


def make_reward_fn(g: GRPOConfig, judge: Any) -> Callable[[list, list[str]], dict[str, np.ndarray]]:
    """``reward_fn(meta, texts) -> {"r_tech", "r_lang", every RewardBreakdown component}``."""
    from jaxkd.rewards import combined_rewards

    rcfg = g.reward_config()
    if rcfg.use_judge and judge is None:
        raise ValueError("grpo.reward.use_judge is true but no judge was loaded")

    def reward_fn(meta: list[Mapping[str, Any]], texts: list[str]) -> dict[str, np.ndarray]:
        br = combined_rewards([m["record"] for m in meta], texts, config=rcfg,
                              judge=judge if rcfg.use_judge else None, questions=[m["question"] for m in meta])
        return {"r_tech": br.r_tech, "r_lang": br.r_lang, **br.components}

    return reward_fn


def load_reward_judge(cfg: RunConfig, policy: Any, log: Callable[[str], None]) -> Any:
    """The LLM judge of ``grpo.judge`` (None when the reward is rule-only); never the policy."""
    g = cfg.grpo
    if not g.reward.use_judge:
        return None
    name = g.judge.model
    for other, what in ((getattr(policy, "run_dir", None), "the policy's start run"), (cfg.run_dir, "this run")):
        if other is not None and _same_path(name, other):
            raise ConfigError(f"grpo.judge.model={name} is {what}: the judge must be a separate, fixed model "
                              f"(default: the base 0.5B preset)")
    from jaxkd.judge import load_judge

    return load_judge(name, config=g.judge, log=log)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GRPOResult:
    summary: dict[str, Any]
    state: dict
    history: list[dict[str, Any]]


def run_grpo_stage(cfg: RunConfig, *, resume: bool = False, policy: Any = None, judge: Any = None,
                   records: Sequence[Mapping[str, Any]] | None = None, log: Callable[[str], None] = print,
                   progress: bool = True) -> GRPOResult:
    """Train the policy with GRPO into ``cfg.run_dir``. ``policy`` (a LoadedModel-like object with
    ``model`` / ``tokenizer``), ``judge`` and ``records`` (train split) replace the loaded ones in
    tests."""
    g, tc = cfg.grpo, cfg.grpo.train
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, g.rows // tc.grad_accum)
    if policy is None:
        policy = load_policy(cfg, log)
    if judge is None:
        judge = load_reward_judge(cfg, policy, log)
    model, tokenizer = policy.model, policy.tokenizer
    from jaxkd.data.formatting import SYSTEM_PROMPT

    if getattr(policy, "kind", None) == "run":
        system_prompt = policy.system_prompt  # the prompt the student was trained with
    else:
        system_prompt = SYSTEM_PROMPT if cfg.data.system_prompt is None else (cfg.data.system_prompt or None)
    prompts = train_prompts(cfg, tokenizer, system_prompt, records)
    sampler = prompt_sampler(prompts, cfg)
    log(f"GRPO prompts: {len(prompts)} from split {cfg.data.train_split!r}, domains "
        f"{ {d: round(w, 3) for d, w in sampler.weights.items()} }")

    model = st.prepare_model(model, tc)
    graphdef, params, frozen = st.split_model(model, tc.trainable)
    ref_graphdef = lora_reference(model, tc.trainable, g.beta)
    source = RolloutSource(model, tokenizer, lambda n: [prompts[i] for i in sampler.next_indices(n)],
                           make_reward_fn(g, judge), g, weights=reward_weights(g), graphdef=graphdef,
                           frozen=frozen, grad_accum=tc.grad_accum, mesh=mesh, max_seq_len=g.max_seq_len)
    tx, step_fn = build_optimizer_step(graphdef, g, tc, vocab=source.vocab, mesh=mesh, ref_graphdef=ref_graphdef)
    extra: dict[str, Any] = {"frozen": frozen}
    if g.beta > 0 and ref_graphdef is None:  # (LoRA: the base, adapters off, is the reference)
        # The reference is the initial policy (also on resume); a copy: the state's buffers are donated.
        extra["ref_params"] = jax.tree.map(jnp.copy, params)
    state = st.init_state(params, tx, tc.seed, mesh)
    log(f"trainable={tc.trainable}: {st.count(params):,} trainable / {st.count(frozen):,} frozen values; "
        f"reference model: {'yes (beta=' + str(g.beta) + ')' if g.beta > 0 else 'none (beta=0)'}")

    run_dir = cfg.run_dir
    ckpt = RunCheckpointer(run_dir, keep=tc.keep, create=True)
    state, extras, start = ckpt.start(state, resume=resume, log=log)
    if extras is not None:
        sampler.set_state(extras["prompts"])
    prepare_run_dir(cfg, recipe="grpo", pretrained=policy, model_cfg=model.cfg, tokenizer=tokenizer,
                    system_prompt=system_prompt, train=tc)

    logger = MetricsLogger(run_dir)
    history: list[dict[str, Any]] = []

    def sink(it: int, step: int, rec: dict) -> None:
        logger.log(step, {"rollout": it, **rec}, prefix=PREFIX)
        history.append({"step": step, "rollout": it, **rec})

    records_hook = RolloutRecords(source, DiagnosticsTracker(g.diagnostics), mu=g.mu, sink=sink, log=log)
    hooks = [H.stop_on_non_finite(ckpt), records_hook.hook()]
    close_bar = None
    if progress:
        bar, close_bar = H.progress_bar(start, tc.steps, "grpo")
        hooks.append(bar)
    hooks.append(H.save_checkpoints(ckpt, every=tc.ckpt_every, extras=lambda: {"prompts": sampler.get_state()}))
    t_loop = time.perf_counter()
    try:
        state = run_loop(step_fn, state, source=source, extra=extra, start=start, steps=tc.steps, hooks=hooks)
    finally:
        logger.close()
        ckpt.close()
        if close_bar is not None:
            close_bar()
    summary = {"run_dir": str(run_dir), "steps": tc.steps, "mu": g.mu, "resumed_from": start if resume else None,
               "policy": getattr(policy, "name", "?"), "judge": g.judge.model if g.reward.use_judge else None,
               "prompts": len(prompts), "rows_per_step": g.rows, "loop_s": round(time.perf_counter() - t_loop, 1),
               "sampler": sampler.get_state(), "grpo": to_dict(g)}
    return GRPOResult(summary=summary, state=state, history=history)


# --------------------------------------------------------------------------------------------
# The report, rebuilt from metrics.jsonl
# --------------------------------------------------------------------------------------------


def read_grpo_metrics(metrics_jsonl: str | Path) -> list[dict[str, float]]:
    """One row per optimizer step that closed a rollout batch (prefix stripped, ordered by step);
    for a resumed run the last row logged for a step wins."""
    rows: dict[int, dict] = {}
    for line in Path(metrics_jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if f"{PREFIX}loss" in r:
            rows[int(r["step"])] = {"step": int(r["step"]), **{k[len(PREFIX):]: v for k, v in r.items()
                                                              if k.startswith(PREFIX)}}
    return [rows[s] for s in sorted(rows)]


# (plot label, metric key) of the curves: the reward, its two parts, length, KL.
CURVES = (("total reward R", "reward_mean"), ("R_tech", "reward/r_tech_mean"), ("R_lang", "reward/r_lang_mean"),
          ("completion length (tokens)", "mean_length"))


def grpo_report(run_dir: str | Path, out_dir: str | Path, name: str, diagnostics: Any = None) -> dict[str, Path]:
    """Write ``grpo_<name>.png`` / ``.json`` / ``.md`` into ``out_dir`` from ``run_dir/metrics.jsonl``.

    The diagnostics summary is recomputed by replaying every row through a ``DiagnosticsTracker``
    (``diagnostics``: the thresholds; default: the run's config.json, else the defaults).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxkd.config import GRPODiagnosticsConfig, from_dict

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    rows = read_grpo_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no GRPO rows ({PREFIX}loss); did the run train?")
    if diagnostics is None:
        conf = run_dir / "config.json"
        d = json.loads(conf.read_text()).get("grpo", {}).get("diagnostics") if conf.exists() else None
        diagnostics = from_dict(GRPODiagnosticsConfig, d) if d else GRPODiagnosticsConfig()
    tracker = DiagnosticsTracker(diagnostics)
    for r in rows:
        tracker.update(int(r["rollout"]), r)
    kl_key = "kl_ref" if any("kl_ref" in r for r in rows) else "approx_kl_old"
    kl_label = ("KL to the reference (k3 / token)" if kl_key == "kl_ref"
                else "KL(pi_old || pi) per update (k3; beta=0: no reference)")
    components = sorted({k[len("reward/"):-len("_mean")] for r in rows for k in r
                         if k.startswith("reward/") and k.endswith("_mean")})
    per_step = []
    for r in rows:
        per_step.append({"step": r["step"], "rollout": int(r["rollout"]), "reward_mean": r["reward_mean"],
                         "reward_std": r["reward_std"], "mean_length": r["mean_length"], kl_key: r.get(kl_key),
                         "components": {c: {"mean": r.get(f"reward/{c}_mean"), "std": r.get(f"reward/{c}_std")}
                                        for c in components},
                         "loss": r["loss"], "entropy": r.get("entropy"), "clip_frac": r.get("clip_frac"),
                         "step_s": r.get("step_s")})
    summary = tracker.summary()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"grpo_{name}"
    report = {"run": name, "source": str(run_dir / "metrics.jsonl"), "steps": len(rows), "kl_metric": kl_key,
              "per_step": per_step, "diagnostics": summary,
              "warnings": {k: v for k, v in summary["warnings"].items()}}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=_json_float))

    def f(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"

    lines = [f"# GRPO run {name}", "", f"Rebuilt from `{run_dir / 'metrics.jsonl'}` by "
             f"`jaxkd.rl.recipe.grpo_report`; {len(rows)} rollout steps.", "",
             "## Reward per step (mean ± std over the rollout batch)", "",
             "| step | R | R_tech | R_lang | length | " + kl_key + " | entropy | s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {f(r['reward_mean'])} ± {f(r['reward_std'])} | "
                     f"{f(r.get('reward/r_tech_mean'))} ± {f(r.get('reward/r_tech_std'))} | "
                     f"{f(r.get('reward/r_lang_mean'))} ± {f(r.get('reward/r_lang_std'))} | {f(r['mean_length'])} | "
                     f"{f(r.get(kl_key))} | {f(r.get('entropy'))} | {f(r.get('step_s'))} |")
    lines += ["", "## Reward components per step (mean)", "",
              "| step | " + " | ".join(components) + " |", "|---" * (len(components) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['step']} | " + " | ".join(f(r.get(f"reward/{c}_mean")) for c in components) + " |")
    lines += ["", "## Diagnostics", "", tracker.markdown()]
    if summary["warnings"]:
        lines += ["Warnings (check: rollout steps): " + "; ".join(f"{k}: {v}" for k, v in summary["warnings"].items()), ""]
    else:
        lines += ["No diagnostic crossed its threshold.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 5, figsize=(19, 3.4))
    x = [r["step"] for r in rows]
    for ax, (label, key) in zip(axes, (*CURVES, (kl_label, kl_key))):
        y = [r.get(key, float("nan")) for r in rows]
        ax.plot(x, y, marker="o", ms=3)
        std_key = key.replace("_mean", "_std") if key.endswith("_mean") else None
        if std_key and all(std_key in r for r in rows):
            s = np.asarray([r[std_key] for r in rows], float)
            ax.fill_between(x, np.asarray(y, float) - s, np.asarray(y, float) + s, alpha=0.2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(f"GRPO {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)
    return {ext: stem.with_suffix(f".{ext}") for ext in ("png", "json", "md")}


def _json_float(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


__all__ = ["CHECKS", "GRPOResult", "grpo_report", "load_policy", "make_reward_fn", "prompt_sampler",
           "read_grpo_metrics", "reward_weights", "run_grpo_stage", "train_prompts"]
