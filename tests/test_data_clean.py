"""Cleaning: normalisation, language/length filters, exact and near-duplicate removal, tagging."""

import copy

import pytest

from jaxkd.data.clean import CleanConfig, clean_records, content_text, summarise_report
from jaxkd.data.schema import load_corpus
from jaxkd.data.tagging import connections, tag_record
from jaxkd.data.textnorm import char_shingles, jaccard, looks_english, normalise


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def light_rephrase(text: str) -> str:
    """A light human-style rewrite: a few words swapped, meaning unchanged."""
    for a, b in (("Switch", "Turn"), ("about", "around"), ("until", "till"), ("If ", "When "),
                 ("Make sure", "Ensure"), ("the phone", "your phone"), ("Press and hold", "Hold down"),
                 ("at least", "a minimum of"), (" first", " beforehand"), ("Check", "Verify")):
        text = text.replace(a, b, 1)
    return text


def planted_copy(rec: dict, new_id: str) -> dict:
    dup = copy.deepcopy(rec)
    dup["id"] = new_id
    dup["symptom"] = light_rephrase(rec["symptom"])
    dup["steps"] = [light_rephrase(s) for s in rec["steps"]]
    dup["questions"] = [q + " thanks" for q in ("Help with this please, it happens daily",
                                                 "same issue here any fix??",
                                                 "so um it does this every time")]
    return dup


def device_records(corpus, device):
    return [r for r in corpus if r["device"] == device]


def test_planted_near_duplicate_removed_distinct_same_device_kept(corpus):
    recs = device_records(corpus, "anc_headphones")
    assert len(recs) >= 10
    dup = planted_copy(recs[0], "anc_headphones-900")
    sim = jaccard(char_shingles(content_text(dup)), char_shingles(content_text(recs[0])))
    assert 0.5 <= sim < 0.95, sim  # a real near-duplicate, not a copy
    out, report = clean_records(recs + [dup])
    kept = [r["id"] for r in out]
    assert kept == [r["id"] for r in recs]  # every distinct record of the device survives
    (removed,) = report["removed_records"]
    assert removed["id"] == "anc_headphones-900"
    assert removed["duplicate_of"] == recs[0]["id"] and removed["kind"] == "near_duplicate"
    assert "record anc_headphones-900: near_duplicate of anc_headphones-001" in summarise_report(report)


def test_threshold_is_configurable(corpus):
    recs = device_records(corpus, "anc_headphones")[:3]
    dup = planted_copy(recs[0], "anc_headphones-900")
    out, report = clean_records(recs + [dup], CleanConfig(content_threshold=0.99))
    assert "anc_headphones-900" in [r["id"] for r in out]
    assert report["removed_records"] == []


def test_exact_duplicate_and_question_duplicates(corpus):
    a, b = device_records(corpus, "smart_plug")[:2]
    exact = copy.deepcopy(a)
    exact["id"] = "smart_plug-901"
    exact["steps"] = [s.upper() + "  " for s in a["steps"]]  # same words, other case/spacing
    b2 = copy.deepcopy(b)
    b2["questions"] = b["questions"] + [a["questions"][0].replace("?", " ??"), a["questions"][1]]
    b2["questions"] = b2["questions"][:5]
    out, report = clean_records([a, b2, exact])
    assert [r["id"] for r in out] == [a["id"], b["id"]]
    assert report["removed_records"][0]["kind"] == "exact_duplicate"
    assert report["removed_records"][0]["duplicate_of"] == a["id"]
    removed_q = {(q["id"], q["duplicate_of"]) for q in report["removed_questions"]}
    assert (b["id"], f"{a['id']}#q0") in removed_q
    assert all(q not in out[1]["questions"] for q in a["questions"])


def test_record_left_with_too_few_questions_dropped(corpus):
    a, b = device_records(corpus, "smart_plug")[:2]
    b2 = copy.deepcopy(b)
    b2["questions"] = [a["questions"][0], a["questions"][1], b["questions"][0]]
    out, report = clean_records([a, b2], CleanConfig(min_questions=2))
    assert [r["id"] for r in out] == [a["id"]]
    assert report["too_few_questions"] == [{"id": b["id"], "questions_left": 1}]


def test_normalisation_and_filters(corpus):
    rec = copy.deepcopy(device_records(corpus, "smart_plug")[0])
    rec["symptom"] = "\u201cSmart\u201d plug\u00a0 won\u2019t\u200b connect \t to the app"
    rec["questions"] = rec["questions"][:3] + [
        "Mon casque ne se connecte pas au téléphone, que faire avec la prise ?", "hi?"]
    out, report = clean_records([rec])
    assert out[0]["symptom"] == "\"Smart\" plug won't connect to the app"
    assert out[0]["questions"] == rec["questions"][:3]
    reasons = sorted(q["reason"] for q in report["filtered_questions"])
    assert reasons[0] == "not English" and reasons[1].startswith("too short")


