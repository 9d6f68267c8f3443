"""Can the rule scorers be gamed? Adversarial "answers" vs the committed real answers.

    python -m evals.adversarial          # -> evals/results/adversarial_scorers.{md,json}

On the held-out items that every committed generation tag answered, score with
``jaxkd.rewards.rule_scores``:
  * the real answers of each tag in ``evals/results/generations``;
  * keyword_dump: the 30 most frequent required-keyword synonyms of those items, space-joined
    (the dump that scored 0.331 keyword coverage under the old substring scorer);
  * common_words: the 100 most frequent content words of the items' reference steps;
  * question_copy: the item's own question; empty: "";
  * own_keywords / own_keyword_bullets: the item's own required synonyms as a comma list / as a
    bulleted list (oracle dumps);
  * stuffed_sentence: "You should check the <own synonym>, the <own synonym>, ..." (an oracle
    keyword-stuffed sentence: the hardest case here, reported as it scores).
No model runs; the numbers are a pure function of the committed files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from evals.domain import GENERATIONS, RESULTS, GenerationCache, bootstrap_ci, heldout_items
from jaxkd.rewards import FUNCTION_WORDS, RULE_METRICS, rule_scores, words

METRICS = [m for m in RULE_METRICS if m != "unsafe"]


def adversaries(items: Sequence[Mapping[str, Any]]) -> dict[str, Callable[[Mapping[str, Any]], str]]:
    syn = Counter(p for it in items for g in it["required"] for p in g)
    dump = " ".join(p for p, _ in syn.most_common(30))
    cw = Counter(w for it in items for s in it["reference_steps"] for w in words(s)
                 if w not in FUNCTION_WORDS and len(w) > 2)
    common = " ".join(w for w, _ in cw.most_common(100))
    return {
        "keyword_dump": lambda it: dump,
        "common_words": lambda it: common,
        "question_copy": lambda it: it["question"],
        "empty": lambda it: "",
        "own_keywords": lambda it: ", ".join(p for g in it["required"] for p in g),
        "own_keyword_bullets": lambda it: "\n".join(f"- {p}" for g in it["required"] for p in g),
        "stuffed_sentence": lambda it: ("You should check the "
                                        + ", the ".join(p for g in it["required"] for p in g) + "."),
    }


def run(results_dir: Path = RESULTS, tags: Sequence[str] | None = None) -> Path:
    gen_dir = Path(results_dir) / "generations"
    tags = list(tags) if tags else sorted(p.stem for p in gen_dir.glob("*.jsonl") if not p.stem.endswith("_seen"))
    answers = {t: {r["item_id"]: r["answer"] for r in GenerationCache(t, gen_dir).rows.values()} for t in tags}
    pool = heldout_items("test", 0)
    items = [it for it in pool if all(it["id"] in answers[t] for t in tags)]
    if not items:
        raise FileNotFoundError(f"no held-out item is answered by every tag {tags} in {gen_dir}")
    rows: dict[str, dict[str, list[float]]] = {}
    for t in tags:
        sc = [rule_scores(it, answers[t][it["id"]]) for it in items]
        rows[t] = {m: [s[m] for s in sc] for m in METRICS}
    adv = adversaries(items)
    for name, make in adv.items():
        sc = [rule_scores(it, make(it)) for it in items]
        rows[name] = {m: [s[m] for s in sc] for m in METRICS}
    summary = {k: {m: dict(zip(("mean", "lo", "hi"), bootstrap_ci(v))) for m, v in r.items()} for k, r in rows.items()}
    best_real = {m: max(summary[t][m]["mean"] for t in tags) for m in METRICS}
    L = ["# Can the rule scorers be gamed? Adversarial answers vs real answers", "",
         f"{len(items)} held-out test items answered by every tag ({', '.join(tags)}); scores from "
         "`jaxkd.rewards.rule_scores` (means, 95% bootstrap intervals over items). Built by "
         "`python -m evals.adversarial` from the committed generations (no model). Adversaries: "
         "keyword_dump = the 30 most frequent required-keyword synonyms of these items; common_words = "
         "the 100 most frequent content words of their reference steps; question_copy; empty; "
         "own_keywords / own_keyword_bullets = the item's own synonyms as a comma / bulleted list; "
         "stuffed_sentence = the item's own synonyms "
         "inside one sentence (\"You should check the X, the Y, ...\").", "",
         "| answers | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for k in rows:
        L.append(f"| {'**' + k + '**' if k in adv else k} | " + " | ".join(
            f"{summary[k][m]['mean']:.3f}" for m in METRICS) + " |")
    L += ["", "Best real model per column: " + ", ".join(f"{m} {best_real[m]:.3f}" for m in METRICS) + ".",
          "spelling only counts unknown words, so any correctly spelled dump scores 1 on it; language (the "
          "offline language signal) also needs well-formed sentences. repetition is a penalty (higher is "
          "worse)."]
    out = Path(results_dir) / "adversarial_scorers.md"
    out.write_text("\n".join(L) + "\n")
    (Path(results_dir) / "adversarial_scorers.json").write_text(json.dumps(
        {"n_items": len(items), "tags": tags, "adversaries": list(adv), "summary": summary,
         "per_item": {k: {m: [float(x) for x in v] for m, v in r.items()} for k, r in rows.items()},
         "item_ids": [it["id"] for it in items]}, indent=1, default=float))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.adversarial", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tags", nargs="*", default=None, help="generation tags (default: all but *_seen)")
    args = p.parse_args(argv)
    print(run(RESULTS, args.tags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
