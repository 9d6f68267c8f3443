"""The KD loss alone, fused (jaxkd.distill.fused) vs unfused (kd_objective on full logits).

    flock /tmp/jaxkd-bigmem.lock python -m evals.bench_kd_loss [--phase timing|sweep|memory|all]

value_and_grad of the loss from final hidden states h [B, T, D] and the head weight w [V, D] at
the real 0.5B shapes (D 896, V 151936 rows of which 151665 are the tokenizer's vocabulary,
B 2 x T 288, ~55% loss positions as an answer tail per row, top-16 teacher cache), for two cases:
  frozen  : gradient wrt h only (trainable=no_embed, the CPU default: lm_head frozen)
  trained : gradient wrt h and w
Phases (each rewrites its own section of evals/results/bench_kd_loss.json and the .md):
  timing : fused and unfused in ONE process, repetitions interleaved (u, f, u, f, ...) after a
           warm-up each, so both see the same machine load; wall and process CPU seconds.
  sweep  : the fused loss alone at several vocabulary chunk sizes.
  memory : each (impl, case) in its own subprocess: compiled memory_analysis and peak RSS
           (plus a baseline child that only builds the inputs).
``--real-head MODEL`` takes h from the model's forward pass on the batch's tokens and w from its
head instead of random values (loads the model: run under the lock).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxkd.machine import describe

RESULTS = Path(__file__).resolve().parent / "results"
D, V, VOCAB, K = 896, 151936, 151665, 16
CASES = {"frozen": (0,), "trained": (0, 1)}


def inputs(args, seed: int = 0) -> dict:
    """Seeded h, w, targets, mask and a top-k teacher like evals.bench_kd_step's."""
    rng = np.random.default_rng(seed)
    b, t = args.batch, args.seq
    ids = rng.integers(0, 20000, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[:, t - 1 - args.answer:t - 1] = 1.0
    logits = rng.normal(size=(b, t, 64)).astype(np.float32) * 3
    cand = rng.integers(0, VOCAB, (b, t, 64)).astype(np.int32)
    order = np.argsort(-logits, axis=-1)[..., :K]
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.25)  # 80% mass in 64 candidates
    out = {"input_ids": ids, "targets": np.concatenate([ids[:, 1:], ids[:, :1]], axis=1),
           "loss_mask": mask, "topk_ids": np.take_along_axis(cand, order, -1),
           "topk_logprobs": np.take_along_axis(lp, order, -1).astype(np.float32)}
    if args.real_head:
        import jax

        from jaxkd.distill.fused import head_weight
        from jaxkd.models import load_pretrained

        model = load_pretrained(args.real_head).model
        pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
        h, _ = jax.jit(lambda i, p: model(i, p, return_hidden=True))(ids, pos)
        out["h"], out["w"] = np.asarray(h), np.asarray(head_weight(model))
        del model
    else:
        out["h"] = rng.normal(size=(b, t, D)).astype(np.float32)
        out["w"] = (rng.normal(size=(V, D)) * 0.08).astype(np.float32)  # logits std ~2.4
    return out


def loss_fns(x: dict, tau: float, chunk: int):
    import jax.numpy as jnp

    from jaxkd.distill.fused import fused_kd_loss, loss_capacity
    from jaxkd.distill.losses import TopK, align_vocab, kd_objective

    top = TopK(jnp.asarray(x["topk_ids"]), jnp.asarray(x["topk_logprobs"]))
    y, m = jnp.asarray(x["targets"]), jnp.asarray(x["loss_mask"])
    cap = loss_capacity(x["loss_mask"])

    def unfused(h, w):
        logits = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
        return kd_objective(align_vocab(logits, VOCAB), y, m, teacher_topk=top, alpha=0.5,
                            temperature=tau)[0]

    def fused(h, w):
        return fused_kd_loss(h, w, y, m, teacher_topk=top, alpha=0.5, temperature=tau,
                             vocab_size=VOCAB, chunk_size=chunk, capacity=cap)[0]

    return {"unfused": unfused, "fused": fused}, cap


def compiled_step(fn, case: str, h, w):
    import jax

    t0 = time.perf_counter()
    step = jax.jit(jax.value_and_grad(fn, argnums=CASES[case])).lower(h, w).compile()
    return step, time.perf_counter() - t0


def timed(step, h, w) -> tuple[float, float, object]:
    import jax

    w0, c0 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(step(h, w))
    return time.perf_counter() - w0, time.process_time() - c0, out


def now_and_load() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg()[0]}


def stats(xs) -> dict:
    return {"min": float(np.min(xs)), "median": float(np.median(xs)), "all": [float(x) for x in xs]}


