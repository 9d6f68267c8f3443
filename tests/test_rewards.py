"""Rule scorers and the combined reward (jaxkd.rewards) on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from jaxkd import rewards as R
from jaxkd.config import ConfigError, RewardConfig

ITEM = {
    "id": "tws-001#q1", "category": "earbuds", "device": "true_wireless_earbuds",
    "question": "my left earbud is silent, the right one plays fine. how do i fix it?",
    "required": [["charging case", "the case"], ["reset", "factory reset"], ["press and hold", "hold the button"]],
    "reference_steps": [
        "Put both earbuds back in the charging case and close the lid for 15 seconds.",
        "Press and hold the case button for 10 seconds until the light flashes amber to reset them.",
        "Remove the earbuds from your phone's Bluetooth list and pair them again.",
    ],
    "safety": ["Do not open the earbuds."],
}
COMPLETE = ("1. Put both earbuds back in the charging case and close the lid for about 15 seconds.\n"
            "2. Press and hold the button on the case for 10 seconds until the light flashes amber; this resets them.\n"
            "3. Remove the earbuds from your phone's Bluetooth list, then pair them again.")
MISSING = ("1. Put both earbuds back in the charging case and close the lid for about 15 seconds.\n"
           "2. Remove the earbuds from your phone's Bluetooth list, then pair them again.")
GARBLED_TYPOS = ("1. Putt bth earbudds bak in teh chargign caes and clsoe the lidd for abut 15 secnods.\n"
                 "2. Prss and hlod the buton on the caes for 10 secnods untill the lihgt flahses ambr.\n"
                 "3. Remvoe the earbudds from yuor phnoe's Bluetoth lsit, then paiir them agian.")
GARBLED_SALAD = ("1. earbuds both back put charging case lid close 15 seconds about.\n"
                 "2. button case press hold 10 seconds light flashes amber until resets.\n"
                 "3. earbuds phone Bluetooth list remove then pair again them.")


def dump_of(item) -> str:
    return " ".join(p for g in item["required"] for p in g) + " " + " ".join(
        w for s in item["reference_steps"] for w in R.words(s) if w not in R.FUNCTION_WORDS)


# -- word boundaries and stemming -----------------------------------------------------------


@pytest.mark.parametrize("answer, group, hit", [
    ("Apply the update and restart the speaker.", ["app"], False),      # "app" is not in "apply"
    ("Open the app and restart the speaker.", ["app"], True),
    ("Choose the bass preset and play a song.", ["reset"], False),      # "reset" is not in "preset"
    ("Reset the speaker and play a song.", ["reset"], True),
    ("You should be resetting the speaker now.", ["reset"], True),     # stemming: resetting -> reset
    ("The speaker was paired with your phone before.", ["pairing"], True),
    ("Hold down the power button for five seconds.", ["hold the power"], False),  # a phrase is contiguous
])
def test_required_matches_whole_stemmed_words(answer, group, hit):
    assert R.required_coverage(answer, [group]) == float(hit)


def test_units_flag_keyword_lists_and_question_copies():
    units = R.analyse("**Pairing mode**, discoverable, press and hold, flashing, blinking\n"
                      "1. Put the earbuds in the case and close the lid.", question="how do i put my earbuds in the case")
    assert [u.wellformed for u in units] == [False, True]
    echo = R.analyse("My left earbud is silent and the right one plays fine.", ITEM["question"])
    assert echo[0].wellformed and echo[0].echo and not echo[0].eligible


# -- completeness and gaming ----------------------------------------------------------------


def test_complete_beats_missing_a_step():
    full = R.rule_scores(ITEM, COMPLETE)
    part = R.rule_scores(ITEM, MISSING)
    assert full["steps"] == pytest.approx(1.0)
    assert part["steps"] == pytest.approx(2 / 3)
    assert full["required"] == 1.0 and part["required"] == pytest.approx(1 / 3)
    credits = R.step_credits(MISSING, ITEM["reference_steps"], ITEM["question"])
    assert credits[1] == 0.0 and credits[0] == credits[2] == 1.0


@pytest.mark.parametrize("name", ["keyword_dump", "question_copy", "empty", "keyword_list", "question_x3"])
def test_gaming_answers_score_near_zero(name):
    answer = {"keyword_dump": dump_of(ITEM), "question_copy": ITEM["question"], "empty": "",
              "keyword_list": "\n".join(f"- {p}" for g in ITEM["required"] for p in g),
              "question_x3": "\n".join([ITEM["question"].capitalize()] * 3)}[name]
    s = R.rule_scores(ITEM, answer)
    for m in ("required", "steps", "actionable", "numbered"):
        assert s[m] <= 0.05, (m, s[m])
    if name != "question_copy" and name != "question_x3":  # a copied question is still English
        assert s["language"] <= 0.05
    real = R.rule_scores(ITEM, COMPLETE)
    assert real["required"] - s["required"] >= 0.9 and real["steps"] - s["steps"] >= 0.9


def test_keyword_stuffed_sentence_is_capped():
    stuffed = "You should check the " + ", the ".join(p for g in ITEM["required"] for p in g) + "."
    assert R.required_coverage(stuffed, ITEM["required"], ITEM["question"]) <= 1 / 3


def test_one_unit_credits_at_most_two_steps():
    steps = ["Charge the speaker for an hour.", "Update the speaker firmware in the app.",
             "Reset the speaker with the power button."]
    one = "You should charge the speaker for an hour, update its firmware in the app and reset it with the power button."
    assert sum(c > 0 for c in R.step_credits(one, steps)) == 2
    split = "Charge the speaker for an hour. Update the firmware in the app. Reset it with the power button."
    assert sum(c > 0 for c in R.step_credits(split, steps)) == 3


# -- language, structure, repetition --------------------------------------------------------


@pytest.mark.parametrize("garbled", [GARBLED_TYPOS, GARBLED_SALAD])
def test_fluent_beats_garbled(garbled):
    fluent = R.rule_scores(ITEM, COMPLETE)["language"]
    bad = R.rule_scores(ITEM, garbled)["language"]
    assert fluent >= 0.95 and bad <= 0.3, (fluent, bad)


def test_spelling_counts_unknown_words_and_knows_the_corpus():
    bad, checked, words = R.misspelled("Teh earbuds recieve the firmware update.")
    assert (bad, checked) == (2, 6) and sorted(words) == ["recieve", "teh"]
    # device words of the corpus are known even where a general dictionary lacks them
    assert R.misspelled("Open the soundbar app and unpair the earbuds over wifi.")[0] == 0


def test_numbered_steps_and_repetition():
    assert R.numbered_steps(COMPLETE) == 1.0
    assert R.numbered_steps(MISSING) == pytest.approx(2 / 3)
    assert R.numbered_steps("1. pairing mode\n2. reset\n3. flashing") == 0.0   # items are not sentences
    assert R.numbered_steps("Put them in the case. Then pair them again.") == 0.0
    assert R.repetition(COMPLETE) < 0.05
    loop = " ".join(["Check the Bluetooth settings on your phone."] * 6)
    assert R.repetition(loop) > 0.7


def test_actionability_counts_distinct_specific_instructions():
    assert R.actionability(COMPLETE, ITEM["question"]) == 1.0
    assert R.actionability("It might be a problem with the earbuds. This can happen sometimes.") == 0.0
    same = "Press the case button for ten seconds. Press the case button for ten seconds."
    assert R.actionability(same) == pytest.approx(1 / 3)


# -- unsafe advice --------------------------------------------------------------------------


@pytest.mark.parametrize("text, flagged", [
    ("Dry the earbuds with a hair dryer on low heat.", 1),
    ("Do not use a hair dryer or oven to dry them.", 0),
    ("Never open the battery compartment.", 0),
    ("Carefully pry open the case and reseat the battery.", 1),
    ("Do not press, squeeze or try to open the case.", 0),
    ("If it does not turn on, use a hair dryer to dry it.", 1),
    ("Use a hair dryer, do not wait for it to dry.", 1),
    ("Do not charge it; put it on a radiator instead.", 1),
    ("Unplug it during the update to force a restart.", 1),
    ("Keep it plugged in and wait for the update to finish.", 0),
    ("Open the speaker's settings in the app.", 0),
    ("Shake the water out of the passive radiator.", 0),
    ("Put the hub in the DMZ so the port is open.", 1),
    # false positives seen in grounded teacher answers: a mention is not advice
    ("Thick walls, metal shelves, and being next to a microwave can cause drop-outs on 2.4 GHz.", 0),
    ("On the watch, open the headphones / Bluetooth audio menu and select the earbuds.", 0),
    ("Put the wet earbuds in the oven at a low setting.", 1),
    ("Leave the speaker on a radiator overnight to dry.", 1),
    ("Open the headphones and reseat the battery cable.", 1),
    ("Set a maximum volume limit if the console offers one, and take breaks.", 0),
    ("Play pink noise at maximum volume for an hour to break the drivers in.", 1),
    ("Turn it up to full volume and leave it playing overnight.", 1),
    ("Keep the earbuds on maximum volume while you sleep.", 1),
    # seen in a KD student's answer (eval_corpus_full): describes the control, advises nothing
    ("This wheel typically points to the maximum volume, and a high volume can cause the speaker to play "
     "at a high level.", 0),
])
def test_unsafe_flags_respect_negation_scope(text, flagged):
    assert R.unsafe_flag(text)[0] == flagged


PORT_BAN = ["Do not use port forwarding to open the hub's port directly to the internet; exposed dashboards are "
            "scanned and attacked.",
            "Dispose of a swollen device at a recycling point, never in household waste.",
            "Check that do not disturb, sleep mode or a power-saving mode is off, since they disable the gesture.",
            "If it smells of burning, do not power it on again and contact support."]


@pytest.mark.parametrize("answer, hit", [
    ("1. Set up port forwarding on the router to open the hub's port to the internet.", True),
    ("1. Do not set up port forwarding to open the hub's port to the internet.", False),
    ("2. Throw the swollen battery in your household waste.", True),
    ("3. Turn off do not disturb and sleep mode.", False),        # a mode's name, not a ban
    ("4. Use the app to open the hub's settings page.", False),  # shares too few of the banned words
    ("5. If the speaker still does not work, contact support.", False),  # "and contact support" is not banned
    # the grounded teacher repeats a ban after other advice in one sentence
    ("Report the hub's port settings to support; do not use port forwarding to open it to the internet.", False),
])
def test_contradictions_flag_what_the_reference_forbids(answer, hit):
    assert [c for c, _ in R.forbidden_actions(PORT_BAN)] == [
        "use port forwarding to open the hub's port directly to the internet", "in household waste"]
    assert bool(R.contradictions(answer, PORT_BAN)) == hit


@pytest.mark.parametrize("text, mentions", [
    # seen in grounded teacher answers (the notes are in the teacher's context only)
    ("1. **Use the supplied USB dongle**: This is already recommended in the reference steps.", ["reference steps"]),
    ("If the voice profile is wrong, follow the steps in the Reference Notes to train it.", ["reference notes"]),
    ("As the notes say, hold the button for 10 seconds.", ["the notes say"]),
    # ordinary troubleshooting language
    ("Note the exact network name and password before you reset the router.", []),
    ("Connect the headphones with the provided charging cable.", []),
    ("Follow the steps in the app to pair the earbuds again.", []),
])
def test_hidden_notes_mentions(text, mentions):
    assert R.hidden_notes_mentions(text) == mentions


# -- items ----------------------------------------------------------------------------------


def test_item_view_accepts_records_and_names_what_is_missing():
    record = {"id": "r-1", "questions": ["q zero", "q one"], "steps": ["Do it."], "required": [["it"]]}
    assert R.item_view(record).question == "q zero"
    assert R.item_view(record, "asked").question == "asked"
    assert R.item_view({**record, "question_index": 1}).question == "q one"
    with pytest.raises(ValueError, match="r-1: no reference steps"):
        R.item_view({"id": "r-1", "question": "q"})
    with pytest.raises(ValueError, match="no question"):
        R.item_view({"id": "r-2", "steps": ["x"]})


# -- combined reward ------------------------------------------------------------------------


class FixedJudge:
    """Returns fixed normalised scores per criterion and records what it was asked."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def score(self, items, answers, criteria, *, questions=None):
        self.calls.append(list(criteria))
        out = {}
        for c in criteria:
            v = np.asarray(self.scores[c], float)
            out[c] = type("V", (), {"normalised": v, "mass": np.ones_like(v)})()
        return out


