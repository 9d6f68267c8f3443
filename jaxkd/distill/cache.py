"""The teacher cache: answers (append-only JSONL) and their top-k logits (one ``.npz`` per answer).

Keying. An entry's key is the sha256 of (teacher preset, the teacher's prompt messages, the
sampling settings, the grounding mode). Grounded and ungrounded answers therefore never share a
key, and changing any sampling setting makes new entries instead of silently reusing old ones.

Top-k store. Entry ``j`` of an answer's store is the teacher distribution that predicted answer
token ``j`` (the last entry predicts the end-of-turn token when the answer ended with one). It is
indexed by *answer* token, so it does not depend on what the teacher saw before the answer: a
teacher that read grounding notes and a student that reads only the question line up token by
token on the same answer ids. Ids are int32, log-probs float16 (at ``logit_temperature``).

Resumability. The ``.npz`` is written (atomically) before its JSONL line, and a line is the commit
point: a run killed half-way leaves at most an orphan ``.npz`` that the next run overwrites, and a
torn last JSONL line is ignored on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jaxkd.config import SamplingConfig, to_dict

ANSWERS_FILE = "answers.jsonl"
TOPK_DIR = "topk"


def cache_key(preset: str, messages: Sequence[Mapping[str, str]], sampling: SamplingConfig,
              grounding: str) -> str:
    """sha256 hex of the teacher preset, prompt messages, sampling settings and grounding mode."""
    payload = {"preset": preset, "messages": [dict(m) for m in messages],
               "sampling": to_dict(sampling), "grounding": grounding}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass
class TeacherEntry:
    """One cached teacher answer (a JSONL line)."""

    key: str
    example_id: str
    split: str
    meta: dict
    preset: str
    grounding: str
    sampling: dict
    teacher_messages: list[dict]
    student_messages: list[dict]
    answer: str
    answer_ids: list[int]
    eos_id: int | None          # end-of-turn token the teacher emitted (None: cut at max_new_tokens)
    finish_reason: str
    topk_k: int = 0
    logit_temperature: float = 1.0
    topk_file: str | None = None  # relative to the cache dir

    @property
    def target_ids(self) -> list[int]:
        """The tokens the student learns to produce: the answer, then the end-of-turn token."""
        return list(self.answer_ids) + ([self.eos_id] if self.eos_id is not None else [])


class TeacherCache:
    """``<dir>/answers.jsonl`` plus ``<dir>/topk/<key>.npz``."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        self.path = self.dir / ANSWERS_FILE
        self._entries: dict[str, TeacherEntry] | None = None

    def entries(self) -> dict[str, TeacherEntry]:
        """All committed entries by key (a torn final line from a killed run is skipped)."""
        if self._entries is None:
            self._entries = {}
            if self.path.exists():
                lines = self.path.read_text(encoding="utf-8").splitlines()
                for i, line in enumerate(lines):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        if i == len(lines) - 1:
                            continue  # the line a killed run was writing
                        raise ValueError(f"{self.path}:{i + 1}: corrupt JSONL line in the teacher "
                                         "cache; delete that line to regenerate the entry") from None
                    entry = TeacherEntry(**row)
                    self._entries[entry.key] = entry
        return self._entries

    def __contains__(self, key: str) -> bool:
        return key in self.entries()

    def get(self, key: str) -> TeacherEntry | None:
        return self.entries().get(key)

    def append(self, entry: TeacherEntry, topk: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Commit one answer: its top-k arrays first (atomic rename), then its JSONL line."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if topk is not None:
            ids, logprobs = topk
            n = len(entry.target_ids)
            if ids.shape != logprobs.shape or ids.ndim != 2 or ids.shape[0] != n:
                raise ValueError(f"top-k arrays {ids.shape}/{logprobs.shape} do not match the "
                                 f"{n} target tokens of entry {entry.example_id}")
            rel = f"{TOPK_DIR}/{entry.key}.npz"
            path = self.dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, ids=ids.astype(np.int32), logprobs=logprobs.astype(np.float16))
            tmp.replace(path)
            entry.topk_file, entry.topk_k = rel, int(ids.shape[1])
        line = json.dumps(dataclasses.asdict(entry), ensure_ascii=False, sort_keys=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries()[entry.key] = entry

    def topk(self, entry: TeacherEntry) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n, k], logprobs float32 [n, k]) for ``entry``'s target tokens."""
        if entry.topk_file is None:
            raise FileNotFoundError(
                f"teacher cache entry {entry.example_id} has no top-k logits (made with "
                f"teacher.top_k=0 or from committed text answers); rerun stage=teacher with "
                f"teacher.top_k > 0, or train with distill.alpha=1.0 (response KD only)")
        path = self.dir / entry.topk_file
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing (teacher cache {self.dir} is incomplete); "
                                    f"rerun stage=teacher to regenerate it")
        with np.load(path) as z:
            return z["ids"].astype(np.int32), z["logprobs"].astype(np.float32)

    def write_provenance(self, record: Mapping[str, Any]) -> None:
        """Append one run's provenance (model, settings, command, date, machine)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "provenance.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record), sort_keys=True, default=str) + "\n")


def export_answers(entries: Iterable[TeacherEntry], path: str | os.PathLike,
                   provenance: Mapping[str, Any]) -> int:
    """Write the text answers (no logits) as a committed dataset: a provenance header line
    (``{"provenance": ...}``) and one ``{key, example_id, ...}`` line per answer, sorted by id."""
    rows = sorted(entries, key=lambda e: (e.split, e.example_id))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"provenance": dict(provenance)}, sort_keys=True, default=str) + "\n")
        for e in rows:
            row = dataclasses.asdict(e)
            row.pop("topk_file")
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return len(rows)


def load_exported(path: str | os.PathLike) -> tuple[dict, dict[str, TeacherEntry]]:
    """(provenance, entries by key) from an ``export_answers`` file (text only: no top-k)."""
    path = Path(path)
    lines = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if not lines or "provenance" not in lines[0]:
        raise ValueError(f"{path}: first line must be the provenance header")
    entries = {}
    for row in lines[1:]:
        e = TeacherEntry(**row, topk_file=None)
        entries[e.key] = e
    return lines[0]["provenance"], entries


# --------------------------------------------------------------------------------------------
# Student examples from cached answers (batched by jaxkd.data.loader.kd_dataset)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class KDExample:
    """One student training sequence: the student's prompt (no grounding) + the teacher's answer."""

    example_id: str
    meta: dict
    ids: np.ndarray          # [P + n] prompt ids then target ids
    prompt_len: int          # P
    topk_ids: np.ndarray | None       # [n, k] entry j predicts target j
    topk_logprobs: np.ndarray | None
    student_messages: list | None = None
    answer: str = ""                  # the teacher's answer text


def kd_example(entry: TeacherEntry, prompt_ids: Sequence[int], cache: TeacherCache | None) -> KDExample:
    """``prompt_ids`` are the student's chat-template ids of ``entry.student_messages``."""
    targets = entry.target_ids
    ids = np.asarray(list(prompt_ids) + targets, np.int32)
    tk_ids = tk_lp = None
    if cache is not None:
        tk_ids, tk_lp = cache.topk(entry)
        if tk_ids.shape[0] != len(targets):
            raise ValueError(f"{entry.example_id}: {tk_ids.shape[0]} top-k rows for {len(targets)} targets")
        if not np.isfinite(tk_lp).all():
            raise ValueError(f"{entry.example_id}: non-finite teacher log-probs in {cache.dir / entry.topk_file}; "
                             "delete that entry's line from the cache and rerun stage=teacher")
    return KDExample(example_id=entry.example_id, meta=entry.meta, ids=ids, prompt_len=len(prompt_ids),
                     topk_ids=tk_ids, topk_logprobs=tk_lp, student_messages=entry.student_messages,
                     answer=entry.answer)
