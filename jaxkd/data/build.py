"""The build: raw corpus YAML -> validated -> cleaned/deduplicated/tagged -> clustered splits.

``build(corpus_dir, out_dir, cfg)`` writes, under ``out_dir`` (default ``jaxkd/data/built``):
``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (cleaned records with ``tags``, ``cluster``,
``split``), ``heldout_qa.jsonl`` (held-out questions with scoring keys), ``dedup_report.json`` and
``dedup_report.md``, and ``manifest.json`` (config, input file hashes, counts, checks). Every file
is deterministic, so running the build twice changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

from jaxkd.config import to_dict
from jaxkd.data.clean import CleanConfig, clean_records, summarise_report
from jaxkd.data.schema import CORPUS_DIR, display_path, lint_records, load_corpus
from jaxkd.data.splits import (SPLITS, SplitConfig, assign_splits, cluster_records,
                               cross_split_pairs, heldout_questions)
from jaxkd.data.store import BUILT_DIR, dumps_jsonl, write_text_if_changed
from jaxkd.data.textnorm import char_shingles, pairwise_jaccard

RECORD_KEYS = ("id", "device", "category", "issue", "symptom", "source", "questions", "steps",
               "required", "safety", "connections", "tags", "cluster", "split", "provenance")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()


class LeakageError(RuntimeError):
    """Near-duplicate texts ended up in different splits (should be impossible by construction)."""


def _max_similarity_to(texts_a: list[str], texts_b: list[str], k: int) -> float:
    if not texts_a or not texts_b:
        return 0.0
    sim = pairwise_jaccard([char_shingles(t, k) for t in texts_a + texts_b])
    return float(sim[: len(texts_a), len(texts_a):].max())


def build(corpus_dir: str | Path = CORPUS_DIR, out_dir: str | Path = BUILT_DIR,
          cfg: BuildConfig = BuildConfig()) -> dict:
    """Run the pipeline and write the outputs; returns the manifest (with ``changed_files``)."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    raw = load_corpus(corpus_dir)  # raises CorpusError with file:line problems
    lint = [str(p) for p in lint_records(raw)]
    cleaned, report = clean_records(raw, cfg.clean)
    clusters = cluster_records(cleaned, cfg.split)
    splits = assign_splits(cleaned, clusters, cfg.split)
    records = []
    for rec, cluster, split in zip(cleaned, clusters, splits):
        rec = {**rec, "cluster": cluster, "split": split}
        records.append({k: rec[k] for k in RECORD_KEYS})
    leaks = cross_split_pairs(records, cfg.split.cluster_threshold, cfg.split.shingle_chars)
    if leaks:
        raise LeakageError(f"{len(leaks)} near-duplicate pair(s) cross splits, e.g. {leaks[:3]}")
    heldout = heldout_questions(records, cfg.split)
    train_questions = [q for r in records if r["split"] == "train" for q in r["questions"]]

    files = {f"{name}.jsonl": dumps_jsonl(r for r in records if r["split"] == name) for name in SPLITS}
    files["heldout_qa.jsonl"] = dumps_jsonl(heldout)
    files["dedup_report.json"] = json.dumps(report, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    files["dedup_report.md"] = summarise_report(report)
    inputs = {display_path(p): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(corpus_dir.glob("*.y*ml"))}
    split_counts = Counter(r["split"] for r in records)
    manifest = {
        "config": to_dict(cfg),
        "inputs": inputs,
        "counts": {
            "raw_records": len(raw), "records": len(records),
            "questions": sum(len(r["questions"]) for r in records),
            "clusters": len(set(clusters)), "largest_cluster": max(Counter(clusters).values()),
            "splits": {s: split_counts[s] for s in SPLITS},
            "heldout_questions": len(heldout),
            "heldout_by_category": dict(sorted(Counter(h["category"] for h in heldout).items())),
            "heldout_by_style": dict(sorted(Counter(h["style"] for h in heldout).items())),
        },
        "multi_record_clusters": {
            str(c): [r["id"] for r in records if r["cluster"] == c]
            for c, n in sorted(Counter(clusters).items()) if n > 1},
        "checks": {
            "lint_warnings": lint,
            "cross_split_near_duplicates": len(leaks),
            "heldout_max_jaccard_to_train_question": round(_max_similarity_to(
                [h["question"] for h in heldout], train_questions, cfg.split.shingle_chars), 4),
            "categories_in_val": sorted({r["category"] for r in records if r["split"] == "val"}),
            "categories_in_test": sorted({r["category"] for r in records if r["split"] == "test"}),
        },
    }
    files["manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    changed = [name for name, text in files.items() if write_text_if_changed(out_dir / name, text)]
    return {**manifest, "changed_files": changed, "summary_text": summarise_report(report)}


def summary_lines(manifest: dict) -> list[str]:
    c, k = manifest["counts"], manifest["checks"]
    s = c["splits"]
    return [
        f"records: {c['raw_records']} raw -> {c['records']} cleaned, {c['questions']} questions",
        f"clusters: {c['clusters']} (largest {c['largest_cluster']} records)",
        f"splits: train {s['train']}, val {s['val']}, test {s['test']}",
        f"held-out QA: {c['heldout_questions']} questions, styles {c['heldout_by_style']}",
        f"cross-split near-duplicate pairs: {k['cross_split_near_duplicates']}; held-out max "
        f"Jaccard to a train question: {k['heldout_max_jaccard_to_train_question']}",
        f"lint warnings (soft schema rules): {len(k['lint_warnings'])}",
        *(f"  {w}" for w in k["lint_warnings"]),
        "changed files: " + (", ".join(manifest["changed_files"]) or "none (already up to date)"),
    ]
