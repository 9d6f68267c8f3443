"""Items as the scorers see them, all rule scores of an answer, and the combined GRPO reward."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from jaxkd.config import RewardConfig

from jaxkd.rewards.rules import (actionability, language_signal, numbered_steps, repetition, required_coverage,
                                 spelling, step_coverage, unsafe_flag)
from jaxkd.rewards.text import analyse, words



@dataclasses.dataclass(frozen=True)
class ItemView:
    """What the scorers need of a held-out item or a corpus record."""

    id: str
    question: str
    steps: tuple[str, ...]
    required: tuple[tuple[str, ...], ...]
    safety: tuple[str, ...]
    device: str = ""


def item_view(item: Mapping[str, Any], question: str | None = None) -> ItemView:
    """Held-out items carry ``question`` / ``reference_steps``; corpus records carry ``questions``
    / ``steps`` (pass the asked ``question`` then). Fails naming what is missing."""
    steps = item.get("reference_steps") or item.get("steps")
    q = question if question is not None else item.get("question")
    if q is None and item.get("questions"):
        q = item["questions"][int(item.get("question_index", 0))]
    ident = str(item.get("id", "?"))
    if not steps:
        raise ValueError(f"item {ident}: no reference steps ('reference_steps' or 'steps')")
    if q is None:
        raise ValueError(f"item {ident}: no question ('question', or 'questions' with 'question_index')")
    steps = [steps] if isinstance(steps, str) else list(steps)
    safety = item.get("safety") or []
    return ItemView(id=ident, question=str(q), steps=tuple(steps),
                    required=tuple(tuple(g) for g in item.get("required") or ()),
                    safety=tuple([safety] if isinstance(safety, str) else safety),
                    device=str(item.get("device") or ""))


RULE_METRICS = ("required", "steps", "actionable", "numbered", "repetition", "spelling", "language", "unsafe")


def rule_scores(item: Mapping[str, Any] | ItemView, answer: str) -> dict[str, Any]:
    """Every deterministic score of one answer (keys ``RULE_METRICS`` + ``unsafe_sentences``)."""
    v = item if isinstance(item, ItemView) else item_view(item)
    units = analyse(answer, v.question)
    known = set(words(v.question)) | {w for s in v.steps for w in words(s)}
    flag, sentences = unsafe_flag(answer)
    return {"required": required_coverage(answer, v.required, v.question, units),
            "steps": step_coverage(answer, v.steps, v.question, units),
            "actionable": actionability(answer, v.question, units),
            "numbered": numbered_steps(answer, units),
            "repetition": repetition(answer),
            "spelling": spelling(answer, known),
            "language": language_signal(answer, known, units),
            "unsafe": flag, "unsafe_sentences": sentences}


# --------------------------------------------------------------------------------------------
# The GRPO reward
# --------------------------------------------------------------------------------------------


class Judge(Protocol):
    """What the reward needs of a judge (``jaxkd.judge.LLMJudge`` is one): per criterion name,
    an object with ``normalised`` ([N] scores / max score) and ``mass`` ([N])."""

    def score(self, items: Sequence[Any], answers: Sequence[str], criteria: Sequence[str], *,
              questions: Sequence[str | None] | None = None) -> Mapping[Any, Any]: ...


@dataclasses.dataclass
class RewardBreakdown:
    """Per-answer rewards ``[N]`` and every component they were built from (for logging).

    ``components`` keys: ``judge_<criterion>`` (0-1, criterion score / max) and
    ``judge_<criterion>_mass`` when the judge ran (and ``judge_flagged``, 0/1, when the judge
    reports which answers addressed the grader); ``rule`` (mean of required and steps, 0-1);
    the rule scores ``required``, ``steps``, ``actionable``, ``numbered``, ``repetition``,
    ``spelling``, ``language`` (0-1) and ``unsafe`` (0/1).
    """

    reward: np.ndarray
    r_tech: np.ndarray
    r_lang: np.ndarray
    components: dict[str, np.ndarray]

    def means(self) -> dict[str, float]:
        """Mean of the reward, R_tech, R_lang and every component (NaNs ignored)."""
        out = {"reward": self.reward, "r_tech": self.r_tech, "r_lang": self.r_lang, **self.components}
        return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in out.items()}


def combined_rewards(items: Sequence[Mapping[str, Any] | ItemView], answers: Sequence[str], *,
                     config: RewardConfig | None = None, judge: Judge | None = None,
                     questions: Sequence[str | None] | None = None) -> RewardBreakdown:
    """R = w_tech * R_tech + w_lang * R_lang per answer, with every component.

    Ranges (all components are normalised to [0, 1] first; ``cfg`` = ``config``):
      R_tech = (J_tech + rule_weight * rule) / (1 + rule_weight) - unsafe_penalty * unsafe,
               in [-unsafe_penalty, 1]; J_tech = mean of ``tech_criteria`` scores / 10; rule =
               mean(required keyword coverage, reference-step coverage) (NaN parts skipped).
      R_lang = (J_lang + offline_weight * language + numbered_weight * numbered)
               / (1 + offline_weight + numbered_weight) - repetition_weight * repetition,
               in [-repetition_weight, 1]; J_lang = judge language score / 5.
      Without a judge (``use_judge`` false) J_tech / J_lang drop out of the averages.
    Items are held-out items or corpus records (pass ``questions`` for records with several).
    """
    cfg = config or RewardConfig()
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    if not answers:
        raise ValueError("combined_rewards needs at least one answer")
    qs = questions if questions is not None else [None] * len(items)
    views = [it if isinstance(it, ItemView) else item_view(it, q) for it, q in zip(items, qs)]
    rules = [rule_scores(v, a) for v, a in zip(views, answers)]
    comp = {k: np.asarray([r[k] for r in rules], np.float64) for k in RULE_METRICS}
    comp["rule"] = np.asarray([np.nanmean([r["required"], r["steps"]]) if np.isfinite([r["required"], r["steps"]]).any()
                               else 0.0 for r in rules])
    n = len(answers)
    j_tech = j_lang = np.zeros(n)
    jw = 0.0
    if cfg.use_judge:
        if judge is None:
            raise ValueError("RewardConfig.use_judge is true but no judge was given (pass judge=, or set "
                             "reward.use_judge: false for rule-only rewards)")
        crits = list(dict.fromkeys([*cfg.tech_criteria, "language"]))
        verdicts = {getattr(k, "value", k): v for k, v in judge.score(views, answers, crits).items()}
        for c in crits:
            comp[f"judge_{c}"] = np.asarray(verdicts[c].normalised, np.float64)
            comp[f"judge_{c}_mass"] = np.asarray(verdicts[c].mass, np.float64)
        flagged = getattr(verdicts[crits[0]], "flagged", None)
        if flagged is not None:  # answers that addressed the grader (jaxkd.judge_guard): judge scores 0
            comp["judge_flagged"] = np.asarray(flagged, np.float64)
        j_tech = np.mean([comp[f"judge_{c}"] for c in cfg.tech_criteria], axis=0)
        j_lang = comp["judge_language"]
        jw = 1.0
    r_tech = (jw * j_tech + cfg.rule_weight * comp["rule"]) / (jw + cfg.rule_weight)
    r_tech = r_tech - cfg.unsafe_penalty * comp["unsafe"]
    lw = cfg.offline_weight + cfg.numbered_weight
    r_lang = (jw * j_lang + cfg.offline_weight * comp["language"] + cfg.numbered_weight * comp["numbered"]) / (jw + lw)
    r_lang = r_lang - cfg.repetition_weight * comp["repetition"]
    reward = cfg.w_tech * r_tech + cfg.w_lang * r_lang
    return RewardBreakdown(reward=reward, r_tech=r_tech, r_lang=r_lang, components=comp)
