"""XLA CPU matmul speed by weight layout: ``[in, out]`` vs ``[out, in]`` storage (issue 10, item 1).

    python -m evals.bench_layout [--reps 7] [--out evals/results/bench_layout.json]

For every projection shape of the 0.5B and 1.5B Qwen2.5 models, times ``y = x @ W`` for
M = 1, 8, 32 rows (decode batch sizes) with W stored either way, and the backward pass (grads of
``sum(y * g)`` wrt x and W) at the training row count (2 x 288 = 576). Every contraction is
one ``dot_general``; only which axis of the stored weight is contracted differs:

- ``io``: W stored ``[in, out]``, ``einsum("mi,io->mo")`` (jaxkd before this change);
- ``oi``: W stored ``[out, in]`` (HF / torch layout), ``einsum("mi,oi->mo")``;
- ``io_nd`` / ``oi_nd``: the same with a 3-D weight (heads split out, ``dnh`` / ``nhd``), the
  einsum form a Projection would use without reshaping its weight (q/k/v/o shapes only).

A single small matmul timed alone reads its weight from cache after the warm-up and pays one
dispatch, so the decision rests on the **stack** figures: one jitted program that runs
``--layers`` decoder layers' worth of projections (q, k, v, o, gate, up, down; distinct weights,
far more bytes than the last-level cache) in a chain, forward at M rows and forward+backward at
the training row count. Each figure is the min and median of ``--reps`` timed calls after two
warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# (model, name, in, out, heads split of the head side: (n, h) or None)
SHAPES = [
    ("0.5B", "q/o_proj", 896, 896, (14, 64)),
    ("0.5B", "k/v_proj", 896, 128, (2, 64)),
    ("0.5B", "gate/up_proj", 896, 4864, None),
    ("0.5B", "down_proj", 4864, 896, None),
    ("1.5B", "q/o_proj", 1536, 1536, (12, 128)),
    ("1.5B", "k/v_proj", 1536, 256, (2, 128)),
    ("1.5B", "gate/up_proj", 1536, 8960, None),
    ("1.5B", "down_proj", 8960, 1536, None),
]
ROWS = (1, 8, 32)
TRAIN_ROWS = 576


def timeit(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    import jax

    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return {"min_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times)}


def forward_fns(d_in: int, d_out: int, heads: tuple[int, int] | None):
    """name -> (weight shape, jitted f(x, w))."""
    import jax
    import jax.numpy as jnp

    fns = {
        "io": ((d_in, d_out), jax.jit(lambda x, w: jnp.einsum("mi,io->mo", x, w))),
        "oi": ((d_out, d_in), jax.jit(lambda x, w: jnp.einsum("mi,oi->mo", x, w))),
    }
    if heads is not None:
        n, h = heads
        if n * h == d_out:  # q/k/v: the head side is the output
            fns["io_nd"] = ((d_in, n, h), jax.jit(lambda x, w: jnp.einsum("md,dnh->mnh", x, w)))
            fns["oi_nd"] = ((n, h, d_in), jax.jit(lambda x, w: jnp.einsum("md,nhd->mnh", x, w)))
    return fns


def backward_fn(spec: str):
    import jax
    import jax.numpy as jnp

    def loss(x, w, g):
        return jnp.sum(jnp.einsum(spec, x, w) * g)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


MODELS = {"0.5B": (896, 4864, 14, 2, 64), "1.5B": (1536, 8960, 12, 2, 128)}


def stack_weights(model: str, layers: int, layout: str, rs: np.random.Generator) -> list[dict[str, Any]]:
    import jax.numpy as jnp

    d, f, n, k, h = MODELS[model]
    shapes = {"q": (d, n * h), "k": (d, k * h), "v": (d, k * h), "o": (n * h, d), "gate": (d, f),
              "up": (d, f), "down": (f, d)}
    out = []
    for _ in range(layers):
        out.append({name: jnp.asarray(0.02 * rs.standard_normal(
            (i, o) if layout == "io" else (o, i), dtype=np.float32)) for name, (i, o) in shapes.items()})
    return out


def stack_fn(layout: str):
    """A chain of every layer's projections (attention replaced by q + padded k/v, so nothing but
    the projections costs anything)."""
    import jax
    import jax.numpy as jnp

    spec = "mi,io->mo" if layout == "io" else "mi,oi->mo"

    def fwd(x, ws):
        for w in ws:
            q = jnp.einsum(spec, x, w["q"])
            kv = jnp.einsum(spec, x, w["k"]) + jnp.einsum(spec, x, w["v"])
            a = q + jnp.tile(kv, (1, q.shape[1] // kv.shape[1]))
            x = x + jnp.einsum(spec, a, w["o"])
            g = jax.nn.silu(jnp.einsum(spec, x, w["gate"])) * jnp.einsum(spec, x, w["up"])
            x = x + jnp.einsum(spec, g, w["down"])
        return x

    def loss(x, ws):
        return jnp.sum(fwd(x, ws) ** 2)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))


WEIGHT_KINDS = ("f32", "bf16_to_f32", "bf16_dot", "int8_to_f32")


def dtype_stack_fn(kind: str):
    """The ``oi`` stack with weights stored as ``kind`` (issue 10 item 7):

    - ``f32``: float32 weights (the reference);
    - ``bf16_to_f32``: bfloat16 weights converted to float32 inside the step, float32 matmul;
    - ``bf16_dot``: bfloat16 weights and activations, bf16 x bf16 matmul accumulating in f32;
    - ``int8_to_f32``: int8 weights with a float32 scale per output channel, converted inside
      the step (weight-only quantisation).
    """
    import jax
    import jax.numpy as jnp

    def mm(x, w):
        if kind == "int8_to_f32":
            q, scale = w
            return jnp.einsum("mi,oi->mo", x, q.astype(jnp.float32)) * scale
        if kind == "bf16_dot":
            return jnp.einsum("mi,oi->mo", x.astype(jnp.bfloat16), w,
                              preferred_element_type=jnp.float32)
        return jnp.einsum("mi,oi->mo", x, w.astype(jnp.float32))

    def fwd(x, ws):
        for w in ws:
            q = mm(x, w["q"])
            kv = mm(x, w["k"]) + mm(x, w["v"])
            a = q + jnp.tile(kv, (1, q.shape[1] // kv.shape[1]))
            x = x + mm(a, w["o"])
            g = jax.nn.silu(mm(x, w["gate"])) * mm(x, w["up"])
            x = x + mm(g, w["down"])
        return x

    return jax.jit(fwd)


def convert_weights(ws: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    import jax.numpy as jnp

    def one(w):
        if kind == "f32":
            return w
        if kind.startswith("bf16"):
            return w.astype(jnp.bfloat16)
        scale = jnp.max(jnp.abs(w), axis=1) / 127.0
        return (jnp.round(w / scale[:, None]).astype(jnp.int8), scale)

    return [{k: one(w) for k, w in layer.items()} for layer in ws]


def run_dtypes(reps: int, layers: int, models: tuple[str, ...]) -> dict[str, Any]:
    """Forward stack time per weight storage kind, ``oi`` layout, M = 1, 8, 32."""
    import jax.numpy as jnp

    rs = np.random.default_rng(2)
    out: dict[str, Any] = {}
    for model in models:
        d = MODELS[model][0]
        base = stack_weights(model, layers, "oi", rs)
        xs = {m: jnp.asarray(rs.standard_normal((m, d), dtype=np.float32)) for m in ROWS}
        for kind in WEIGHT_KINDS:
            ws = convert_weights(base, kind)
            fwd = dtype_stack_fn(kind)
            out.setdefault(model, {})[kind] = {f"forward_M{m}": timeit(lambda: fwd(xs[m], ws), reps)
                                               for m in ROWS}
            del ws
            print(f"dtype {model} {kind}: " + ", ".join(
                f"{c} {v['median_ms']:.1f} ms" for c, v in out[model][kind].items()), file=sys.stderr, flush=True)
        del base
    return out


def run_stack(reps: int, layers: int, models: tuple[str, ...]) -> dict[str, Any]:
    import jax.numpy as jnp

    rs = np.random.default_rng(1)
    out: dict[str, Any] = {}
    for model in models:
        d = MODELS[model][0]
        for layout in ("io", "oi"):
            ws = stack_weights(model, layers, layout, rs)
            fwd, bwd = stack_fn(layout)
            cell = out.setdefault(model, {}).setdefault(layout, {})
            for m in ROWS:
                x = jnp.asarray(rs.standard_normal((m, d), dtype=np.float32))
                cell[f"forward_M{m}"] = timeit(lambda: fwd(x, ws), reps)
            x = jnp.asarray(rs.standard_normal((TRAIN_ROWS, d), dtype=np.float32))
            cell[f"backward_M{TRAIN_ROWS}"] = timeit(lambda: bwd(x, ws), reps)
            del ws
            print(f"stack {model} {layout}: " + ", ".join(f"{c} {v['median_ms']:.1f} ms" for c, v in cell.items()),
                  file=sys.stderr, flush=True)
    return out


def run(reps: int) -> dict[str, Any]:
    import jax.numpy as jnp

    rs = np.random.default_rng(0)
    results = []
    for model, name, d_in, d_out, heads in SHAPES:
        row: dict[str, Any] = {"model": model, "proj": name, "in": d_in, "out": d_out, "forward": {},
                               "backward": {}}
        for label, (wshape, fn) in forward_fns(d_in, d_out, heads).items():
            w = jnp.asarray(rs.standard_normal(wshape, dtype=np.float32))
            for m in ROWS:
                x = jnp.asarray(rs.standard_normal((m, d_in), dtype=np.float32))
                row["forward"].setdefault(label, {})[m] = timeit(lambda: fn(x, w), reps)
            del w
        x = jnp.asarray(rs.standard_normal((TRAIN_ROWS, d_in), dtype=np.float32))
        g = jnp.asarray(rs.standard_normal((TRAIN_ROWS, d_out), dtype=np.float32))
        for label, spec, wshape in (("io", "mi,io->mo", (d_in, d_out)), ("oi", "mi,oi->mo", (d_out, d_in))):
            w = jnp.asarray(rs.standard_normal(wshape, dtype=np.float32))
            fn = backward_fn(spec)
            row["backward"][label] = timeit(lambda: fn(x, w, g), reps)
        results.append(row)
        fw = row["forward"]
        print(f"{model} {name:13s} " + "  ".join(
            f"M={m}: io {fw['io'][m]['median_ms']:.2f} / oi {fw['oi'][m]['median_ms']:.2f} ms"
            for m in ROWS) + f"  bwd io {row['backward']['io']['median_ms']:.1f} / oi "
            f"{row['backward']['oi']['median_ms']:.1f} ms", file=sys.stderr, flush=True)
    return {"rows": list(ROWS), "train_rows": TRAIN_ROWS, "reps": reps, "results": results}


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Per layout: the sum over one decoder layer's projections (q, k, v, o, gate, up, down),
    per model and row count: a layer's matmul time."""
    per_layer = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}
    out: dict[str, Any] = {}
    for r in res["results"]:
        mult = per_layer[r["proj"]]
        for label in ("io", "oi"):
            for m in res["rows"]:
                for stat in ("min_ms", "median_ms"):
                    key = (r["model"], f"forward_M{m}", label, stat)
                    out[key] = out.get(key, 0.0) + mult * r["forward"][label][m][stat]
            for stat in ("min_ms", "median_ms"):
                key = (r["model"], f"backward_M{res['train_rows']}", label, stat)
                out[key] = out.get(key, 0.0) + mult * r["backward"][label][stat]
    nested: dict[str, Any] = {}
    for (model, case, label, stat), v in out.items():
        nested.setdefault(model, {}).setdefault(case, {}).setdefault(label, {})[stat] = v
    return nested


