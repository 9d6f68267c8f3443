"""Grounding ablation (issue 6): does distilling a reference-grounded teacher help the student?

    python -m evals.ablation                  # -> evals/results/grounding_ablation.{md,json,png}

Reads what the other tools wrote, computes nothing from models:
  * the teacher-stage answers committed in ``jaxkd/data/teacher/<teacher>__{none,reference}.jsonl``
    (train + val prompts, the very answers each student was distilled from), scored against
    their records: the grounded teacher is the ceiling a student can approach;
  * ``kd_domain_<tag>.json`` for the held-out test items (``python -m evals.domain``), with the
    judge's verdicts when ``python -m evals.judge`` has added them;
  * ``judge_sanity.json`` (``python -m evals.judge --sanity``).
Every row carries a 95% percentile bootstrap interval; differences are paired on the same items.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from evals.domain import RESULTS, bootstrap_ci, paired_diff_ci, required_coverage, step_coverage, unsafe_flag

ROOT = Path(__file__).resolve().parents[1]
TEACHER_DIR = ROOT / "jaxkd" / "data" / "teacher"
METRICS = ["steps", "required", "judge", "judge_acc", "unsafe"]
LABELS = {"steps": "key-step coverage", "required": "keyword coverage", "judge": "judge score /10",
          "judge_acc": "judge accuracy (>=6/10)", "unsafe": "unsafe-advice rate"}


def _fmt(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    if not np.isfinite(mean):
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def teacher_stage_scores(teacher: str = "qwen2.5-coder-1.5b-instruct", teacher_dir: Path = TEACHER_DIR
                         ) -> dict[str, Any]:
    """Key-step / keyword coverage of the committed ungrounded vs grounded teacher-stage answers."""
    from jaxkd.data.store import load_records
    from jaxkd.distill.cache import load_exported

    paths = {g: Path(teacher_dir) / f"{teacher}__{g}.jsonl" for g in ("none", "reference")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"teacher-stage answers missing: {missing} (run `python -m jaxkd.train "
                                f"--config configs/cpu_default.yaml stage=teacher teacher.grounding=...`)")
    loaded = {}
    for g, p in paths.items():
        prov, entries = load_exported(p)
        loaded[g] = ({e.example_id: e for e in entries.values()}, prov)
    records = {r["id"]: r for s in ("train", "val") for r in load_records(s)}
    common = sorted(set(loaded["none"][0]) & set(loaded["reference"][0]))
    out: dict[str, Any] = {"n": len(common), "teacher": teacher, "by_grounding": {}, "provenance": {}}
    per: dict[str, dict[str, list]] = {}
    for g, (rows, prov) in loaded.items():
        m = {"steps": [], "required": [], "unsafe": [], "eos": [], "tokens": []}
        for ex in common:
            rec, ans = records[ex.split("#")[0]], rows[ex].answer
            m["steps"].append(step_coverage(ans, rec["steps"]))
            m["required"].append(required_coverage(ans, rec["required"]))
            m["unsafe"].append(unsafe_flag(ans)[0])
            m["eos"].append(float(rows[ex].finish_reason == "eos"))
            m["tokens"].append(len(rows[ex].answer_ids))
        per[g] = m
        out["by_grounding"][g] = {k: dict(zip(("mean", "lo", "hi"), bootstrap_ci(v))) for k, v in m.items()}
        out["provenance"][g] = {k: prov.get(k) for k in ("command", "date", "machine", "last_run")}
    out["paired_reference_minus_none"] = {
        k: dict(zip(("mean", "lo", "hi"), paired_diff_ci(per["none"][k], per["reference"][k])))
        for k in ("steps", "required", "unsafe")}
    return out


def heldout_rows(tags: Sequence[str], results_dir: Path = RESULTS) -> dict[str, dict]:
    res = {}
    for t in tags:
        p = Path(results_dir) / f"kd_domain_{t}.json"
        if not p.exists():
            raise FileNotFoundError(f"{p} missing: run `python -m evals.domain --tag {t} ...` first")
        res[t] = json.loads(p.read_text())
    return res


def paired(res: Mapping[str, dict], base: str, other: str, metric: str) -> tuple[float, float, float, int]:
    a = {i["id"]: i for i in res[base]["items"]}
    common = [i for i in res[other]["items"] if i["id"] in a and metric in i and metric in a[i["id"]]]
    if not common:
        return float("nan"), float("nan"), float("nan"), 0
    m, lo, hi = paired_diff_ci([a[i["id"]][metric] for i in common], [i[metric] for i in common])
    return m, lo, hi, len(common)


def _student_tables(res: Mapping[str, dict], tags: list[str], metrics: Sequence[str],
                    diffs: dict[str, dict]) -> list[str]:
    """Means per model, then every pairwise difference (later tag minus earlier), into ``diffs``."""
    head = " | ".join(LABELS[m] for m in metrics)
    L = [f"| student | n | {head} |", "|---|---|" + "---|" * len(metrics)]
    for t in tags:
        s = res[t]["summary"]
        L.append(f"| {t} | {res[t]['n_items']} | " + " | ".join(
            _fmt(s[m]["mean"], *s[m]["ci95"]) if m in s else "-" for m in metrics) + " |")
    L += ["", "Paired differences (same items):", "", f"| comparison | {head} |", "|---|" + "---|" * len(metrics)]
    for i, a in enumerate(tags):
        for b in tags[i + 1:]:
            cells = {m: paired(res, a, b, m) for m in metrics}
            diffs[f"{b} - {a}"] = {m: dict(zip(("mean", "lo", "hi", "n"), c)) for m, c in cells.items()}
            L.append(f"| {b} - {a} | " + " | ".join(_fmt(*cells[m][:3], True) for m in metrics) + " |")
    return L


def write(students: Sequence[str] = ("student_base", "student_kd", "student_kd_grounded"),
          teachers: Sequence[str] = ("teacher", "teacher_grounded"), out_dir: Path = RESULTS,
          teacher_dir: Path = TEACHER_DIR,
          seen_students: Sequence[str] = ("student_base_seen", "student_kd_seen", "student_kd_grounded_seen")
          ) -> Path:
    ts = teacher_stage_scores(teacher_dir=teacher_dir)
    res = heldout_rows([*students, *teachers], out_dir)
    sanity_p = out_dir / "judge_sanity.json"
    sanity = json.loads(sanity_p.read_text()) if sanity_p.exists() else None

    L = ["# Grounded teacher ablation (issue 6)", "",
         "Context distillation: the grounded teacher answers with the record's reference steps, key "
         "terms and safety notes in its system message; the student is trained on (question -> "
         "grounded answer) and its logits, and never sees the notes. Same recipe otherwise "
         "(configs/cpu_default.yaml: 64 train + 16 val prompts, 40 KD steps, forward KL top-16 + CE, "
         "seed 0). Means with 95% percentile-bootstrap intervals (2000 resamples); differences are "
         "paired on the same items.", ""]

    L += ["## 1. Teacher ceiling on the prompts the students were distilled from", "",
          f"{ts['n']} train + val prompts, teacher {ts['teacher']}, greedy, 160 new tokens at most.", "",
          "| teacher prompt | key-step coverage | keyword coverage | unsafe | ended with EOS | tokens |",
          "|---|---|---|---|---|---|"]
    for g, s in ts["by_grounding"].items():
        L.append(f"| grounding={g} | " + " | ".join(_fmt(s[k]["mean"], s[k]["lo"], s[k]["hi"])
                                                     for k in ("steps", "required", "unsafe", "eos"))
                 + f" | {s['tokens']['mean']:.0f} |")
    d = ts["paired_reference_minus_none"]
    L.append("| paired reference - none | " + " | ".join(_fmt(d[k]["mean"], d[k]["lo"], d[k]["hi"], True)
                                                       for k in ("steps", "required", "unsafe")) + " | | |")
    tm = [m for m in METRICS if any(m in res[t]["summary"] for t in teachers)]
    L += ["", "On the held-out test items (`python -m evals.domain`, grounding only in the teacher's context):", "",
          "| teacher | n | " + " | ".join(LABELS[m] for m in tm) + " |", "|---|---|" + "---|" * len(tm)]
    for t in teachers:
        s = res[t]["summary"]
        L.append(f"| {t} | {res[t]['n_items']} | " + " | ".join(
            _fmt(s[k]["mean"], *s[k]["ci95"]) if k in s else "-" for k in tm) + " |")
    if len(teachers) == 2:
        cells = [paired(res, teachers[0], teachers[1], k) for k in tm]
        L.append(f"| paired {teachers[1]} - {teachers[0]} | {cells[0][3]} | "
                 + " | ".join(_fmt(*c[:3], True) for c in cells) + " |")

    diffs: dict[str, dict] = {}
    L += ["", "## 2. Student ablation on the held-out test items", ""]
    L += _student_tables(res, list(students), METRICS, diffs)

    seen = [t for t in seen_students if (Path(out_dir) / f"kd_domain_{t}.json").exists()]
    if seen:
        rs = heldout_rows(seen, out_dir)
        L += ["", "## 2b. Records the students were distilled on, asked in a new phrasing", "",
              "Each of the 64 train records of the KD run, asked with the record's next question "
              "(`--items distilled-paraphrase`), which no model saw in training. The held-out table "
              "above measures transfer to unseen devices and issues, where grounded answers can teach "
              "form but not the missing facts; this one measures whether the facts of the distilled "
              "records were absorbed.", ""]
        L += _student_tables(rs, seen, [m for m in METRICS if any(m in rs[t]["summary"] for t in seen)], diffs)
        res.update(rs)

    if sanity:
        L += ["", "## 3. Does the judge discriminate?", "",
              f"Judge {sanity['judge']} on {sanity['n']} held-out items: the reference steps written as an "
              f"answer vs a `{sanity['mismatched_from']}` answer to an item of another category.", "",
              "| answer judged | judge score /10 | judge accuracy | unparsed replies |", "|---|---|---|---|"]
        for k in ("reference", "mismatched"):
            s = sanity[k]
            L.append(f"| {k} | {_fmt(s['judge']['mean'], *s['judge']['ci95'])} | "
                     f"{_fmt(s['judge_acc']['mean'], *s['judge_acc']['ci95'])} | {s.get('judge_unparsed', '-')} |")
        g = sanity["gap"]
        L.append(f"| paired gap reference - mismatched | {_fmt(g['mean'], *g['ci95'], True)} | | |")

    L += ["", "## Commands (2-core x86_64 VM, CPU, f32)", "",
          "```",
          "python -m jaxkd.train --config configs/cpu_default.yaml stage=teacher                         # ungrounded answers",
          "python -m jaxkd.train --config configs/cpu_default.yaml stage=kd                              # runs/kd-cpu",
          "python -m jaxkd.train --config configs/cpu_default.yaml stage=teacher teacher.grounding=reference",
          "python -m jaxkd.train --config configs/cpu_default.yaml stage=kd teacher.grounding=reference name=kd-cpu-grounded",
          "python -m evals.domain --model qwen2.5-coder-0.5b-instruct --split test --limit 32 --tag student_base --reference-tag teacher",
          "python -m evals.domain --model runs/kd-cpu --split test --limit 32 --tag student_kd --reference-tag teacher",
          "python -m evals.domain --model runs/kd-cpu-grounded --split test --limit 32 --tag student_kd_grounded --reference-tag teacher",
          "python -m evals.domain --model qwen2.5-coder-1.5b-instruct --split test --limit 32 --tag teacher",
          "python -m evals.domain --model qwen2.5-coder-1.5b-instruct --split test --limit 32 --grounding reference --tag teacher_grounded",
          "python -m evals.domain --model qwen2.5-coder-0.5b-instruct --items distilled-paraphrase --split train --limit 0 --tag student_base_seen",
          "python -m evals.domain --model runs/kd-cpu --items distilled-paraphrase --split train --limit 0 --tag student_kd_seen",
          "python -m evals.domain --model runs/kd-cpu-grounded --items distilled-paraphrase --split train --limit 0 --tag student_kd_grounded_seen",
          "python -m evals.judge --tags " + " ".join(students) + " --sanity --limit 16",
          "python -m evals.judge --tags " + " ".join(teachers),
          "python -m evals.judge --tags " + " ".join(reversed(seen)),
          "python -m evals.ablation",
          "```", "",
          "Teacher-stage provenance: " + "; ".join(
              f"{g}: {p.get('date')} on {p.get('machine')}, {(p.get('last_run') or {}).get('tok_per_s')} tok/s"
              for g, p in ts["provenance"].items()) + ".",
          "Generations (with the command, date and machine of each): evals/results/generations/<tag>.jsonl; "
          "judge verdicts: evals/results/judgements/. Every `python -m evals.domain` call above ran with "
          "`--batch-size 16` under `flock /tmp/jaxkd-bigmem.lock`."]
    out = out_dir / "grounding_ablation.md"
    out.write_text("\n".join(L) + "\n")
    (out_dir / "grounding_ablation.json").write_text(json.dumps(
        {"teacher_stage": ts, "heldout": {t: r["summary"] for t, r in res.items()}, "paired": diffs,
         "judge_sanity": sanity}, indent=1, default=float))
    _plot(res, [("held-out test items (unseen records)", list(students)),
                ("distilled records, new phrasing", seen)], out_dir / "grounding_ablation.png")
    return out


def _plot(res: Mapping[str, dict], groups: Sequence[tuple[str, Sequence[str]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(title, tags) for title, tags in groups if tags]
    fig, axes = plt.subplots(1, len(groups), figsize=(7.5 * len(groups), 3.8), squeeze=False)
    for ax, (title, tags) in zip(axes[0], groups):
        metrics = [m for m in METRICS if all(m in res[t]["summary"] for t in tags)]
        width = 0.8 / len(tags)
        for j, t in enumerate(tags):
            s = res[t]["summary"]
            means = [s[m]["mean"] for m in metrics]
            err = np.array([[s[m]["mean"] - s[m]["ci95"][0], s[m]["ci95"][1] - s[m]["mean"]] for m in metrics]).T
            ax.bar(np.arange(len(metrics)) + j * width, means, width, yerr=np.clip(err, 0, None), capsize=3,
                   label=f"{t} (n={res[t]['n_items']})")
        ax.set_xticks(np.arange(len(metrics)) + width * (len(tags) - 1) / 2, [LABELS[m] for m in metrics],
                      fontsize=7, rotation=12)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean (95% bootstrap CI)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", nargs="*", default=["student_base", "student_kd", "student_kd_grounded"])
    p.add_argument("--teachers", nargs="*", default=["teacher", "teacher_grounded"])
    args = p.parse_args(argv)
    print(write(args.students, args.teachers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
