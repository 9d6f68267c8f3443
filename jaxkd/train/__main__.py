"""``python -m jaxkd.train --config configs/cpu_default.yaml stage=teacher|kd [key.path=value ...]``

stage=teacher  the teacher answers the training (and validation) prompts once; answers and top-k
               logits go to ``teacher.cache_dir``, the text answers (with provenance) to
               ``teacher.answers_dir`` for committing.
stage=kd       the student trains on them into ``runs/<name>`` (``--resume`` continues the run);
               ``python -m jaxkd.generate --model runs/<name>`` then serves it.
stage=grpo     GRPO from ``grpo.init`` (e.g. runs/kd-cpu) into ``runs/<name>`` with the judge +
               rule reward; publishes evals/results/grpo_<name>.png/.json/.md at the end.

Each stage is a recipe: a function ``(cfg, resume, command) -> exit code`` in ``RECIPES``, the one
dispatch table from ``config.Stage``. Processes that load real weights should run under
``flock /tmp/jaxkd-bigmem.lock`` on a shared CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from jaxkd.config import RunConfig, Stage


def _setup_jax_cache() -> None:
    root = Path(__file__).resolve().parents[2]
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _log(s: str) -> None:
    print(s, flush=True)


def teacher_recipe(cfg: RunConfig, resume: bool, command: str) -> int:
    from jaxkd.distill.teacher_stage import run_teacher_stage

    summary = run_teacher_stage(cfg, command=command, log=_log)
    print(json.dumps(summary, indent=1))
    return 0


def kd_recipe(cfg: RunConfig, resume: bool, command: str) -> int:
    from jaxkd.distill import kd

    t0 = time.perf_counter()
    result = kd.run_kd(cfg, resume=resume, log=_log)
    summary = result.summary
    if cfg.train.final_generate and result.val_examples:
        summary["val_generation"] = kd.final_generation(result, cfg.train.final_generate,
                                                        cfg.teacher.sampling.max_new_tokens)
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    summary["command"] = command
    kd.write_summary(cfg.run_dir, summary)
    _publish(cfg)
    print(json.dumps(summary, indent=1, default=str))
    print(f"trained student in {cfg.run_dir}: serve it with `python -m jaxkd.generate --model {cfg.run_dir} "
          f"\"...\"` (newest run: also `make run`, `make demo`)", flush=True)
    return 0


def grpo_recipe(cfg: RunConfig, resume: bool, command: str) -> int:
    from jaxkd.rl import recipe

    t0 = time.perf_counter()
    result = recipe.run_grpo_stage(cfg, resume=resume, log=_log)
    summary = result.summary
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    summary["command"] = command
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    results = _results_dir()
    if results is not None:
        written = recipe.grpo_report(cfg.run_dir, results, cfg.name, cfg.grpo.diagnostics)
        print(f"GRPO report: {', '.join(str(p) for p in written.values())}", flush=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "grpo"}, indent=1, default=str))
    print(f"GRPO policy in {cfg.run_dir}: serve it with `python -m jaxkd.generate --model {cfg.run_dir} "
          f"\"...\"`", flush=True)
    return 0


# The one dispatch table: a new stage adds its Stage member and its recipe here.
RECIPES: dict[Stage, Callable[[RunConfig, bool, str], int]] = {
    Stage.TEACHER: teacher_recipe,
    Stage.KD: kd_recipe,
    Stage.GRPO: grpo_recipe,
}


def _results_dir() -> Path | None:
    """evals/results (or $JAXKD_RESULTS_DIR); None outside a checkout."""
    results = Path(os.environ.get("JAXKD_RESULTS_DIR")
                   or Path(__file__).resolve().parents[2] / "evals" / "results")
    if not results.parent.is_dir():
        return None
    results.mkdir(exist_ok=True)
    return results


def _publish(cfg: RunConfig) -> None:
    """Copy the run's summary and a loss / domain-weight plot to evals/results/kd_<name>.*"""
    import shutil

    from jaxkd.train.metrics import plot_training, read_metrics, val_curve, val_curve_markdown

    results = _results_dir()
    if results is None:
        return
    stem = results / f"kd_{cfg.name}"
    src = cfg.run_dir / "summary.json"
    if src.exists():
        shutil.copy(src, stem.with_suffix(".json"))
    metrics = cfg.run_dir / "metrics.jsonl"
    md = cfg.run_dir / "summary.md"
    if md.exists():
        curve = val_curve(read_metrics(metrics)) if metrics.exists() else []
        stem.with_suffix(".md").write_text(md.read_text() + ("\n" + val_curve_markdown(curve) if curve else ""))
    plot_training(metrics, stem.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxkd.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stage=kd train.steps=10")
    args = parser.parse_args(argv)
    _setup_jax_cache()
    from jaxkd.distributed import maybe_initialize

    maybe_initialize()  # joins a multi-process group when launch/ set one up; before any JAX work

    from jaxkd.config import ConfigError, load

    try:
        cfg = load(RunConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m jaxkd.train " + " ".join(shlex.quote(a) for a in argv)
    return RECIPES[cfg.stage](cfg, args.resume, command)


if __name__ == "__main__":
    sys.exit(main())
