"""Throughput on an accelerator at the mission's shapes: Qwen2.5-1.5B student, Qwen2.5-7B teacher.

    python -m evals.bench_accel [--out DIR] [--deadline-s 520] [--tiny]

What a GPU/TPU user of jaxkd gets from the same code the CPU recipe runs, side by side with
PyTorch / transformers on the same machine, inputs and shapes:
- ceilings measured first: a bf16 8192^3 matrix product and a large device copy (read + write),
- decode (``models.generate.Generator``, greedy, every row runs its whole budget): the 1.5B at
  batch 1 / 32 / 128, the 7B at batch 1 / 32, and the 7B at batch 32 capturing the top-16
  log-probs per token as the teacher stage does; transformers' ``generate`` on the 1.5B at batch 32,
- one KD step (the recipe's step: fused head over loss positions, one global norm, AdamW, the
  embeddings and head frozen; bf16 compute, float32 parameters and optimizer) of the 1.5B at
  8 x 1024 tokens, 55% of them loss positions, against the same loss in PyTorch eager under
  bf16 autocast.
Weights are random (the figures do not depend on their values; the shapes are the released
models'), and no row stops early: the models have no EOS id here.

Every section runs in its own process (own memory, own compile cache) with at least 5 timed
repetitions after a warm-up; each figure is reported as min and median. Model FLOPs follow the
usual accounting (2 FLOPs per multiply-add; training 6N per token for the trained matrices plus
12 * layers * heads * head_dim * T for attention over the full T x T window, which is what the
einsum attention computes; the frozen head 4 * d * V per loss position: forward and input
gradient). Decode's floor per step is the weights plus the filled KV window read once
(bytes / measured copy rate) or its FLOPs at the measured matmul rate, whichever is larger.
``--tiny`` runs every section on a tiny model on whatever JAX finds (the test suite's check).
Writes OUT/bench_accel.{json,md} after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from evals.bench_kd_step import ALPHA, TOPK, make_batch, time_jax_kd, time_torch_kd

RESULTS = Path(__file__).resolve().parent / "results"

# The released models' architectures (their config.json): the bench builds them from these, as
# the device machine cannot reach the hub. tests/test_bench_accel.py checks the 1.5B against the
# packaged weights' config.
SHAPES = {
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, rope_theta=1e6, qkv_bias=True, tie_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                       num_heads=28, num_kv_heads=4, rope_theta=1e6, qkv_bias=True, tie_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, rope_theta=1e6, qkv_bias=True, tie_embeddings=True),
}
DATASHEET = {"bf16_tflops": 989.0, "hbm_gbps": 4800.0, "name": "H200 SXM datasheet"}


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def model_config(name: str):
    from jaxkd.config import ModelConfig

    return ModelConfig(**SHAPES[name])


def matmul_params(cfg) -> dict[str, int]:
    """Weights that take part in matrix products: per token, the body's (all layers) and the head's."""
    hd, d = cfg.head_size, cfg.hidden_size
    layer = d * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * d + 3 * d * cfg.intermediate_size
    return {"body": cfg.num_layers * layer, "head": d * cfg.vocab_size}


def kd_step_flops(cfg, batch: int, seq: int, loss_positions: int) -> float:
    """Model FLOPs of one KD step: body trained (6N per token) with full-window attention, the
    frozen head on the loss positions only (forward + input gradient)."""
    n = matmul_params(cfg)
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq
    return batch * seq * (6 * n["body"] + attn) + 4 * n["head"] * batch * loss_positions


def decode_floor(cfg, batch: int, ctx: float, bytes_per_s: float, flops_per_s: float) -> dict[str, float]:
    """Least time of one decode step at mean filled context ``ctx``: bf16 weights and KV window
    read once, or the step's FLOPs at the matmul rate, whichever is larger."""
    n = matmul_params(cfg)
    weight_bytes = 2 * (n["body"] + n["head"])
    kv_bytes = batch * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_size * ctx * 2
    flops = batch * (2 * (n["body"] + n["head"]) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_size * ctx)
    t_bytes, t_flops = (weight_bytes + kv_bytes) / bytes_per_s, flops / flops_per_s
    return {"step_floor_s": max(t_bytes, t_flops), "bytes": weight_bytes + kv_bytes, "flops": flops,
            "bound": "memory" if t_bytes >= t_flops else "compute"}


