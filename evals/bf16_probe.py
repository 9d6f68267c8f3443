"""Is bfloat16 faster than float32 on this CPU, where, and how far do its answers drift? (issue 10,
item 7: every attempt's figure is recorded, kept or not)

    python -m evals.bf16_probe                 # writes evals/results/bf16_probe.{md,json}
    python -m evals.bf16_probe --judge         # + the 1.5B judge forward (about 4 more minutes)

Each section is a side-by-side comparison in this one process (repetitions interleaved, min /
median of ``--reps`` after a warm-up). Whole-model decode speed and drift per weight dtype is
``evals.bench_generate``'s weights section; the KD step's is ``evals.bench_kd_step --compute-dtypes``.

1. One projection ``[M, 896] x [4864, 896]^T`` (the 0.5B's MLP up-projection) for M = 1 ... 2560:
   float32; bfloat16 operands with bfloat16 output; bfloat16 operands with float32 accumulation
   (``preferred_element_type``, what ``jaxkd.models.layers.Projection`` asks for).
2. ``--judge``: one 1.5B judge forward (two calibration answers, technical criterion, no step
   probes), float32 vs bfloat16, and the largest difference in expected score.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evals.bench_generate import stats
from evals.domain import RESULTS

JUDGE = "qwen2.5-coder-1.5b-instruct"


def _interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    for f in fns.values():  # warm-up: compiles
        f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return out


def matmul_section(reps: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    k_in, n_out = 896, 4864
    plain = jax.jit(lambda x, w: jnp.einsum("mi,oi->mo", x, w))
    acc32 = jax.jit(lambda x, w: jnp.einsum("mi,oi->mo", x, w, preferred_element_type=jnp.float32))
    rows = []
    rng = np.random.default_rng(0)
    for m in (1, 8, 32, 256, 2560):
        x = jnp.asarray(rng.standard_normal((m, k_in)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((n_out, k_in)), jnp.float32)
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        t = _interleaved({"f32": lambda: plain(x, w).block_until_ready(),
                          "bf16_out_bf16": lambda: plain(xb, wb).block_until_ready(),
                          "bf16_acc_f32": lambda: acc32(xb, wb).block_until_ready()}, reps)
        rows.append({"M": m, **{k: stats(v) for k, v in t.items()}})
        print(f"matmul M={m}: " + ", ".join(f"{k} {1e3 * np.median(v):.2f} ms" for k, v in t.items()), flush=True)
    return rows


def judge_section(reps: int) -> dict[str, Any]:
    from evals.calibration import load_pairs
    from evals.domain import heldout_items
    from jaxkd.config import JudgeConfig
    from jaxkd.judge import Criterion, LLMJudge
    from jaxkd.serving import load_model

    items = {it["id"]: it for it in heldout_items("test", 0)}
    pair = load_pairs(per_category=1)[0]
    its, answers = [items[pair["item_id"]]] * 2, [pair["answer_a"], pair["answer_b"]]
    cfg = JudgeConfig(step_weight=0.0, injection="off", batch_size=2)
    judges = {}
    for dt in ("float32", "bfloat16"):  # both held (6.2 + 3.1 GB) so that repetitions interleave
        lm = load_model(JUDGE, param_dtype=dt, compute_dtype=dt)
        judges[dt] = LLMJudge(lm.model, lm.tokenizer, fingerprint=dt, config=cfg)
    got: dict[str, list] = {dt: [] for dt in judges}
    t = _interleaved({dt: (lambda dt=dt: got[dt].append(judges[dt].score(its, answers, (Criterion.TECHNICAL,))))
                      for dt in judges}, reps)
    out: dict[str, Any] = {}
    for dt in judges:
        out[dt] = {"forward_s": stats(t[dt]), "technical": got[dt][-1][Criterion.TECHNICAL].score.tolist()}
        print(f"judge {dt}: {np.median(t[dt]):.2f} s median, technical {out[dt]['technical']}", flush=True)
    out["max_abs_score_diff"] = float(np.max(np.abs(np.subtract(out["float32"]["technical"],
                                                                out["bfloat16"]["technical"]))))
    return out


def write(data: dict[str, Any], results: Path) -> Path:
    L = ["# bfloat16 vs float32 on this CPU (issue 10, item 7)", "",
         f"Command: `{data['command']}`; {data['date']} on {data['machine']}. Every figure: min / median of "
         f"{data['reps']} timed repetitions after a warm-up, the compared variants interleaved in one process.", "",
         "## One projection [M, 896] x [4864, 896]^T (ms)", "",
         "| M | float32 | bf16 -> bf16 | bf16, f32 accumulation | f32 / bf16-acc-f32 (medians) |", "|---|---|---|---|---|"]
    for r in data["matmul"]:
        def c(k: str) -> str:
            return f"{1e3 * r[k]['min']:.2f} / {1e3 * r[k]['median']:.2f}"
        L.append(f"| {r['M']} | {c('f32')} | {c('bf16_out_bf16')} | {c('bf16_acc_f32')} | "
                 f"{r['f32']['median'] / r['bf16_acc_f32']['median']:.2f}x |")
    if data.get("judge"):
        j = data["judge"]
        L += ["", f"## {JUDGE} judge forward (two answers, technical criterion, batch 2)", "",
              f"float32 {j['float32']['forward_s']['min']:.2f} / {j['float32']['forward_s']['median']:.2f} s, "
              f"bfloat16 {j['bfloat16']['forward_s']['min']:.2f} / {j['bfloat16']['forward_s']['median']:.2f} s "
              f"(f32 / bf16 {j['float32']['forward_s']['median'] / j['bfloat16']['forward_s']['median']:.2f}x); "
              f"expected technical scores {[round(x, 3) for x in j['float32']['technical']]} vs "
              f"{[round(x, 3) for x in j['bfloat16']['technical']]} (largest difference {j['max_abs_score_diff']:.3f} "
              f"on the 0-10 scale)."]
    L += ["", "Raw figures: `bf16_probe.json`.", ""]
    path = results / "bf16_probe.md"
    path.write_text("\n".join(L))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--judge", action="store_true", help="also time the 1.5B judge forward")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.reps < 5:
        p.error("--reps must be at least 5 (a figure is the min and median of 5 or more)")
    from jaxkd.machine import describe

    data: dict[str, Any] = {
        "command": "python -m evals.bf16_probe" + (" --judge" if args.judge else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(), "reps": args.reps, "platform": platform.platform()}
    data["matmul"] = matmul_section(args.reps)
    if args.judge:
        data["judge"] = judge_section(args.reps)
    (args.results / "bf16_probe.json").write_text(json.dumps(data, indent=1))  # first: figures survive a format bug
    print(write(data, args.results))


if __name__ == "__main__":
    main()
