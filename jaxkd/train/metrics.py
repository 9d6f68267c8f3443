"""Training metrics: JSONL + TensorBoard writer, text-similarity metrics, per-subdomain tables."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


class MetricsLogger:
    """Appends ``{"step", "time", **scalars}`` lines to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard (tensorboardX) under ``<run_dir>/tb``. Non-scalar values go to JSONL only."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))

    def log(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        row: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in values.items():
            name = f"{prefix}{k}"
            if isinstance(v, (int, float, np.floating, np.integer)) or (hasattr(v, "shape") and v.shape == ()):
                v = float(v)
                row[name] = v
                if self._tb is not None and math.isfinite(v):
                    self._tb.add_scalar(name, v, step)
            else:
                row[name] = v
        self._jsonl.write(json.dumps(row, sort_keys=True, default=_jsonable) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; for a resumed run the last row logged for a step wins."""
    rows: dict[tuple[int, str], dict] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            kind = "train" if "loss" in r else ",".join(sorted(k for k in r if k not in ("step", "time")))
            rows[(r["step"], kind)] = r
    return [rows[k] for k in sorted(rows)]


# --------------------------------------------------------------------------------------------
# Text similarity to the teacher
# --------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-pair ROUGE-L F1 (rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    return [float(normalise(p) == normalise(r)) for p, r in zip(predictions, references)]


# --------------------------------------------------------------------------------------------
# Per-subdomain tables
# --------------------------------------------------------------------------------------------


def per_domain_table(values: Mapping[str, Sequence[float]], domains: Sequence[str]) -> dict[str, dict]:
    """``{domain: {"n": count, metric: mean, ...}}`` for per-example metric lists."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(domains):
        groups[d].append(i)
    out = {}
    for d in sorted(groups):
        idx = groups[d]
        out[d] = {"n": len(idx), **{m: float(np.mean([vals[i] for i in idx])) for m, vals in values.items()}}
    return out


def markdown_table(rows: Mapping[str, Mapping[str, Any]], first: str = "domain", digits: int = 3) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(next(iter(rows.values())).keys())
    lines = ["| " + " | ".join([first, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, r in rows.items():
        cells = [f"{r[c]:.{digits}f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"