def stats(xs) -> dict[str, float]:
    return {"min": float(np.min(xs)), "median": float(np.median(xs)), "n": len(xs)}


# --------------------------------------------------------------------------------------------
# Sections (each runs in a child process and prints one RESULT line)
# --------------------------------------------------------------------------------------------


def _timed(f, *args, reps: int) -> list[float]:
    """Wall seconds of ``reps`` calls of ``f(*args)`` (each waited for) after one warm-up call."""
    import jax

    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return times


def _device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def _peak_device_gb() -> float | None:
    import jax

    try:
        return jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30
    except Exception:  # CPU devices keep no stats
        return None


def section_ceilings(a) -> dict:
    import jax
    import jax.numpy as jnp

    n = 256 if a.tiny else 8192
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (n, n), jnp.bfloat16)
    y = jax.random.normal(k2, (n, n), jnp.bfloat16)
    times = _timed(jax.jit(lambda x, y: x @ y), x, y, reps=a.reps * 2)
    # Device copy rate: one read + one write of 4 GiB, as an elementwise op in bf16 and in f32;
    # the faster variant is the ceiling (XLA's bf16 elementwise kernels can lag the f32 ones).
    copies = {}
    for dtype, elems in (("bfloat16", 1 << 31), ("float32", 1 << 30)):
        elems = (1 << 20) if a.tiny else elems
        z = jax.random.normal(k1, (elems,), dtype)
        ctimes = _timed(jax.jit(lambda z: z * 2), z, reps=a.reps * 2)
        nbytes = 2 * elems * z.dtype.itemsize
        copies[dtype] = {"bytes": nbytes, "s": stats(ctimes), "gbps_best": nbytes / min(ctimes) / 1e9,
                         "gbps_median": nbytes / np.median(ctimes) / 1e9}
        del z
    best = max(copies.values(), key=lambda c: c["gbps_best"])
    return {"device": _device_name(), "matmul_n": n, "matmul_s": stats(times),
            "bf16_tflops_best": 2 * n**3 / min(times) / 1e12, "bf16_tflops_median": 2 * n**3 / np.median(times) / 1e12,
            "copy": copies, "copy_gbps_best": best["gbps_best"], "copy_gbps_median": best["gbps_median"]}


def section_attention(a) -> dict:
    """One layer's attention, forward + backward, at the KD step's shapes: jaxkd's einsum
    attention vs ``jax.nn.dot_product_attention`` (XLA and cuDNN), causal, bf16."""
    import jax
    import jax.numpy as jnp

    from jaxkd.models.layers import fused_attention, gqa_attention

    cfg = model_config(a.model)
    b, t, n, k, h = a.batch, a.seq, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(ks[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, k, h), jnp.bfloat16)
    cot = jax.random.normal(ks[3], (b, t, n, h), jnp.bfloat16)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

    def ours(q, kk, v):
        return gqa_attention(q, jnp.swapaxes(kk, 1, 2), jnp.swapaxes(v, 1, 2), mask, jnp.bfloat16)

    impls = {"jaxkd einsum (gqa_attention)": ours}
    for impl in (None, "cudnn"):
        impls[f"jax.nn.dot_product_attention({impl or 'auto'})"] = (
            lambda q, kk, v, impl=impl: jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation=impl))
    # what jaxkd's packed batches need: an explicit [B, 1, T, S] mask (causal within segments),
    # as train.attention=cudnn runs it
    impls["jax.nn.dot_product_attention(cudnn, explicit mask)"] = (
        lambda q, kk, v: fused_attention(q, kk, v, mask, jnp.bfloat16, "cudnn"))
    ref = ours(q, kk, v).astype(jnp.float32)
    rows = {}
    for name, f in impls.items():
        try:
            step = jax.jit(jax.value_and_grad(lambda q, kk, v, f=f: jnp.vdot(f(q, kk, v).astype(jnp.float32),
                                                                            cot.astype(jnp.float32)),
                                              argnums=(0, 1, 2)))
            times = _timed(step, q, kk, v, reps=a.reps * 2)
            out = jax.jit(f)(q, kk, v).astype(jnp.float32)
            rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            rows[name] = {"fwd_bwd_s": stats(times), "rel_err_vs_jaxkd": rel}
        except Exception as e:  # cuDNN absent (CPU) or shape unsupported: say so
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"device": _device_name(), "model": a.model, "batch": b, "seq": t, "layers": cfg.num_layers, "rows": rows}


