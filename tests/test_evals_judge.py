"""LLM-as-judge plumbing (prompt, parsing, caching, result files) and the grounding ablation report.

The judge model is replaced by a rule that reads the prompt it is given, so these tests check
what reaches the judge and what happens to its replies; the real judge's behaviour is measured
by ``python -m evals.judge --sanity`` (committed in evals/results/judge_sanity.json).
"""

from __future__ import annotations

import json
import math

import pytest

from evals import ablation as A
from evals import judge as J
from evals.domain import GenerationCache, score_answers, summarise

STEPS = ["Put both earbuds back in the charging case and close the lid for 15 seconds.",
         "Press and hold the case button for 10 seconds until the light flashes amber.",
         "Remove the earbuds from your phone's Bluetooth list and pair them again."]
ITEMS = [{"id": f"x#q{i}", "category": cat, "question": f"question {i}: left bud silent",
          "required": [["charging case"], ["reset"]], "reference_steps": STEPS,
          "safety": ["Never heat the case."]} for i, cat in enumerate(["earbuds", "tv", "earbuds", "tv"])]
GOOD = "1. Put both earbuds back in the charging case and close the lid for 15 seconds.\n2. Reset."
BAD = "Restart your television."


class ByteTokenizer:
    """Chat template = the messages' text as bytes, so the fake judge can read its prompt."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return list("\n".join(m["content"] for m in messages).encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode()


class RuleJudge:
    """Replies "9/10" when the graded answer contains the first reference step, else "Score: 2"."""

    def __init__(self):
        self.tokenizer, self.prompts = ByteTokenizer(), []

    def generate(self, prompt_ids, sampling):
        replies = []
        for ids in prompt_ids:
            text = bytes(ids).decode()
            self.prompts.append(text)
            answer = text.split("Answer to grade:")[1]
            replies.append(list(("9/10" if STEPS[0] in answer else "Score: 2").encode()))
        return type("Out", (), {"tokens": replies})()


def make_judge(tmp_path):
    j = J.Judge("fake-judge", batch_size=3, root=tmp_path / "judgements", log=lambda s: None)
    j._gen = RuleJudge()
    return j


@pytest.mark.parametrize("reply, score", [("8", 8.0), ("8/10", 8.0), ("Score: 10", 10.0), (" 0.", 0.0),
                                          ("I'd say 7 out of 10", 7.0), ("eleven", math.nan), ("", math.nan)])
def test_parse_score(reply, score):
    got = J.parse_score(reply)
    assert (math.isnan(got) and math.isnan(score)) or got == score


def test_judge_prompt_carries_reference_question_and_answer():
    text = J.judge_messages(ITEMS[0], "my answer")[1]["content"]
    for s in STEPS:
        assert s in text
    assert "Key terms: charging case; reset" in text and "Never heat the case." in text
    assert ITEMS[0]["question"] in text and text.index("my answer") > text.index("Answer to grade:")
    assert "(empty)" in J.judge_messages(ITEMS[0], "  ")[1]["content"]


def test_judge_scores_caches_and_writes_results(tmp_path):
    judge = make_judge(tmp_path)
    answers = [GOOD, BAD, GOOD, BAD]
    assert judge.score(ITEMS, answers) == [9.0, 2.0, 9.0, 2.0]
    assert len(judge._gen.prompts) == 4
    assert judge.score(ITEMS, answers) == [9.0, 2.0, 9.0, 2.0]
    assert len(judge._gen.prompts) == 4, "cached verdicts must not be judged again"
    # a fresh Judge reads the verdict file back
    again = J.Judge("fake-judge", root=tmp_path / "judgements")
    assert again.score(ITEMS, answers) == [9.0, 2.0, 9.0, 2.0] and again._gen is None

    # kd_domain_<tag>.json gains per-item judge scores and summary intervals
    gens = GenerationCache("s", root=tmp_path / "generations")
    for it, a in zip(ITEMS, answers):
        gens.add({"key": it["id"], "item_id": it["id"], "answer": a})
    sc = score_answers(ITEMS, answers)
    res = {"tag": "s", "n_items": 4, "summary": summarise(sc),
           "items": [{"id": it["id"], **{k: v[i] for k, v in sc.items()}} for i, it in enumerate(ITEMS)]}
    (tmp_path / "kd_domain_s.json").write_text(json.dumps(res))
    summ = J.judge_tag(judge, "s", {it["id"]: it for it in ITEMS}, tmp_path)
    assert summ["judge"]["mean"] == pytest.approx(0.55) and summ["judge_acc"]["mean"] == 0.5
    assert summ["judge_unparsed"] == 0
    saved = json.loads((tmp_path / "kd_domain_s.json").read_text())
    assert [i["judge_acc"] for i in saved["items"]] == [1.0, 0.0, 1.0, 0.0]
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
    assert (tmp_path / "judge_sanity.json").exists()
    mism = [p for p in judge._gen.prompts if "question 0" in p][-1]
    assert BAD in mism, "item 0 (earbuds) must be paired with a tv item's answer"


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
