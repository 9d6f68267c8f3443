"""LLM-as-judge over evaluation results: rubric scores from ``jaxkd.judge``, cached, per tag.

    python -m evals.judge --tags student_base student_kd --limit 32     # scores into kd_domain_<tag>.json
    python -m evals.judge --sanity --limit 16                            # reference vs mismatched answers
    python -m evals.judge --calibrate --judge qwen2.5-coder-1.5b-instruct   # hand-labelled pairs

The judge (``jaxkd.judge.LLMJudge``) reads the record's reference steps (no key-term list), the
question and the answer between delimiters, and scores four criteria as expectations over its
score-token distribution: technical accuracy 0-10, completeness 0-10, practical utility 0-10,
language quality 0-5. Per item, ``kd_domain_<tag>.json`` gains ``judge`` (technical / 10, the
column the reports have always shown), ``judge_acc`` (technical >= ``PASS_SCORE``),
``judge_completeness`` / ``judge_utility`` (/ 10), ``judge_language`` (/ 5), ``judge_mass``
(the probability the judge put on valid score tokens, lowest over the criteria) and
``judge_flagged`` (the injection guard caught text addressed to the grader: 0 on every criterion
under the default ``--injection zero``). Completeness mixes the rubric score with per-reference-step
yes/no probes (``--step-weight``; see ``jaxkd.judge``).

Default judge: ``JudgeConfig().model`` (the 1.5B preset) unless it is one of the models under
test and another preset is available (``pick_judge``); the choice is printed and stored.
Verdicts are cached in ``evals/results/judgements/<judge>__<rubric version>.jsonl`` keyed by
(judge weights fingerprint, rubric version, criterion, prompt), with provenance.
``--calibrate`` is documented in ``evals.calibration``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from evals.domain import RESULTS, GenerationCache, bootstrap_ci, distilled_paraphrase_items, heldout_items
from jaxkd.config import JudgeConfig
from jaxkd.judge import CRITERIA, RUBRIC_VERSION, Criterion, Verdicts

JUDGEMENTS = RESULTS / "judgements"
DEFAULT_JUDGE = JudgeConfig().model
JUDGE_PRESETS = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
PASS_SCORE = 6  # "judge accuracy" = share of answers with an expected technical score >= 6/10


def pick_judge(models_under_test: Sequence[str], requested: str | None = None,
               candidates: Sequence[str] = JUDGE_PRESETS) -> tuple[str, str]:
    """(judge, note): ``requested`` if given, else the first candidate that is not under test,
    else the first candidate with a note saying it is also under test."""
    if requested:
        clash = requested in models_under_test
        return requested, (f"judge {requested} is also a model under test" if clash else "")
    for c in candidates:
        if c not in models_under_test:
            return c, ""
    return candidates[0], (f"judge {candidates[0]} is also a model under test: no other judge preset "
                           f"among {list(candidates)}")


class Judge:
    """``jaxkd.judge.LLMJudge`` loaded on first use, with its verdict cache under ``root``."""

    def __init__(self, model: str = DEFAULT_JUDGE, *, config: JudgeConfig | None = None, root: Path = JUDGEMENTS,
                 log=print):
        self.model_name = model
        self.config = config or JudgeConfig(model=model)
        self.root, self.log = Path(root), log
        self._judge = None

    @property
    def label(self) -> str:
        """The judge's name in reports: the model, plus its dtype when one is forced."""
        return self.model_name + (f" ({self.config.dtype})" if self.config.dtype else "")

    @property
    def cache_path(self) -> Path:
        from jaxkd.judge import verdict_cache_path

        return verdict_cache_path(self.root, self.model_name)

    def _llm(self):
        if self._judge is None:
            from jaxkd.judge import load_judge

            self._judge = load_judge(self.model_name, config=self.config, cache_dir=self.root, log=self.log)
        return self._judge

    def score(self, items: Sequence[Mapping], answers: Sequence[str], criteria: Sequence[Criterion | str] = tuple(
              Criterion), *, label: str = "") -> dict[Criterion, Verdicts]:
        return self._llm().score(items, answers, criteria, labels=[label] * len(items))


