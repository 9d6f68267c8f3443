"""The teacher recipe (``stage=teacher``): answer the KD prompts once, keep answers and top-k logits.

Answers and top-k logits go to ``teacher.cache_dir``; the text answers (with provenance) to
``teacher.answers_dir`` for committing. When the committed answers exist but the top-k store does
not (a fresh clone), one forward pass over each answer rebuilds the store instead of decoding again.
With ``replay.enabled`` the same path then has the student preset answer the general replay
prompts (``jaxkd.distill.replay``) into ``replay.cache_dir`` / ``replay.answers_dir``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from jaxkd.config import RunConfig


def run_teacher_stage(cfg: RunConfig, *, command: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fill the teacher cache for ``cfg.teacher.splits`` (and, with ``replay.enabled``, the
    replay cache: the student preset's answers to the general prompts); returns the summary."""
    from jaxkd.distill import teacher as T

    items = [it for s in cfg.teacher.splits for it in T.teacher_prompts(cfg, s)]
    # teacher.splits=[] answers the replay prompts only (and touches no teacher file)
    summary = _answer(cfg, items, {s: sum(it.split == s for it in items) for s in cfg.teacher.splits},
                      command=command, log=log) if items else {}
    if cfg.replay.enabled:
        from jaxkd.distill.replay import REPLAY_SPLIT, replay_config, replay_records

        rcfg = replay_config(cfg)
        ritems = T.teacher_prompts(rcfg, REPLAY_SPLIT, records=replay_records(cfg))
        log(f"replay: the student {cfg.student} answers {len(ritems)} general prompts ({cfg.replay.prompts})")
        summary = {"teacher": summary, "replay": _answer(rcfg, ritems, {REPLAY_SPLIT: len(ritems)},
                                                          command=command, log=log, label="replay")}
    return summary


def _answer(cfg: RunConfig, items: Sequence[Any], splits: dict[str, int], *, command: str,
            log: Callable[[str], None], label: str = "teacher") -> dict[str, Any]:
    """``cfg.teacher.preset`` answers ``items`` into ``cfg.teacher.cache_dir`` (rebuilding the
    top-k of committed answers by rescoring them) and exports the text answers."""
    from jaxkd.distill import teacher as T
    from jaxkd.distill.cache import TeacherCache, load_exported
    from jaxkd.models import load_pretrained

    cache = TeacherCache(cfg.teacher.cache_dir)
    todo = sum(it.key not in cache for it in items)
    summary: dict = {}
    if todo:
        t0 = time.perf_counter()
        pt = load_pretrained(cfg.teacher.preset)
        log(f"loaded {label} {cfg.teacher.preset} in {time.perf_counter() - t0:.0f}s")
        committed = T.answers_export_path(cfg)
        if committed.exists() and cfg.teacher.top_k > 0:
            from jaxkd.distill.rescore import rescore_exported

            summary["rescored"] = rescore_exported(
                pt.model, pt.tokenizer, committed, cfg.teacher.cache_dir,
                keys=[it.key for it in items], top_k=cfg.teacher.top_k,
                logit_temperature=cfg.teacher.logit_temperature,
                vocab=T.real_vocab_size(pt.tokenizer, pt.model.cfg.vocab_size),
                preset=cfg.teacher.preset, grounding=cfg.teacher.grounding, log=log)
            cache = TeacherCache(cfg.teacher.cache_dir)
        summary.update(T.run_teacher(cfg, pt.model, pt.tokenizer, items=items, log=log))
    prov = T.provenance(cfg, {"splits": splits, "last_run": summary}, command=command)
    cache.write_provenance(prov)
    committed = T.answers_export_path(cfg)
    if not summary.get("generated") and committed.exists() and \
            {it.key for it in items} <= set(load_exported(committed)[1]):
        # Nothing was decoded (answers cached or rescored): the committed file and the provenance
        # of the run that generated it stay as they are.
        log(f"{label} answers: all {len(items)} prompts already in {committed} (left unchanged; "
            f"top-k store in {cfg.teacher.cache_dir})")
    else:
        path = T.export_stage_answers(cfg, items, prov)
        log(f"{label} answers: {len(items)} prompts -> {path} (top-k store in {cfg.teacher.cache_dir})")
    return summary
