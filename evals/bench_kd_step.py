"""One KD train step, jaxkd vs a straightforward PyTorch implementation, same model, loss and batch.

    flock /tmp/jaxkd-bigmem.lock python -m evals.bench_kd_step [--model qwen2.5-coder-0.5b-instruct]

Each framework runs in its own subprocess (so peak RSS is its own): load the student, build the
same seeded batch (B x T tokens, loss on the answer part, a synthetic top-k teacher with k ids),
then ``--steps`` timed steps after one warm-up/compile step of
    loss = alpha * CE + (1 - alpha) * KL_topk+tail(teacher || student),  AdamW, embeddings frozen.
The first-step loss of both must agree (same weights, same batch): a correctness cross-check.
Writes evals/results/bench_kd_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ALPHA, TOPK, LR = 0.5, 16, 1e-5


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


def run_jax(args) -> dict:
    import jax

    from jaxkd.config import DistillConfig, TrainConfig
    from jaxkd.models import load_pretrained
    import functools

    from jaxkd.distill.kd import kd_loss
    from jaxkd.train import state as st
    from jaxkd.train.trainer import make_train_step

    t0 = time.perf_counter()
    pt = load_pretrained(args.model)
    load_s = time.perf_counter() - t0
    vocab = min(len(pt.tokenizer), pt.config.vocab_size)
    tcfg = TrainConfig(steps=100, lr=LR, warmup_steps=0, schedule="constant", clip_norm=1.0,
                       trainable="no_embed")
    graphdef, params, frozen = st.split_model(pt.model, "no_embed")
    tx = st.make_optimizer(tcfg)
    state = st.init_state(params, tx, 0)
    step = make_train_step(functools.partial(kd_loss, graphdef=graphdef, dist=DistillConfig(alpha=ALPHA),
                                             vocab=vocab), tx, clip_norm=tcfg.clip_norm)
    batch = make_batch(vocab, args.batch, args.seq, args.answer)
    times, losses = [], []
    for i in range(args.steps + 1):
        t1 = time.perf_counter()
        state, m = step(state, batch, {"frozen": frozen})
        losses.append(float(m["loss"]))
        times.append(time.perf_counter() - t1)
    return {"framework": f"jax {jax.__version__} (jaxkd jitted step, donated state)", "load_s": load_s,
            "first_step_s": times[0], "step_s": times[1:], "losses": losses,
            "trainable": st.count(state["params"])}


def run_torch(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from jaxkd.models import resolve_hf_dir, resolve_spec

    torch.set_num_threads(os.cpu_count() or 2)
    t0 = time.perf_counter()
    hf_dir = resolve_hf_dir(resolve_spec(args.model))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    load_s = time.perf_counter() - t0
    from transformers import AutoTokenizer

    vocab = min(len(AutoTokenizer.from_pretrained(str(hf_dir))), model.config.vocab_size)
    for name, p in model.named_parameters():
        p.requires_grad = not ("embed_tokens" in name or "lm_head" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    b = {k: torch.from_numpy(v) for k, v in make_batch(vocab, args.batch, args.seq, args.answer).items()}

    def loss_fn():
        logits = model(input_ids=b["input_ids"].long()).logits[..., :vocab].float()
        logq = F.log_softmax(logits, dim=-1)
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

    times, losses = [], []
    for _ in range(args.steps + 1):
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(float(loss))
        times.append(time.perf_counter() - t1)
    return {"framework": f"torch {torch.__version__} (eager, {torch.get_num_threads()} threads)",
            "load_s": load_s, "first_step_s": times[0], "step_s": times[1:], "losses": losses,
            "trainable": sum(p.numel() for p in trainable)}


def child(args) -> None:
    out = run_jax(args) if args.child == "jax" else run_torch(args)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--answer", type=int, default=160, help="loss positions per row")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    p.add_argument("--child", choices=["jax", "torch"], default=None)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    results = {}
    for fw in ("jax", "torch"):
        cmd = [sys.executable, "-m", "evals.bench_kd_step", "--child", fw, "--model", args.model,
               "--batch", str(args.batch), "--seq", str(args.seq), "--answer", str(args.answer),
               "--steps", str(args.steps)]
        print("running", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{fw} benchmark failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(line[-1][len("RESULT "):])
        r["tokens_per_s"] = args.batch * args.seq / float(np.median(r["step_s"]))
        results[fw] = r
        print(fw, json.dumps(r), flush=True)
    diff = abs(results["jax"]["losses"][0] - results["torch"]["losses"][0])
    meta = {"model": args.model, "batch": args.batch, "seq": args.seq, "loss_positions": args.answer,
            "top_k": TOPK, "alpha": ALPHA, "trainable": "no_embed (embed_tokens, lm_head frozen)",
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "flock /tmp/jaxkd-bigmem.lock python -m evals.bench_kd_step " + " ".join(sys.argv[1:]),
            "first_step_loss_abs_diff": diff}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_kd_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["# One KD train step: jaxkd vs PyTorch (CPU)", "",
             f"{meta['model']}, batch {args.batch} x {args.seq} tokens, loss on {args.answer} positions/row, "
             f"alpha {ALPHA} CE + forward KL over top-{TOPK}+tail, AdamW, {meta['trainable']}. "
             f"{meta['machine']}, {meta['date']}. Both processes ran one after the other, alone under "
             "the big-memory lock, though other users' light jobs shared the 2 cores.", "",
             "| framework | step s (median) | tokens/s | first step s (incl. compile) | peak RSS GB | first loss |",
             "|---|---|---|---|---|---|"]
    for r in results.values():
        lines.append(f"| {r['framework']} | {np.median(r['step_s']):.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['first_step_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['losses'][0]:.5f} |")
    lines += ["", f"First-step losses differ by {diff:.2e} (same weights and batch).", "",
              f"Command: `{meta['command']}`"]
    (RESULTS / "bench_kd_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