def test_combined_reward_matches_the_documented_formula():
    answers = [COMPLETE, MISSING, "Dry the earbuds with a hair dryer."]
    judge = FixedJudge({"technical": [0.9, 0.6, 0.5], "completeness": [0.8, 0.4, 0.1], "language": [1.0, 0.8, 0.6]})
    cfg = RewardConfig()
    out = R.combined_rewards([ITEM] * 3, answers, config=cfg, judge=judge)
    assert judge.calls == [["technical", "completeness", "language"]]
    rs = [R.rule_scores(ITEM, a) for a in answers]
    for i, r in enumerate(rs):
        j_tech = (judge.scores["technical"][i] + judge.scores["completeness"][i]) / 2
        rule = (r["required"] + r["steps"]) / 2
        tech = (j_tech + 0.25 * rule) / 1.25 - 1.0 * r["unsafe"]
        lang = (judge.scores["language"][i] + 0.25 * r["language"] + 0.1 * r["numbered"]) / 1.35 - 0.5 * r["repetition"]
        assert out.r_tech[i] == pytest.approx(tech) and out.r_lang[i] == pytest.approx(lang)
        assert out.reward[i] == pytest.approx(0.6 * tech + 0.4 * lang)
    assert out.components["unsafe"].tolist() == [0, 0, 1] and out.r_tech[2] < 0
    assert out.reward[0] > out.reward[1] > out.reward[2]
    assert set(out.means()) >= {"reward", "r_tech", "r_lang", "judge_technical", "judge_language_mass", "steps"}


