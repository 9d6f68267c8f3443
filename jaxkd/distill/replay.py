"""General replay: the base student's own answers to general chat prompts, mixed into KD.

A student trained only on troubleshooting answers learns to answer *everything* in numbered
steps: asked for the capital of France, the corpus-scale KD student listed "1. The capital of
France is Paris. 2. It is located ...". Replay keeps the general behaviour in the training
distribution. The teacher stage has the student preset (before any training) answer the prompts
of ``replay.prompts`` under the same system prompt the student is trained and served with,
capturing its top-k exactly as the teacher's are captured; KD then draws ``replay.fraction`` of
its rows from those answers. On a replay row the KD loss is CE on the base's answer plus KL to
the base's distribution: a KL anchor to the starting model on general text, with no second model
in memory during training.

The replay prompts are training data: they must stay disjoint from the retention evaluation
(``jaxkd/data/general/sanity_qa.jsonl`` and ``text.txt``); ``tests/test_replay.py`` checks it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxkd.config import ConfigError, RunConfig, SamplingConfig

REPLAY_SPLIT = "replay"
# the domain label of every replay row, whatever domain_sampling.key is; no corpus record uses it
REPLAY_DOMAIN = "general-replay"


def load_replay_prompts(path: str | Path) -> list[dict[str, str]]:
    """``{"id", "category", "prompt"}`` per line; a clear error for a missing file, a bad line
    or a repeated id."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"replay.prompts: {path} does not exist (general chat prompts, one JSON "
                                "object {\"id\", \"category\", \"prompt\"} per line)")
    from jaxkd.data.store import jsonl_lines

    out, seen = [], set()
    for n, row in jsonl_lines(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("id", "category", "prompt")):
            raise ValueError(f"{path}:{n}: needs non-empty string fields id, category, prompt")
        if row["id"] in seen:
            raise ValueError(f"{path}:{n}: id {row['id']!r} repeated")
        seen.add(row["id"])
        out.append(row)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def replay_records(cfg: RunConfig) -> list[dict[str, Any]]:
    """The replay prompts as one-question records, so the teacher stage's prompt, cache and
    export machinery applies unchanged (``example_meta`` reads device / category / issue)."""
    rows = load_replay_prompts(cfg.replay.prompts)
    if cfg.replay.limit:
        rows = rows[:cfg.replay.limit]
    return [{"id": r["id"], "device": REPLAY_DOMAIN, "category": REPLAY_DOMAIN, "issue": REPLAY_DOMAIN,
             "split": REPLAY_SPLIT, "questions": [r["prompt"]], "replay_category": r["category"]}
            for r in rows]


def replay_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the teacher section describing the replay answers: the student preset,
    ungrounded, greedy, top-k captured like the teacher's (same k and temperature, so the KD loss
    reads both stores alike), its own cache and answers directory. Its answer filter keeps only
    the truncation check: the record checks (reference steps, unsafe advice) are the corpus's."""
    if not cfg.replay.enabled:
        raise ConfigError("replay.enabled is false")
    rc, tc = cfg.replay, cfg.teacher
    teacher = dataclasses.replace(
        tc, preset=cfg.student, grounding="none", batch_size=rc.batch_size,
        sampling=SamplingConfig(max_new_tokens=rc.max_new_tokens, temperature=0.0),
        cache_dir=rc.cache_dir, answers_dir=rc.answers_dir, questions="first",
        limit_per_split={REPLAY_SPLIT: rc.limit})
    distill = dataclasses.replace(cfg.distill, min_step_coverage=0.0, drop_unsafe=False, drop_leaked_notes=False)
    return dataclasses.replace(cfg, teacher=teacher, distill=distill)


__all__ = ["REPLAY_DOMAIN", "REPLAY_SPLIT", "load_replay_prompts", "replay_config", "replay_records"]
