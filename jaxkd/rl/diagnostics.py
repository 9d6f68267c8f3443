"""Reward-hacking and stability diagnostics for GRPO, computed every step from the rollout texts,
rewards and the update's metrics, checked against ``GRPODiagnosticsConfig`` thresholds.

Text checks work on lower-cased word tokens (``[a-z0-9]+``):
  verbosity     mean completion length; Pearson correlation of length with reward over the batch
                and within groups (group means removed: what the advantages actually reward)
  boilerplate   share of a completion's distinct word n-grams that also occur in completions of
                OTHER prompts (batch) / in every sibling of its group (group); repetition inside
                one completion (1 - distinct / total n-grams)
  off-topic     share of the question's (and the reference text's, when given) content words that
                the completion contains
  diversity     distinct-1 / distinct-2 within each group (distinct n-grams / n-grams, pooled over
                the group's K completions), averaged over groups
Update-side checks read the step metrics: k3 KL to the reference, clip fractions, entropy, the
zero-variance group share, the truncation rate and the sampler/trainer log-prob gap.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxkd.config import GRPODiagnosticsConfig

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset("""a an and are as at be but by can do does for from has have how i if in into is it
its my no not of on or so than that the then there this to up was what when where which why will with
you your""".split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if len(w) >= 3 and w not in STOPWORDS}


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant or there are < 2 points."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def length_reward_correlation(lengths: np.ndarray, rewards: np.ndarray, group: np.ndarray
                              ) -> tuple[float, float]:
    """(over the batch, within groups: both sides centred on their group means)."""
    lengths, rewards = np.asarray(lengths, np.float64), np.asarray(rewards, np.float64)
    group = np.asarray(group)
    lc, rc = lengths.copy(), rewards.copy()
    for g in np.unique(group):
        sel = group == g
        lc[sel] -= lengths[sel].mean()
        rc[sel] -= rewards[sel].mean()
    return pearson(lengths, rewards), pearson(lc, rc)


def boilerplate(texts: Sequence[str], group: np.ndarray, n: int) -> tuple[float, float]:
    """(batch share, group share): mean over completions of the share of their distinct n-grams
    found in another prompt's completion / in every other completion of their own group."""
    group = np.asarray(group)
    grams = [set(ngrams(words(t), n)) for t in texts]
    by_group: dict[int, set] = {}
    for g, s in zip(group, grams):
        by_group.setdefault(int(g), set()).update(s)
    batch_share, group_share = [], []
    for i, s in enumerate(grams):
        if not s:
            continue
        others = set().union(*(v for g, v in by_group.items() if g != int(group[i])))
        batch_share.append(len(s & others) / len(s) if len(by_group) > 1 else float("nan"))
        sibs = [grams[j] for j in np.flatnonzero(group == group[i]) if j != i]
        if sibs:
            common = set.intersection(*sibs)
            group_share.append(len(s & common) / len(s))
    return _nanmean(batch_share), _nanmean(group_share)


def self_repetition(texts: Sequence[str], n: int) -> float:
    """Mean over completions with at least one n-gram of 1 - distinct / total n-grams."""
    vals = []
    for t in texts:
        g = ngrams(words(t), n)
        if g:
            vals.append(1.0 - len(set(g)) / len(g))
    return _nanmean(vals)


def distinct_n(texts: Sequence[str], group: np.ndarray, n: int) -> float:
    """Distinct n-grams / n-grams pooled over each group's completions, averaged over groups."""
    group = np.asarray(group)
    vals = []
    for g in np.unique(group):
        pooled = [x for i in np.flatnonzero(group == g) for x in ngrams(words(texts[i]), n)]
        if pooled:
            vals.append(len(set(pooled)) / len(pooled))
    return _nanmean(vals)


def overlap(texts: Sequence[str], sources: Sequence[str | None]) -> float:
    """Mean share of each source's content words that its completion contains (NaN if no source)."""
    vals = []
    for t, src in zip(texts, sources):
        if not src:
            continue
        want = content_words(src)
        if want:
            vals.append(len(want & set(words(t))) / len(want))
    return _nanmean(vals)