def phase_timing(args, x) -> dict:
    import jax.numpy as jnp

    h, w = jnp.asarray(x["h"]), jnp.asarray(x["w"])
    fns, cap = loss_fns(x, args.tau, args.chunk)
    out = {}
    for case in args.cases:
        steps, rec = {}, {}
        started = now_and_load()
        for impl, fn in fns.items():
            steps[impl], compile_s = compiled_step(fn, case, h, w)
            first = timed(steps[impl], h, w)  # warm-up
            rec[impl] = {"compile_s": compile_s, "warmup_s": first[0], "wall": [], "cpu": [],
                         "out": first[2]}
        for _ in range(args.reps):
            for impl in fns:
                wall, cpu, _ = timed(steps[impl], h, w)
                rec[impl]["wall"].append(wall)
                rec[impl]["cpu"].append(cpu)
        (lu, gu), (lf, gf) = rec["unfused"].pop("out"), rec["fused"].pop("out")
        grad_err = [float(jnp.abs(a - b).max() / jnp.abs(a).max()) for a, b in zip(gu, gf)]
        res = {impl: {"compile_s": r["compile_s"], "warmup_s": r["warmup_s"],
                      "wall_s": stats(r["wall"]), "cpu_s": stats(r["cpu"])} for impl, r in rec.items()}
        res["ratio_median_wall"] = res["fused"]["wall_s"]["median"] / res["unfused"]["wall_s"]["median"]
        res["ratio_min_wall"] = res["fused"]["wall_s"]["min"] / res["unfused"]["wall_s"]["min"]
        res["ratio_median_cpu"] = res["fused"]["cpu_s"]["median"] / res["unfused"]["cpu_s"]["median"]
        res["loss"] = {"unfused": float(lu), "fused": float(lf), "rel_diff": abs(float(lf - lu)) / abs(float(lu))}
        res["grad_max_rel_err"] = grad_err  # max |g_f - g_u| / max |g_u|, per differentiated input
        key = case if args.tau == 1.0 else f"{case}, tau {args.tau:g}"
        out[key] = {**res, **started, "tau": args.tau, "chunk": args.chunk}
        print(case, json.dumps(res), flush=True)
    return {"capacity": cap, "chunk": args.chunk, "tau": args.tau, "reps": args.reps, "cases": out}


def phase_sweep(args, x) -> dict:
    import jax.numpy as jnp

    h, w = jnp.asarray(x["h"]), jnp.asarray(x["w"])
    out = {}
    for case, chunk in [(c, k) for c in args.cases for k in args.sweep]:
        started = now_and_load()
        step, compile_s = compiled_step(loss_fns(x, args.tau, chunk)[0]["fused"], case, h, w)
        timed(step, h, w)
        walls, cpus = zip(*[timed(step, h, w)[:2] for _ in range(args.reps)])
        temp = step.memory_analysis().temp_size_in_bytes
        out[f"{case}:{chunk}:{args.tau:g}"] = {"case": case if args.tau == 1.0 else f"{case}, tau {args.tau:g}", "chunk": chunk, "wall_s": stats(walls), "cpu_s": stats(cpus),
                                  "temp_mb": temp / 1e6, "compile_s": compile_s, **started}
        print("chunk", case, chunk, json.dumps(out[f"{case}:{chunk}:{args.tau:g}"]), flush=True)
    return {"tau": args.tau, "reps": args.reps, "chunks": out}


