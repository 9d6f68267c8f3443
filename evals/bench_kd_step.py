"""One KD train step, jaxkd vs a straightforward PyTorch implementation, same model, loss and batch.

    python -m evals.bench_kd_step [--model qwen2.5-coder-0.5b-instruct] [--compute-dtypes float32 bfloat16]
                                  [--low-memory dots]

Each framework runs in its own subprocess (so peak RSS is its own): load the student, build the
same seeded batch (B x T tokens, loss on the answer part, a synthetic top-k teacher with k ids),
then ``--steps`` timed steps after one warm-up/compile step of
    loss = alpha * CE + (1 - alpha) * KL_topk+tail(teacher || student),  AdamW, embeddings frozen.
jaxkd runs exactly the KD recipe's step: ``kd.with_loss_index`` on the host batch, then the
trainer step of ``kd.kd_loss`` (fused head, one global norm). The first-step loss of both must
agree (same weights, same batch): a correctness cross-check. Peak RSS is reported after loading
and at the end (the process maximum), so a load-time peak cannot hide in the step's figure.
``--low-memory REMAT`` adds one more jaxkd run (float32 compute) with that layer remat and AdamW's
first moment in bfloat16 (``train.remat``, ``train.adam_mu_dtype``): the memory-lean recipe.
Writes evals/results/bench_kd_step.{json,md}.
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
ALPHA, TOPK, LR = 0.5, 16, 1e-5
TARGET_RATIO, TARGET_RSS_GB = 0.75, 7.0   # the targets for the 0.5B at batch 2 x 288


def make_batch(vocab: int, b: int, t: int, answer: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(vocab, 20000), (b, t)).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
    mask = np.zeros((b, t), np.float32)
    mask[:, t - 1 - answer:t - 1] = 1.0
    logits = rng.normal(size=(b, t, 64)).astype(np.float32) * 3
    cand = rng.integers(0, vocab, (b, t, 64)).astype(np.int32)
    order = np.argsort(-logits, axis=-1)[..., :TOPK]
    topk_ids = np.take_along_axis(cand, order, -1)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.25)  # 80% mass in the 64 candidates
    topk_lp = np.take_along_axis(lp, order, -1).astype(np.float32)
    return {"input_ids": ids, "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, t), np.int32), "targets": targets, "loss_mask": mask,
            "topk_ids": topk_ids, "topk_logprobs": topk_lp}


def time_jax_kd(model, vocab: int, *, batch: int, seq: int, answer: int, steps: int, chunk: int,
                remat: str = "none", mu_dtype: str = "float32") -> dict:
    """Time ``steps`` KD recipe steps (after one warm-up/compile step) of ``model`` on
    ``make_batch``; the model is consumed (its arrays move into the train state)."""
    import functools

    from jaxkd.config import DistillConfig, TrainConfig
    from jaxkd.distill.kd import kd_loss, with_loss_index
    from jaxkd.train import state as st
    from jaxkd.train.trainer import make_train_step

    tcfg = TrainConfig(steps=100, lr=LR, warmup_steps=0, schedule="constant", clip_norm=1.0,
                       trainable="no_embed", adam_mu_dtype=mu_dtype)
    graphdef, params, frozen = st.split_model(model, "no_embed")
    tx = st.make_optimizer(tcfg)
    state = st.init_state(params, tx, 0)
    step = make_train_step(functools.partial(kd_loss, graphdef=graphdef, dist=DistillConfig(alpha=ALPHA),
                                             vocab=vocab, chunk_size=chunk, remat=remat),
                           tx, clip_norm=tcfg.clip_norm)
    del model, params  # the state and `frozen` hold every array; the donated ones are freed by the first step
    raw = make_batch(vocab, batch, seq, answer)
    times, losses, cpu = [], [], []
    for _ in range(steps + 1):
        t1, c1 = time.perf_counter(), time.process_time()
        b = with_loss_index(raw)  # host work of the recipe's batch source, timed with the step
        state, m = step(state, b, {"frozen": frozen})
        losses.append(float(m["loss"]))  # a device->host read: the step has finished
        times.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
    mem = step._jitted.lower(state, b, {"frozen": frozen}).compile().memory_analysis()
    xla = {k: getattr(mem, k) / 2**30 for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                 "alias_size_in_bytes", "temp_size_in_bytes")
           if mem is not None and hasattr(mem, k)}
    return {"first_step_s": times[0], "step_s": times[1:], "cpu_s": cpu[1:], "losses": losses,
            "trainable": st.count(state["params"]), "xla_memory_gb": xla,
            "loss_index_width": int(b["loss_index"].shape[-1])}


def run_jax(args) -> dict:
    import jax

    from jaxkd.models import load_pretrained

    t0 = time.perf_counter()
    pt = load_pretrained(args.model, compute_dtype=args.compute_dtype)  # parameters stay float32
    load_s = time.perf_counter() - t0
    load_rss = _peak_rss_gb()
    vocab = min(len(pt.tokenizer), pt.config.vocab_size)
    model = pt.model
    del pt
    out = time_jax_kd(model, vocab, batch=args.batch, seq=args.seq, answer=args.answer, steps=args.steps,
                      chunk=args.chunk, remat=args.remat, mu_dtype=args.mu_dtype)
    lean = f", remat {args.remat}, Adam mu {args.mu_dtype}" if args.remat != "none" or args.mu_dtype != "float32" else ""
    return {"framework": f"jax {jax.__version__} (jaxkd KD recipe step, donated state, compute "
                         f"{args.compute_dtype}{lean})", "load_s": load_s, "compute_dtype": args.compute_dtype,
            "remat": args.remat, "adam_mu_dtype": args.mu_dtype, "load_peak_rss_gb": load_rss, **out}


def time_torch_kd(model, vocab: int, raw: dict[str, np.ndarray], steps: int, *, device: str = "cpu",
                  autocast_dtype=None) -> dict:
    """Time ``steps`` steps (after one warm-up step) of the same KD loss in PyTorch eager on
    ``model`` (a transformers causal LM): AdamW over everything but the embeddings and head.
    ``autocast_dtype``: run the forward under ``torch.autocast`` (mixed precision)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    for name, p in model.named_parameters():
        p.requires_grad = not ("embed_tokens" in name or "lm_head" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    b = {k: torch.from_numpy(v).to(device) for k, v in raw.items()}

    def loss_fn():
        ctx = (torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype)
               if autocast_dtype is not None else contextlib.nullcontext())
        with ctx:
            logits = model(input_ids=b["input_ids"].long()).logits
        logq = F.log_softmax(logits[..., :vocab].float(), dim=-1)
        mask = b["loss_mask"]
        denom = mask.sum().clamp(min=1)
        nll = -logq.gather(-1, b["targets"].long()[..., None])[..., 0]
        ce = (nll * mask).sum() / denom

        def with_tail(lk):
            head = torch.logsumexp(lk, dim=-1, keepdim=True).exp()
            return torch.cat([lk, torch.log((1 - head).clamp(min=1e-30))], dim=-1)

        logq_k = with_tail(logq.gather(-1, b["topk_ids"].long()))
        logp_k = with_tail(b["topk_logprobs"])
        p = logp_k.exp()
        kl = torch.where(p > 0, p * (logp_k - logq_k), torch.zeros_like(p)).sum(-1)
        kd = (kl * mask).sum() / denom
        return ALPHA * ce + (1 - ALPHA) * kd

    times, losses, cpu = [], [], []
    for _ in range(steps + 1):
        t1, c1 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(float(loss))  # a device->host read: the step has finished
        times.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
    return {"first_step_s": times[0], "step_s": times[1:], "cpu_s": cpu[1:], "losses": losses,
            "trainable": sum(p.numel() for p in trainable)}


