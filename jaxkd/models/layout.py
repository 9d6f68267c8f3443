"""Which projection weight layout to decode with on this machine, decided by measuring it.

XLA's CPU matmul speed depends on which axis of the stored weight is contracted, and the answer
differs between CPUs and row counts: on a 2-core Intel Xeon (AMX) ``[out, in]`` was up to ~2x
faster than ``[in, out]`` for 8 rows and more, while on a 2-core AMD EPYC ``[in, out]`` was 1.28x
faster at 8 rows and 1.44x *slower* at one row (``evals/results/bench_layout_epyc.md``). The
stored layout stays HF's ``[out, in]`` (training, checkpoints, LoRA, export); a ``Generator`` can
decode on an ``[in, out]`` copy of the projection weights for the steps where that is faster.

``choose(cfg, dtype)`` returns a ``LayoutChoice`` (one layout for single-row decode steps, one for
every step with more rows: batched decode and prefill). It times both layouts once per machine,
model shape and dtype, on a jitted chain of one decoder layer's projections (distinct weights,
several layers' worth so they stream from memory), and caches the figures in
``$JAXKD_CACHE/layout.json`` (default ``~/.cache/jaxkd``). ``[in, out]`` is chosen only when it is
at least ``MARGIN`` faster at the median; ties keep the stored layout (no copy, no extra memory).

Overrides: ``JAXKD_WEIGHT_LAYOUT=oi|io|auto`` (environment) or ``Generator(weight_layout=...)``.
Non-CPU backends and small models (below ``MIN_BYTES`` of projection weights, where the weights
do not stream from memory and a timing decides nothing) always use ``[out, in]``.

    python -m jaxkd.models.layout [--model PRESET] [--dtype float32] [--remeasure]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from jaxkd.config import ModelConfig

LAYOUT_MODES = ("auto", "oi", "io")
MARGIN = 0.10      # [in, out] must be this much faster (median time ratio <= 1 - MARGIN)
MIN_BYTES = 64 << 20
ROWS_MANY = 8      # the row count standing for "more than one row" in the measurement
REPS = 5


@dataclasses.dataclass(frozen=True)
class LayoutChoice:
    one_row: str       # single-row decode steps
    many_rows: str     # batched decode and every prefill
    source: str        # why: "env", "argument", "backend", "small model", "measured", "cached"
    figures: dict | None = None

    @property
    def needs_copy(self) -> bool:
        return "io" in (self.one_row, self.many_rows)

    def for_rows(self, rows: int) -> str:
        return self.one_row if rows <= 1 else self.many_rows


def cache_path() -> Path:
    return Path(os.environ.get("JAXKD_CACHE", Path.home() / ".cache" / "jaxkd")) / "layout.json"


def layer_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's projections: q, k, v, o, gate, up, down."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def projection_bytes(cfg: ModelConfig, dtype: Any) -> int:
    import numpy as np

    per_layer = sum(i * o for i, o in layer_shapes(cfg))
    return per_layer * cfg.num_layers * np.dtype(dtype).itemsize


def _machine_key(cfg: ModelConfig, dtype: Any) -> str:
    import jax
    import numpy as np

    from jaxkd.machine import cpu_facts

    facts, (q_proj, k_proj) = cpu_facts(), layer_shapes(cfg)[:2]
    raw = json.dumps([facts["cpu"], facts["simd"], facts["cores"], jax.__version__,
                      cfg.hidden_size, cfg.intermediate_size, q_proj[1], k_proj[1],
                      np.dtype(dtype).name, ROWS_MANY, MARGIN])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def measure(cfg: ModelConfig, dtype: Any, *, reps: int = REPS, layers: int = 4) -> dict[str, Any]:
    """Median / min ms of a jitted chain of ``layers`` decoder layers' projections (q, k, v, o,
    gate, up, down with distinct random weights) at 1 and ``ROWS_MANY`` rows, both layouts,
    repetitions interleaved."""
    import jax
    import jax.numpy as jnp

    one = layer_shapes(cfg)
    d, q, kv = cfg.hidden_size, one[0][1], one[1][1]
    shapes = one * layers
    keys = jax.random.split(jax.random.key(0), len(shapes))
    w_io = [jax.random.normal(k, s, dtype) * 0.02 for k, s in zip(keys, shapes)]
    w_oi = [jnp.asarray(w.T) for w in w_io]

    def chain(ws, x, io: bool):
        y_sum = jnp.zeros((), jnp.float32)
        h = x
        for i in range(0, len(ws), 7):
            qkvo, mlp = ws[i:i + 4], ws[i + 4:i + 7]
            spec = "mi,io->mo" if io else "mi,oi->mo"
            dot = lambda a, w: jnp.einsum(spec, a, w, preferred_element_type=jnp.float32).astype(dtype)
            a = dot(h, qkvo[0]) + jnp.pad(dot(h, qkvo[1]) + dot(h, qkvo[2]), ((0, 0), (0, q - kv)))
            h = h + dot(a, qkvo[3])
            h = h + dot(jax.nn.silu(dot(h, mlp[0])) * dot(h, mlp[1]), mlp[2])
            y_sum = y_sum + jnp.sum(h.astype(jnp.float32))
        return y_sum

    fns = {"io": jax.jit(lambda ws, x: chain(ws, x, True)), "oi": jax.jit(lambda ws, x: chain(ws, x, False))}
    weights = {"io": w_io, "oi": w_oi}
    out: dict[str, Any] = {}
    for rows in (1, ROWS_MANY):
        x = jnp.ones((rows, d), dtype)
        times: dict[str, list[float]] = {"io": [], "oi": []}
        for name, fn in fns.items():  # compile + two warm-ups
            for _ in range(2):
                jax.block_until_ready(fn(weights[name], x))
        for _ in range(reps):
            for name, fn in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(weights[name], x))
                times[name].append(1e3 * (time.perf_counter() - t))
        out[f"rows_{rows}"] = {name: {"min_ms": min(v), "median_ms": statistics.median(v)}
                               for name, v in times.items()}
    return out


def _pick(fig: dict[str, dict[str, float]]) -> str:
    return "io" if fig["io"]["median_ms"] <= (1 - MARGIN) * fig["oi"]["median_ms"] else "oi"


def choose(cfg: ModelConfig, dtype: Any, mode: str | None = None, *, remeasure: bool = False) -> LayoutChoice:
    """The layouts a ``Generator`` decodes ``cfg``-shaped weights of ``dtype`` with (see the module
    docstring for the order of the rules)."""
    import jax
    import numpy as np

    source = "argument"
    if mode is None or mode == "auto":
        env = os.environ.get("JAXKD_WEIGHT_LAYOUT", "").strip()
        if env and env != "auto":
            mode, source = env, "env"
    if mode not in (None, *LAYOUT_MODES):
        raise ValueError(f"weight layout {mode!r} (from {source}): expected one of {LAYOUT_MODES}")
    if mode in ("oi", "io"):
        return LayoutChoice(mode, mode, source)
    if jax.default_backend() != "cpu":
        return LayoutChoice("oi", "oi", "backend")
    if projection_bytes(cfg, dtype) < MIN_BYTES:
        return LayoutChoice("oi", "oi", "small model")
    path, key = cache_path(), _machine_key(cfg, dtype)
    try:
        cached = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        cached = {}  # an unreadable cache is re-measured and rewritten
    if key in cached and not remeasure:
        figs, source = cached[key]["figures"], "cached"
    else:
        figs, source = measure(cfg, dtype), "measured"
        # self-describing for a reader of the file (the key is a hash of these and the CPU facts)
        cached[key] = {"figures": figs, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "dtype": np.dtype(dtype).name, "layer_shapes_in_out": layer_shapes(cfg),
                       "jax": jax.__version__}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: measure again next time
    return LayoutChoice(_pick(figs["rows_1"]), _pick(figs[f"rows_{ROWS_MANY}"]), source, figs)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from jaxkd.config import load_model_spec
    from jaxkd.models import resolve_hf_dir
    from jaxkd.models.params import read_hf_config

    ap = argparse.ArgumentParser(prog="python -m jaxkd.models.layout", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remeasure", action="store_true")
    args = ap.parse_args(argv)
    cfg = read_hf_config(resolve_hf_dir(load_model_spec(args.model)))
    c = choose(cfg, args.dtype, remeasure=args.remeasure)
    print(f"{args.model} ({args.dtype}): one row -> {c.one_row}, {ROWS_MANY}+ rows -> {c.many_rows} ({c.source}; "
          f"cache {cache_path()})")
    for rows, fig in (c.figures or {}).items():
        print(f"  {rows}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms (min {v['min_ms']:.2f})" for k, v in fig.items()))


if __name__ == "__main__":
    main()