def test_not_english_or_bad_length_record_filtered(corpus):
    rec = copy.deepcopy(device_records(corpus, "smart_plug")[0])
    rec["steps"] = ["Débranchez la prise et attendez dix secondes avant de la rebrancher.",
                    "Mettez le téléphone sur le réseau de 2,4 GHz et ouvrez l'application.",
                    "Maintenez le bouton pendant cinq secondes pour la réinitialiser."]
    short = copy.deepcopy(device_records(corpus, "smart_plug")[1])
    short["steps"] = short["steps"][:2] + ["Ok."]
    out, report = clean_records([rec, short])
    assert out == []
    reasons = {r["id"]: r["reason"] for r in report["filtered_records"]}
    assert reasons[rec["id"]].startswith("not English")
    assert reasons[short["id"]].startswith("step 2 too short")


def test_looks_english_heuristic():
    assert looks_english("bedroom speaker randomly goes offline every 2-3 days, power cycle fixes it")
    assert looks_english("um so my headphones keep cutting out what do i do")
    assert looks_english("zigbee bulb unreachable hub")
    assert not looks_english("Mein Kopfhörer verbindet sich nicht mit dem Handy, was kann ich tun?")
    assert not looks_english("Mis auriculares no se conectan al teléfono, qué hago")
    assert not looks_english("耳机无法连接手机怎么办")
    assert normalise("a\u00ad\u200bb  \u2014 c\n") == "ab - c"


def test_tags(corpus):
    rec = {"device": "zigbee_smart_bulb", "category": "smart_home", "issue": "pairing",
           "source": "manual", "symptom": "Bulb will not join the Zigbee hub",
           "questions": ["my bulb wont pair with the hub"],
           "steps": ["Move the hub away from the Wi-Fi router on 2.4 GHz.",
                     "Pair your phone over Bluetooth in the app."], "safety": []}
    assert connections(rec) == ["bluetooth", "wifi", "zigbee"]
    tags = tag_record(rec)
    assert {"device:zigbee_smart_bulb", "category:smart_home", "issue:pairing", "source:manual",
            "conn:zigbee", "conn:wifi", "conn:bluetooth", "mentions:app"} <= set(tags)
    assert "has_safety" not in tags and "conn:hdmi" not in tags
    out, _ = clean_records(corpus)
    assert all(f"device:{r['device']}" in r["tags"] and f"issue:{r['issue']}" in r["tags"] for r in out)
    share = {c: sum(c in r["connections"] for r in out) / len(out) for c in ("bluetooth", "wifi")}
    assert share["bluetooth"] > 0.2 and share["wifi"] > 0.2, share


def test_build_end_to_end_removes_planted_yaml_duplicate(tmp_path, corpus):
    """A lightly re-phrased record planted in a corpus YAML file is removed by the build and the
    dedup report names the record it duplicated."""
    import json
    import shutil

    import yaml

    from jaxkd.data.build import BuildConfig, build
    from jaxkd.data.schema import CORPUS_DIR
    from jaxkd.data.splits import SplitConfig

    src = tmp_path / "corpus"
    src.mkdir()
    for name in ("smart_plug.yaml", "wifi_router.yaml", "anc_headphones.yaml"):
        shutil.copy(CORPUS_DIR / name, src / name)
    original = device_records(corpus, "smart_plug")[2]
    dup = planted_copy(original, "smart_plug-950")
    fields = ("id", "device", "category", "issue", "symptom", "source", "questions", "steps",
              "required", "safety")
    with (src / "smart_plug.yaml").open("a") as f:
        f.write(yaml.safe_dump([{k: dup[k] for k in fields}], sort_keys=False, width=1000))
    cfg = BuildConfig(split=SplitConfig(min_heldout_questions=10))
    manifest = build(src, tmp_path / "out", cfg)
    report = json.loads((tmp_path / "out" / "dedup_report.json").read_text())
    assert [(r["id"], r["duplicate_of"]) for r in report["removed_records"]] == [
        ("smart_plug-950", original["id"])]
    assert manifest["counts"]["raw_records"] == manifest["counts"]["records"] + 1
    kept = (tmp_path / "out" / "train.jsonl").read_text() + (tmp_path / "out" / "test.jsonl").read_text()
    assert "smart_plug-950" not in kept + (tmp_path / "out" / "val.jsonl").read_text()