def child(args) -> dict:
    import jax.numpy as jnp

    x = inputs(args)
    h, w = jnp.asarray(x["h"]), jnp.asarray(x["w"])
    if args.child == "baseline":
        return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    impl, case = args.child.split(":")
    step, _ = compiled_step(loss_fns(x, args.tau, args.chunk)[0][impl], case, h, w)
    ma = step.memory_analysis()
    for _ in range(2):
        timed(step, h, w)
    return {"temp_mb": ma.temp_size_in_bytes / 1e6, "argument_mb": ma.argument_size_in_bytes / 1e6,
            "output_mb": ma.output_size_in_bytes / 1e6,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def phase_memory(args) -> dict:
    out = {}
    for name in ["baseline"] + [f"{i}:{c}" for c in args.cases for i in ("unfused", "fused")]:
        cmd = [sys.executable, "-m", "evals.bench_kd_loss", "--child", name, *common_flags(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        out[name] = json.loads(line[-1][len("RESULT "):])
        print(name, json.dumps(out[name]), flush=True)
    return out


def common_flags(args) -> list[str]:
    flags = ["--batch", str(args.batch), "--seq", str(args.seq), "--answer", str(args.answer),
             "--tau", str(args.tau), "--chunk", str(args.chunk)]
    return flags + (["--real-head", args.real_head] if args.real_head else [])


def render(data: dict) -> str:
    meta = data["meta"]
    lines = ["# KD loss alone: fused vs unfused (CPU)", "",
             f"value_and_grad of alpha 0.5 CE + forward KL over top-{K}+tail from h [B, T, {D}] and "
             f"w [{V}, {D}] (real vocabulary {VOCAB}), batch {meta['batch']} x {meta['seq']}, "
             f"{meta['loss_positions']} loss positions ({meta['loss_fraction']:.0%}), inputs: "
             f"{meta['inputs']}. Machine: {meta['machine']}. This machine is SHARED with other "
             "jobs (the 1-minute load average when each measurement started is listed), so wall "
             "times are inflated and noisy; the timing phase interleaves the two implementations "
             "in one process so both see the same load, and process CPU seconds are given too.", ""]
    if "timing" in data:
        t = data["timing"]
        lines += [f"## Timing ({t['reps']} interleaved reps after a warm-up; chunk {t['chunk']}, "
                  f"capacity {t['capacity']})", "",
                  "| case | impl | wall s min | wall s median | CPU s median | compile s | "
                  "fused/unfused wall (median) | (min) | CPU (median) | load avg at start |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for case, r in t["cases"].items():
            for impl in ("unfused", "fused"):
                ratio = (f"{r['ratio_median_wall']:.3f} | {r['ratio_min_wall']:.3f} | {r['ratio_median_cpu']:.3f}"
                         if impl == "fused" else " | | ")
                lines.append(f"| {case} | {impl} | {r[impl]['wall_s']['min']:.2f} | "
                             f"{r[impl]['wall_s']['median']:.2f} | {r[impl]['cpu_s']['median']:.2f} | "
                             f"{r[impl]['compile_s']:.1f} | {ratio} | {r['load']:.1f} |")
        lines += [""] + [f"- {case}: loss rel diff {r['loss']['rel_diff']:.1e}, gradient max rel err "
                         + ", ".join(f"{e:.1e}" for e in r["grad_max_rel_err"]) for case, r in t["cases"].items()]
        lines.append("")
    if "sweep" in data:
        s = data["sweep"]
        lines += [f"## Chunk size (fused only, {s['reps']} reps after a warm-up each)", "",
                  "| case | chunk | wall s min | wall s median | CPU s median | temp MB | load avg at start |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(s["chunks"].values(), key=lambda r: (r["case"], r["chunk"], r["date"])):
            lines.append(f"| {r['case']} | {r['chunk']} | {r['wall_s']['min']:.2f} | {r['wall_s']['median']:.2f} | "
                         f"{r['cpu_s']['median']:.2f} | {r['temp_mb']:.0f} | {r['load']:.1f} |")
        lines.append("")
    if "memory" in data:
        mem = data["memory"]
        base = mem["runs"]["baseline"]["peak_rss_gb"]
        lines += [f"## Memory (one subprocess each, compile + 2 steps; {mem['date']})", "",
                  "XLA temp = the compiled step's scratch buffers (`memory_analysis()`); the baseline "
                  "child only builds the inputs (h, w, batch), so RSS above it is the step's own.", "",
                  "| run | XLA temp MB | arguments MB | outputs MB | peak RSS GB | above baseline GB |",
                  "|---|---|---|---|---|---|"]
        for name, r in mem["runs"].items():
            lines.append(f"| {name} | {r.get('temp_mb', 0):.0f} | {r.get('argument_mb', 0):.0f} | "
                         f"{r.get('output_mb', 0):.0f} | {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] - base:.2f} |")
        lines.append("")
    lines += ["Commands: " + "; ".join(f"`{c}`" for c in meta["commands"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["timing", "sweep", "memory", "all"], default="all")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=288)
    p.add_argument("--answer", type=int, default=158, help="loss positions per row (158/288 = 55%%)")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cases", default="frozen,trained")
    p.add_argument("--sweep", default="2048,4096,8192,16384,32768")
    p.add_argument("--real-head", default=None, help="model preset: real h and w instead of random")
    p.add_argument("--out", default=str(RESULTS / "bench_kd_loss"))
    p.add_argument("--child", default=None)
    args = p.parse_args()
    args.cases = args.cases.split(",")
    args.sweep = [int(c) for c in args.sweep.split(",")]
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    out = Path(args.out)
    path = out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.exists() else {}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = f"python -m evals.bench_kd_loss {' '.join(sys.argv[1:])}"
    meta = data.get("meta", {"commands": []})
    meta.update({"batch": args.batch, "seq": args.seq, "loss_positions": args.batch * args.answer,
                 "loss_fraction": args.answer / args.seq,
                 "inputs": f"real h and w from {args.real_head}" if args.real_head else "random (seeded)",
                 "machine": describe()})
    meta["commands"] = [c for c in meta["commands"] if c != cmd] + [cmd]
    data["meta"] = meta
    phases = ["timing", "sweep", "memory"] if args.phase == "all" else [args.phase]
    x = inputs(args) if set(phases) & {"timing", "sweep"} else None
    for ph in phases:
        res = {"timing": lambda: phase_timing(args, x), "sweep": lambda: phase_sweep(args, x),
               "memory": lambda: {"runs": phase_memory(args)}}[ph]()
        # a phase run for some cases / chunk sizes updates those and keeps the others
        inner = {"timing": "cases", "sweep": "chunks", "memory": "runs"}[ph]
        res[inner] = {**data.get(ph, {}).get(inner, {}), **res[inner]}
        data[ph] = {**res, "date": date}
        out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