def summarise_verdicts(v: Mapping[Criterion, Verdicts]) -> dict[str, Any]:
    """Bootstrap means of each criterion (0-1), judge_acc, the valid mass and the score spread."""
    out: dict[str, Any] = {}
    tech = v[Criterion.TECHNICAL].score
    cols = {"judge": v[Criterion.TECHNICAL].normalised,
            "judge_acc": (tech >= PASS_SCORE).astype(float)}
    for c in (Criterion.COMPLETENESS, Criterion.UTILITY, Criterion.LANGUAGE):
        if c in v:
            cols[f"judge_{c.value}"] = v[c].normalised
    for name, vals in cols.items():
        mean, lo, hi = bootstrap_ci(list(vals))
        out[name] = {"mean": mean, "ci95": [lo, hi], "n": int(np.isfinite(vals).sum())}
    mass = np.min([x.mass for x in v.values()], axis=0)
    out["judge_mass"] = {"mean": float(np.mean(mass)), "min": float(np.min(mass))}
    flagged = getattr(v[Criterion.TECHNICAL], "flagged", None)
    if flagged is not None:  # answers the injection guard caught (scored 0 under policy "zero")
        out["judge_flagged"] = {"n": int(np.sum(flagged)), "share": float(np.mean(flagged))}
    out["judge_spread"] = {"std": float(np.std(tech)), "p10": float(np.quantile(tech, 0.1)),
                           "p50": float(np.median(tech)), "p90": float(np.quantile(tech, 0.9)),
                           "distinct_0.1": int(len(np.unique(np.round(tech, 1))))}
    return out


def judge_tag(judge: Judge, tag: str, items_by_id: Mapping[str, Mapping], results_dir: Path = RESULTS
              ) -> dict[str, Any]:
    """Judge the answers behind ``kd_domain_<tag>.json`` and write the scores into it."""
    path = Path(results_dir) / f"kd_domain_{tag}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m evals.domain ... --tag {tag}` first")
    res = json.loads(path.read_text())
    gens = {r["item_id"]: r["answer"] for r in GenerationCache(tag, Path(results_dir) / "generations").rows.values()}
    ids = [i["id"] for i in res["items"]]
    missing = [i for i in ids if i not in gens or i not in items_by_id]
    if missing:
        raise KeyError(f"tag {tag}: no generation / held-out item for {missing[:3]}")
    v = judge.score([items_by_id[i] for i in ids], [gens[i] for i in ids], label=tag)
    mass = np.min([x.mass for x in v.values()], axis=0)
    for k, row in enumerate(res["items"]):
        row["judge"] = float(v[Criterion.TECHNICAL].normalised[k])
        row["judge_acc"] = float(v[Criterion.TECHNICAL].score[k] >= PASS_SCORE)
        for c in (Criterion.COMPLETENESS, Criterion.UTILITY, Criterion.LANGUAGE):
            row[f"judge_{c.value}"] = float(v[c].normalised[k])
        row["judge_mass"] = float(mass[k])
        if v[Criterion.TECHNICAL].flagged is not None:
            row["judge_flagged"] = bool(v[Criterion.TECHNICAL].flagged[k])
    for stale in ("judge_unparsed",):
        res["summary"].pop(stale, None)
    res["summary"].update(summarise_verdicts(v))
    res["judge"] = {"model": judge.model_name, "rubric": RUBRIC_VERSION, "pass_score": PASS_SCORE,
                    "injection": judge.config.injection, "step_weight": judge.config.step_weight,
                    "step_criteria": list(judge.config.step_criteria),
                    "criteria": {c.value: CRITERIA[c].max_score for c in v}}
    path.write_text(json.dumps(res, indent=1, default=float))
    return res["summary"]


def reference_answer(item: Mapping[str, Any]) -> str:
    steps = item["reference_steps"]
    return "\n".join(f"{i}. {s}" for i, s in enumerate([steps] if isinstance(steps, str) else steps, 1))


