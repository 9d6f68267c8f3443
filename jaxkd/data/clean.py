"""Cleaning: normalise text, filter by language and length, remove exact and near duplicates, tag.

``clean_records(records, cfg)`` returns ``(kept_records, report)``. The report is JSON-able and
lists every removal with its reason and, for duplicates, the record (and question) it duplicated.
Order matters and is fixed: records are processed in corpus order (file name, then position), so
the first of two duplicates is the one kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxkd.config import ConfigError
from jaxkd.data.neardup import NearDupIndex
from jaxkd.data.tagging import connections, tag_record
from jaxkd.data.textnorm import (char_shingles, english_score, looks_english, match_key, normalise,
                                 pairwise_jaccard)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CleanConfig:
    """Thresholds are exact Jaccard similarities over character 5-gram shingles."""

    content_threshold: float = 0.5   # symptom + steps of two records: the later record is removed
    question_threshold: float = 0.7  # one question vs any kept question: the later one is removed
    num_perm: int = 128
    shingle_chars: int = 5
    min_question_chars: int = 10
    max_question_chars: int = 600
    min_step_chars: int = 8
    max_step_chars: int = 600
    min_symptom_chars: int = 10
    max_symptom_chars: int = 300
    min_questions: int = 2  # a record left with fewer questions is dropped

    def __post_init__(self) -> None:
        for name in ("content_threshold", "question_threshold"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"data.clean.{name} must be in (0, 1], got {v}")
        if self.min_questions < 1:
            raise ConfigError(f"data.clean.min_questions must be >= 1, got {self.min_questions}")


def content_text(record: dict) -> str:
    """What a record *is*: its symptom and reference steps (questions are phrasings of it)."""
    return " ".join([record["symptom"], *record["steps"]])


def normalise_record(record: dict) -> tuple[dict, int]:
    """A copy with every text field normalised; also the number of strings that changed."""
    changed = 0

    def norm(s: str, lower: bool = False) -> str:
        nonlocal changed
        out = normalise(s)
        out = out.lower() if lower else out
        changed += out != s
        return out

    rec = dict(record)
    rec["symptom"] = norm(record["symptom"])
    rec["questions"] = [norm(q) for q in record["questions"]]
    rec["steps"] = [norm(s) for s in record["steps"]]
    rec["safety"] = [norm(s) for s in record["safety"]]
    rec["required"] = [[norm(p, lower=True) for p in g] for g in record["required"]]
    return rec, changed


def _length_problem(text: str, lo: int, hi: int) -> str | None:
    if len(text) < lo:
        return f"too short ({len(text)} chars < {lo})"
    if len(text) > hi:
        return f"too long ({len(text)} chars > {hi})"
    return None


def _filter_record(rec: dict, cfg: CleanConfig, report: dict) -> dict | None:
    """Drops bad questions from ``rec``; returns None (and reports) when the record must go."""
    rid = rec["id"]
    problem = _length_problem(rec["symptom"], cfg.min_symptom_chars, cfg.max_symptom_chars)
    if problem:
        report["filtered_records"].append({"id": rid, "reason": f"symptom {problem}"})
        return None
    for i, step in enumerate(rec["steps"]):
        problem = _length_problem(step, cfg.min_step_chars, cfg.max_step_chars)
        if problem:
            report["filtered_records"].append({"id": rid, "reason": f"step {i} {problem}"})
            return None
    body = content_text(rec)
    if not looks_english(body):
        ascii_share, stop_share, foreign_share = english_score(body)
        report["filtered_records"].append({
            "id": rid, "reason": f"not English (ascii letters {ascii_share:.2f}, English words "
                                 f"{stop_share:.2f}, other-language words {foreign_share:.2f})"})
        return None
    kept = []
    for i, q in enumerate(rec["questions"]):
        problem = _length_problem(q, cfg.min_question_chars, cfg.max_question_chars)
        if problem is None and not looks_english(q):
            problem = "not English"
        if problem:
            report["filtered_questions"].append(
                {"id": rid, "question_index": i, "question": q, "reason": problem})
        else:
            kept.append(q)
    rec["questions"] = kept
    return rec


def clean_records(records: list[dict], cfg: CleanConfig = CleanConfig()) -> tuple[list[dict], dict]:
    """Normalise, filter, dedup (exact then near, records then questions) and tag ``records``."""
    report: dict[str, Any] = {
        "config": dataclasses.asdict(cfg), "filtered_records": [], "filtered_questions": [],
        "removed_records": [], "removed_questions": [], "too_few_questions": []}
    n_changed = 0
    stage: list[dict] = []
    for record in records:
        rec, changed = normalise_record(record)
        n_changed += changed
        rec = _filter_record(rec, cfg, report)
        if rec is not None:
            stage.append(rec)

    # Records: exact duplicates of content, then near duplicates (MinHash LSH + exact Jaccard).
    exact: dict[str, str] = {}
    index = NearDupIndex(cfg.content_threshold, num_perm=cfg.num_perm, shingle_chars=cfg.shingle_chars)
    kept_records: list[dict] = []
    for rec in stage:
        text = content_text(rec)
        key = match_key(text)
        if key in exact:
            report["removed_records"].append({
                "id": rec["id"], "kind": "exact_duplicate", "duplicate_of": exact[key],
                "similarity": 1.0, "symptom": rec["symptom"]})
            continue
        hits = index.query(text)
        if hits:
            other, sim = hits[0]
            report["removed_records"].append({
                "id": rec["id"], "kind": "near_duplicate", "duplicate_of": other,
                "similarity": round(sim, 4), "symptom": rec["symptom"]})
            continue
        exact[key] = rec["id"]
        index.add(rec["id"], text)
        kept_records.append(rec)

    # Questions: against every question already kept (same record included).
    q_exact: dict[str, str] = {}
    q_index = NearDupIndex(cfg.question_threshold, num_perm=cfg.num_perm, shingle_chars=cfg.shingle_chars)
    out: list[dict] = []
    for rec in kept_records:
        questions = []
        for i, q in enumerate(rec["questions"]):
            qkey = f"{rec['id']}#q{len(questions)}"
            key = match_key(q)
            dup = (q_exact[key], 1.0) if key in q_exact else (q_index.query(q) or [None])[0]
            if dup is not None:
                report["removed_questions"].append({
                    "id": rec["id"], "question": q, "kind": "exact_duplicate" if dup[1] == 1.0
                    else "near_duplicate", "duplicate_of": dup[0], "similarity": round(dup[1], 4)})
                continue
            q_exact[key] = qkey
            q_index.add(qkey, q)
            questions.append(q)
        rec["questions"] = questions
        if len(questions) < cfg.min_questions:
            report["too_few_questions"].append({"id": rec["id"], "questions_left": len(questions)})
            continue
        rec["connections"] = connections(rec)
        rec["tags"] = tag_record(rec)
        out.append(rec)

    report["closest_kept_records"] = _closest_pairs(
        [(r["id"], content_text(r)) for r in out], cfg.shingle_chars)
    report["closest_kept_questions"] = _closest_pairs(
        [(f"{r['id']}#q{i}", q) for r in out for i, q in enumerate(r["questions"])], cfg.shingle_chars)
    report["summary"] = {
        "input_records": len(records), "output_records": len(out),
        "normalised_strings": n_changed,
        "filtered_records": len(report["filtered_records"]),
        "filtered_questions": len(report["filtered_questions"]),
        "exact_duplicate_records": sum(r["kind"] == "exact_duplicate" for r in report["removed_records"]),
        "near_duplicate_records": sum(r["kind"] == "near_duplicate" for r in report["removed_records"]),
        "duplicate_questions": len(report["removed_questions"]),
        "dropped_too_few_questions": len(report["too_few_questions"]),
        "output_questions": sum(len(r["questions"]) for r in out)}
    return out, report


def _closest_pairs(items: list[tuple[str, str]], k: int, top: int = 10) -> list[dict]:
    """The ``top`` most similar kept pairs of different records: how close the survivors come to
    the thresholds (evidence that the thresholds separate duplicates from distinct records)."""
    if len(items) < 2:
        return []
    sim = pairwise_jaccard([char_shingles(t, k) for _, t in items])
    owner = np.asarray([key.split("#")[0] for key, _ in items])
    sim[owner[:, None] == owner[None, :]] = -1.0
    sim = np.triu(sim, 1) - np.tril(np.ones_like(sim))
    flat = np.argsort(-sim, axis=None, kind="stable")[:top]
    out = []
    for f in flat:
        a, b = divmod(int(f), len(items))
        if sim[a, b] < 0:
            break
        out.append({"a": items[a][0], "b": items[b][0], "jaccard": round(float(sim[a, b]), 4)})
    return out


def summarise_report(report: dict) -> str:
    """A short Markdown summary of a cleaning report (counts, then each removal on one line)."""
    s = report["summary"]
    lines = ["# Dedup and cleaning report", "",
             f"- records: {s['input_records']} in, {s['output_records']} out",
             f"- questions kept: {s['output_questions']}",
             f"- text fields changed by normalisation: {s['normalised_strings']}",
             f"- records filtered (length/language): {s['filtered_records']}",
             f"- questions filtered (length/language): {s['filtered_questions']}",
             f"- exact duplicate records removed: {s['exact_duplicate_records']}",
             f"- near-duplicate records removed: {s['near_duplicate_records']} "
             f"(Jaccard >= {report['config']['content_threshold']} on symptom + steps)",
             f"- duplicate questions removed: {s['duplicate_questions']} "
             f"(Jaccard >= {report['config']['question_threshold']})",
             f"- records dropped with < {report['config']['min_questions']} questions left: "
             f"{s['dropped_too_few_questions']}", ""]
    for r in report["removed_records"]:
        lines.append(f"- record {r['id']}: {r['kind']} of {r['duplicate_of']} (J={r['similarity']})")
    for r in report["removed_questions"]:
        lines.append(f"- question of {r['id']}: {r['kind']} of {r['duplicate_of']} "
                     f"(J={r['similarity']}): {r['question']!r}")
    for r in report["filtered_records"]:
        lines.append(f"- record {r['id']} filtered: {r['reason']}")
    for r in report["filtered_questions"]:
        lines.append(f"- question {r['question_index']} of {r['id']} filtered: {r['reason']}")
    for r in report["too_few_questions"]:
        lines.append(f"- record {r['id']} dropped: {r['questions_left']} question(s) left")
    for key, what in (("closest_kept_records", "symptom + steps"), ("closest_kept_questions", "questions")):
        if report.get(key):
            lines += ["", f"Closest kept pairs of different records ({what}):"]
            lines += [f"- {p['a']} ~ {p['b']}: J={p['jaccard']}" for p in report[key]]
    return "\n".join(lines) + "\n"
