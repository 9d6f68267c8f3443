"""``python -m jaxkd.train --config configs/cpu_default.yaml stage=teacher|kd [key.path=value ...]``

stage=teacher  the teacher answers the training (and validation) prompts once; answers and top-k
               logits go to ``teacher.cache_dir``, the text answers (with provenance) to
               ``teacher.answers_dir`` for committing.
stage=kd       the student trains on them (``--resume`` continues the run in ``runs/<name>``).

Processes that load real weights should run under ``flock /tmp/jaxkd-bigmem.lock`` on a shared
CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path


def _setup_jax_cache() -> None:
    root = Path(__file__).resolve().parents[2]
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


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

    from jaxkd.config import ConfigError, RunConfig, Stage, load

    try:
        cfg = load(RunConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    if cfg.stage == Stage.TEACHER:
        argv = sys.argv[1:] if argv is None else argv
        return _teacher_stage(cfg, "python -m jaxkd.train " + " ".join(shlex.quote(a) for a in argv))
    from jaxkd.train import loop

    t0 = time.perf_counter()
    summary = loop.run_kd(cfg, resume=args.resume, log=lambda s: print(s, flush=True))
    if cfg.train.final_generate and summary["val_examples_list"]:
        summary["val_generation"] = loop.final_generation(
            summary, summary["val_examples_list"], summary["tokenizer"], cfg.train.final_generate,
            cfg.teacher.sampling.max_new_tokens)
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    loop.write_summary(cfg.run_dir, summary)
    _publish(cfg, summary)
    print(json.dumps(loop.plain_summary(summary), indent=1, default=str))
    return 0


def _publish(cfg, summary) -> None:
    """Copy the run's summary and a loss / domain-weight plot to evals/results/kd_<name>.*"""
    import shutil

    from jaxkd.train.metrics import plot_training

    results = Path(os.environ.get("JAXKD_RESULTS_DIR")
                   or Path(__file__).resolve().parents[2] / "evals" / "results")
    if not results.parent.is_dir():
        return
    results.mkdir(exist_ok=True)
    stem = results / f"kd_{cfg.name}"
    for ext in ("json", "md"):
        src = cfg.run_dir / f"summary.{ext}"
        if src.exists():
            shutil.copy(src, stem.with_suffix(f".{ext}"))
    plot_training(cfg.run_dir / "metrics.jsonl", stem.with_suffix(".png"))


def _teacher_stage(cfg, command: str) -> int:
    from jaxkd.distill import teacher as T
    from jaxkd.distill.cache import TeacherCache, load_exported
    from jaxkd.models import load_pretrained

    items = [it for s in cfg.teacher.splits for it in T.teacher_prompts(cfg, s)]
    cache = TeacherCache(cfg.teacher.cache_dir)
    todo = sum(it.key not in cache for it in items)
    summary: dict = {}
    if todo:
        t0 = time.perf_counter()
        pt = load_pretrained(cfg.teacher.preset)
        print(f"loaded teacher {cfg.teacher.preset} in {time.perf_counter() - t0:.0f}s", flush=True)
        committed = T.answers_export_path(cfg)
        if committed.exists() and cfg.teacher.top_k > 0:
            # A fresh clone has the committed text answers but not the top-k store: one forward
            # pass over each answer rebuilds it, far cheaper than decoding the answers again.
            from jaxkd.distill.rescore import rescore_exported

            summary["rescored"] = rescore_exported(
                pt.model, pt.tokenizer, committed, cfg.teacher.cache_dir,
                keys=[it.key for it in items], top_k=cfg.teacher.top_k,
                logit_temperature=cfg.teacher.logit_temperature,
                vocab=T.real_vocab_size(pt.tokenizer, pt.model.cfg.vocab_size),
                preset=cfg.teacher.preset, grounding=cfg.teacher.grounding,
                log=lambda s: print(s, flush=True))
            cache = TeacherCache(cfg.teacher.cache_dir)
        summary.update(T.run_teacher(cfg, pt.model, pt.tokenizer, items=items,
                                    log=lambda s: print(s, flush=True)))
    prov = T.provenance(cfg, {"splits": {s: sum(it.split == s for it in items) for s in cfg.teacher.splits},
                              "last_run": summary}, command=command)
    cache.write_provenance(prov)
    committed = T.answers_export_path(cfg)
    if not summary.get("generated") and committed.exists() and \
            {it.key for it in items} <= set(load_exported(committed)[1]):
        # Nothing was decoded (answers cached or rescored): the committed file and the provenance
        # of the run that generated it stay as they are.
        print(f"teacher answers: all {len(items)} prompts already in {committed} (left unchanged; "
              f"top-k store in {cfg.teacher.cache_dir})")
    else:
        path = T.export_stage_answers(cfg, items, prov)
        print(f"teacher answers: {len(items)} prompts -> {path} (top-k store in {cfg.teacher.cache_dir})")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
