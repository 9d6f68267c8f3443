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


def val_curve(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """``[{"step", "kl", "ce"?, "token_accuracy"?, "replay_kl"?}]`` by step: the val evaluations
    (``val/*``; ``val_replay/kl``, the KL to the base on held-out general replay prompts) and the
    domain sampler's val passes (``reweight/val_kl``, the same mean val KL; at step 0 it is the
    student before training)."""
    by_step: dict[int, dict[str, float]] = {}
    for r in rows:
        point = {k[4:]: float(v) for k, v in r.items() if k.startswith("val/") and isinstance(v, (int, float))}
        if "val_replay/kl" in r:
            point["replay_kl"] = float(r["val_replay/kl"])
        if "reweight/val_kl" in r:
            point.setdefault("kl", float(r["reweight/val_kl"]))
        if point:
            by_step.setdefault(int(r["step"]), {"step": int(r["step"])}).update(point)
    return [by_step[s] for s in sorted(by_step)]


def val_curve_markdown(curve: Sequence[Mapping[str, float]]) -> str:
    """The val curve as a table, with the step of the lowest val KL named."""
    if not curve:
        return ""
    cols = [c for c in ("kl", "ce", "token_accuracy", "replay_kl") if any(c in p for p in curve)]
    lines = ["| step | " + " | ".join(f"val {c}" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for p in curve:
        lines.append(f"| {p['step']} | " + " | ".join(f"{p[c]:.3f}" if c in p else "" for c in cols) + " |")
    best = min(curve, key=lambda p: p["kl"])
    return (f"## Val curve\n\nLowest val KL {best['kl']:.3f} at step {best['step']} (first: {curve[0]['kl']:.3f} at "
            f"step {curve[0]['step']}, last: {curve[-1]['kl']:.3f} at step {curve[-1]['step']}). Step-0 and "
            "every-N-step KL points without CE come from the domain sampler's val passes."
            + (" val replay_kl: KL to the base student on the held-out general replay prompts (its drift from "
               "the base off the domain)." if "replay_kl" in cols else "") + "\n\n" + "\n".join(lines) + "\n")


def plot_training(metrics_jsonl: str | Path, png: str | Path, smooth: int = 15) -> None:
    """Train loss (per step, and its ``smooth``-step moving mean), the val curve, and the domain
    weights at each re-weighting, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl)
    train = [r for r in rows if "train/loss" in r]
    rw = [r for r in rows if "reweight/weights" in r]
    curve = val_curve(rows)
    panels = 1 + bool(curve) + bool(rw)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax, col = axes[0, 0], 0
    for key, color in (("train/loss", "C0"), ("train/kd", "C1"), ("train/ce", "C2")):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if not pts:
            continue
        steps, vals = map(np.asarray, zip(*pts))
        ax.plot(steps, vals, color=color, alpha=0.25, lw=0.8)
        if len(vals) >= smooth:
            ma = np.convolve(vals, np.ones(smooth) / smooth, mode="valid")
            ax.plot(steps[smooth - 1:], ma, color=color, label=f"{key.split('/')[1]} ({smooth}-step mean)")
        else:
            ax.plot(steps, vals, color=color, label=key.split("/")[1])
    ax.set_xlabel("step")
    ax.set_title("KD training loss")
    ax.legend(fontsize=8)
    if curve:
        col += 1
        ax = axes[0, col]
        for key, marker in (("kl", "o"), ("ce", "s"), ("replay_kl", "^")):
            pts = [(p["step"], p[key]) for p in curve if key in p]
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"val {key}")
        best = min(curve, key=lambda p: p["kl"])
        ax.axvline(best["step"], color="grey", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_title(f"val curve (lowest KL at step {best['step']})")
        ax.legend(fontsize=8)
    if rw:
        col += 1
        ax = axes[0, col]
        names = sorted(rw[0]["reweight/weights"])
        for d in names:
            ax.plot([r["step"] for r in rw], [r["reweight/weights"][d] for r in rw], marker="o", label=d)
        ax.set_xlabel("step")
        ax.set_title("domain sampling weights")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