def sanity(judge: Judge, items: Sequence[Mapping], answers_tag: str = "teacher", results_dir: Path = RESULTS,
           pool: Sequence[Mapping] | None = None) -> dict[str, Any]:
    """Technical score of the references themselves vs a real answer to a different-category item."""
    gens = {r["item_id"]: r["answer"]
            for r in GenerationCache(answers_tag, Path(results_dir) / "generations").rows.values()}
    pool = [it for it in (pool if pool is not None else heldout_items("test", 0)) if it["id"] in gens]
    if not pool:
        raise FileNotFoundError(f"no generations under tag {answers_tag!r} in {Path(results_dir) / 'generations'}")
    mismatched = []
    for k, it in enumerate(items):
        others = [o for o in pool if o["category"] != it["category"]]
        mismatched.append(gens[others[k % len(others)]["id"]])
    ref = judge.score(items, [reference_answer(it) for it in items], label="sanity:reference")
    bad = judge.score(items, mismatched, label=f"sanity:mismatched:{answers_tag}")
    out = {"reference": summarise_verdicts(ref), "mismatched": summarise_verdicts(bad),
           "n": len(items), "judge": judge.model_name, "rubric": RUBRIC_VERSION, "mismatched_from": answers_tag}
    d = ref[Criterion.TECHNICAL].normalised - bad[Criterion.TECHNICAL].normalised
    mean, lo, hi = bootstrap_ci(list(d))
    out["gap"] = {"mean": mean, "ci95": [lo, hi]}
    (Path(results_dir) / "judge_sanity.json").write_text(json.dumps(out, indent=1, default=float))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.judge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", default=None, help="preset, .gguf, HF dir or run dir (default: pick_judge)")
    p.add_argument("--tags", nargs="*", default=[], help="kd_domain_<tag>.json files to judge")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=32, help="held-out items for --sanity")
    p.add_argument("--sanity", action="store_true", help="reference vs mismatched answers")
    p.add_argument("--calibrate", action="store_true", help="score the hand-labelled pairs (evals/calibration)")
    p.add_argument("--categories", nargs="*", default=None, help="calibration categories (default: all)")
    p.add_argument("--per-category", type=int, default=0, help="calibration pairs per category (0 = all)")
    p.add_argument("--config", default="configs/cpu_default.yaml",
                   help="run config whose distilled records the *_seen tags ask about")
    p.add_argument("--batch-size", type=int, default=JudgeConfig().batch_size)
    p.add_argument("--injection", choices=("zero", "strip", "off"), default=JudgeConfig().injection,
                   help="answers that address the grader: 0 on every criterion, judged stripped, or as written")
    p.add_argument("--judge-dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter and matmul dtype of the judge (default: as it loads, float32)")
    p.add_argument("--step-weight", type=float, default=JudgeConfig().step_weight,
                   help="weight of the per-reference-step probes in completeness (0 = rubric score only)")
    args = p.parse_args(argv)
    if not args.tags and not args.sanity and not args.calibrate:
        p.error("give --tags, --sanity and/or --calibrate")
    under_test = sorted({json.loads((RESULTS / f"kd_domain_{t}.json").read_text()).get("model", "")
                         for t in args.tags if (RESULTS / f"kd_domain_{t}.json").exists()})
    name, note = pick_judge(under_test, args.judge)
    print(f"judge: {name}" + (f" ({note})" if note else ""))
    judge = Judge(name, config=JudgeConfig(model=name, batch_size=args.batch_size, injection=args.injection,
                                           step_weight=args.step_weight, dtype=args.judge_dtype))
    if args.tags:
        items = heldout_items(args.split, 0) + distilled_paraphrase_items(args.config, "train")
        by_id = {it["id"]: it for it in items}
        for tag in args.tags:
            s = judge_tag(judge, tag, by_id)
            print(json.dumps({"tag": tag, **{k: s[k] for k in ("judge", "judge_acc", "judge_mass")}}))
    if args.sanity:
        print(json.dumps(sanity(judge, heldout_items(args.split, args.limit)), indent=1))
    if args.calibrate:
        from evals.calibration import run_calibration

        print(run_calibration(judge, per_category=args.per_category, categories=args.categories))
    return 0


if __name__ == "__main__":
    sys.exit(main())
