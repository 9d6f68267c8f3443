"""evals.teacher_answers on the committed corpus answers: every prompt is accounted for once."""

from __future__ import annotations

from evals.teacher_answers import markdown, summarize
from jaxkd.config import RunConfig, load


def test_counts_add_up_and_drops_follow_the_config_checks():
    cfg = load(RunConfig, "configs/cpu_corpus_replay.yaml")
    s = summarize(cfg)
    for groups in (s["splits"], s["categories"]):
        for g in groups.values():
            assert g["answered"] <= g["prompts"] and g["eos"] <= g["answered"]
            assert g["kept"] + sum(g["dropped"].values()) == g["answered"]
    total = sum(g["prompts"] for g in s["splits"].values())
    assert total == sum(g["prompts"] for g in s["categories"].values()) > 0
    # every answer cut at max_new_tokens is dropped (drop_truncated), before any other reason
    for g in s["splits"].values():
        assert g["dropped"].get("truncated", 0) == g["answered"] - g["eos"]
    lax = summarize(load(RunConfig, "configs/cpu_corpus_replay.yaml",
                         ["distill.drop_truncated=false", "distill.min_step_coverage=0", "distill.drop_unsafe=false",
                          "distill.drop_leaked_notes=false"]))
    assert all(g["kept"] == g["answered"] for g in lax["splits"].values())
    text = markdown(cfg.name, s)
    assert "| train |" in text and "ended with EOS" in text