def run_torch(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxkd.models import resolve_hf_dir, resolve_spec

    torch.set_num_threads(os.cpu_count() or 2)
    t0 = time.perf_counter()
    hf_dir = resolve_hf_dir(resolve_spec(args.model))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    load_s = time.perf_counter() - t0
    load_rss = _peak_rss_gb()
    vocab = min(len(AutoTokenizer.from_pretrained(str(hf_dir))), model.config.vocab_size)
    out = time_torch_kd(model, vocab, make_batch(vocab, args.batch, args.seq, args.answer), args.steps)
    return {"framework": f"torch {torch.__version__} (eager, {torch.get_num_threads()} threads)",
            "load_s": load_s, "load_peak_rss_gb": load_rss, **out}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(args) -> None:
    load_avg = os.getloadavg()[0]
    out = run_jax(args) if args.child == "jax" else run_torch(args)
    out["peak_rss_gb"] = _peak_rss_gb()
    out["load_avg_1min_at_start"] = load_avg
    print("RESULT " + json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=288, help="tokens per row (train.max_len of the KD configs)")
    p.add_argument("--answer", type=int, default=158, help="loss positions per row (55%%, as in KD batches)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up step")
    p.add_argument("--chunk", type=int, default=2048, help="jaxkd: vocabulary rows per fused-head chunk")
    p.add_argument("--remat", choices=["none", "dots", "full"], default="none",
                   help="jaxkd: decoder layer rematerialisation (train.remat)")
    p.add_argument("--compute-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="jaxkd: one run per matmul compute dtype (train.compute_dtype; parameters and the "
                        "optimizer stay float32), all compared with the same PyTorch float32 run")
    p.add_argument("--low-memory", choices=["dots", "full"], default=None,
                   help="jaxkd: one more float32 run with this layer remat and AdamW's first moment in bfloat16")
    p.add_argument("--compute-dtype", default="float32", help=argparse.SUPPRESS)  # the child's
    p.add_argument("--mu-dtype", default="float32", help=argparse.SUPPRESS)       # the child's
    p.add_argument("--child", choices=["jax", "torch"], default=None)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    results = {}
    # (key, framework, compute dtype, remat, Adam first-moment dtype)
    runs = [("jax" if dt == "float32" else f"jax_{dt}", "jax", dt, args.remat, "float32")
            for dt in dict.fromkeys(args.compute_dtypes)]
    if args.low_memory:
        runs.append(("jax_low_memory", "jax", "float32", args.low_memory, "bfloat16"))
    for key, fw, dt, remat, mu in runs + [("torch", "torch", "float32", "none", "float32")]:
        cmd = [sys.executable, "-m", "evals.bench_kd_step", "--child", fw, "--model", args.model,
               "--batch", str(args.batch), "--seq", str(args.seq), "--answer", str(args.answer),
               "--steps", str(args.steps), "--chunk", str(args.chunk), "--remat", remat,
               "--compute-dtype", dt, "--mu-dtype", mu]
        print("running", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{fw} benchmark failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(line[-1][len("RESULT "):])
        r["tokens_per_s"] = args.batch * args.seq / float(np.median(r["step_s"]))
        results[key] = r
        print(key, json.dumps(r), flush=True)
    jax_keys = [k for k, *_ in runs]
    diffs = {k: abs(results[k]["losses"][0] - results["torch"]["losses"][0]) for k in jax_keys}
    ratios = {k: float(np.median(results[k]["step_s"]) / np.median(results["torch"]["step_s"])) for k in jax_keys}
    main_key = jax_keys[0]
    diff, ratio = diffs[main_key], ratios[main_key]
    meta = {"model": args.model, "batch": args.batch, "seq": args.seq, "loss_positions": args.answer,
            "top_k": TOPK, "alpha": ALPHA, "chunk": args.chunk, "remat": args.remat,
            "trainable": "no_embed (embed_tokens, lm_head frozen)", "machine": describe(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -m evals.bench_kd_step " + " ".join(sys.argv[1:]),
            "first_step_loss_abs_diff": diff, "jax_over_torch_median": ratio,
            "per_compute_dtype": {k: {"jax_over_torch_median": ratios[k], "first_step_loss_abs_diff": diffs[k]}
                                  for k in jax_keys},
            "targets": {"jax_over_torch_median_max": TARGET_RATIO, "jax_peak_rss_gb_max": TARGET_RSS_GB}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_kd_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    jr = results[main_key]
    lines = ["# One KD train step: jaxkd vs PyTorch eager (CPU)", "",
             f"{meta['model']}, batch {args.batch} x {args.seq} tokens, loss on {args.answer} positions/row, "
             f"alpha {ALPHA} CE + forward KL over top-{TOPK}+tail, AdamW, clip 1.0, {meta['trainable']}; "
             f"jaxkd: the KD recipe's step (fused head, chunk {args.chunk}, remat {args.remat}, loss-index width "
             f"{jr.get('loss_index_width')}). {args.steps} timed steps after one warm-up step, per framework, "
             f"each in its own process, one after the other.", "",
             f"Machine: {meta['machine']}, {meta['date']}. The machine is SHARED: other users' jobs ran on the "
             "same 2 cores (1-minute load average at each process start below), so wall times are "
             "inflated and noisy; process CPU seconds are listed too.", "",
             "| framework | step s median | min | max | CPU s median | tokens/s | first step s (incl. compile) "
             "| peak RSS after load GB | peak RSS GB | first loss | load avg at start |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        lines.append(f"| {r['framework']} | {np.median(r['step_s']):.2f} | {min(r['step_s']):.2f} | "
                     f"{max(r['step_s']):.2f} | {np.median(r['cpu_s']):.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['first_step_s']:.1f} | {r['load_peak_rss_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['losses'][0]:.5f} | {r['load_avg_1min_at_start']:.1f} |")
    lines += [""]
    for k in jax_keys:
        r = results[k]
        ok_t, ok_m = ratios[k] <= TARGET_RATIO, r["peak_rss_gb"] <= TARGET_RSS_GB
        lean = (f", remat {r['remat']}, Adam mu {r['adam_mu_dtype']}"
                if r.get("remat", "none") != "none" or r.get("adam_mu_dtype", "float32") != "float32" else "")
        lines += [f"- jaxkd ({r.get('compute_dtype', 'float32')} compute{lean}) / PyTorch median step: **{ratios[k]:.3f}** "
                  f"(target <= {TARGET_RATIO}: {'met' if ok_t else 'NOT met'}); peak RSS **{r['peak_rss_gb']:.2f} GB** "
                  f"(target <= {TARGET_RSS_GB} GB: {'met' if ok_m else 'NOT met'}); first-step losses differ by "
                  f"{diffs[k]:.2e}"]
    lines += [f"- {k}: compiled step buffers (XLA memory analysis, GB): " + ", ".join(
                  f"{n.replace('_size_in_bytes', '')} {v:.2f}" for n, v in results[k].get("xla_memory_gb", {}).items())
              for k in jax_keys]
    lines += ["- Same weights and batch in every process: the first-step losses cross-check the loss.", "",
              f"Command: `{meta['command']}`"]
    (RESULTS / "bench_kd_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