def rollout_diagnostics(texts: Sequence[str], group: np.ndarray, rewards: np.ndarray,
                        lengths: np.ndarray, truncated: np.ndarray, *,
                        questions: Sequence[str | None] | None = None,
                        references: Sequence[str | None] | None = None, ngram: int = 4,
                        zero_variance_frac: float | None = None) -> dict[str, float]:
    """Every text-side diagnostic of one rollout batch (rows aligned with ``group``)."""
    corr, corr_group = length_reward_correlation(lengths, rewards, group)
    bp_batch, bp_group = boilerplate(texts, group, ngram)
    out = {
        "mean_length": float(np.mean(lengths)),
        "length_reward_corr": corr,
        "length_reward_corr_group": corr_group,
        "boilerplate_batch": bp_batch,
        "boilerplate_group": bp_group,
        "self_repetition": self_repetition(texts, ngram),
        "distinct_1": distinct_n(texts, group, 1),
        "distinct_2": distinct_n(texts, group, 2),
        "question_overlap": overlap(texts, questions) if questions is not None else float("nan"),
        "reference_overlap": overlap(texts, references) if references is not None else float("nan"),
        "truncation_rate": float(np.mean(truncated)),
    }
    if zero_variance_frac is not None:
        out["zero_variance_frac"] = float(zero_variance_frac)
    return out


# check name -> (metric key, threshold field of GRPODiagnosticsConfig, "max" | "min")
CHECKS: dict[str, tuple[str, str, str]] = {
    "verbosity": ("length_reward_corr_group", "max_length_reward_corr", "max"),
    "boilerplate_batch": ("boilerplate_batch", "max_boilerplate_batch", "max"),
    "boilerplate_group": ("boilerplate_group", "max_boilerplate_group", "max"),
    "self_repetition": ("self_repetition", "max_self_repetition", "max"),
    "off_topic_question": ("question_overlap", "min_question_overlap", "min"),
    "off_topic_reference": ("reference_overlap", "min_reference_overlap", "min"),
    "diversity": ("distinct_2", "min_distinct_2", "min"),
    "kl": ("kl_ref", "max_kl", "max"),
    "clipping": ("clip_frac", "max_clip_frac", "max"),
    "entropy": ("entropy", "min_entropy", "min"),
    "zero_variance_groups": ("zero_variance_frac", "max_zero_variance_frac", "max"),
    "truncation": ("truncation_rate", "max_truncation_rate", "max"),
    "logprob_gap": ("logprob_gap_mean", "max_logprob_gap", "max"),
}


def check_thresholds(record: Mapping[str, Any], cfg: GRPODiagnosticsConfig) -> list[str]:
    """A warning line for every check whose value crosses its threshold (missing/NaN: skipped)."""
    out = []
    for name, (key, field, side) in CHECKS.items():
        thr = getattr(cfg, field)
        value = record.get(key)
        if thr is None or value is None or not math.isfinite(float(value)):
            continue
        value = float(value)
        if (side == "max" and value > thr) or (side == "min" and value < thr):
            word = "above max" if side == "max" else "below min"
            out.append(f"{name}: {key} = {value:.4g} {word} {thr:g} (grpo.diagnostics.{field})")
    return out


class DiagnosticsTracker:
    """Collects each step's diagnostics, returns its threshold warnings, and summarises the run."""

    def __init__(self, cfg: GRPODiagnosticsConfig):
        self.cfg = cfg
        self.history: list[dict[str, float]] = []
        self.warnings: list[tuple[int, str, str]] = []  # (step, check, message)

    def update(self, step: int, record: Mapping[str, Any]) -> list[str]:
        row = {k: float(v) for k, v in record.items() if isinstance(v, (int, float, np.floating, np.integer))}
        self.history.append({"step": step, **row})
        msgs = check_thresholds(row, self.cfg)
        for m in msgs:
            self.warnings.append((step, m.split(":", 1)[0], m))
        return msgs

    def summary(self) -> dict[str, Any]:
        """Per metric: first, last, mean, min, max over steps; per check: steps that warned."""
        keys = sorted({k for h in self.history for k in h if k != "step"})
        metrics = {}
        for k in keys:
            vals = [h[k] for h in self.history if k in h and math.isfinite(h[k])]
            if vals:
                metrics[k] = {"first": vals[0], "last": vals[-1], "mean": float(np.mean(vals)),
                              "min": float(np.min(vals)), "max": float(np.max(vals))}
        checks = {name: [s for s, c, _ in self.warnings if c == name] for name in CHECKS}
        return {"steps": len(self.history), "metrics": metrics,
                "warnings": {k: v for k, v in checks.items() if v}}

    def markdown(self) -> str:
        """The summary as a Markdown table (one row per check, then the warned steps)."""
        s = self.summary()
        lines = ["| check | metric | threshold | first | last | min | max | steps warned |",
                 "|---|---|---|---|---|---|---|---|"]
        for name, (key, field, side) in CHECKS.items():
            m = s["metrics"].get(key)
            thr = getattr(self.cfg, field)
            if m is None:
                continue
            warned = s["warnings"].get(name, [])
            lines.append(f"| {name} | {key} | {side} {thr} | {m['first']:.4g} | {m['last']:.4g} | "
                         f"{m['min']:.4g} | {m['max']:.4g} | {len(warned)} |")
        return "\n".join(lines) + "\n"
