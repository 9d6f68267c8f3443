"""LLM-as-judge: technical correctness 0-10 of an answer against the record's reference.

    python -m evals.judge --tags student_base student_kd student_kd_grounded --limit 32
    python -m evals.judge --sanity --limit 16        # reference vs mismatched answers

The judge model (default: the KD teacher) sees the record's reference steps, key terms and safety
notes, the user's question and the answer, and replies with one integer 0-10; greedy, a few
tokens, parsed. Scores go into each ``kd_domain_<tag>.json`` as the per-item ``judge`` (0-1,
score / 10) and ``judge_acc`` (1 if score >= ``PASS_SCORE``) next to the keyword metrics, so the
report can show them with bootstrap intervals. Every verdict is cached with its provenance in
``evals/results/judgements/<judge>.jsonl`` keyed by (judge, prompt), so reruns only judge what is new.

``--sanity`` measures whether the judge discriminates at all: it scores each item's reference
steps written as an answer (should score high) and the answer to an item of another category
(should score low). A judge that cannot separate those is not worth its numbers; the report says
how far apart they are. This is the R_tech term the GRPO reward will reuse.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from evals.domain import (GENERATIONS, RESULTS, GenerationCache, bootstrap_ci, distilled_paraphrase_items, gen_key,
                          heldout_items)

JUDGEMENTS = RESULTS / "judgements"
DEFAULT_JUDGE = "qwen2.5-coder-1.5b-instruct"
PASS_SCORE = 6  # "judge accuracy" = share of answers scored >= 6/10

JUDGE_SYSTEM = (
    "You grade answers written by a consumer-electronics troubleshooting assistant. You are given "
    "verified reference notes for the user's problem. Judge only technical correctness: does the "
    "answer identify the right cause and give the reference's key steps correctly and safely? "
    "Scale: 10 = all key steps, correct and safe; 7 = most key steps, nothing wrong; "
    "4 = generic advice that only partly fits; 1 = wrong device, wrong problem or misleading; "
    "0 = unsafe or empty. Reply with the integer score only.")


def _as_list(v: Any) -> list:
    if isinstance(v, str):
        return [v]
    return list(v or [])


def judge_messages(item: Mapping[str, Any], answer: str) -> list[dict]:
    steps = _as_list(item.get("reference_steps") or item.get("steps"))
    lines = ["Reference notes:"] + [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    terms = [g[0] for g in item.get("required", ()) if g]
    if terms:
        lines.append("Key terms: " + "; ".join(terms))
    safety = _as_list(item.get("safety"))
    if safety:
        lines.append("Safety notes: " + " ".join(safety))
    lines += ["", f"User's question: {item['question']}", "", "Answer to grade:",
              answer.strip() or "(empty)", "", "Score (0-10):"]
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


_INT = re.compile(r"\b(10|[0-9])\b")


def parse_score(text: str) -> float:
    """The first integer 0-10 in the judge's reply (``"8/10"``, ``"Score: 7"``); NaN when none."""
    m = _INT.search(text)
    return float(m.group(1)) if m else float("nan")


