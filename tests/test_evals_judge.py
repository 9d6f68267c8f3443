"""evals.judge plumbing (judge choice, result files, sanity, calibration) and the ablation report.

The LLM judge is replaced by a rule over the answers, so these tests check what reaches the judge
and what happens to its scores; the judge's mechanics are tested in tests/test_judge.py and its
real behaviour is measured by ``python -m evals.judge --calibrate`` (evals/results/judge_calibration.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals import ablation as A
from evals import judge as J
from evals.domain import GenerationCache, score_answers, summarise
from jaxkd.config import JudgeConfig
from jaxkd.judge import CRITERIA, Criterion, Verdicts

STEPS = ["Put both earbuds back in the charging case and close the lid for 15 seconds.",
         "Press and hold the case button for 10 seconds until the light flashes amber.",
         "Remove the earbuds from your phone's Bluetooth list and pair them again."]
ITEMS = [{"id": f"x#q{i}", "category": cat, "question": f"question {i}: left bud silent",
          "required": [["charging case"], ["reset"]], "reference_steps": STEPS,
          "safety": ["Never heat the case."]} for i, cat in enumerate(["earbuds", "tv", "earbuds", "tv"])]
GOOD = "1. Put both earbuds back in the charging case and close the lid for 15 seconds.\n2. Reset."
BAD = "Restart your television."


class RuleLLM:
    """Stands in for jaxkd.judge.LLMJudge: technical 9/10 when the answer holds the first
    reference step, else 2/10; the other criteria follow; records what it was asked."""

    def __init__(self):
        self.calls = []

    def score(self, items, answers, criteria, labels=None):
        self.calls.append((list(answers), [Criterion(c) for c in criteria]))
        out = {}
        for c in map(Criterion, criteria):
            top = CRITERIA[c].max_score
            s = np.asarray([0.9 * top if STEPS[0] in a else 0.2 * top for a in answers])
            out[c] = Verdicts(c, s, np.full(len(answers), 0.97), np.zeros((len(answers), top + 1)))
        return out


def make_judge(tmp_path):
    j = J.Judge("fake-judge", root=tmp_path / "judgements", log=lambda s: None)
    j._judge = RuleLLM()
    return j


def test_pick_judge_avoids_the_model_under_test():
    assert J.pick_judge(["runs/kd-cpu"]) == ("qwen2.5-coder-1.5b-instruct", "")
    assert J.pick_judge(["qwen2.5-coder-1.5b-instruct"])[0] == "qwen2.5-coder-0.5b-instruct"
    name, note = J.pick_judge(["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"])
    assert name == "qwen2.5-coder-1.5b-instruct" and "also a model under test" in note
    assert J.pick_judge([], "my-judge") == ("my-judge", "")


def test_judge_tag_writes_every_criterion_into_the_results(tmp_path):
    judge = make_judge(tmp_path)
    answers = [GOOD, BAD, GOOD, BAD]
    gens = GenerationCache("s", root=tmp_path / "generations")
    for it, a in zip(ITEMS, answers):
        gens.add({"key": it["id"], "item_id": it["id"], "answer": a})
    sc = score_answers(ITEMS, answers)
    res = {"tag": "s", "n_items": 4, "summary": {**summarise(sc), "judge_unparsed": 0},
           "items": [{"id": it["id"], **{k: v[i] for k, v in sc.items()}} for i, it in enumerate(ITEMS)]}
    (tmp_path / "kd_domain_s.json").write_text(json.dumps(res))
    summ = J.judge_tag(judge, "s", {it["id"]: it for it in ITEMS}, tmp_path)
    assert summ["judge"]["mean"] == pytest.approx(0.55) and summ["judge_acc"]["mean"] == 0.5
    assert summ["judge_language"]["mean"] == pytest.approx(0.55) and summ["judge_mass"]["min"] == pytest.approx(0.97)
    assert summ["judge_spread"]["distinct_0.1"] == 2 and "judge_unparsed" not in summ
    saved = json.loads((tmp_path / "kd_domain_s.json").read_text())
    assert [i["judge_acc"] for i in saved["items"]] == [1.0, 0.0, 1.0, 0.0]
    assert saved["judge"]["model"] == "fake-judge" and saved["judge"]["criteria"]["language"] == 5
    assert judge._judge.calls[0][0] == answers
    with pytest.raises(FileNotFoundError, match="kd_domain_missing"):
        J.judge_tag(judge, "missing", {}, tmp_path)


def test_sanity_uses_other_category_answers(tmp_path):
    judge = make_judge(tmp_path)
    gens = GenerationCache("teacher", root=tmp_path / "generations")
    for it, a in zip(ITEMS, [GOOD, BAD, GOOD, BAD]):
        gens.add({"key": it["id"], "item_id": it["id"], "answer": a})
    out = J.sanity(judge, ITEMS, "teacher", tmp_path, pool=ITEMS)
    # references contain step 1 -> 9; mismatched answers come from the other category
    assert out["reference"]["judge"]["mean"] == pytest.approx(0.9)
    assert out["mismatched"]["judge"]["mean"] == pytest.approx(0.55) and out["gap"]["mean"] == pytest.approx(0.35)
    assert (tmp_path / "judge_sanity.json").exists()
    mismatched = judge._judge.calls[-1][0]
    assert mismatched[0] == BAD, "item 0 (earbuds) must be paired with a tv item's answer"
    assert mismatched[1] == GOOD, "item 1 (tv) must be paired with an earbuds item's answer"


def test_calibration_pairs_and_report(tmp_path):
    from evals import calibration as C

    pairs = C.load_pairs()
    assert len(pairs) >= 60 and {p["category"] for p in pairs} == set(C.CATEGORIES)
    for p in pairs:
        assert p["answer_a"] != p["answer_b"] and p["winner"] in ("a", "b") and p["why"]
    sub = C.load_pairs(per_category=1)
    assert [p["category"] for p in sub] == list(C.CATEGORIES)
    with pytest.raises(ValueError, match="unknown calibration categories"):
        C.load_pairs(categories=["nope"])

    class WinnerJudge:
        """Scores the labelled winner 8 and the loser 3 on every criterion."""
        model_name = "oracle"

        def __init__(self):
            self.winners = {p["answer_a"] if p["winner"] == "a" else p["answer_b"] for p in sub}

        def score(self, items, answers, criteria, label=""):
            return {c: Verdicts(c, np.asarray([8.0 if a in self.winners else 3.0 for a in answers]) *
                                CRITERIA[c].max_score / 10, np.ones(len(answers)), np.zeros((len(answers), 1)))
                    for c in map(Criterion, criteria)}

    # an entry of an older run (keyed by model name only) is kept, under "<model> @ <its rubric>"
    legacy = {"n_pairs": 0, "per_category": 0, "rubric": "v2-old", "agreement": {}, "valid_mass_mean": {},
              "wall_s": 1.0, "command": "python -m evals.judge --calibrate", "date": "d", "machine": "m"}
    (tmp_path / "judge_calibration.json").write_text(json.dumps({"judges": {"old-judge": legacy}}))
    out = C.run_calibration(WinnerJudge(), per_category=1, results_dir=tmp_path)
    assert json.loads((tmp_path / "judge_calibration.json").read_text())["judges"]["old-judge @ v2-old"] == legacy
    data = json.loads((tmp_path / "judge_calibration.json").read_text())
    from jaxkd.judge import RUBRIC_VERSION

    agree = data["judges"][f"oracle @ {RUBRIC_VERSION}"]["agreement"]
    assert all(agree[c][k]["agree"] == 1.0 for c in C.CATEGORIES for k in agree[c])
    assert agree["plain_vs_injected"]["technical"]["not_raised"] == 1.0
    assert data["rules"]["agreement"]["complete_vs_missing_step"]["steps"]["agree"] == 1.0
    text = out.read_text()
    assert f"## Judge `oracle @ {RUBRIC_VERSION}`" in text
    assert "Injection guard: flagged" not in text.split("## Judge `oracle")[1].split("##")[0]

    class GuardedJudge(WinnerJudge):
        """The oracle, with step probes on completeness (winner 1, loser 0) and the guard's flags."""
        model_name = "guarded"
        config = JudgeConfig(injection="zero", step_criteria=("completeness",))

        def score(self, items, answers, criteria, label=""):
            out = super().score(items, answers, criteria, label)
            win = np.asarray([a in self.winners for a in answers], float)
            flagged = np.asarray(["Ignore" in a or "grader" in a.lower() for a in answers])
            for c, v in out.items():
                v.flagged = flagged
                if c == Criterion.COMPLETENESS:
                    v.steps = win
            return out

    guarded = GuardedJudge()
    guarded._judge = guarded  # where run_calibration looks for the LLMJudge's config and stats
    text = C.run_calibration(guarded, per_category=1, results_dir=tmp_path).read_text()
    j = json.loads((tmp_path / "judge_calibration.json").read_text())["judges"][f"guarded @ {RUBRIC_VERSION}"]
    assert j["injection"] == "zero" and j["step_criteria"] == ["completeness"]
    assert j["agreement"]["complete_vs_missing_step"]["completeness_steps"]["agree"] == 1.0
    assert j["flagged"]["n_injected"] == 1 and j["flagged"]["n_other"] == 2 * len(C.CATEGORIES) - 1
    assert "completeness: step probes x 10" in text and "Injection guard: flagged" in text and "| complete_vs_missing_step | completeness 1.00 (margin +5.00) |" in text


