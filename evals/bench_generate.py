"""Generation throughput: jaxkd's Generator vs an older jaxkd vs transformers, and the teacher stage.

    flock /tmp/jaxkd-bigmem.lock python -m evals.bench_generate --baseline-src DIR

``DIR`` is a checkout of the implementation to compare against (e.g. ``git worktree add
/tmp/jaxkd-base b9562dc``). One run, on one machine:

1. machine: CPU, versions, and the memory read bandwidth (a 1 GiB reduction, jax and numpy);
2. layout: ``evals.bench_layout`` (projection weight layout and weight storage dtype);
3. decode (the 0.5B): this jaxkd, the baseline jaxkd and transformers (torch, CPU) on the same
   chat-formatted troubleshooting prompts, greedy, float32, exactly N new tokens per row (EOS
   ignored), batch 1, 8 and 32, with each implementation's share of the weight-streaming
   roofline ``batch * bandwidth / weight bytes read per step``;
   and next to each a compute-side bound: the step's matmuls alone (every projection and the lm
   head, ``run_matmuls``) timed at the same row count;
4. weights: the real 0.5B with bf16 weights (f32 or bf16 compute) next to f32: decode speed and
   agreement with f32 (issue 10 item 7; int8 is in the layout microbenchmark);
5. teacher (the 1.5B): the teacher stage itself (``run_teacher``: real teacher prompts, top-k
   capture, cache writes into a fresh directory) on the first P prompts of each checkout's
   ``configs/cpu_default.yaml`` (each at its configured batch size); overall tok/s =
   generated tokens / wall time of the stage.

Each implementation runs in its own process (``evals/bench_worker.py``, PYTHONPATH set to its
checkout), all loaded at once, and the timed repetitions are interleaved: repetition r of every
implementation runs before repetition r + 1 of any, so load on a shared machine hits all alike.
Every figure is the min and median of ``--reps`` (>= 5) timed repetitions after one warm-up.
Writes ``evals/results/bench_generate.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results"
WORKER = Path(__file__).resolve().with_name("bench_worker.py")
QUESTIONS = [
    "My Bluetooth earbuds keep disconnecting from my laptop every few minutes. How do I fix it?",
    "My soundbar has no sound from the TV over HDMI ARC. What should I check?",
    "The left earbud of my true wireless earbuds does not charge in the case. What can I do?",
    "My smart speaker says it cannot connect to Wi-Fi after I changed my router. How do I fix it?",
    "My noise-cancelling headphones make a hissing sound when ANC is on. Is it broken?",
    "My portable speaker will not pair with my phone; the light just keeps flashing blue.",
    "The wireless subwoofer of my soundbar keeps cutting out. How do I re-pair it?",
    "My robot vacuum stops in the middle of a room and says the wheel is stuck. What should I do?",
]


def _check_measured_src(worker: "Worker", loaded: dict[str, Any]) -> None:
    """A jaxkd worker must have imported jaxkd from its own checkout, or the comparison is void."""
    f = loaded.get("jaxkd_file")
    if f is not None and not Path(f).resolve().is_relative_to(worker.src):
        raise SystemExit(f"bench worker {worker.name}: imported jaxkd from {f}, not from {worker.src}")


class Worker:
    """A bench_worker.py process running one implementation."""

    def __init__(self, name: str, src: Path, extra_env: dict[str, str] | None = None):
        self.name, self.extra_env = name, dict(extra_env or {})
        # Absolute: the worker runs with cwd=src, where a relative PYTHONPATH would point nowhere and
        # the editable install's jaxkd would be measured instead (caught by check_measured_src).
        src = Path(src).resolve()
        self.src = src
        env = dict(os.environ, PYTHONPATH=str(src), TOKENIZERS_PARALLELISM="false")
        # XLA_FLAGS / JAXKD_WEIGHT_LAYOUT are read once, at start: one process per setting
        env.update(self.extra_env)
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(src))

    def call(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                out = json.loads(line[2:])
                if not out.pop("ok"):
                    raise RuntimeError(f"worker {self.name}: {out['error']}\n{out['trace']}")
                return out
        raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": float(min(values)), "median": float(statistics.median(values)), "n": len(values)}


def measure_bandwidth(reps: int, gib: float = 1.0) -> dict[str, Any]:
    """Memory read bandwidth (GB/s): full reductions of a ``gib`` GiB float32 array with numpy
    (one thread) and a jitted jax sum (XLA's CPU threads); min / median seconds of ``reps``."""
    import jax
    import jax.numpy as jnp

    n = int(gib * (1 << 30)) // 4
    x_np = np.random.default_rng(0).random(n, dtype=np.float32)
    x_np.sum()
    t_np = [_timed(lambda: x_np.sum(dtype=np.float32)) for _ in range(reps)]
    x_j = jnp.asarray(x_np)
    del x_np
    f = jax.jit(lambda a: jnp.sum(a))
    f(x_j).block_until_ready()
    t_j = [_timed(lambda: f(x_j).block_until_ready()) for _ in range(reps)]
    del x_j
    gb = n * 4 / 1e9
    return {"array_GiB": gib, "numpy_s": stats(t_np), "jax_s": stats(t_j),
            "numpy_GBps": gb / min(t_np), "jax_GBps": gb / min(t_j),
            "best_GBps": max(gb / min(t_np), gb / min(t_j))}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def chat_prompts(model: str, n: int) -> list[list[int]]:
    from jaxkd.data.formatting import SYSTEM_PROMPT
    from jaxkd.models import resolve_hf_dir, resolve_spec
    from jaxkd.models.generate import chat_ids
    from jaxkd.models.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_hf_dir(resolve_spec(model)))
    qs = (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]
    return [chat_ids(tok, [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}])
            for q in qs]


