"""Generation throughput: jaxkd ``Generator`` vs transformers ``generate`` on the same model.

    python -m evals.bench_generate --model qwen2.5-coder-0.5b-instruct

Same GGUF weights (jaxkd reads its cached float32 HF conversion; transformers loads the GGUF
file itself with ``gguf_file=``), same chat-formatted troubleshooting prompts, same machine,
greedy, float32, exactly ``--new-tokens`` tokens per row (EOS is ignored on both sides), batch 1
and batch 8, in one run. Each figure is also given as a share of the weight-streaming roofline:
every decode step reads every weight once except the embedding table (a row gather), so
``roofline tok/s = batch * bandwidth / bytes_per_step`` with the read bandwidth measured here.
Writes ``evals/results/bench_generate.{json,md}``. Run it alone (``flock /tmp/jaxkd-bigmem.lock``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

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
RESULTS = Path(__file__).resolve().parent / "results"


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth (GB/s): best of ``repeats`` full reductions of a ``gib`` GiB array,
    with numpy (one thread) and with a jitted jax sum (XLA's CPU threads)."""
    import jax
    import jax.numpy as jnp

    n = int(gib * (1 << 30)) // 4
    x_np = np.random.default_rng(0).random(n, dtype=np.float32)
    best_np = min(_timed(lambda: x_np.sum(dtype=np.float32)) for _ in range(repeats))
    x_j = jnp.asarray(x_np)
    del x_np
    f = jax.jit(lambda a: jnp.sum(a))
    f(x_j).block_until_ready()
    best_j = min(_timed(lambda: f(x_j).block_until_ready()) for _ in range(repeats))
    del x_j
    return {"numpy_GBps": n * 4 / best_np / 1e9, "jax_GBps": n * 4 / best_j / 1e9, "array_GiB": gib}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_step(model) -> tuple[int, int]:
    """(bytes of weights read per decode step, total parameter bytes)."""
    import jax
    from flax import nnx

    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    emb = model.embed_tokens.weight[...]
    gathered = emb.size * emb.dtype.itemsize if model.lm_head is not None else 0  # tied: head reads it
    return total - gathered, total


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    from jaxkd.data.formatting import SYSTEM_PROMPT

    out = []
    for q in (QUESTIONS * ((n + len(QUESTIONS) - 1) // len(QUESTIONS)))[:n]:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                             {"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append([int(i) for i in ids])
    return out


def bench_jaxkd(model_name: str, batch_sizes: Sequence[int], new_tokens: int) -> dict[str, Any]:
    from jaxkd.config import SamplingConfig
    from jaxkd.models import load_pretrained
    from jaxkd.models.generate import Generator

    t0 = time.perf_counter()
    pre = load_pretrained(model_name, param_dtype="float32", compute_dtype="float32")
    load_s = time.perf_counter() - t0
    step_bytes, total_bytes = weight_bytes_per_step(pre.model)
    gen = Generator(pre.model, pre.tokenizer, max_seq_len=1024, prompt_bucket=64)
    gen.eos_ids = frozenset()  # benchmark: always generate exactly new_tokens per row
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    out: dict[str, Any] = {"load_s": load_s, "weight_bytes_per_step": step_bytes,
                           "param_bytes": total_bytes, "hf_dir": str(pre.hf_dir), "runs": {}}
    for b in batch_sizes:
        prompts = chat_prompts(pre.tokenizer, b)
        t = time.perf_counter()
        gen.generate(prompts, sampling)  # compile (or load from the persistent cache) + warm
        warm_s = time.perf_counter() - t
        t = time.perf_counter()
        res = gen.generate(prompts, sampling)
        wall = time.perf_counter() - t
        assert all(len(tk) == new_tokens for tk in res.tokens), [len(tk) for tk in res.tokens]
        out["runs"][b] = _figures(b, new_tokens, wall, res.prefill_s, res.decode_s,
                                  first_row=pre.tokenizer.decode(res.tokens[0][:40]), warm_s=warm_s,
                                  prompt_lens=[len(p) for p in prompts])
        print(f"jaxkd b={b}: {out['runs'][b]['decode_tok_s']:.2f} tok/s decode", file=sys.stderr)
    del gen, pre
    gc.collect()
    return out


def bench_transformers(hf_dir: str, gguf_path: Path, batch_sizes: Sequence[int],
                       new_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(hf_dir)  # the same tokenizer jaxkd uses
    tok.padding_side = "left"
    out: dict[str, Any] = {"load_s": load_s, "torch_threads": torch.get_num_threads(), "runs": {}}

    def run(prompts: list[list[int]], n: int) -> tuple[float, Any]:
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
        t = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t, seq[:, batch["input_ids"].shape[1]:]

    for b in batch_sizes:
        prompts = chat_prompts(tok, b)
        run(prompts, 4)  # warm
        prefill_s = min(run(prompts, 1)[0] for _ in range(2))
        wall, seq = run(prompts, new_tokens)
        assert seq.shape == (b, new_tokens), seq.shape
        out["runs"][b] = _figures(b, new_tokens, wall, prefill_s, wall - prefill_s,
                                  first_row=tok.decode(seq[0][:40]),
                                  prompt_lens=[len(p) for p in prompts])
        print(f"transformers b={b}: {out['runs'][b]['decode_tok_s']:.2f} tok/s decode", file=sys.stderr)
    del model
    gc.collect()
    return out


def _figures(b: int, n: int, wall: float, prefill_s: float, decode_s: float, **extra) -> dict:
    return {"batch": b, "new_tokens_per_row": n, "wall_s": wall, "prefill_s": prefill_s,
            "decode_s": decode_s, "end_to_end_tok_s": b * n / wall,
            "decode_tok_s": b * (n - 1) / decode_s, **extra}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
        simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if f" {f}" in flags]
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration):
        simd, mem_kb = [], 0
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "gguf"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "simd": simd, "cores": os.cpu_count(), "ram_GiB": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def write_markdown(res: dict[str, Any], path: Path) -> None:
    m, bw = res["machine"], res["bandwidth"]
    j, h = res["jaxkd"], res["transformers"]
    lines = [
        "# Generation benchmark: jaxkd vs transformers",
        "",
        f"Command: `{res['command']}` ({res['date']})",
        "",
        f"Model: {res['model']} (GGUF Q4_K_M dequantised to float32; both sides use the same weights), "
        f"greedy, {res['new_tokens']} new tokens per row (EOS ignored), chat-formatted "
        f"troubleshooting prompts of {', '.join(map(str, j['runs'][max(j['runs'])]['prompt_lens']))} tokens.",
        "",
        f"Machine: {m['cpu']} ({', '.join(m['simd'])}), {m['cores']} cores, {m['ram_GiB']} GiB RAM, "
        f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        f"Measured memory read bandwidth: {bw['jax_GBps']:.1f} GB/s (jitted jax sum over "
        f"{bw['array_GiB']} GiB), {bw['numpy_GBps']:.1f} GB/s (numpy, one thread); the roofline "
        f"uses the higher, {res['roofline_GBps']:.1f} GB/s. Weights read per decode step: "
        f"{j['weight_bytes_per_step'] / 1e9:.3f} GB (all parameters {j['param_bytes'] / 1e9:.3f} GB "
        f"minus the embedding table, which is gathered).",
        "",
        "| batch | roofline tok/s | jaxkd decode tok/s | share of roofline | transformers decode tok/s "
        "| share of roofline | jaxkd / transformers | jaxkd end-to-end tok/s | transformers end-to-end tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in res["batch_sizes"]:
        jr, hr, roof = j["runs"][b], h["runs"][b], res["roofline_tok_s"][b]
        lines.append(
            f"| {b} | {roof:.2f} | {jr['decode_tok_s']:.2f} | {jr['decode_tok_s'] / roof:.0%} | "
            f"{hr['decode_tok_s']:.2f} | {hr['decode_tok_s'] / roof:.0%} | "
            f"{jr['decode_tok_s'] / hr['decode_tok_s']:.2f}x | {jr['end_to_end_tok_s']:.2f} | "
            f"{hr['end_to_end_tok_s']:.2f} |")
    lines += [
        "",
        "Decode tok/s = batch x (new tokens - 1) / time after the first token; transformers' prefill "
        "time is measured as a separate 1-token generate. End-to-end includes prefill.",
        f"Targets (not test assertions): >= 1.3x transformers at batch 1, >= 2x at batch 8, batch-1 "
        f">= 80% of roofline. Load: jaxkd {j['load_s']:.1f} s (cached HF conversion), "
        f"transformers {h['load_s']:.1f} s (parses + dequantises the GGUF); torch threads "
        f"{h['torch_threads']}.",
        "",
        f"First row, jaxkd: {j['runs'][1]['first_row']!r}",
        "",
        f"First row, transformers: {h['runs'][1]['first_row']!r}",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.bench_generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a packaged preset name")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_generate")
    args = ap.parse_args(argv)

    from jaxkd import assets
    from jaxkd.config import WeightSource, load_model_spec

    spec = load_model_spec(args.model)
    if spec.source != WeightSource.PACKAGED:
        raise SystemExit(f"--model must be a packaged (GGUF) preset so both sides load the same file; "
                         f"{spec.name} is {spec.source.value}")
    gguf_path = assets.asset_path(spec.location)
    bw = measure_bandwidth()
    print(f"bandwidth: {bw}", file=sys.stderr)
    jx = bench_jaxkd(spec.name, args.batch_sizes, args.new_tokens)
    hf = bench_transformers(jx["hf_dir"], gguf_path, args.batch_sizes, args.new_tokens)
    roof_bw = max(bw["jax_GBps"], bw["numpy_GBps"])
    res = {
        "command": "python -m evals.bench_generate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": spec.name, "gguf": spec.location, "new_tokens": args.new_tokens,
        "batch_sizes": args.batch_sizes, "machine": machine(), "bandwidth": bw, "roofline_GBps": roof_bw,
        "roofline_tok_s": {b: b * roof_bw * 1e9 / jx["weight_bytes_per_step"] for b in args.batch_sizes},
        "jaxkd": jx, "transformers": hf,
        "ratio_decode": {b: jx["runs"][b]["decode_tok_s"] / hf["runs"][b]["decode_tok_s"]
                         for b in args.batch_sizes},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    if 1 in args.batch_sizes:
        write_markdown(res, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text() if 1 in args.batch_sizes else json.dumps(res["ratio_decode"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