class _NoEosTokenizer:
    """What ``Generator`` reads from a tokenizer, with no EOS: every row decodes its whole budget."""

    eos_token_id = None
    generation_eos_ids = ()
    pad_token_id = 0

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab


def section_decode(a) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxkd.config import SamplingConfig
    from jaxkd.models import build_decoder
    from jaxkd.models.generate import Generator

    cfg = model_config(a.model)
    t0 = time.perf_counter()
    model = build_decoder(cfg, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    init_s = time.perf_counter() - t0
    # one cache window for prompt + budget: one decode shape per batch size
    span = a.prompt + a.new + 8
    gen = Generator(model, _NoEosTokenizer(cfg.vocab_size), max_seq_len=span, prompt_bucket=64,
                    window_bucket=span, compact=False)
    sampling = SamplingConfig(max_new_tokens=a.new, temperature=0.0)
    rng = np.random.default_rng(0)
    rows = {}
    for b in a.batches:
        prompts = [list(rng.integers(1, min(cfg.vocab_size, 20000), a.prompt)) for _ in range(b)]
        t = time.perf_counter()
        gen.generate(prompts, sampling, topk=a.topk)  # compile prefill + decode
        compile_s = time.perf_counter() - t
        dec, tot, pre = [], [], []
        for _ in range(a.reps):
            t = time.perf_counter()
            out = gen.generate(prompts, sampling, topk=a.topk)
            total = time.perf_counter() - t
            assert out.new_tokens == b * a.new, (out.new_tokens, b, a.new)
            dec.append((out.new_tokens - b) / out.decode_s)  # tokens from decode steps / decode time
            tot.append(out.new_tokens / total)
            pre.append(out.prefill_s)
        rows[str(b)] = {"batch": b, "decode_tok_s": stats(dec), "total_tok_s": stats(tot), "prefill_s": stats(pre),
                        "first_call_s": compile_s}
        print(f"decode {a.model} batch {b} topk {a.topk}: {np.median(dec):.0f} tok/s", file=sys.stderr, flush=True)
    return {"device": _device_name(), "model": a.model, "init_s": init_s, "prompt": a.prompt, "new": a.new,
            "topk": a.topk, "rows": rows, "peak_device_gb": _peak_device_gb(), "jax": jax.__version__}


def section_kd(a) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxkd.models import build_decoder

    cfg = model_config(a.model)
    model = build_decoder(cfg, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    model.set_attention(a.attention)  # train.attention
    out = time_jax_kd(model, cfg.vocab_size, batch=a.batch, seq=a.seq, answer=a.answer, steps=a.reps,
                      chunk=a.chunk, remat=a.remat)
    what = "jaxkd KD step" + (f", train.attention {a.attention}" if a.attention != "einsum" else "")
    return {"device": _device_name(), "model": a.model, "framework": f"jax {jax.__version__} ({what})",
            "chunk": a.chunk, "remat": a.remat, "attention": a.attention, **out, "peak_device_gb": _peak_device_gb()}


def _torch_model(name: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = SHAPES[name]
    hf = Qwen2Config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                     num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                     num_key_value_heads=s["num_kv_heads"], rope_theta=s["rope_theta"],
                     tie_word_embeddings=s["tie_embeddings"], eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(_torch_device()):
        return Qwen2ForCausalLM(hf).to(dtype)


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_peak_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def section_torch_kd(a) -> dict:
    import torch

    dev = _torch_device()
    model = _torch_model(a.model, torch.float32)
    vocab = SHAPES[a.model]["vocab_size"]
    out = time_torch_kd(model, vocab, make_batch(vocab, a.batch, a.seq, a.answer), a.reps, device=dev,
                        autocast_dtype=torch.bfloat16)
    return {"device": f"torch:{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}", "model": a.model,
            "framework": f"torch {torch.__version__} (eager, bf16 autocast, "
                         f"{getattr(model.config, '_attn_implementation', '?')} attention)",
            **out, "peak_device_gb": _torch_peak_gb()}


def section_torch_decode(a) -> dict:
    import torch

    dev = _torch_device()
    model = _torch_model(a.model, torch.bfloat16).eval()
    vocab = SHAPES[a.model]["vocab_size"]
    rng = np.random.default_rng(0)
    rows = {}
    for b in a.batches:
        ids = torch.from_numpy(rng.integers(1, min(vocab, 20000), (b, a.prompt))).to(dev)
        kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(ids, **kw)
            first = time.perf_counter() - t
            tot = []
            for _ in range(a.reps):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = model.generate(ids, **kw)
                if dev == "cuda":
                    torch.cuda.synchronize()
                tot.append((out.shape[1] - a.prompt) * b / (time.perf_counter() - t))
        rows[str(b)] = {"batch": b, "total_tok_s": stats(tot), "first_call_s": first}
    return {"device": f"torch:{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}", "model": a.model,
            "framework": f"transformers generate (torch {torch.__version__}, bf16, greedy)", "prompt": a.prompt,
            "new": a.new, "rows": rows, "peak_device_gb": _torch_peak_gb()}


SECTIONS = {"ceilings": section_ceilings, "attention": section_attention, "decode": section_decode, "kd": section_kd,
            "torch_kd": section_torch_kd, "torch_decode": section_torch_decode}


# --------------------------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------------------------


def plan(tiny: bool) -> list[tuple[str, str, list[str]]]:
    """(key, section, extra child args) in order of importance: a run cut short keeps the first."""
    s, t = ("tiny", "tiny") if tiny else ("qwen2.5-1.5b", "qwen2.5-7b")
    kd = ["--model", s, "--batch", "2" if tiny else "8", "--seq", "64" if tiny else "1024",
          "--answer", "35" if tiny else "563"]
    dec = ["--prompt", "32" if tiny else "128", "--new", "16" if tiny else "256"]
    return [
        ("ceilings", "ceilings", []),
        ("kd_jax", "kd", kd + ["--chunk", "2048"]),
        ("kd_torch", "torch_kd", kd),
        ("decode_student", "decode", ["--model", s, "--batches", "1", "32", "128"] + dec),
        ("decode_teacher", "decode", ["--model", t, "--batches", "1", "32"] + dec),
        ("decode_teacher_topk", "decode", ["--model", t, "--batches", "32", "--topk", str(TOPK)] + dec),
        ("decode_student_torch", "torch_decode", ["--model", s, "--batches", "32"] + dec),
        ("kd_jax_chunk16k", "kd", kd + ["--chunk", "16384"]),
        ("kd_jax_remat_dots", "kd", kd + ["--chunk", "16384", "--remat", "dots"]),
        ("attention", "attention", kd[:-2]),
        ("kd_jax_cudnn_attention", "kd", kd + ["--chunk", "16384", "--attention", "cudnn"]),
    ]


def run_children(a) -> dict:
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tiny": a.tiny,
                              "command": "python -m evals.bench_accel " + " ".join(sys.argv[1:]),
                              "machine": _machine(), "reps": a.reps}, "sections": {}, "skipped": {}}
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    if a.only:
        old = json.loads((out_dir / "bench_accel.json").read_text())
        results["sections"] = {k: v for k, v in old["sections"].items() if k not in a.only}
        results["meta"].update({k: v for k, v in old["meta"].items() if k not in results["meta"]})
    for key, section, extra in plan(a.tiny):
        if a.only and key not in a.only:
            continue
        left = a.deadline_s - (time.perf_counter() - t_start)
        if left < 30:
            results["skipped"][key] = f"deadline ({a.deadline_s} s) reached"
            continue
        cmd = [sys.executable, "-m", "evals.bench_accel", "--child", section, "--reps", str(a.reps)] + extra
        cmd += ["--tiny"] if a.tiny else []
        print(f"[{time.perf_counter() - t_start:5.0f}s] {key}: {' '.join(cmd[2:])}", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=left)
            line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
            if proc.returncode or not line:
                results["skipped"][key] = f"failed (rc {proc.returncode}): {proc.stderr[-1500:]}"
            else:
                results["sections"][key] = json.loads(line[-1][len("RESULT "):])
                results["sections"][key]["run"] = {k: results["meta"][k] for k in ("date", "command", "machine")}
        except subprocess.TimeoutExpired:
            results["skipped"][key] = f"killed at the deadline ({a.deadline_s} s)"
        print(f"  -> {'ok' if key in results['sections'] else results['skipped'][key][-600:]}", flush=True)
        write(results, out_dir)
    return results


def _machine() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    from jaxkd.machine import describe

    return f"{gpu or 'no NVIDIA GPU'}; host: {describe()}"


def _f(x: float, nd: int = 0) -> str:
    return f"{x:,.{nd}f}"


def report(results: dict) -> list[str]:
    sec = results["sections"]
    meta = results["meta"]
    lines = ["# jaxkd on an accelerator: decode, teacher top-k capture and the KD step at the mission's shapes", "",
             f"Machine: {meta['machine']}. {meta['date']}. Random weights with the released models' shapes "
             f"(Qwen2.5-1.5B student, Qwen2.5-7B teacher); every figure min / median of {meta['reps']}+ timed "
             "repetitions after a warm-up, each section in its own process (evals/bench_accel.py says what is "
             "counted).", ""]
    runs: dict[tuple, list[str]] = {}
    for key, r in sec.items():
        run = r.get("run", meta)
        runs.setdefault((run["date"], run["command"]), []).append(key)
    if len(runs) > 1:
        lines += ["Sections by run (the machine goes back between runs; each run started a fresh one):", ""]
        lines += [f"- {date}, `{cmd}`: {', '.join(keys)}" for (date, cmd), keys in runs.items()] + [""]
    else:
        lines += [f"Command: `{meta['command']}`", ""]
    ceil = sec.get("ceilings")
    if ceil:
        lines += [f"Ceilings measured here: bf16 {ceil['matmul_n']}^3 matrix product **{_f(ceil['bf16_tflops_best'])} "
                  f"TFLOP/s** best ({_f(ceil['bf16_tflops_median'])} median; datasheet {_f(DATASHEET['bf16_tflops'])}); "
                  f"device copy **{_f(ceil['copy_gbps_best'])} GB/s** best, read + write "
                  f"({_f(ceil['copy_gbps_median'])} median; datasheet {_f(DATASHEET['hbm_gbps'])})."]
        if "first_run_ceilings" in meta:
            c = meta["first_run_ceilings"]
            lines[-1] += (f" The first run's machine measured {_f(c['bf16_tflops_best'])} TFLOP/s and, as a bf16 "
                          f"elementwise op only, {_f(c['copy_gbps_best_bf16_only'])} GB/s (best).")
        lines.append("")
        peak, bw = ceil["bf16_tflops_best"] * 1e12, ceil["copy_gbps_best"] * 1e9
    else:
        peak, bw = DATASHEET["bf16_tflops"] * 1e12, DATASHEET["hbm_gbps"] * 1e9
    kd_keys = [k for k in ("kd_jax", "kd_jax_chunk16k", "kd_jax_remat_dots", "kd_jax_cudnn_attention", "kd_torch")
               if k in sec]
    if kd_keys:
        r0 = sec[kd_keys[0]]
        cfg = model_config(r0["model"])
        b, t, p = _kd_shape(meta)
        flops = kd_step_flops(cfg, b, t, p)
        lines += [f"## One KD step: {r0['model']}, {b} x {t} tokens, {p} loss positions per row, top-{TOPK} KD + CE "
                  f"(alpha {ALPHA}), AdamW, embeddings and head frozen", "",
                  f"Model FLOPs per step: {flops / 1e12:.1f} T. MFU against the measured matmul rate (from the ceilings "
                  "section's run) and the datasheet.", "",
                  "| run | step s min | median | tokens/s (median) | MFU measured peak | MFU datasheet | first step s | peak device GB | first loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in kd_keys:
            r = sec[k]
            med, mn = float(np.median(r["step_s"])), float(np.min(r["step_s"]))
            name = r["framework"] + (f", chunk {r['chunk']}, remat {r['remat']}" if "chunk" in r else "")
            pk = r.get("peak_device_gb")
            lines.append(f"| {name} | {mn:.3f} | {med:.3f} | {_f(b * t / med)} | {flops / med / peak:.1%} | "
                         f"{flops / med / (DATASHEET['bf16_tflops'] * 1e12):.1%} | {r['first_step_s']:.1f} | "
                         f"{'-' if pk is None else f'{pk:.1f}'} | {r['losses'][0]:.4f} |")
        if "kd_torch" in sec:
            tm = float(np.median(sec["kd_torch"]["step_s"]))
            lines += [""] + [f"- {k} / PyTorch median step: **{float(np.median(sec[k]['step_s'])) / tm:.3f}**"
                             if _same_run(sec[k], sec["kd_torch"]) else
                             f"- {k}: measured in another run than PyTorch's (another machine start): no ratio"
                             for k in kd_keys if k != "kd_torch"]
            lines.append("- Same model shapes and batch, but not the same random weights in the two frameworks: "
                         "first losses are not comparable here (bench_kd_step.py cross-checks them on real weights).")
        lines.append("")
    dec_keys = [k for k in ("decode_student", "decode_teacher", "decode_teacher_topk", "decode_student_torch") if k in sec]
    if dec_keys:
        r0 = sec[dec_keys[0]]
        lines += [f"## Decode: prompt {r0['prompt']} tokens, {r0['new']} new tokens per row, greedy", "",
                  "Floor: bf16 weights + the filled KV window read once per step at the measured copy rate, or the "
                  "step's FLOPs at the measured matmul rate (whichever is larger).", "",
                  "| model | run | batch | decode tok/s min | median | of floor (median) | floor bound | "
                  "end-to-end tok/s median | prefill s median | peak device GB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k in dec_keys:
            r = sec[k]
            cfg = model_config(r["model"])
            what = r.get("framework") or (f"jaxkd Generator" + (f", top-{r['topk']} captured" if r.get("topk") else ""))
            for row in r["rows"].values():
                pk = r.get("peak_device_gb")
                pk = "-" if pk is None else f"{pk:.1f}"
                fl = decode_floor(cfg, row["batch"], r["prompt"] + r["new"] / 2, bw, peak)
                roof = row["batch"] / fl["step_floor_s"]
                if "decode_tok_s" in row:
                    d = row["decode_tok_s"]
                    lines.append(f"| {r['model']} | {what} | {row['batch']} | {_f(d['min'])} | {_f(d['median'])} | "
                                 f"{d['median'] / roof:.0%} | {fl['bound']} | {_f(row['total_tok_s']['median'])} | "
                                 f"{row['prefill_s']['median']:.3f} | {pk} |")
                else:
                    lines.append(f"| {r['model']} | {what} | {row['batch']} | - | - | - | {fl['bound']} | "
                                 f"{_f(row['total_tok_s']['median'])} | - | {pk} |")
        if "decode_student_torch" in sec and "decode_student" in sec:
            for bs, row in sec["decode_student_torch"]["rows"].items():
                if bs in sec["decode_student"]["rows"] and _same_run(sec["decode_student"], sec["decode_student_torch"]):
                    ratio = (sec["decode_student"]["rows"][bs]["total_tok_s"]["median"] / row["total_tok_s"]["median"])
                    lines.append(f"\n- jaxkd / transformers end-to-end tok/s, {sec['decode_student']['model']} batch {bs}: "
                                 f"**{ratio:.2f}x**")
        if "decode_teacher_topk" in sec and "decode_teacher" in sec:
            for bs, row in sec["decode_teacher_topk"]["rows"].items():
                if bs in sec["decode_teacher"]["rows"] and _same_run(sec["decode_teacher"], sec["decode_teacher_topk"]):
                    ratio = row["decode_tok_s"]["median"] / sec["decode_teacher"]["rows"][bs]["decode_tok_s"]["median"]
                    lines.append(f"- {sec['decode_teacher']['model']} batch {bs}: decode with top-{TOPK} capture runs at "
                                 f"{ratio:.2f}x the plain rate")
        lines.append("")
    att = sec.get("attention")
    if att:
        lines += [f"## Attention alone: one layer forward + backward, {att['model']}, {att['batch']} x {att['seq']}, causal, bf16", "",
                  "| implementation | fwd+bwd ms min | median | x layers, ms (median) | rel. error vs jaxkd un-jitted |",
                  "|---|---|---|---|---|"]
        for name, r in att["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | not run: {r['error'][:120]} | | | |")
                continue
            med = r["fwd_bwd_s"]["median"]
            lines.append(f"| {name} | {r['fwd_bwd_s']['min'] * 1e3:.2f} | {med * 1e3:.2f} | "
                         f"{med * 1e3 * att['layers']:.1f} | {r['rel_err_vs_jaxkd']:.1e} |")
        lines.append("")
    if results["skipped"]:
        lines += ["## Not measured in this run", ""] + [f"- {k}: {v.splitlines()[-1] if v.strip() else v}"
                                                      for k, v in results["skipped"].items()] + [""]
    return lines


def _same_run(x: dict, y: dict) -> bool:
    """Whether two sections were measured in one run: only then is their ratio side by side."""
    return x.get("run") == y.get("run")


def _kd_shape(meta: dict) -> tuple[int, int, int]:
    for key, section, extra in plan(meta["tiny"]):
        if section == "kd":
            x = dict(zip(extra[::2], extra[1::2]))
            return int(x["--batch"]), int(x["--seq"]), int(x["--answer"])
    raise RuntimeError("no kd section in the plan")


def write(results: dict, out_dir: Path) -> None:
    (out_dir / "bench_accel.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench_accel.md").write_text("\n".join(report(results)) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS), help="where bench_accel.{json,md} go")
    p.add_argument("--deadline-s", type=float, default=520.0,
                   help="start no section after this many seconds; a running one is killed at it")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (>= 5 for a reported figure)")
    p.add_argument("--tiny", action="store_true", help="a tiny model on whatever device JAX finds (smoke test)")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from OUT/bench_accel.json")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these sections (keys of plan()), keeping OUT/bench_accel.json's others")
    # the child's
    p.add_argument("--child", choices=sorted(SECTIONS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="qwen2.5-1.5b", help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, nargs="+", default=[1], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--answer", type=int, default=563, help=argparse.SUPPRESS)
    p.add_argument("--prompt", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--new", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--topk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--remat", default="none", help=argparse.SUPPRESS)
    p.add_argument("--attention", choices=["einsum", "xla", "cudnn"], default="einsum", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        try:
            out = SECTIONS[a.child](a)
        except Exception:
            traceback.print_exc()
            return 1
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    if a.report_only:
        results = json.loads((Path(a.out) / "bench_accel.json").read_text())
        write(results, Path(a.out))
    else:
        results = run_children(a)
    print("\n".join(report(results)))
    return 0 if results["sections"] else 1


if __name__ == "__main__":
    sys.exit(main())