def test_grounding_ablation_report(tmp_path):
    from jaxkd.data.store import load_records
    from jaxkd.distill.cache import TeacherEntry, export_answers

    recs = load_records("train")[:6]
    tdir = tmp_path / "teacher"
    tdir.mkdir()
    for g in ("none", "reference"):
        entries = []
        for r in recs:
            ans = "\n".join(f"{i}. {s}" for i, s in enumerate(r["steps"], 1)) if g == "reference" else "Restart it."
            entries.append(TeacherEntry(
                key=f"{g}:{r['id']}", example_id=f"{r['id']}#q0", split="train", meta={}, preset="t",
                grounding=g, sampling={}, teacher_messages=[], student_messages=[], answer=ans,
                answer_ids=[1, 2], eos_id=7 if g == "reference" else None,
                finish_reason="eos" if g == "reference" else "length"))
        export_answers(entries, tdir / f"qwen2.5-coder-1.5b-instruct__{g}.jsonl",
                       {"date": "d", "machine": "m", "last_run": {"tok_per_s": 1.0}})
    for tag, ans in (("b", BAD), ("k", BAD), ("kg", GOOD), ("t", BAD), ("tg", GOOD)):
        sc = score_answers(ITEMS, [ans] * 4)
        items = [{"id": it["id"], **{k: v[i] for k, v in sc.items()}, "judge": 0.9 if ans == GOOD else 0.2,
                  "judge_acc": float(ans == GOOD)} for i, it in enumerate(ITEMS)]
        summ = summarise({**sc, "judge": [i["judge"] for i in items], "judge_acc": [i["judge_acc"] for i in items]})
        (tmp_path / f"kd_domain_{tag}.json").write_text(json.dumps({"n_items": 4, "summary": summ, "items": items}))
    for tag, ans in (("ks", BAD), ("kgs", GOOD)):
        sc = score_answers(ITEMS[:2], [ans] * 2)
        (tmp_path / f"kd_domain_{tag}.json").write_text(json.dumps(
            {"n_items": 2, "summary": summarise(sc),
             "items": [{"id": it["id"], **{k: v[i] for k, v in sc.items()}} for i, it in enumerate(ITEMS[:2])]}))
    out = A.write(["b", "k", "kg"], ["t", "tg"], out_dir=tmp_path, teacher_dir=tdir,
                  seen_students=["ks", "kgs", "absent"])
    text = out.read_text()
    assert "| grounding=reference | 1.000 [1.000, 1.000]" in text
    assert "| paired reference - none | +1.000 [+1.000, +1.000]" in text
    assert "| kg - k | +0.333 [+0.333, +0.333]" in text  # step coverage: GOOD covers 1 of 3 steps
    assert "## 2b." in text and "| kgs - ks | +0.333 [+0.333, +0.333]" in text and "absent" not in text
    data = json.loads((tmp_path / "grounding_ablation.json").read_text())
    assert data["paired"]["kg - k"]["judge_acc"]["mean"] == 1.0
    assert data["teacher_stage"]["by_grounding"]["reference"]["eos"]["mean"] == 1.0
    assert (tmp_path / "grounding_ablation.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="teacher-stage answers missing"):
        A.write(["b"], ["t"], out_dir=tmp_path, teacher_dir=tmp_path / "nowhere")


def test_distilled_paraphrase_items_ask_the_distilled_records_anew():
    from jaxkd.config import RunConfig, load
    from jaxkd.distill.teacher import teacher_prompts

    from evals.domain import distilled_paraphrase_items

    cfg = load(RunConfig, "configs/cpu_default.yaml")
    prompts = teacher_prompts(cfg, "train")
    items = distilled_paraphrase_items("configs/cpu_default.yaml", "train")
    assert [it["record_id"] for it in items] == [p.record["id"] for p in prompts if len(p.record["questions"]) > 1]
    seen = {p.record["id"]: p.record["questions"][p.question_index] for p in prompts}
    for it in items:
        assert it["question"] != seen[it["record_id"]] and it["reference_steps"]


def test_judge_diagnostics_match_each_answer_to_its_verdict_halves():
    from evals.judge_diagnostics import halves

    verdicts = [{"criterion": "technical", "item_id": "a#q1", "score": 4.5, "dist": [0.5, 0.5], "steps": 0.4},
                {"criterion": "technical", "item_id": "a#q1", "score": 6.0, "dist": [0.0, 1.0], "steps": 0.8,
                 "steps_p_yes": [0.7, 0.9]},
                {"criterion": "completeness", "item_id": "a#q1", "score": 4.5, "dist": [1.0, 0.0], "steps": 0.1}]
    got = halves([{"item_id": "a#q1", "scores": {"technical": 6.0}}], verdicts, "technical")
    assert got == {"a#q1": {"score": 6.0, "rubric": 1.0, "probe": 0.8, "p_yes": [0.7, 0.9]}}
    with pytest.raises(KeyError, match="0 candidate rows"):
        halves([{"item_id": "a#q1", "scores": {"technical": 5.0}}], verdicts, "technical")
    with pytest.raises(ValueError, match="no step probes"):
        halves([{"item_id": "b#q1", "scores": {"technical": 1.0}}],
               [{"criterion": "technical", "item_id": "b#q1", "score": 1.0, "dist": [1.0], "steps": None}], "technical")


def test_probe_auc_counts_ordered_pairs_and_half_ties():
    from evals.judge_diagnostics import auc

    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auc([0.1], [0.9, 0.8]) == 0.0
    assert auc([0.5, 0.9], [0.5, 0.1]) == 0.875   # (0.5 tie + 1 + 1 + 1) / 4 pairs
    assert np.isnan(auc([], [0.3]))


def test_judge_diagnostics_read_only_the_rows_of_the_manifest_judge(tmp_path):
    from evals.judge_diagnostics import judge_rows

    (tmp_path / "m").mkdir()
    rows = [{"key": "k05", "item_id": "a#q1", "scores": {"technical": 6.0}},
            {"key": "k15", "item_id": "a#q1", "scores": {"technical": 3.0}}]   # another judge's row
    (tmp_path / "m" / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from evals.report import StaleCache

    manifest = {"m": {"judge": {"model": "small", "weights": "w05:dtype=bfloat16", "keys": {"a#q1": "k05"}}}}
    assert judge_rows(tmp_path, manifest, "m", "small", "bfloat16") == rows[:1]
    with pytest.raises(StaleCache, match="config's judge is big"):
        judge_rows(tmp_path, manifest, "m", "big", "bfloat16")
    # the same judge in another dtype is another judge: its keys differ, so are its scores
    with pytest.raises(StaleCache, match=r"small's \(bfloat16\), the config's judge is small \(float32\)"):
        judge_rows(tmp_path, manifest, "m", "small")
    f32 = {"m": {"judge": {"model": "small", "weights": "w05", "keys": {"a#q1": "k05"}}}}
    with pytest.raises(StaleCache, match=r"small's \(float32\), the config's judge is small \(bfloat16\)"):
        judge_rows(tmp_path, f32, "m", "small", "bfloat16")
    assert judge_rows(tmp_path, f32, "m", "small", "float32") == rows[:1]
    with pytest.raises(KeyError, match="1 of the manifest's judge keys are missing"):
        judge_rows(tmp_path, {"m": {"judge": {"model": "small", "weights": "w05",
                                              "keys": {"a#q1": "k05", "b#q1": "kb"}}}}, "m", "small")
    with pytest.raises(KeyError, match="names no judge scores"):
        judge_rows(tmp_path, {"m": {}}, "m", "small")
