"""Held-out domain QA: generate answers (cached with provenance), score them, report with CIs.

    python -m evals.domain --model qwen2.5-coder-0.5b-instruct --split test --limit 40
    python -m evals.domain --model runs/kd-cpu --split test --limit 40          # a KD checkpoint
    python -m evals.domain --model qwen2.5-coder-1.5b-instruct --grounding reference ...
    python -m evals.domain --report                                            # kd_domain.{md,json,png}

Scores per answer (the held-out item carries the record's keys) come from jaxkd.rewards, which
documents them: required (keyword groups), steps (reference-step completeness), actionable,
numbered, repetition, spelling, language (offline signal), unsafe; all match on word boundaries
with stemming and only inside well-formed sentences that are not copies of the question. Plus
  rougeL/em  ROUGE-L F1 / exact match to another model's answers on the same items (--reference-tag)
``--rescore`` recomputes the rule scores of every kd_domain_<tag>.json from the committed
generations (no model); judge columns are added by ``python -m evals.judge``.
Means carry 95% percentile-bootstrap intervals; the report adds paired bootstrap differences.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import re
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# The scorers live in the library (jaxkd.rewards), shared with the GRPO rewards; re-exported here
# for the scripts that import them from evals.domain.
from jaxkd.rewards import (RULE_METRICS, UNSAFE_PATTERNS, normalise, required_coverage, rule_scores,  # noqa: F401
                           step_coverage, unsafe_flag)

RESULTS = Path(__file__).resolve().parent / "results"
GENERATIONS = RESULTS / "generations"


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], *, n: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over items (NaNs dropped)."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], **kw) -> tuple[float, float, float]:
    """Bootstrap CI of mean(b - a) over items both scored."""
    d = [y - x for x, y in zip(a, b) if np.isfinite(x) and np.isfinite(y)]
    return bootstrap_ci(d, **kw)


def score_answers(items: Sequence[Mapping], answers: Sequence[str],
                  references: Sequence[str] | None = None) -> dict[str, list]:
    """Every rule score of ``jaxkd.rewards.rule_scores`` per answer (+ ROUGE-L / EM to
    ``references``)."""
    from jaxkd.train.metrics import exact_match, rouge_l

    out: dict[str, list] = {k: [] for k in (*RULE_METRICS, "unsafe_sentences")}
    for it, ans in zip(items, answers, strict=True):
        for k, v in rule_scores(it, ans).items():
            out[k].append(v)
    if references is not None:
        out["rougeL"] = rouge_l(answers, references)
        out["em"] = exact_match(answers, references)
    return out


def summarise(scores: Mapping[str, list], domains: Sequence[str] | None = None) -> dict[str, Any]:
    summary = {}
    for m in (*RULE_METRICS, "rougeL", "em", "judge", "judge_acc", "judge_completeness", "judge_utility",
              "judge_language"):
        if m in scores:
            mean, lo, hi = bootstrap_ci(scores[m])
            summary[m] = {"mean": mean, "ci95": [lo, hi], "n": int(np.isfinite(scores[m]).sum())}
    if domains is not None:
        by: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(domains):
            by[d].append(i)
        summary["per_category"] = {d: {"n": len(ix), "required": float(np.nanmean([scores["required"][i] for i in ix])),
                                       "steps": float(np.nanmean([scores["steps"][i] for i in ix]))}
                                   for d, ix in sorted(by.items())}
    return summary


# --------------------------------------------------------------------------------------------
# Items and generation (cached)
# --------------------------------------------------------------------------------------------


def heldout_items(split: str = "test", limit: int = 0) -> list[dict]:
    """Held-out QA items of records in ``split``, interleaved across categories; first ``limit``."""
    from jaxkd.data.store import load_records

    items = load_records("heldout")
    ids = {r["id"] for r in load_records(split)}
    items = [it for it in items if it["record_id"] in ids]
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for it in sorted(items, key=lambda r: r["id"]):
        by_cat[it["category"]].append(it)
    out = []
    for i in range(max(len(v) for v in by_cat.values())):
        out.extend(v[i] for _, v in sorted(by_cat.items()) if i < len(v))
    return out[:limit] if limit > 0 else out


def distilled_paraphrase_items(config: str | Path = "configs/cpu_default.yaml", split: str = "train",
                               limit: int = 0) -> list[dict]:
    """Another phrasing of each question the KD run was distilled on.

    The records are exactly the teacher stage's prompts of ``split`` under ``config``; each item
    asks the record's next question (index + 1, wrapping), which neither teacher nor student saw in
    training. Held-out test items measure transfer to unseen devices; these measure whether the
    student absorbed the knowledge of the records it was distilled on.
    """
    from jaxkd.config import RunConfig, load
    from jaxkd.distill.teacher import teacher_prompts

    cfg = load(RunConfig, config)
    out = []
    for p in teacher_prompts(cfg, split):
        rec, qs = p.record, p.record["questions"]
        if len(qs) < 2:
            continue
        qi = (p.question_index + 1) % len(qs)
        out.append({"id": f"{rec['id']}#q{qi}", "record_id": rec["id"], "category": rec["category"],
                    "device": rec.get("device"), "question": qs[qi], "question_index": qi,
                    "required": rec["required"], "reference_steps": rec["steps"],
                    "safety": rec.get("safety", [])})
    return out[:limit] if limit > 0 else out


def item_messages(item: Mapping, grounding: str = "none", system_prompt: str | None = None) -> list[dict]:
    """The prompt for ``item``; ``system_prompt`` None: the default (the evaluated model's own
    prompt is passed by ``generate_answers``), "" : no system turn."""
    from jaxkd.data.formatting import SYSTEM_PROMPT
    from jaxkd.distill.teacher import teacher_messages

    system = SYSTEM_PROMPT if system_prompt is None else system_prompt
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": item["question"]}]
    return teacher_messages(msgs, item, grounding)


def gen_key(model_id: str, messages: Sequence[Mapping], sampling: Mapping) -> str:
    """Cache key of one answer; ``model_id`` identifies the weights (``generate_answers`` passes
    ``evals.identity.weights_identity(model)["id"]``), not merely their path."""
    blob = json.dumps({"model": model_id, "messages": list(messages), "sampling": dict(sampling)},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class GenerationCache:
    """``evals/results/generations/<tag>.jsonl``: one line per answer with its provenance."""

    def __init__(self, tag: str, root: Path = GENERATIONS):
        self.path = Path(root) / f"{tag}.jsonl"
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.rows[r["key"]] = r

    def add(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        self.rows[row["key"]] = row


def _load_model(model: str):
    """(loaded model, display name) through the one loader, ``jaxkd.serving.load_model``."""
    from jaxkd.serving import load_model

    loaded = load_model(model)
    return loaded, loaded.name


def generate_answers(model: str, items: Sequence[Mapping], *, tag: str, grounding: str = "none",
                     max_new_tokens: int = 160, batch_size: int = 8, log=print) -> list[str]:
    """Answers for ``items`` from cache or freshly generated (greedy), cached as they come."""
    from jaxkd.config import SamplingConfig, to_dict

    cache = GenerationCache(tag)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    from jaxkd.serving import served_system_prompt

    system = served_system_prompt(model)  # a run is evaluated with the prompt it was trained with
    msgs = [item_messages(it, grounding, system or "") for it in items]
    # Keyed by what the weights are (evals.identity: asset sha256 / file metadata / run step), not
    # by the path: a run retrained in place under the same path must not be served stale answers.
    from evals.identity import weights_identity

    weights = weights_identity(model)["id"]
    model_id = weights + ("" if grounding == "none" else f"+grounding={grounding}")
    keys = [gen_key(model_id, m, to_dict(sampling)) for m in msgs]
    todo = [i for i, k in enumerate(keys) if k not in cache.rows]
    if todo:
        from jaxkd.models.generate import Generator, chat_ids

        t0 = time.perf_counter()
        pt, resolved = _load_model(model)
        log(f"loaded {resolved} in {time.perf_counter() - t0:.0f}s; generating {len(todo)} answers")
        gen = Generator(pt.model, pt.tokenizer, max_seq_len=1024, prompt_bucket=64)
        prov = {"model": resolved, "weights": weights, "grounding": grounding, "sampling": to_dict(sampling),
                "command": " ".join(shlex.quote(a) for a in ["python", "-m", "evals.domain", *sys.argv[1:]]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.machine()}"}
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            t1 = time.perf_counter()
            ids = [chat_ids(pt.tokenizer, msgs[i]) for i in chunk]
            out = gen.generate(ids, sampling)
            for i, toks, reason in zip(chunk, out.tokens, out.finish_reasons):
                cache.add({"key": keys[i], "item_id": items[i]["id"], "answer":
                           pt.tokenizer.decode(toks, skip_special_tokens=True), "finish_reason": reason,
                           "new_tokens": len(toks), "provenance": prov})
            log(f"  {min(s + batch_size, len(todo))}/{len(todo)} ({out.new_tokens} tokens in "
                f"{time.perf_counter() - t1:.0f}s, {out.new_tokens / max(out.decode_s, 1e-9):.1f} tok/s)")
    return [cache.rows[k]["answer"] for k in keys]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def write_report(results_dir: Path = RESULTS, tags: Sequence[str] | None = None) -> Path:
    """kd_domain.md / .json / .png from the per-model result files (first tag = baseline for the
    paired differences)."""
    files = {p.stem[len("kd_domain_"):]: p for p in sorted(Path(results_dir).glob("kd_domain_*.json"))}
    tags = list(tags) if tags else sorted(files)
    missing = [t for t in tags if t not in files]
    if missing:
        raise FileNotFoundError(f"no result files for tags {missing} in {results_dir}")
    res = {t: json.loads(files[t].read_text()) for t in tags}
    metrics = ["required", "steps", "actionable", "language", "unsafe", "rougeL"]
    metrics += [m for m in ("judge", "judge_acc", "judge_completeness", "judge_utility", "judge_language")
                if any(m in r["summary"] for r in res.values())]
    judges = sorted({f"{r['judge']['model']} (rubric {r['judge'].get('rubric', 'v0 greedy')})"
                     for r in res.values() if r.get("judge")})
    lines = ["# Held-out domain QA: base student vs KD student vs teacher", "",
             "Means with 95% percentile-bootstrap intervals over held-out items (2000 resamples). "
             "Rule scores (`jaxkd.rewards`; word-boundary, stemmed, credited only inside well-formed "
             "sentences that are not copies of the question): required = keyword-group coverage, "
             "steps = reference-step completeness (soft credit per step), actionable = distinct "
             "specific instructions / 3, language = offline language signal (well-formed share x "
             "spelling), unsafe = share of answers with un-negated unsafe advice; rougeL = ROUGE-L F1 "
             "to the reference tag's answers. judge = LLM judge technical accuracy / 10, judge_acc = "
             "share with an expected technical score >= 6/10, judge_completeness / judge_utility / 10, "
             "judge_language / 5 (`python -m evals.judge`: expectations over the judge's score-token "
             "distribution" + (f"; judge: {', '.join(judges)}" if judges else "") + ")."
             + (" Judge columns marked rubric v0 come from the earlier greedy judge (first integer of a "
                "greedy reply, key terms shown to the judge) and have not been re-judged." if any(
                    "v0" in j for j in judges) else "") + " A keyword dump, "
             "a copy of the question and an empty answer score 0 on the rule scores "
             "(evals/results/adversarial_scorers.md).", "",
             "| model | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for t, r in res.items():
        cells = []
        for m in metrics:
            s = r["summary"].get(m)
            cells.append(f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s else "-")
        lines.append(f"| {t} | {r['n_items']} | " + " | ".join(cells) + " |")
    base = tags[0]
    diffs: dict[str, dict] = {}
    if len(tags) > 1:
        lines += ["", f"Paired differences vs `{base}` on the same items (mean [95% CI]):", "",
                  "| model | required | steps |", "|---|---|---|"]
        for t in tags[1:]:
            a = {i["id"]: i for i in res[base]["items"]}
            common = [i for i in res[t]["items"] if i["id"] in a]
            row = {}
            for m in ("required", "steps"):
                row[m] = paired_diff_ci([a[i["id"]][m] for i in common], [i[m] for i in common])
            diffs[t] = {m: {"mean": v[0], "ci95": [v[1], v[2]]} for m, v in row.items()}
            lines.append(f"| {t} | " + " | ".join(f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"
                                                    for v in row.values()) + " |")
    lines += ["", "Commands and provenance:", ""]
    for t, r in res.items():
        lines.append(f"- `{t}`: `python -m evals.domain --model {r['model']} --split {r['split']} "
                     f"--limit {r['n_items']} --grounding {r['grounding']} --tag {t}"
                     + (f" --reference-tag {r['reference_tag']}" if r.get("reference_tag") else "")
                     + f"` (max_new_tokens {r['max_new_tokens']}, greedy)")
    out = Path(results_dir) / "kd_domain.md"
    out.write_text("\n".join(lines) + "\n")
    (Path(results_dir) / "kd_domain.json").write_text(json.dumps(
        {"tags": tags, "summary": {t: r["summary"] for t, r in res.items()}, "paired_vs_" + base: diffs},
        indent=1, default=float))
    _plot(res, Path(results_dir) / "kd_domain.png")
    return out


def _plot(res: Mapping[str, Mapping], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["required", "steps"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(res), 1)
    for j, (t, r) in enumerate(res.items()):
        means = [r["summary"][m]["mean"] for m in metrics]
        err = np.array([[r["summary"][m]["mean"] - r["summary"][m]["ci95"][0],
                         r["summary"][m]["ci95"][1] - r["summary"][m]["mean"]] for m in metrics]).T
        ax.bar(np.arange(len(metrics)) + j * width, means, width, yerr=err, capsize=3, label=t)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(res) - 1) / 2, metrics)
    ax.set_ylabel("coverage (95% bootstrap CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> dict:
    items = (distilled_paraphrase_items(args.config, args.split, args.limit) if args.items == "distilled-paraphrase"
             else heldout_items(args.split, args.limit))
    tag = args.tag or re.sub(r"[^A-Za-z0-9_.@-]+", "_", Path(args.model).name) + (
        "" if args.grounding == "none" else f"_grounded")
    answers = generate_answers(args.model, items, tag=tag, grounding=args.grounding,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    refs = None
    if args.reference_tag:
        ref_cache = GenerationCache(args.reference_tag)
        by_item = {r["item_id"]: r["answer"] for r in ref_cache.rows.values()}
        if all(it["id"] in by_item for it in items):
            refs = [by_item[it["id"]] for it in items]
    scores = score_answers(items, answers, refs)
    result = {"tag": tag, "model": args.model, "grounding": args.grounding, "split": args.split,
              "items_kind": args.items,
              "n_items": len(items), "max_new_tokens": args.max_new_tokens,
              "reference_tag": args.reference_tag if refs else None,
              "summary": summarise(scores, [it["category"] for it in items]),
              "items": [{"id": it["id"], **{k: v[i] for k, v in scores.items()}} for i, it in enumerate(items)]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"kd_domain_{tag}.json").write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({"tag": tag, **result["summary"]}, indent=1))
    return result


def rescore(results_dir: Path = RESULTS, tags: Sequence[str] | None = None,
            config: str = "configs/cpu_default.yaml") -> list[str]:
    """Recompute the rule scores of ``kd_domain_<tag>.json`` from the committed generations (no
    model); judge columns already in the file are kept. Returns the tags rescored."""
    files = sorted(Path(results_dir).glob("kd_domain_*.json"))
    done = []
    items = {it["id"]: it for it in heldout_items("test", 0)}
    items.update({it["id"]: it for it in distilled_paraphrase_items(config, "train")})
    for path in files:
        tag = path.stem[len("kd_domain_"):]
        if tags and tag not in tags:
            continue
        res = json.loads(path.read_text())
        if "items" not in res:
            continue
        gens = {r["item_id"]: r["answer"] for r in GenerationCache(tag, Path(results_dir) / "generations").rows.values()}
        ids = [row["id"] for row in res["items"]]
        lost = [i for i in ids if i not in gens or i not in items]
        if lost:
            raise KeyError(f"{path.name}: no generation or item for {lost[:3]}")
        refs = None
        if res.get("reference_tag"):
            ref = {r["item_id"]: r["answer"] for r in GenerationCache(res["reference_tag"], Path(results_dir)
                                                                        / "generations").rows.values()}
            refs = [ref[i] for i in ids]
        scores = score_answers([items[i] for i in ids], [gens[i] for i in ids], refs)
        for k, row in enumerate(res["items"]):
            row.update({m: v[k] for m, v in scores.items()})
        merged = {m: [row.get(m, float("nan")) for row in res["items"]]
                  for m in {*scores, *(k for row in res["items"] for k in row if k.startswith("judge"))}}
        old_summary = res.get("summary", {})
        res["summary"] = summarise(merged, [items[i]["category"] for i in ids])
        for k in ("judge_mass", "judge_spread"):
            if k in old_summary:
                res["summary"][k] = old_summary[k]
        path.write_text(json.dumps(res, indent=1, default=float))
        done.append(tag)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.domain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset name, .gguf, HF dir, or a jaxkd.train run dir (runs/<name>)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=40, help="items (category-interleaved); 0 = all")
    p.add_argument("--items", default="heldout", choices=["heldout", "distilled-paraphrase"],
                   help="held-out QA of --split's records, or a new phrasing of each question the "
                        "KD run under --config was distilled on")
    p.add_argument("--config", default="configs/cpu_default.yaml", help="for --items distilled-paraphrase")
    p.add_argument("--grounding", default="none", choices=["none", "reference"])
    p.add_argument("--tag", default=None, help="name of the results/generation files")
    p.add_argument("--reference-tag", default=None, help="tag whose answers ROUGE-L/EM compare against")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--report", action="store_true", help="combine evals/results/kd_domain_*.json")
    p.add_argument("--rescore", action="store_true",
                   help="recompute the rule scores of every kd_domain_*.json from the committed generations")
    p.add_argument("--report-tags", nargs="*", default=None,
                   help="tags to compare in the report, first = baseline (default: all, sorted)")
    args = p.parse_args(argv)
    if args.rescore:
        print("rescored:", " ".join(rescore(RESULTS, None, args.config)))
        if not args.report:
            return 0
    if args.report:
        print(write_report(RESULTS, args.report_tags))
        return 0
    if not args.model:
        p.error("--model is required unless --report")
    evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
