"""What the committed teacher answers of a KD config hold, and what its checks keep (issue 14).

    python -m evals.teacher_answers --config configs/cpu_corpus_replay.yaml
        # -> evals/results/teacher_answers_<run name>.{md,json}

Reads only committed files (the exported answers, the built splits): for every prompt of the
config's teacher splits, whether the teacher answered it, ended with its end-of-turn token within
``teacher.sampling.max_new_tokens``, and why ``jaxkd.distill.kd.answer_rejection`` would drop it
under the config's ``distill`` checks; per split and per category, with answer lengths in tokens
and the provenance (command, machine, timing) of the run that last wrote the file.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(cfg: Any) -> dict[str, Any]:
    from jaxkd.distill.cache import load_exported
    from jaxkd.distill.kd import answer_rejection
    from jaxkd.distill.teacher import answers_export_path, teacher_prompts

    path = answers_export_path(cfg)
    if not path.exists():
        raise SystemExit(f"no committed teacher answers at {path}; run the teacher stage of this config first")
    prov, entries = load_exported(path)
    rows = []
    for split in cfg.teacher.splits:
        for it in teacher_prompts(cfg, split):
            e = entries.get(it.key)
            reason = None if e is None else answer_rejection(e, it.record, it.question_index, cfg.distill)
            rows.append({"split": split, "category": it.record.get("category", "?"), "answered": e is not None,
                         "eos": e is not None and e.eos_id is not None,
                         "tokens": None if e is None else len(e.answer_ids), "dropped": reason})

    def group(sel: list[dict]) -> dict[str, Any]:
        got = [r for r in sel if r["answered"]]
        lens = np.asarray([r["tokens"] for r in got], float)
        return {"prompts": len(sel), "answered": len(got), "eos": sum(r["eos"] for r in got),
                "kept": sum(r["dropped"] is None for r in got),
                "dropped": dict(collections.Counter(r["dropped"] for r in got if r["dropped"])),
                "tokens_median": float(np.median(lens)) if got else None,
                "tokens_p90": float(np.percentile(lens, 90)) if got else None,
                "tokens_max": int(lens.max()) if got else None}

    return {"answers_file": str(path), "max_new_tokens": cfg.teacher.sampling.max_new_tokens,
            "checks": {k: getattr(cfg.distill, k) for k in
                       ("drop_truncated", "min_step_coverage", "drop_unsafe", "drop_leaked_notes")},
            "provenance": {k: prov.get(k) for k in ("command", "date", "machine", "last_run", "splits")},
            "splits": {s: group([r for r in rows if r["split"] == s]) for s in cfg.teacher.splits},
            "categories": {c: group([r for r in rows if r["category"] == c])
                           for c in sorted({r["category"] for r in rows})}}


def markdown(name: str, s: dict[str, Any]) -> str:
    prov = s["provenance"]
    head = ["| | prompts | answered | ended with EOS | kept for KD | dropped (reason: n) | answer tokens median / p90 / max |",
            "|---|---:|---:|---:|---:|---|---|"]

    def line(label: str, g: dict[str, Any]) -> str:
        eos = f"{g['eos']} ({g['eos'] / g['answered']:.0%})" if g["answered"] else "0"
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(g["dropped"].items())) or "-"
        lens = "-" if g["tokens_median"] is None else \
            f"{g['tokens_median']:.0f} / {g['tokens_p90']:.0f} / {g['tokens_max']}"
        return f"| {label} | {g['prompts']} | {g['answered']} | {eos} | {g['kept']} | {drops} | {lens} |"

    last = prov.get("last_run") or {}
    out = [f"# Teacher answers of `{name}`", "",
           f"File: `{s['answers_file']}` (max_new_tokens {s['max_new_tokens']}). Checks: " +
           ", ".join(f"{k}={v}" for k, v in s["checks"].items()) + ".", "",
           f"Last written by: `{prov.get('command')}` on {prov.get('date')}; machine: {prov.get('machine')}."]
    if last.get("generated"):
        out += ["", f"That run generated {last['generated']} answers ({last['new_tokens']} tokens) in "
                    f"{last['wall_s'] / 60:.1f} min of wall time, {last['tok_per_s']} tok/s in generation "
                    f"({last['wall_tok_per_s']} overall) at batch {last['batch_size']}."]
    out += ["", "## By split", "", *head, *[line(k, g) for k, g in s["splits"].items()], "",
            "## By category (all splits)", "", *head, *[line(k, g) for k, g in s["categories"].items()], "",
            "`python -m evals.teacher_answers --config <config>` wrote this from the committed files."]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from jaxkd.config import RunConfig, load

    cfg = load(RunConfig, args.config, args.overrides)
    s = summarize(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"teacher_answers_{cfg.name}"
    stem.with_suffix(".json").write_text(json.dumps(s, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(cfg.name, s))
    print(markdown(cfg.name, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