class Judge:
    """A greedy judge over a loaded model; verdicts cached by (judge, prompt)."""

    def __init__(self, model: str = DEFAULT_JUDGE, *, batch_size: int = 8, max_new_tokens: int = 4,
                 root: Path = JUDGEMENTS, log=print):
        self.model_name, self.batch_size, self.max_new_tokens = model, batch_size, max_new_tokens
        safe = re.sub(r"[^A-Za-z0-9_.@-]+", "_", Path(model).name)
        self.cache = GenerationCache(safe, root=root)
        self.log = log
        self._gen = None

    def _generator(self):
        if self._gen is None:
            from evals.domain import _load_model
            from jaxkd.models.generate import Generator

            t0 = time.perf_counter()
            pt, resolved = _load_model(self.model_name)
            self.log(f"judge {resolved} loaded in {time.perf_counter() - t0:.0f}s")
            self._gen = Generator(pt.model, pt.tokenizer, max_seq_len=1536, prompt_bucket=64)
        return self._gen

    def score(self, items: Sequence[Mapping], answers: Sequence[str], *, label: str = "") -> list[float]:
        """Scores 0-10 (NaN where the reply held no integer), in item order."""
        from jaxkd.config import SamplingConfig, to_dict
        from jaxkd.models.generate import chat_ids

        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0)
        msgs = [judge_messages(it, a) for it, a in zip(items, answers, strict=True)]
        keys = [gen_key(f"judge:{self.model_name}", m, to_dict(sampling)) for m in msgs]
        todo = [i for i, k in enumerate(keys) if k not in self.cache.rows]
        if todo:
            gen = self._generator()
            prov = {"judge": self.model_name, "sampling": to_dict(sampling),
                    "command": " ".join(shlex.quote(a) for a in ["python", "-m", "evals.judge", *sys.argv[1:]]),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{platform.node()} {platform.machine()}"}
            # longest prompts together: fewer padded prefill tokens per batch
            todo.sort(key=lambda i: -len(msgs[i][1]["content"]))
            for s in range(0, len(todo), self.batch_size):
                chunk = todo[s:s + self.batch_size]
                t0 = time.perf_counter()
                out = gen.generate([chat_ids(gen.tokenizer, msgs[i]) for i in chunk], sampling)
                for i, toks in zip(chunk, out.tokens):
                    reply = gen.tokenizer.decode(toks, skip_special_tokens=True)
                    self.cache.add({"key": keys[i], "item_id": items[i]["id"], "label": label,
                                    "reply": reply, "score": parse_score(reply), "provenance": prov})
                self.log(f"  judged {min(s + self.batch_size, len(todo))}/{len(todo)} {label} "
                         f"({time.perf_counter() - t0:.0f}s)")
        return [float(self.cache.rows[k]["score"]) for k in keys]


def summarise_scores(scores: Sequence[float]) -> dict[str, Any]:
    s = np.asarray(scores, np.float64)
    ok = np.isfinite(s)
    judge = list(s / 10.0)
    acc = [float(x >= PASS_SCORE) if np.isfinite(x) else float("nan") for x in s]
    out = {}
    for name, vals in (("judge", judge), ("judge_acc", acc)):
        mean, lo, hi = bootstrap_ci(vals)
        out[name] = {"mean": mean, "ci95": [lo, hi], "n": int(ok.sum())}
    out["judge_unparsed"] = int((~ok).sum())
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
    scores = judge.score([items_by_id[i] for i in ids], [gens[i] for i in ids], label=tag)
    for row, sc in zip(res["items"], scores):
        row["judge"] = sc / 10.0
        row["judge_acc"] = float(sc >= PASS_SCORE) if np.isfinite(sc) else float("nan")
    res["summary"].update(summarise_scores(scores))
    res["judge"] = {"model": judge.model_name, "pass_score": PASS_SCORE}
    path.write_text(json.dumps(res, indent=1, default=float))
    return res["summary"]


def reference_answer(item: Mapping[str, Any]) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(_as_list(item["reference_steps"]), 1))


def sanity(judge: Judge, items: Sequence[Mapping], answers_tag: str = "teacher", results_dir: Path = RESULTS,
           pool: Sequence[Mapping] | None = None) -> dict[str, Any]:
    """Judge the references themselves vs a real answer to a different-category item."""
    gens = {r["item_id"]: r["answer"]
            for r in GenerationCache(answers_tag, Path(results_dir) / "generations").rows.values()}
    pool = [it for it in (pool if pool is not None else heldout_items("test", 0)) if it["id"] in gens]
    if not pool:
        raise FileNotFoundError(f"no generations under tag {answers_tag!r} in {GENERATIONS}")
    mismatched = []
    for k, it in enumerate(items):
        others = [o for o in pool if o["category"] != it["category"]]
        mismatched.append(gens[others[k % len(others)]["id"]])
    ref = judge.score(items, [reference_answer(it) for it in items], label="sanity:reference")
    bad = judge.score(items, mismatched, label=f"sanity:mismatched:{answers_tag}")
    out = {"reference": summarise_scores(ref), "mismatched": summarise_scores(bad),
           "n": len(items), "judge": judge.model_name, "mismatched_from": answers_tag}
    d = [a - b for a, b in zip(ref, bad) if np.isfinite(a) and np.isfinite(b)]
    mean, lo, hi = bootstrap_ci([x / 10 for x in d])
    out["gap"] = {"mean": mean, "ci95": [lo, hi]}
    (Path(results_dir) / "judge_sanity.json").write_text(json.dumps(out, indent=1, default=float))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.judge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", default=DEFAULT_JUDGE, help="preset, .gguf, HF dir or run dir")
    p.add_argument("--tags", nargs="*", default=[], help="kd_domain_<tag>.json files to judge")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=32, help="held-out items for --sanity")
    p.add_argument("--sanity", action="store_true", help="reference vs mismatched answers")
    p.add_argument("--config", default="configs/cpu_default.yaml",
                   help="run config whose distilled records the *_seen tags ask about")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    if not args.tags and not args.sanity:
        p.error("give --tags and/or --sanity")
    judge = Judge(args.judge, batch_size=args.batch_size)
    items = heldout_items(args.split, 0) + distilled_paraphrase_items(args.config, "train")
    by_id = {it["id"]: it for it in items}
    for tag in args.tags:
        s = judge_tag(judge, tag, by_id)
        print(json.dumps({"tag": tag, **{k: s[k] for k in ("judge", "judge_acc", "judge_unparsed")}}))
    if args.sanity:
        print(json.dumps(sanity(judge, heldout_items(args.split, args.limit)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