def machine() -> dict[str, Any]:
    from jaxkd.machine import cpu_facts

    facts = cpu_facts()
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "gguf"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"host": platform.node(), "cpu": facts["cpu"], "simd": facts["simd"], "cores": facts["cores"],
            "ram_GiB": facts["ram_gib"], "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions,
            "load_avg_at_start": os.getloadavg()}


def git_rev(src: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_matmuls(model: str, batch_sizes: Sequence[int], reps: int, dtypes: Sequence[str]) -> dict[str, Any]:
    """The matmul floor of one decode step: a jitted chain of every projection of every layer
    (distinct random weights, in the layout ``jaxkd.models.layout`` picks for that row count and
    dtype) and the [V, D] lm head, nothing else (no attention, norms, sampling), at ``b`` rows.
    A decode step cannot be faster than its matmuls: ``b / floor`` bounds tok/s from the compute
    side as the bandwidth roofline does from the memory side. Also the machine's large-matmul rate
    (2048^3) in each dtype."""
    import jax
    import jax.numpy as jnp

    from jaxkd.config import load_model_spec
    from jaxkd.models import resolve_hf_dir
    from jaxkd.models.layout import choose, layer_shapes
    from jaxkd.models.params import read_hf_config

    cfg = read_hf_config(resolve_hf_dir(load_model_spec(model)))
    shapes = layer_shapes(cfg)
    d, q, kv = cfg.hidden_size, shapes[0][1], shapes[1][1]
    out: dict[str, Any] = {"model": model, "layers": cfg.num_layers, "vocab": cfg.vocab_size, "runs": {}}
    for name in dtypes:
        dtype = jnp.dtype(name)
        big = jnp.ones((2048, 2048), dtype)
        mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
        mm(big).block_until_ready()
        t = [_timed(lambda: mm(big).block_until_ready()) for _ in range(reps)]
        out.setdefault("peak_GFLOPs", {})[name] = 2 * 2048 ** 3 / min(t) / 1e9
        choice = choose(cfg, dtype)
        keys = iter(jax.random.split(jax.random.key(0), 7 * cfg.num_layers + 1))
        head = jax.random.normal(next(keys), (cfg.vocab_size, d), dtype) * 0.02
        w = {"oi": [], "io": []}
        for _ in range(cfg.num_layers):
            for i, o in shapes:
                x = jax.random.normal(next(keys), (o, i), dtype) * 0.02
                w["oi"].append(x)
        for b in batch_sizes:
            layout = choice.for_rows(b)
            if layout == "io" and not w["io"]:
                w["io"] = [jnp.asarray(x.T) for x in w["oi"]]
            spec = "mi,io->mo" if layout == "io" else "mi,oi->mo"

            def step(ws, head, h):
                dot = lambda a, m: jnp.einsum(spec, a, m, preferred_element_type=jnp.float32).astype(dtype)
                for li in range(0, len(ws), 7):
                    l = ws[li:li + 7]
                    a = dot(h, l[0]) + jnp.pad(dot(h, l[1]) + dot(h, l[2]), ((0, 0), (0, q - kv)))
                    h = h + dot(a, l[3])
                    h = h + dot(jax.nn.silu(dot(h, l[4])) * dot(h, l[5]), l[6])
                return jnp.einsum("md,vd->mv", h, head, preferred_element_type=jnp.float32)

            f = jax.jit(step)
            h0 = jnp.ones((b, d), dtype) * 0.01
            for _ in range(2):
                f(w[layout], head, h0).block_until_ready()
            ts = [_timed(lambda: f(w[layout], head, h0).block_until_ready()) for _ in range(reps)]
            flops = 2 * b * (cfg.num_layers * sum(i * o for i, o in shapes) + cfg.vocab_size * d)
            out["runs"][f"{name}/{b}"] = {"dtype": name, "batch": b, "layout": layout, "step_s": stats(ts),
                                          "GFLOPs_best": flops / min(ts) / 1e9,
                                          "tok_s_bound_best": b / min(ts), "tok_s_bound_median": b / statistics.median(ts)}
            print(f"matmul floor {name} b={b} ({layout}): {1e3 * statistics.median(ts):.1f} ms/step", file=sys.stderr,
                  flush=True)
        del w, head
    return out


def run_layout(reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "layout.json"
        subprocess.run([sys.executable, "-m", "evals.bench_layout", "--reps", str(reps), "--dtypes",
                        "--out", str(out)], check=True, cwd=str(ROOT), stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def run_decode(model: str, impls: dict[str, Path], batch_sizes: Sequence[int], new_tokens: Sequence[int],
               reps: int, xla_flags: dict[str, str] | None = None,
               envs: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """``xla_flags`` / ``envs``: extra jaxkd implementations (this checkout) by name, each run with
    that XLA_FLAGS value / those environment variables, timed in the same interleaved repetitions."""
    workers = {name: Worker(name, src) for name, src in impls.items()}
    envs = {**{name: {"XLA_FLAGS": flags} for name, flags in (xla_flags or {}).items()}, **(envs or {})}
    workers.update({name: Worker(name, ROOT, env) for name, env in envs.items()})
    out: dict[str, Any] = {"impls": {}, "runs": {}}
    try:
        for name, w in workers.items():
            kind = "transformers" if name == "transformers" else "jaxkd"
            out["impls"][name] = w.call(op="load", impl=kind, model=model)
            if w.extra_env:
                out["impls"][name]["env"] = w.extra_env
            _check_measured_src(w, out["impls"][name])
            print(f"loaded {name}: {out['impls'][name]}", file=sys.stderr, flush=True)
        for b, n in zip(batch_sizes, new_tokens):
            prompts = chat_prompts(model, b)
            for w in workers.values():
                w.call(op="decode", prompts=prompts, new_tokens=n)  # warm-up (compiles)
            reps_out: dict[str, list[dict]] = {name: [] for name in workers}
            for r in range(reps):
                for name, w in workers.items():
                    reps_out[name].append(w.call(op="decode", prompts=prompts, new_tokens=n))
                print(f"decode b={b} rep {r}: " + ", ".join(
                    f"{k} {b * (n - 1) / v[-1]['decode_s']:.2f} tok/s" for k, v in reps_out.items()),
                    file=sys.stderr, flush=True)
            out["runs"][str(b)] = {
                "batch": b, "new_tokens": n, "prompt_lens": [len(p) for p in prompts],
                **{name: {"decode_s": stats([x["decode_s"] for x in xs]),
                          "prefill_s": stats([x["prefill_s"] for x in xs]),
                          "wall_s": stats([x["wall_s"] for x in xs]),
                          "decode_tok_s_best": b * (n - 1) / min(x["decode_s"] for x in xs),
                          "decode_tok_s_median": b * (n - 1) / statistics.median(x["decode_s"] for x in xs),
                          "e2e_tok_s_median": b * n / statistics.median(x["wall_s"] for x in xs),
                          "first_row_tokens": xs[0]["tokens"][:40],
                          "row_tokens": xs[0].get("all_tokens")}
                   for name, xs in reps_out.items()}}
    finally:
        for w in workers.values():
            w.close()
    return out


WEIGHT_VARIANTS = {"f32": ("float32", "float32"), "bf16 weights, f32 compute": ("bfloat16", "float32"),
                   "bf16 weights, bf16 compute": ("bfloat16", "bfloat16")}


def run_weights(model: str, batch_sizes: Sequence[int], new_tokens: int, reps: int) -> dict[str, Any]:
    """Weight storage attempts (issue 10 item 7) on the real model: decode speed next to f32,
    interleaved, and agreement with f32 (last-token logits of a prompt, greedy tokens)."""
    workers = {name: Worker(name, ROOT) for name in WEIGHT_VARIANTS}
    out: dict[str, Any] = {"new_tokens": new_tokens, "runs": {}, "parity": {}}
    try:
        for name, w in workers.items():
            param, compute = WEIGHT_VARIANTS[name]
            w.call(op="load", impl="jaxkd", model=model, param_dtype=param, compute_dtype=compute)
        prompt = chat_prompts(model, 1)[0]
        ref = np.asarray(workers["f32"].call(op="logits", prompt=prompt)["logits"])
        for b in batch_sizes:
            prompts = chat_prompts(model, b)
            for w in workers.values():
                w.call(op="decode", prompts=prompts, new_tokens=new_tokens)
            reps_out: dict[str, list[dict]] = {name: [] for name in workers}
            for _ in range(reps):
                for name, w in workers.items():
                    reps_out[name].append(w.call(op="decode", prompts=prompts, new_tokens=new_tokens))
            out["runs"][str(b)] = {name: {"decode_s": stats([x["decode_s"] for x in xs]),
                                          "decode_tok_s_median": b * (new_tokens - 1) / statistics.median(
                                              x["decode_s"] for x in xs),
                                          "tokens": xs[0]["tokens"]} for name, xs in reps_out.items()}
            print(f"weights b={b}: " + ", ".join(f"{k} {v['decode_tok_s_median']:.2f} tok/s" for k, v in
                                                 out["runs"][str(b)].items()), file=sys.stderr, flush=True)
        for name, w in workers.items():
            got = np.asarray(w.call(op="logits", prompt=prompt)["logits"])
            toks = out["runs"][str(batch_sizes[0])][name]["tokens"]
            ref_toks = out["runs"][str(batch_sizes[0])]["f32"]["tokens"]
            agree = next((i for i, (a, c) in enumerate(zip(toks, ref_toks)) if a != c), len(ref_toks))
            out["parity"][name] = {"max_abs_logit_diff": float(np.abs(got - ref).max()),
                                   "logit_scale": float(np.abs(ref).max()),
                                   "same_argmax": bool(got.argmax() == ref.argmax()),
                                   "greedy_tokens_equal_to_f32": agree}
    finally:
        for w in workers.values():
            w.close()
    return out


def run_teacher(impls: dict[str, tuple[Path, Path]], prompts: int, reps: int, model: str) -> dict[str, Any]:
    workers = {name: Worker(name, src) for name, (src, _) in impls.items()}
    out: dict[str, Any] = {"impls": {}, "prompts": prompts}
    try:
        for name, w in workers.items():
            out["impls"][name] = w.call(op="load", impl="jaxkd", model=model)
            _check_measured_src(w, out["impls"][name])
        reps_out: dict[str, list[dict]] = {name: [] for name in workers}
        for r in range(reps + 1):  # rep 0: warm-up
            for name, w in workers.items():
                res = w.call(op="teacher", config=str(impls[name][1]), limit=prompts)
                if r:
                    reps_out[name].append(res)
                print(f"teacher rep {r}{' (warm-up)' if not r else ''} {name}: {res['new_tokens']} tokens "
                      f"in {res['wall_s']:.1f}s = {res['new_tokens'] / res['wall_s']:.2f} tok/s "
                      f"(batch {res['batch_size']})", file=sys.stderr, flush=True)
        for name, xs in reps_out.items():
            toks = xs[0]["new_tokens"]
            out[name] = {"wall_s": stats([x["wall_s"] for x in xs]), "new_tokens": toks,
                         "batch_size": xs[0]["batch_size"], "topk_rows": xs[0]["topk_rows"],
                         "tok_s_best": toks / min(x["wall_s"] for x in xs),
                         "tok_s_median": toks / statistics.median(x["wall_s"] for x in xs),
                         "first_answer_ids": xs[0]["first_answer_ids"]}
    finally:
        for w in workers.values():
            w.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.bench_generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="decode benchmark preset (packaged)")
    ap.add_argument("--teacher-model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[128, 128, 64],
                    help="new tokens per row, one per batch size (or one for all)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="a checkout of the jaxkd to compare against (e.g. a worktree of b9562dc)")
    ap.add_argument("--teacher-prompts", type=int, default=16, help="teacher prompts per repetition")
    ap.add_argument("--weights-new-tokens", type=int, default=32, help="new tokens per row, weight-dtype attempts")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["layout", "matmuls", "transformers", "decode", "weights", "teacher"])
    ap.add_argument("--xla-flags", nargs="*", default=[], metavar="NAME=FLAGS",
                    help="also decode with this checkout under XLA_FLAGS=FLAGS, reported as NAME "
                         "(e.g. 'jaxkd-xnn=--xla_cpu_experimental_xnn_fusion_type=dot')")
    ap.add_argument("--env", nargs="*", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="also decode with this checkout under these environment variables, reported as "
                         "NAME (e.g. 'jaxkd-io=JAXKD_WEIGHT_LAYOUT=io')")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_generate")
    args = ap.parse_args(argv)
    if args.reps < 5:
        raise SystemExit("--reps must be >= 5 (every figure is the min and median of at least 5 repetitions)")
    variants = dict(v.split("=", 1) for v in args.xla_flags if "=" in v)
    if len(variants) != len(args.xla_flags) or {"jaxkd", "baseline", "transformers"} & set(variants):
        raise SystemExit(f"--xla-flags takes NAME=FLAGS with new names, got {args.xla_flags}")
    envs: dict[str, dict[str, str]] = {}
    for v in args.env:
        name, _, pairs = v.partition("=")
        kv = [p.split("=", 1) for p in pairs.split(",") if p]
        if not kv or any(len(p) != 2 for p in kv) or name in envs or name in variants or \
                name in ("jaxkd", "baseline", "transformers"):
            raise SystemExit(f"--env takes NAME=KEY=VALUE[,KEY=VALUE] with new names, got {v!r}")
        envs[name] = dict(kv)
    tokens = args.new_tokens * len(args.batch_sizes) if len(args.new_tokens) == 1 else args.new_tokens
    if len(tokens) != len(args.batch_sizes):
        raise SystemExit(f"--new-tokens: give one value or one per batch size ({len(args.batch_sizes)})")
    if args.baseline_src is not None:  # absolute: workers run with their checkout as cwd
        args.baseline_src = args.baseline_src.resolve()
    if args.baseline_src is not None and not (args.baseline_src / "jaxkd" / "__init__.py").exists():
        raise SystemExit(f"--baseline-src {args.baseline_src} is not a jaxkd checkout (no jaxkd/__init__.py)")

    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "command": "python -m evals.bench_generate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "reps": args.reps, "src": {"jaxkd": git_rev(ROOT)}}
    if args.baseline_src is not None:
        res["src"]["baseline"] = f"{git_rev(args.baseline_src)} ({args.baseline_src})"
    res["bandwidth"] = measure_bandwidth(args.reps)
    print(f"bandwidth: {res['bandwidth']['best_GBps']:.1f} GB/s", file=sys.stderr, flush=True)
    if "matmuls" not in args.skip:
        res["matmuls"] = run_matmuls(args.model, args.batch_sizes, args.reps,
                                     ["float32"] + (["bfloat16"] if any(
                                         e.get("JAXKD_BATCHED_DTYPE") == "bfloat16" for e in envs.values()) else []))
    if "layout" not in args.skip:
        res["layout"] = run_layout(args.reps)
    if "decode" not in args.skip:
        impls = {"jaxkd": ROOT}
        if args.baseline_src is not None:
            impls["baseline"] = args.baseline_src
        if "transformers" not in args.skip:
            impls["transformers"] = ROOT
        res["decode"] = run_decode(args.model, impls, args.batch_sizes, tokens, args.reps, variants, envs)
        res["decode"]["model"] = args.model
    if "weights" not in args.skip:
        res["weights"] = run_weights(args.model, args.batch_sizes, args.weights_new_tokens, args.reps)
        res["weights"]["model"] = args.model
    if "teacher" not in args.skip:
        impls_t = {"jaxkd": (ROOT, ROOT / "configs" / "cpu_default.yaml")}
        if args.baseline_src is not None:
            impls_t["baseline"] = (args.baseline_src, args.baseline_src / "configs" / "cpu_default.yaml")
        res["teacher"] = run_teacher(impls_t, args.teacher_prompts, args.reps, args.teacher_model)
        res["teacher"]["model"] = args.teacher_model
    res["total_s"] = round(time.perf_counter() - t_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    from evals.bench_report import write_markdown

    write_markdown(res, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