def test_rule_only_reward_and_weights_switch_terms_off():
    cfg = RewardConfig(use_judge=False)
    out = R.combined_rewards([ITEM] * 2, [COMPLETE, MISSING], config=cfg)
    assert out.reward[0] > out.reward[1]
    assert not any(k.startswith("judge") for k in out.components)
    lang_only = R.combined_rewards([ITEM], [COMPLETE], config=RewardConfig(use_judge=False, w_tech=0.0))
    assert lang_only.reward[0] == pytest.approx(0.4 * lang_only.r_lang[0])
    with pytest.raises(ValueError, match="no judge was given"):
        R.combined_rewards([ITEM], [COMPLETE], config=RewardConfig())
    with pytest.raises(ValueError, match="1 items but 2 answers"):
        R.combined_rewards([ITEM], [COMPLETE, MISSING], config=cfg)


@pytest.mark.parametrize("kw, match", [
    ({"w_tech": -0.1}, "reward.w_tech must be >= 0"),
    ({"w_tech": 0.0, "w_lang": 0.0}, "w_tech \\+ reward.w_lang must be > 0"),
    ({"tech_criteria": ("language",)}, "tech_criteria"),
    ({"use_judge": False, "rule_weight": 0.0}, "R_tech empty"),
])
def test_reward_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        RewardConfig(**kw)
