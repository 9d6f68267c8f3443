"""What moves the judge's score: its rubric half vs its step-probe half, against the rule scorers.

    python -m evals.judge_diagnostics --config configs/eval_corpus_full.yaml
        # writes evals/results/<name>_judge_diagnostics.md from the committed caches (no model)

With step probes on (``judge.step_weight`` > 0), a technical / completeness score is
``(1 - w) * rubric expectation + w * 10 * mean P(yes | "does the answer contain step s?")``. The
calibration pairs (``evals/results/judge_calibration.md``) check the sum on hand-made answers; this
report checks the halves on the real answers of an ``evals.run`` report. Per model it gives each half's
mean, each half's paired difference to the baseline (record-level bootstrap, the same resampling
as the report), and the item-level correlation of the probe half with the rule step coverage
(what the probes are meant to measure) and with the answer length (what they should not).

A last table goes one reference step at a time: the probe's P(yes) for a step against the rule
scorer's credit for that step in the same answer (``jaxkd.rewards.rules.step_credits``). Its AUC
is the chance that a step the rule finds (credit >= 0.5) gets a higher P(yes) than one it does not
(credit 0; ties count half): 0.5 is a probe that does not read the answer for that step, 1.0 one
that agrees with the rule on every pair. Neither side is ground truth (the rule misses
paraphrases, the probe may be right there), but a probe that cannot tell the grounded teacher's
steps from the base model's is not measuring steps.

Each model's judge rows (``<cache>/<tag>/judge.jsonl``: scores only; those its manifest entry
names, as in the report) are matched to the verdict
cache rows that hold the halves (``<cache>/judgements/<judge>__<rubric>.jsonl``) by item and exact
score; a row without exactly one match is an error, never a guess.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from evals.stats import paired_record_diff

CRITERIA = ("technical", "completeness")


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m evals.run --config ...` with the judge on first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def halves(judge_rows: Sequence[Mapping], verdicts: Sequence[Mapping], criterion: str) -> dict[str, dict[str, float]]:
    """item id -> {"score", "rubric", "probe"} for one model's judge rows."""
    index: dict[tuple[str, float], list[Mapping]] = defaultdict(list)
    for v in verdicts:
        if v["criterion"] == criterion:
            index[(v["item_id"], float(v["score"]))].append(v)
    out = {}
    for row in judge_rows:
        key = (row["item_id"], float(row["scores"][criterion]))
        hits = index.get(key, [])
        # the same answer judged twice (two models answering alike) gives identical rows: fine
        if not hits or len({json.dumps(h["dist"]) for h in hits}) != 1:
            raise KeyError(f"{criterion} verdict of {row['item_id']} (score {key[1]}): {len(hits)} candidate "
                           f"rows in the verdict cache; expected one")
        v = hits[0]
        if v.get("steps") is None:
            raise ValueError(f"{criterion} verdict of {row['item_id']} has no step probes (judge.step_weight 0?)")
        out[row["item_id"]] = {"score": float(v["score"]),
                               "rubric": float(np.dot(v["dist"], np.arange(len(v["dist"])))),
                               "probe": float(v["steps"]), "p_yes": list(v.get("steps_p_yes") or ())}
    return out


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(a random ``pos`` value > a random ``neg`` value), ties counting half (NaN if either is empty)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def step_table(cfg: Any, tags: Sequence[str], per: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
    """Per model and pooled: probe P(yes) on the steps the rule credits vs those it does not."""
    from evals.report import load_results
    from evals.run import select_items
    from jaxkd.rewards import item_view
    from jaxkd.rewards.rules import step_credits

    items = {it["id"]: it for it in select_items(cfg.items.split, cfg.items.records)}
    answers = {t: r["answers"] for t, r in load_results(cfg, list(items.values())).items()}
    found, missed = {}, {}
    for t in tags:
        found[t], missed[t] = [], []
        for i, h in per[t].items():
            view = item_view(items[i])
            credit = step_credits(answers[t][i], view.steps, view.question)
            if len(h["p_yes"]) != len(credit):
                raise ValueError(f"{t} {i}: {len(h['p_yes'])} probe answers for {len(credit)} reference steps")
            for p, c in zip(h["p_yes"], credit):
                if c >= 0.5:
                    found[t].append(p)
                elif c == 0:
                    missed[t].append(p)
    L = ["## Step probes against the rule scorer, step by step", "",
         "| model | steps the rule finds | steps it does not | P(yes), found | P(yes), not found | AUC |",
         "|---|---|---|---|---|---|"]
    for t, f, m in [*((t, found[t], missed[t]) for t in tags),
                    ("all models", sum(found.values(), []), sum(missed.values(), []))]:
        mean = lambda x: f"{np.mean(x):.3f}" if x else "-"  # noqa: E731
        L.append(f"| {t} | {len(f)} | {len(m)} | {mean(f)} | {mean(m)} | {auc(f, m):.3f} |")
    return L + [""]


def judge_rows(cache: Path, manifest: Mapping[str, Any], tag: str, judge: str,
               dtype: str | None = None) -> list[dict]:
    """``tag``'s judge.jsonl rows that its manifest entry names (``evals.report.judge_scores``, as
    the report reads them), checked to be ``judge``'s in ``dtype`` and complete."""
    from evals.report import judge_scores

    entry = manifest.get(tag, {}).get("judge")
    if not entry:
        raise KeyError(f"{tag}: its manifest entry names no judge scores: run the judge first")
    rows = judge_scores(cache / tag, tag, entry, judge, dtype)
    missing = sum(r is None for r in rows.values())
    if missing:
        raise KeyError(f"{tag}: {missing} of the manifest's judge keys are missing from {cache / tag / 'judge.jsonl'}")
    return list(rows.values())


def build(cfg: Any, results: Mapping[str, Any], config_path: str) -> str:
    from evals.measure import read_manifest
    from jaxkd.judge import RUBRIC_VERSION, verdict_cache_path

    cache = Path(cfg.cache_dir)
    manifest = read_manifest(cfg)
    judge = cfg.judge_model()
    vpath = verdict_cache_path(cache / "judgements", judge)
    verdicts = _jsonl(vpath)
    items = {m: {it["id"]: it for it in results["models"][m]["items"]} for m in results["models"]}
    tags = [m.tag for m in cfg.models]
    base = cfg.baseline
    L = [f"# Judge diagnostics: {cfg.name}", "",
         f"Command: `python -m evals.judge_diagnostics --config {config_path}` (reads `{vpath}` and each "
         f"model's `judge.jsonl`; no model). Judge `{judge}`, rubric `{RUBRIC_VERSION}`. A step-probed score is "
         "(1 - w) x rubric expectation (0-10) + w x 10 x probe P(yes), w = judge.step_weight. Paired "
         f"differences vs `{base}` with 95% record-level bootstrap intervals (unadjusted: diagnostics, not "
         "headline comparisons).", ""]
    rows = {t: judge_rows(cache, manifest, t, judge, cfg.judge.dtype) for t in tags}
    for c in CRITERIA:
        per = {t: halves(rows[t], verdicts, c) for t in tags}
        L += [f"## {c}", "",
              "| model | n | score | rubric half (0-10) | probe P(yes) | score - base | rubric - base | "
              "probe - base | corr(probe, rule steps) | corr(probe, words) |", "|---|---|---|---|---|---|---|---|---|---|"]
        ids = sorted(per[base])
        groups = [items[base][i]["record_id"] for i in ids]
        for t in tags:
            h = per[t]
            if sorted(h) != ids:
                raise KeyError(f"{t} and {base} were judged on different items")

            def col(name: str, tag: str = t) -> np.ndarray:
                return np.asarray([per[tag][i][name] for i in ids])

            diffs = []
            for name in ("score", "rubric", "probe"):
                if t == base:
                    diffs.append("-")
                    continue
                m, lo, hi, _ = paired_record_diff(col(name, base), col(name), groups, n=cfg.bootstrap_resamples,
                                                  seed=cfg.seed)
                diffs.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            rule = np.asarray([items[t][i]["steps"] for i in ids])
            words = np.asarray([items[t][i]["words"] for i in ids], float)
            L.append(f"| {t} | {len(ids)} | {col('score').mean():.3f} | {col('rubric').mean():.3f} | "
                     f"{col('probe').mean():.3f} | " + " | ".join(diffs) + f" | {np.corrcoef(col('probe'), rule)[0, 1]:+.3f} "
                     f"| {np.corrcoef(col('probe'), words)[0, 1]:+.3f} |")
        L.append("")
    L += step_table(cfg, tags, per)  # the probes are asked once per answer: any criterion's rows hold them
    return "\n".join(L)


def main(argv: Sequence[str] | None = None) -> None:
    from evals.run import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    report = Path(cfg.results_dir) / f"{cfg.name}.json"
    if not report.exists():
        raise FileNotFoundError(f"{report} missing: run `python -m evals.run --config {args.config}` first")
    text = build(cfg, json.loads(report.read_text()), args.config)
    out = Path(cfg.results_dir) / f"{cfg.name}_judge_diagnostics.md"
    out.write_text(text + "\n")
    print(out)


if __name__ == "__main__":
    main()
