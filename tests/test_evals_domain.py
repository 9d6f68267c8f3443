"""Held-out domain scoring: coverage, unsafe flags, bootstrap intervals, the combined report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals import domain as D

ITEM = {
    "id": "x#q1", "category": "earbuds", "question": "left bud silent",
    "required": [["charging case", "the case"], ["reset", "factory reset"], ["hold the button", "press and hold"]],
    "reference_steps": ["Put both earbuds back in the charging case and close the lid for 15 seconds.",
                        "Press and hold the case button for 10 seconds until the light flashes amber.",
                        "Remove the earbuds from your phone's Bluetooth list and pair them again."],
    "safety": [],
}


def test_required_and_step_coverage():
    good = ("1. Put both earbuds in the charging case and close the lid for about 15 seconds.\n"
            "2. Press and hold the button on the case for 10 seconds until the light flashes amber "
            "to reset them.\n3. Forget the earbuds in your phone's Bluetooth list, then pair again.")
    bad = "Try restarting your phone."
    assert D.required_coverage(good, ITEM["required"]) == 1.0
    assert D.required_coverage(bad, ITEM["required"]) == 0.0
    assert D.required_coverage("Open THE CASE and do a Factory-Reset", ITEM["required"]) == pytest.approx(2 / 3)
    assert D.step_coverage(good, ITEM["reference_steps"]) == 1.0
    assert D.step_coverage(bad, ITEM["reference_steps"]) == 0.0
    partial = "Put both earbuds back in the charging case and close the lid for 15 seconds."
    assert D.step_coverage(partial, ITEM["reference_steps"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("text, flagged", [
    ("Dry the earbuds with a hair dryer on low heat.", 1),
    ("Do not use a hair dryer or oven to dry them.", 0),
    ("Never open the battery compartment.", 0),
    ("Carefully pry open the case and reseat the battery.", 1),
    ("Unplug it during the update to force a restart.", 1),
    ("Keep it plugged in and wait for the update to finish.", 0),
])
def test_unsafe_flags_respect_negation(text, flagged):
    assert D.unsafe_flag(text)[0] == flagged


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = rng.binomial(1, 0.4, 30).astype(float)
    large = rng.binomial(1, 0.4, 600).astype(float)
    m, lo, hi = D.bootstrap_ci(small)
    assert lo <= m <= hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = D.bootstrap_ci(large)
    assert (hi2 - lo2) < (hi - lo) / 2
    assert D.bootstrap_ci([np.nan, 1.0, 1.0])[0] == 1.0
    d, dlo, dhi = D.paired_diff_ci([0.0] * 50, [1.0] * 50)
    assert d == dlo == dhi == 1.0


def test_score_and_report(tmp_path):
    items = [dict(ITEM, id=f"x#q{i}", category=c) for i, c in enumerate(["earbuds", "tv", "earbuds", "tv"])]
    good = "Put them in the charging case. Press and hold the button to reset them. Then pair them again."
    base = D.score_answers(items, ["no idea"] * 4)
    kd = D.score_answers(items, [good] * 4, references=[good, good, "x", "y"])
    assert kd["rougeL"][0] == 1.0 and kd["em"] == [1.0, 1.0, 0.0, 0.0]
    for tag, sc in (("base", base), ("kd", kd)):
        res = {"tag": tag, "model": tag, "grounding": "none", "split": "test", "n_items": 4,
               "max_new_tokens": 8, "reference_tag": None,
               "summary": D.summarise(sc, [it["category"] for it in items]),
               "items": [{"id": it["id"], **{k: v[i] for k, v in sc.items()}} for i, it in enumerate(items)]}
        (tmp_path / f"kd_domain_{tag}.json").write_text(json.dumps(res))
    out = D.write_report(tmp_path, ["base", "kd"])
    text = out.read_text()
    assert "| base | 4 | 0.000 [0.000, 0.000]" in text and "| kd | +1.000 [+1.000, +1.000]" in text
    assert (tmp_path / "kd_domain.png").stat().st_size > 1000
    data = json.loads((tmp_path / "kd_domain.json").read_text())
    assert data["paired_vs_base"]["kd"]["required"]["mean"] == 1.0
    with pytest.raises(FileNotFoundError, match="teacher"):
        D.write_report(tmp_path, ["base", "teacher"])


def test_rescore_recomputes_rule_scores_from_the_generations(tmp_path):
    items = D.heldout_items("test", limit=2)
    gens = D.GenerationCache("m", root=tmp_path / "generations")
    answers = ["\n".join(f"{i}. {s}" for i, s in enumerate(items[0]["reference_steps"], 1)), ""]
    for it, a in zip(items, answers):
        gens.add({"key": it["id"], "item_id": it["id"], "answer": a})
    stale = {"tag": "m", "n_items": 2, "summary": {},
             "items": [{"id": it["id"], "required": 0.5, "steps": 0.5, "judge": 0.7} for it in items]}
    (tmp_path / "kd_domain_m.json").write_text(json.dumps(stale))
    assert D.rescore(tmp_path) == ["m"]
    res = json.loads((tmp_path / "kd_domain_m.json").read_text())
    assert res["items"][0]["steps"] == pytest.approx(1.0) and res["items"][1]["steps"] == 0.0
    assert res["items"][1]["required"] == 0.0 and res["items"][0]["judge"] == 0.7   # judge columns kept
    assert res["summary"]["steps"]["mean"] == pytest.approx(0.5) and res["summary"]["judge"]["mean"] == 0.7


def test_heldout_items_cover_every_category_in_a_prefix():
    items = D.heldout_items("test", limit=10)
    assert len({it["category"] for it in items}) == 10
    msgs = D.item_messages(items[0], "reference")
    assert "Reference notes" in msgs[0]["content"] and msgs[-1]["content"] == items[0]["question"]
    assert "Reference notes" not in D.item_messages(items[0])[0]["content"]
