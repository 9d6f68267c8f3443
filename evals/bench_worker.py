"""One model in one process, driven over stdin/stdout by ``evals.bench_generate`` (JSON lines).

Run by file path so that ``PYTHONPATH`` decides which jaxkd it measures (this checkout, or an
older one given with ``bench_generate --baseline-src``); it therefore imports nothing from
``evals`` and uses only the Generator / teacher API both versions share.

    {"op": "load", "impl": "jaxkd" | "transformers", "model": PRESET, "param_dtype": "float32"}
    {"op": "decode", "prompts": [[ids]], "new_tokens": N}       one timed greedy generate
    {"op": "logits", "prompt": [ids]}                           last-position logits (parity checks)
    {"op": "teacher", "config": YAML, "overrides": [...], "limit": N}
                                                               one timed teacher stage (fresh cache)
    {"op": "quit"}

Every reply is one JSON line on stdout prefixed with ``@@`` (libraries may print too).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATE: dict[str, Any] = {}


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def load(msg: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if msg["impl"] == "transformers":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from jaxkd import assets
        from jaxkd.config import load_model_spec
        from jaxkd.models import resolve_hf_dir

        spec = load_model_spec(msg["model"])
        gguf = assets.asset_path(spec.location)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(resolve_hf_dir(spec)))
        tok.padding_side = "left"
        STATE.update(impl="transformers", model=model, tok=tok)
        return {"load_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}
    import jax
    from flax import nnx

    import jaxkd
    from jaxkd.models import load_pretrained
    from jaxkd.models.generate import Generator

    pre = load_pretrained(msg["model"], param_dtype=msg.get("param_dtype", "float32"),
                          compute_dtype=msg.get("compute_dtype", "float32"))
    STATE.update(impl="jaxkd", pre=pre, gen=Generator(pre.model, pre.tokenizer, max_seq_len=1024,
                                                      prompt_bucket=64))
    STATE["gen"].eos_ids = frozenset()  # decode benchmark: exactly new_tokens per row
    leaves = jax.tree.leaves(nnx.state(pre.model, nnx.Param))
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    emb = pre.model.embed_tokens.weight[...]
    gathered = emb.size * emb.dtype.itemsize if pre.model.lm_head is not None else 0
    out = {"load_s": time.perf_counter() - t0, "jaxkd_file": jaxkd.__file__,
           "param_bytes": total, "weight_bytes_per_step": total - gathered}
    batched = getattr(STATE["gen"], "batched_dtype", None)  # older checkouts: one dtype
    if batched is not None:  # steps over more than one row read a copy cast to this dtype
        size = jax.numpy.dtype(batched).itemsize
        out["batched_dtype"] = batched
        out["weight_bytes_per_wide_step"] = sum(x.size * size for x in leaves) - (
            emb.size * size if pre.model.lm_head is not None else 0)
    lay = getattr(STATE["gen"], "layouts", None)  # older checkouts have one layout
    if lay is not None:
        out["layouts"] = {"one_row": lay.one_row, "many_rows": lay.many_rows, "source": lay.source}
    return out


def decode(msg: dict[str, Any]) -> dict[str, Any]:
    prompts, n = msg["prompts"], int(msg["new_tokens"])
    if STATE["impl"] == "transformers":
        import torch

        model, tok = STATE["model"], STATE["tok"]
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")

        def run(k: int) -> tuple[float, Any]:
            t = time.perf_counter()
            with torch.inference_mode():
                seq = model.generate(**batch, do_sample=False, max_new_tokens=k, min_new_tokens=k,
                                     pad_token_id=tok.pad_token_id)
            return time.perf_counter() - t, seq[:, batch["input_ids"].shape[1]:]

        prefill_s = run(1)[0]  # the first token (prefill) alone, timed just before
        wall, seq = run(n)
        return {"wall_s": wall, "prefill_s": prefill_s, "decode_s": wall - prefill_s,
                "tokens": [int(t) for t in seq[0]], "all_tokens": seq.tolist(), "rows": len(prompts)}
    from jaxkd.config import SamplingConfig

    t = time.perf_counter()
    out = STATE["gen"].generate(prompts, SamplingConfig(max_new_tokens=n, temperature=0.0))
    wall = time.perf_counter() - t
    if any(len(x) != n for x in out.tokens):
        raise RuntimeError(f"rows generated {[len(x) for x in out.tokens]} tokens, not {n}")
    return {"wall_s": wall, "prefill_s": out.prefill_s, "decode_s": out.decode_s,
            "tokens": out.tokens[0], "all_tokens": out.tokens, "rows": len(prompts)}


def logits(msg: dict[str, Any]) -> dict[str, Any]:
    """Last-position float32 logits of one prompt (a plain forward pass)."""
    import jax.numpy as jnp
    import numpy as np

    ids = jnp.asarray([msg["prompt"]], jnp.int32)
    out, _ = STATE["pre"].model(ids, jnp.arange(ids.shape[1], dtype=jnp.int32)[None])
    return {"logits": np.asarray(out[0, -1], np.float32).tolist()}


def teacher(msg: dict[str, Any]) -> dict[str, Any]:
    """The teacher stage itself (``run_teacher``: batching, top-k capture, cache writes) on the
    first ``limit`` prompts of its config, into a fresh cache directory."""
    from jaxkd.config import RunConfig, load
    from jaxkd.distill import teacher as T

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(RunConfig, msg["config"], [*msg.get("overrides", []), f"teacher.cache_dir={tmp}/c",
                                              f"teacher.answers_dir={tmp}/a"])
        items = [it for s in cfg.teacher.splits for it in T.teacher_prompts(cfg, s, limit=0)]
        items = items[: int(msg["limit"])]
        pre = STATE["pre"]
        kw = {"progress": False} if "progress" in T.run_teacher.__code__.co_varnames else {}
        t = time.perf_counter()
        summary = T.run_teacher(cfg, pre.model, pre.tokenizer, items=items, log=lambda s: None, **kw)
        wall = time.perf_counter() - t
        from jaxkd.distill.cache import TeacherCache

        entries = TeacherCache(cfg.teacher.cache_dir).entries()
        first = entries[items[0].key]
        topk_rows = sum(TeacherCache(cfg.teacher.cache_dir).topk(e)[0].shape[0] for e in entries.values())
    return {"wall_s": wall, "new_tokens": summary["new_tokens"], "prompts": len(items),
            "batch_size": cfg.teacher.batch_size, "topk_rows": topk_rows,
            "first_answer_ids": first.answer_ids[:40]}


def main() -> int:
    ops = {"load": load, "decode": decode, "teacher": teacher, "logits": logits}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "quit":
            break
        try:
            out = ops[msg["op"]](msg)
            out["ok"] = True
        except Exception as e:  # the driver reports it and stops
            import traceback

            out = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        gc.collect()
        reply(out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
    sys.exit(main())
