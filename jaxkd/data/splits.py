"""Leak-free splits: cluster records by symptom similarity, split whole clusters, build held-out QA.

Two records fall in one cluster when any of their situation texts (symptom or a question) are
near duplicates of each other, or their content (symptom + steps) is (union-find over MinHash LSH
candidate pairs confirmed by exact Jaccard >= ``cluster_threshold``). Clusters, not records, are
assigned to train/val/test with a fixed seed, stratified by device so every device and therefore
every category lands in val and test. So no near-duplicate pair can cross two splits.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import defaultdict

from jaxkd.config import ConfigError
from jaxkd.data.clean import content_text
from jaxkd.data.neardup import NearDupIndex
from jaxkd.data.textnorm import char_shingles, pairwise_jaccard

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitConfig:
    seed: int = 20261124
    val_fraction: float = 0.1
    test_fraction: float = 0.15
    cluster_threshold: float = 0.5  # exact Jaccard of character 5-gram shingles
    num_perm: int = 128
    shingle_chars: int = 5
    min_heldout_questions: int = 150

    def __post_init__(self) -> None:
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(
                f"data.split fractions must be in (0, 1) and sum below 1, got val="
                f"{self.val_fraction} test={self.test_fraction}")
        if not 0 < self.cluster_threshold <= 1:
            raise ConfigError(f"data.split.cluster_threshold must be in (0, 1], got {self.cluster_threshold}")


def situation_texts(record: dict) -> list[str]:
    """The short texts that describe a record's situation: its symptom and every question."""
    return [record["symptom"], *record["questions"]]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_record_pairs(records: list[dict], cfg: SplitConfig) -> list[tuple[int, int, float, str]]:
    """``(i, j, jaccard, kind)`` for record pairs i < j linked by a near-duplicate text pair."""
    situ = NearDupIndex(cfg.cluster_threshold, num_perm=cfg.num_perm, shingle_chars=cfg.shingle_chars)
    body = NearDupIndex(cfg.cluster_threshold, num_perm=cfg.num_perm, shingle_chars=cfg.shingle_chars)
    for i, rec in enumerate(records):
        for j, text in enumerate(situation_texts(rec)):
            situ.add(f"{i:06d}/{j}", text)
        body.add(f"{i:06d}", content_text(rec))
    best: dict[tuple[int, int], tuple[float, str]] = {}
    for index, kind in ((situ, "situation"), (body, "content")):
        for a, b, sim in index.pairs():
            i, j = int(a.split("/")[0]), int(b.split("/")[0])
            if i != j:
                key = (min(i, j), max(i, j))
                if key not in best or sim > best[key][0]:
                    best[key] = (sim, kind)
    return [(i, j, s, k) for (i, j), (s, k) in sorted(best.items())]


def cluster_records(records: list[dict], cfg: SplitConfig = SplitConfig()) -> list[int]:
    """Cluster id per record, numbered 0.. in order of each cluster's first record."""
    uf = _UnionFind(len(records))
    for i, j, _, _ in near_duplicate_record_pairs(records, cfg):
        uf.union(i, j)
    ids: dict[int, int] = {}
    return [ids.setdefault(uf.find(i), len(ids)) for i in range(len(records))]


def assign_splits(records: list[dict], clusters: list[int], cfg: SplitConfig = SplitConfig()) -> list[str]:
    """Split name per record. Whole clusters move together; each device gets val and test records.

    Per device (in sorted order) the targets carry their fractional remainders forward so the
    totals match the fractions; each device gets at least one val and one test cluster, and a
    cluster that would overshoot a split's target is left for train.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(clusters):
        members[c].append(i)
    by_device: dict[str, list[int]] = defaultdict(list)
    for c in sorted(members):
        by_device[records[members[c][0]]["device"]].append(c)
    split_of_cluster: dict[int, str] = {}
    want = {"val": 0.0, "test": 0.0}
    got = {"val": 0, "test": 0}
    for device in sorted(by_device):
        cl = by_device[device]
        if len(cl) < 3:
            raise ValueError(
                f"device {device!r} has only {len(cl)} symptom cluster(s); it needs 3+ to appear in "
                "train, val and test. Add distinct records for it or raise data.split.cluster_threshold")
        random.Random(f"{cfg.seed}:{device}").shuffle(cl)
        n = sum(len(members[c]) for c in cl)
        queue = list(cl)
        for split, frac in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
            want[split] += frac * n
            target = max(1, round(want[split]) - got[split])
            taken = 0
            # Clusters in seeded order, skipping any that would overshoot the target, so one big
            # cluster cannot swallow a device's whole test share; always keep one for train.
            for c in list(queue):
                if taken >= target or len(queue) == 1:
                    break
                if taken + len(members[c]) <= target:
                    queue.remove(c)
                    split_of_cluster[c] = split
                    taken += len(members[c])
            if taken == 0:  # every cluster overshoots: take the smallest (first in seeded order)
                c = min(queue, key=lambda c: len(members[c]))
                queue.remove(c)
                split_of_cluster[c] = split
                taken = len(members[c])
            got[split] += taken
        for c in queue:
            split_of_cluster[c] = "train"
    return [split_of_cluster[c] for c in clusters]


def question_style(question: str) -> str:
    """voice (no punctuation, speech fillers), search (short query), forum (casual) or written."""
    words = question.split()
    has_punct = bool(re.search(r"[.,?!;:]", question))
    fillers = re.search(r"\b(um|uh|erm|hmm|like|so)\b", question.lower())
    if not has_punct and fillers:
        return "voice"
    if len(words) <= 8 and "?" not in question and not fillers:
        return "search"
    if question[:1].islower() or "??" in question or re.search(r"\b(anyone|lol|tho|pls|plz)\b", question.lower()):
        return "forum"
    return "written"


def heldout_questions(records: list[dict], cfg: SplitConfig = SplitConfig()) -> list[dict]:
    """Held-out QA items from test-split records: every question but the first (cleanest) one.

    Each item carries the scoring keys: ``required`` groups, ``reference_steps`` and ``safety``.
    """
    items = []
    for rec in records:
        if rec["split"] != "test":
            continue
        for qi, question in enumerate(rec["questions"][1:], start=1):
            items.append({
                "id": f"{rec['id']}#q{qi}", "record_id": rec["id"], "question_index": qi,
                "question": question, "style": question_style(question),
                "device": rec["device"], "category": rec["category"], "issue": rec["issue"],
                "source": rec["source"], "symptom": rec["symptom"], "required": rec["required"],
                "reference_steps": rec["steps"], "safety": rec["safety"], "tags": rec["tags"]})
    if len(items) < cfg.min_heldout_questions:
        raise ValueError(
            f"held-out QA has {len(items)} questions, fewer than data.split.min_heldout_questions="
            f"{cfg.min_heldout_questions}; add records or raise data.split.test_fraction")
    return items


def cross_split_pairs(records: list[dict], threshold: float, shingle_chars: int = 5) -> list[dict]:
    """Exact all-pairs check: near-duplicate texts of records in different splits (should be [])."""
    texts, owner = [], []
    for i, rec in enumerate(records):
        for t in [*situation_texts(rec), content_text(rec)]:
            texts.append(char_shingles(t, shingle_chars))
            owner.append(i)
    sim = pairwise_jaccard(texts)
    bad = []
    for a, b in zip(*(sim >= threshold).nonzero()):
        ra, rb = records[owner[a]], records[owner[b]]
        if a < b and ra["split"] != rb["split"]:
            bad.append({"a": ra["id"], "b": rb["id"], "jaccard": float(sim[a, b]),
                        "splits": [ra["split"], rb["split"]]})
    return bad
