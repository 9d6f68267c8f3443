"""Markdown for ``evals.bench_generate``'s results (kept apart so the driver stays short)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Figures of the pre-issue-10 code the targets are stated against (issue 10; bench_generate.md
# of 2026-11-24): the ratios below are measured in this run, these are only quoted.
TARGETS = {"decode_b8_vs_baseline": 1.6, "decode_b8_roofline": 0.50, "teacher_vs_5.3": 3.0}


def _mm(cell: dict[str, float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(cell['min'] * scale)} / {fmt.format(cell['median'] * scale)}"


def write_markdown(res: dict[str, Any], path: Path) -> None:
    m, bw = res["machine"], res["bandwidth"]
    lines = [
        "# Generation benchmark: jaxkd vs its previous version vs transformers; the teacher stage",
        "",
        f"Command: `{res['command']}` ({res['date']}, {res['total_s'] / 60:.0f} min). Source: jaxkd "
        f"{res['src']['jaxkd']}" + (f", baseline {res['src']['baseline']}" if "baseline" in res["src"] else "")
        + ".",
        "",
        f"Machine: {m['host']}, {m['cpu']} ({', '.join(m['simd'])}), {m['cores']} cores, {m['ram_GiB']} GiB "
        f"RAM, Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) +
        f". Load average at start {', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])}: the machine is "
        "shared with other jobs, so absolute figures are noisy; every comparison is side by side in this "
        "run (repetitions interleaved), and the run can be repeated on a quiet machine with the command "
        "above.",
        "",
        f"Every figure: min / median of {res['reps']} timed repetitions after one warm-up (rates: best / "
        "median).",
        "",
        f"Memory read bandwidth: {bw['jax_GBps']:.1f} GB/s (jitted jax sum over {bw['array_GiB']} GiB; "
        f"min / median {_mm(bw['jax_s'], 1e3, '{:.0f}')} ms), {bw['numpy_GBps']:.1f} GB/s (numpy, one thread). "
        f"The roofline uses the best, {bw['best_GBps']:.1f} GB/s.",
        "",
    ]
    lines += _summary(res)
    if "decode" in res:
        lines += _decode(res)
    if "matmuls" in res:
        lines += _matmuls(res)
    if "teacher" in res:
        lines += _teacher(res)
    if "weights" in res:
        lines += _weights(res)
    if "layout" in res:
        from evals.bench_layout import markdown as layout_md

        lines += ["## Weight layout and weight dtype (XLA CPU matmul microbenchmark)", "",
                  "`io` = weights stored `[in, out]`, contracted `mi,io->mo` (before); `oi` = stored "
                  "`[out, in]` (HF layout), `mi,oi->mo` (now). `_nd` = the 3-D head-split weight in one "
                  "einsum. Backward = grads wrt x and W of `sum(y * g)` at the training row count.", ""]
        lines += layout_md(res["layout"]) + [""]
    path.write_text("\n".join(lines) + "\n")


def _roofline(res: dict[str, Any], b: int, impl: str = "jaxkd") -> float:
    """Weight-streaming tok/s bound at batch ``b``: of the f32 model (the issue's), or with
    ``impl`` of the bytes that implementation's steps at that batch read (a bf16 copy reads half)."""
    info = res["decode"]["impls"][impl]
    step_bytes = info.get("weight_bytes_per_wide_step", info["weight_bytes_per_step"]) if b > 1 \
        else info["weight_bytes_per_step"]
    return b * res["bandwidth"]["best_GBps"] * 1e9 / step_bytes


def _bf16_variants(res: dict[str, Any]) -> list[str]:
    """Implementations whose batched steps run on a bf16 copy (``batched_dtype``)."""
    return [n for n, i in res.get("decode", {}).get("impls", {}).items() if i.get("batched_dtype") == "bfloat16"]


def _summary(res: dict[str, Any]) -> list[str]:
    out = ["## Targets (issue 10), as measured in this run", "", "| target | measured | met |", "|---|---|---|"]
    dec = res.get("decode", {}).get("runs", {})
    if "8" in dec and "baseline" in dec["8"]:
        r = dec["8"]["jaxkd"]["decode_tok_s_median"] / dec["8"]["baseline"]["decode_tok_s_median"]
        out.append(f"| 0.5B decode, batch 8: >= {TARGETS['decode_b8_vs_baseline']}x the previous code | "
                   f"{r:.2f}x (medians) | {'yes' if r >= TARGETS['decode_b8_vs_baseline'] else 'no'} |")
    if "8" in dec:
        share = dec["8"]["jaxkd"]["decode_tok_s_median"] / _roofline(res, 8)
        out.append(f"| 0.5B decode, batch 8: >= {TARGETS['decode_b8_roofline']:.0%} of roofline | {share:.0%} "
                   f"(median) | {'yes' if share >= TARGETS['decode_b8_roofline'] else 'no'} |")
    for n in _bf16_variants(res) if "8" in dec else []:
        med = dec["8"][n]["decode_tok_s_median"]
        if "baseline" in dec["8"]:
            r = med / dec["8"]["baseline"]["decode_tok_s_median"]
            out.append(f"| 0.5B decode, batch 8, `{n}` (batched steps on a bf16 copy): >= "
                       f"{TARGETS['decode_b8_vs_baseline']}x the previous code | {r:.2f}x (medians) | "
                       f"{'yes' if r >= TARGETS['decode_b8_vs_baseline'] else 'no'} |")
        share, own = med / _roofline(res, 8), med / _roofline(res, 8, n)
        out.append(f"| 0.5B decode, batch 8, `{n}`: >= {TARGETS['decode_b8_roofline']:.0%} of roofline | {share:.0%} "
                   f"of the f32 model's, {own:.0%} of its own (bf16 bytes) (median) | "
                   f"{'yes' if own >= TARGETS['decode_b8_roofline'] else 'no'} |")
    if "1" in dec and "baseline" in dec["1"]:
        r = dec["1"]["jaxkd"]["decode_tok_s_median"] / dec["1"]["baseline"]["decode_tok_s_median"]
        out.append(f"| 0.5B decode, batch 1: not slower than the previous code | {r:.2f}x (medians) | "
                   f"{'yes' if r >= 1.0 else 'no'} |")
    t = res.get("teacher")
    if t:
        tok = t["jaxkd"]["tok_s_median"]
        out.append(f"| 1.5B teacher stage with top-k: >= 3x today's 5.3 tok/s (15.9) | {tok:.2f} tok/s "
                   f"(median), {tok / 5.3:.2f}x 5.3" + (f"; {tok / t['baseline']['tok_s_median']:.2f}x the "
                                                       "previous code in this run" if "baseline" in t else "")
                   + f" | {'yes' if tok >= 3 * 5.3 else 'no'} |")
    return out + [""]


def _decode(res: dict[str, Any]) -> list[str]:
    d = res["decode"]
    names = list(d["impls"])
    j = d["impls"]["jaxkd"]
    out = [f"## Decode: {d['model']} (float32, greedy)", "",
           f"Weights read per decode step: {j['weight_bytes_per_step'] / 1e9:.3f} GB (all parameters "
           f"{j['param_bytes'] / 1e9:.3f} GB minus the embedding table, which is gathered). Roofline tok/s = "
           "batch x bandwidth / that. Decode tok/s = batch x (new tokens - 1) / time after the first token "
           "(transformers: its generate time minus a 1-token generate timed in the same repetition). "
           "Implementations: " + ", ".join(
               f"`{n}`" + (f" ({d['impls'][n].get('jaxkd_file', '')}"
                           + (f", XLA_FLAGS={d['impls'][n]['xla_flags']}" if d['impls'][n].get('xla_flags') else "")
                           + "".join(f", {k}={v}" for k, v in d['impls'][n].get('env', {}).items())
                           + (", weights multiplied as {one_row} at one row, {many_rows} at more ({source})".format(
                               **d['impls'][n]['layouts']) if d['impls'][n].get('layouts') else "")
                           + ")" if n != "transformers" else
                           f" (torch, {d['impls'][n]['torch_threads']} threads)") for n in names) + ".", "",
           "| batch | new tokens | roofline tok/s | " + " | ".join(
               f"{n} decode tok/s best / median | {n} % roofline" for n in names) + " | " + " | ".join(
               f"jaxkd / {n}" for n in names[1:]) + " |",
           "|---:|---:|---:|" + "---:|---:|" * len(names) + "---:|" * (len(names) - 1)]
    for b, run in d["runs"].items():
        roof = _roofline(res, int(b))
        cells = []
        for n in names:
            cells.append(f"{run[n]['decode_tok_s_best']:.2f} / {run[n]['decode_tok_s_median']:.2f}")
            cells.append(f"{run[n]['decode_tok_s_median'] / roof:.0%}")
        ratios = [f"{run['jaxkd']['decode_tok_s_median'] / run[n]['decode_tok_s_median']:.2f}x" for n in names[1:]]
        out.append(f"| {b} | {run['new_tokens']} | {roof:.1f} | " + " | ".join(cells + ratios) + " |")
    out += ["", "Prefill (first token) seconds, min / median:", "",
            "| batch | prompt tokens | " + " | ".join(names) + " |", "|---:|---|" + "---:|" * len(names)]
    for b, run in d["runs"].items():
        out.append(f"| {b} | {min(run['prompt_lens'])}-{max(run['prompt_lens'])} | " +
                   " | ".join(_mm(run[n]["prefill_s"]) for n in names) + " |")
    same = all(run[n]["first_row_tokens"] == run["jaxkd"]["first_row_tokens"] for run in d["runs"].values()
               for n in names)
    out += ["", f"Greedy tokens of the first row (40 shown) identical across implementations and batch "
            f"sizes: {'yes' if same else 'NO'}.", ""]
    bf16 = _bf16_variants(res)
    if bf16:
        out += [f"`{n}` multiplies a bf16 copy of the weights (f32 accumulation; KV cache f32) in prefill and in "
                f"steps over more than one row, reading {d['impls'][n]['weight_bytes_per_wide_step'] / 1e9:.3f} GB "
                f"per such step; one-row steps use the f32 weights." for n in bf16]
        out += ["", "| batch | implementation | own roofline tok/s | % of it (median) | rows with all greedy tokens "
                "equal to `jaxkd`'s | first differing token (earliest row) |", "|---:|---|---:|---:|---:|---:|"]
        for b, run in d["runs"].items():
            for n in bf16:
                own = _roofline(res, int(b), n)
                rows, ref = run[n].get("row_tokens"), run["jaxkd"].get("row_tokens")
                if rows is None or ref is None:
                    continue
                diffs = [next((i for i, (x, y) in enumerate(zip(r, q)) if x != y), None) for r, q in zip(rows, ref)]
                first = min((i for i in diffs if i is not None), default=None)
                out.append(f"| {b} | `{n}` | {own:.1f} | {run[n]['decode_tok_s_median'] / own:.0%} | "
                           f"{sum(i is None for i in diffs)} of {len(diffs)} | "
                           f"{'-' if first is None else first} |")
        out.append("")
    return out


def _matmuls(res: dict[str, Any]) -> list[str]:
    m = res["matmuls"]
    dec = res.get("decode", {})
    by_dtype = {"float32": "jaxkd", **{"bfloat16": n for n in _bf16_variants(res)}}
    out = [f"## Compute side: the matmul floor of a decode step ({m['model']})", "",
           f"One jitted chain of every projection of all {m['layers']} layers (random weights, in the layout "
           "`jaxkd.models.layout` picks for that row count and dtype) and the lm head, nothing else: a decode step "
           "cannot beat its own matmuls. Bound tok/s = batch / that time. Large-matmul rate of this machine "
           "(2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in m["peak_GFLOPs"].items()) + ".", "",
           "| batch | dtype | layout | matmuls ms min / median | GFLOP/s (best) | bound tok/s (median) | decode tok/s "
           "(median) | decode / bound |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in m["runs"].values():
        impl = by_dtype.get(r["dtype"]) if r["batch"] > 1 or r["dtype"] == "float32" else None
        run = dec.get("runs", {}).get(str(r["batch"]), {}).get(impl) if impl else None
        got = f"`{impl}` {run['decode_tok_s_median']:.2f}" if run else "-"
        ratio = f"{run['decode_tok_s_median'] / r['tok_s_bound_median']:.0%}" if run else "-"
        out.append(f"| {r['batch']} | {r['dtype']} | {r['layout']} | {_mm(r['step_s'], 1e3, '{:.1f}')} | "
                   f"{r['GFLOPs_best']:.0f} | {r['tok_s_bound_median']:.1f} | {got} | {ratio} |")
    return out + [""]


def _teacher(res: dict[str, Any]) -> list[str]:
    t = res["teacher"]
    names = [n for n in ("jaxkd", "baseline") if n in t]
    out = [f"## Teacher stage: {t['model']} (float32), top-k capture", "",
           f"`run_teacher` on the first {t['prompts']} teacher prompts (train + val, category-interleaved) of "
           "each checkout's `configs/cpu_default.yaml`, at its configured batch size, into a fresh cache "
           "directory per repetition. Overall tok/s = generated tokens (EOS included) / wall time of the "
           "whole stage call (tokenising, prefill, decode, top-k, cache writes).", "",
           "| implementation | batch size | tokens | wall s min / median | tok/s best / median | top-k rows |",
           "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        r = t[n]
        out.append(f"| {n} | {r['batch_size']} | {r['new_tokens']} | {_mm(r['wall_s'], 1, '{:.1f}')} | "
                   f"{r['tok_s_best']:.2f} / {r['tok_s_median']:.2f} | {r['topk_rows']} |")
    if len(names) == 2:
        same = t["jaxkd"]["first_answer_ids"] == t["baseline"]["first_answer_ids"]
        out += ["", f"Speed-up (medians): {t['jaxkd']['tok_s_median'] / t['baseline']['tok_s_median']:.2f}x. "
                f"First answer's first 40 ids identical: {'yes' if same else 'NO'}."]
    return out + [""]


def _weights(res: dict[str, Any]) -> list[str]:
    w = res["weights"]
    names = list(next(iter(w["runs"].values())))
    out = [f"## Weight storage attempts: {w['model']} (issue 10 item 7)", "",
           f"Greedy decode of {w['new_tokens']} tokens per row, repetitions interleaved with float32. "
           "Agreement: last-token logits of a chat prompt vs float32, and how many greedy tokens of the first "
           "row equal float32's. A path is kept only if faster than float32 here and within tolerance.", "",
           "| weights | " + " | ".join(f"batch {b} decode tok/s (median)" for b in w["runs"]) +
           " | max abs logit diff (logit scale) | same argmax | greedy tokens equal |",
           "|---|" + "---:|" * len(w["runs"]) + "---:|---|---:|"]
    for n in names:
        p = w["parity"][n]
        out.append(f"| {n} | " + " | ".join(f"{run[n]['decode_tok_s_median']:.2f}" for run in w["runs"].values())
                   + f" | {p['max_abs_logit_diff']:.3g} ({p['logit_scale']:.3g}) | {p['same_argmax']} | "
                   f"{p['greedy_tokens_equal_to_f32']} / {w['new_tokens']} |")
    return out + [""]