def markdown(res: dict[str, Any]) -> list[str]:
    lines = ["| model | projection (in x out) | layout | " + " | ".join(
        f"M={m} min / med ms" for m in res["rows"]) + f" | backward M={res['train_rows']} min / med ms |",
             "|---|---|---|" + "---:|" * (len(res["rows"]) + 1)]
    for r in res["results"]:
        for label, cells in r["forward"].items():
            bwd = r["backward"].get(label)
            lines.append(f"| {r['model']} | {r['proj']} ({r['in']}x{r['out']}) | {label} | " + " | ".join(
                f"{cells[m]['min_ms']:.2f} / {cells[m]['median_ms']:.2f}" for m in res["rows"]) + " | " +
                (f"{bwd['min_ms']:.1f} / {bwd['median_ms']:.1f}" if bwd else "") + " |")
    lines += ["", "One decoder layer's projections summed (q, k, v, o, gate, up, down), median ms:", "",
              "| model | case | io | oi | io / oi |", "|---|---|---:|---:|---:|"]
    for model, cases in res["summary"].items():
        for case, labels in cases.items():
            a, b = labels["io"]["median_ms"], labels["oi"]["median_ms"]
            lines.append(f"| {model} | {case} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    lines += ["", f"Stack of {res['stack_layers']} layers' projections in one jitted program (distinct "
              "weights), min / median ms:", "", "| model | case | io | oi | io / oi (medians) |",
              "|---|---|---:|---:|---:|"]
    for model, labels in res["stack"].items():
        for case in labels["io"]:
            a, b = labels["io"][case], labels["oi"][case]
            lines.append(f"| {model} | {case} | {a['min_ms']:.1f} / {a['median_ms']:.1f} | "
                         f"{b['min_ms']:.1f} / {b['median_ms']:.1f} | {a['median_ms'] / b['median_ms']:.2f}x |")
    if "dtypes" in res:
        lines += ["", f"Weight storage (`oi` layout, stack of {res['stack_layers']} layers, forward), "
                  "min / median ms:", "", "| model | weights | " + " | ".join(
                      f"M={m}" for m in res["rows"]) + " |", "|---|---|" + "---:|" * len(res["rows"])]
        for model, kinds in res["dtypes"].items():
            for kind, cells in kinds.items():
                lines.append(f"| {model} | {kind} | " + " | ".join(
                    f"{cells[f'forward_M{m}']['min_ms']:.1f} / {cells[f'forward_M{m}']['median_ms']:.1f}"
                    for m in res["rows"]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.bench_layout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers in the stack figures")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", action="store_true", help="also time bf16 / int8 weight storage")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    if args.reps < 5:
        raise SystemExit("--reps must be >= 5 (min and median of at least 5 timed repetitions)")
    res = run(args.reps)
    res["summary"] = summary(res)
    res["stack_layers"] = args.layers
    res["stack"] = run_stack(args.reps, args.layers, tuple(args.models))
    if args.dtypes:
        res["dtypes"] = run_dtypes(args.reps, args.layers, tuple(args.models))
    text = "\n".join(markdown(res))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
