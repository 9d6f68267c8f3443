"""Splits: no near-duplicate crosses splits, stratified by category, held-out QA, idempotent build."""

import copy
import json
import random
from collections import Counter

import pytest

from jaxkd.data.build import BuildConfig, build
from jaxkd.data.clean import content_text
from jaxkd.data.schema import CATEGORIES, load_corpus
from jaxkd.data.splits import SplitConfig, assign_splits, cluster_records
from jaxkd.data.store import BUILT_DIR, load_records
from jaxkd.data.textnorm import char_shingles, jaccard, pairwise_jaccard

THRESHOLD = SplitConfig().cluster_threshold


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    manifest = build(out_dir=out)
    return out, manifest


def texts_of(rec):
    return [rec["symptom"], *rec["questions"], content_text(rec)]


def test_pairwise_jaccard_matches_sets():
    rng = random.Random(0)
    recs = load_corpus()[:60]
    sets = [char_shingles(t) for r in recs for t in texts_of(r)]
    sim = pairwise_jaccard(sets)
    for _ in range(300):
        i, j = rng.randrange(len(sets)), rng.randrange(len(sets))
        assert sim[i, j] == pytest.approx(jaccard(sets[i], sets[j]), abs=1e-6)


def test_no_near_duplicate_crosses_splits_on_real_corpus(built):
    out, manifest = built
    records = load_records("all", built_dir=out)
    assert len(records) == manifest["counts"]["records"] >= 100
    sets, owner = [], []
    for i, r in enumerate(records):
        for t in texts_of(r):
            sets.append(char_shingles(t))
            owner.append(i)
    sim = pairwise_jaccard(sets)
    close = 0
    for a, b in zip(*(sim >= THRESHOLD).nonzero()):
        if owner[a] != owner[b]:
            close += 1
            ra, rb = records[owner[a]], records[owner[b]]
            assert ra["split"] == rb["split"], (ra["id"], rb["id"], float(sim[a, b]))
            assert ra["cluster"] == rb["cluster"]
    # the real corpus has near-duplicate texts across records (short search queries), so the
    # check above is not vacuous
    assert close > 0


def test_planted_near_duplicate_questions_land_in_same_split():
    recs = [r for r in load_corpus() if r["category"] in ("headphones", "earbuds")]
    a, b = recs[0], recs[40]
    b = copy.deepcopy(b)
    b["questions"] = b["questions"][:2] + [a["questions"][1].replace("anyone", "anybody")]
    recs = [b if r["id"] == b["id"] else r for r in recs]
    cfg = SplitConfig()
    for seed in range(6):
        cfg = SplitConfig(seed=seed)
        clusters = cluster_records(recs, cfg)
        ia, ib = recs.index(a), recs.index(b)
        assert clusters[ia] == clusters[ib]
        splits = assign_splits(recs, clusters, cfg)
        assert splits[ia] == splits[ib]


def test_split_stratified_seeded_and_sized(built):
    out, manifest = built
    records = load_records("all", built_dir=out)
    per_split = Counter(r["split"] for r in records)
    n = len(records)
    assert abs(per_split["test"] / n - 0.15) < 0.04 and abs(per_split["val"] / n - 0.10) < 0.04
    present = {r["category"] for r in records}
    for split in ("val", "test"):
        assert {r["category"] for r in records if r["split"] == split} == present
        assert {r["device"] for r in records if r["split"] == split} == {r["device"] for r in records}
    clusters = [r["cluster"] for r in records]
    same = assign_splits(records, clusters, SplitConfig())
    assert same == [r["split"] for r in records]
    other = assign_splits(records, clusters, SplitConfig(seed=7))
    assert other != same


def test_heldout_questions(built):
    out, manifest = built
    heldout = load_records("heldout", built_dir=out)
    test_records = {r["id"]: r for r in load_records("test", built_dir=out)}
    train_questions = [q for r in load_records("train", built_dir=out) for q in r["questions"]]
    assert len(heldout) >= 150
    assert {h["category"] for h in heldout} == {r["category"] for r in load_records("all", built_dir=out)}
    assert set(CATEGORIES) >= {h["category"] for h in heldout}
    for h in heldout:
        rec = test_records[h["record_id"]]
        assert h["question_index"] >= 1 and rec["questions"][h["question_index"]] == h["question"]
        assert h["question"] != rec["questions"][0]
        assert h["required"] == rec["required"] and h["reference_steps"] == rec["steps"]
        assert h["safety"] == rec["safety"] and h["required"]
    sets = [char_shingles(h["question"]) for h in heldout] + [char_shingles(q) for q in train_questions]
    sim = pairwise_jaccard(sets)[: len(heldout), len(heldout):]
    assert sim.max() < THRESHOLD
    assert {h["style"] for h in heldout} >= {"voice", "forum"}


def test_build_idempotent_and_committed_outputs_current(built, tmp_path):
    out, manifest = built
    again = build(out_dir=out)
    assert again["changed_files"] == []
    # the committed outputs match a fresh build of the committed corpus
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "heldout_qa.jsonl", "dedup_report.json"):
        assert (BUILT_DIR / name).read_text() == (out / name).read_text(), (
            f"jaxkd/data/built/{name} is stale: run `python -m jaxkd.data build` and commit it")
    report = json.loads((out / "dedup_report.json").read_text())
    assert report["summary"]["output_records"] == manifest["counts"]["records"]


def test_datasets_loading_and_stats_outputs(built, tmp_path):
    from jaxkd.data.stats import compute_stats, plot, to_markdown
    from jaxkd.data.store import load_dataset

    out, manifest = built
    ds = load_dataset("train", built_dir=out)
    assert len(ds) == manifest["counts"]["splits"]["train"]
    row = ds[0]
    assert row["split"] == "train" and isinstance(row["required"][0], list) and row["questions"]
    assert len(load_dataset("all", built_dir=out)) == manifest["counts"]["records"]
    stats = compute_stats(out)
    assert sum(sum(v.values()) for v in stats["facets"]["device"].values()) == stats["records"]
    for facet in ("category", "issue", "source"):
        assert sum(sum(v.values()) for v in stats["facets"][facet].values()) == stats["records"]
    md = to_markdown(stats, manifest)
    assert f"- records: {stats['records']} (train {manifest['counts']['splits']['train']}," in md
    assert "| smart_home |" in md and "## Per issue" in md
    plot(stats, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
