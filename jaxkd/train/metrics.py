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


def plot_training(metrics_jsonl: str | Path, png: str | Path) -> None:
    """Train loss / KD / CE curves and the domain weights at each re-weighting, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl)
    train = [r for r in rows if "train/loss" in r]
    rw = [r for r in rows if "reweight/weights" in r]
    fig, axes = plt.subplots(1, 2 if rw else 1, figsize=(10 if rw else 5, 3.5), squeeze=False)
    ax = axes[0, 0]
    for key in ("train/loss", "train/kd", "train/ce"):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key.split("/")[1])
    ax.set_xlabel("step")
    ax.set_title("KD training loss")
    ax.legend(fontsize=8)
    if rw:
        ax = axes[0, 1]
        names = sorted(rw[0]["reweight/weights"])
        for d in names:
            ax.plot([r["step"] for r in rw], [r["reweight/weights"][d] for r in rw], marker="o", label=d)
        ax.set_xlabel("step")
        ax.set_title("domain sampling weights")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
