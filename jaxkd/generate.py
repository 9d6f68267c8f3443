"""Ask the assistant one question and stream the answer to the terminal.

    python -m jaxkd.generate "My earbuds won't pair. What do I do?"           # newest trained run, else base
    python -m jaxkd.generate --model runs/kd-cpu "My earbuds won't pair. What do I do?"

``--model`` takes a trained run directory (``runs/<name>``), a preset name (configs/models/*.yaml),
a preset YAML path, a ``.gguf`` file or an HF directory; without it, the newest trained run under
``--runs-dir`` is served, else the base preset. Everything loads through ``jaxkd.serving.load_model``,
so a run answers with its trained weights and the system prompt it was trained with. The answer
goes to stdout as it is generated; which model was loaded, from where, and load / compile / decode
timings go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxkd.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("question", help="the user's question")
    ap.add_argument("--model", default=None,
                    help="run dir (runs/<name>), preset name, preset YAML, .gguf file or HF directory "
                         "(default: the newest trained run under --runs-dir, else the base preset)")
    ap.add_argument("--runs-dir", default="runs", help="where trained runs live (for the default model)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: its best-val step when it kept one, else the latest)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system", default=None,
                    help="system prompt (default: the one the model was trained with; '' for none)")
    ap.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    return ap


def prepare(args: argparse.Namespace, log: Any = None) -> tuple[Any, list[dict[str, str]]]:
    """(the loaded model, the chat messages for ``args.question``); logs which model and why."""
    from jaxkd.serving import default_model, load_model

    why = "given by --model"
    spec = args.model
    if spec is None:
        spec, why = default_model(args.runs_dir)
    t0 = time.perf_counter()
    loaded = load_model(spec, step=args.step, param_dtype=args.param_dtype, compute_dtype=args.compute_dtype)
    if log is not None:
        kind = "trained run" if loaded.kind == "run" else "base preset" if loaded.kind == "preset" else loaded.kind
        log(f"model: {loaded.name} [{kind}; {why}] ({loaded.config.arch.value}, {loaded.config.num_layers} "
            f"layers) loaded in {time.perf_counter() - t0:.1f} s from {loaded.source}")
    system = loaded.system_prompt if args.system is None else args.system
    if log is not None:
        log("system prompt: " + ("none" if not system else
                                 "from the run" if loaded.kind == "run" and args.system is None else
                                 "--system" if args.system is not None else "the default (jaxkd.data.formatting)"))
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": args.question})
    return loaded, messages


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxkd.assets import AssetError
    from jaxkd.config import ConfigError, SamplingConfig

    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from jaxkd.ckpt import CheckpointError
    from jaxkd.models.generate import Generator
    from jaxkd.models.params import WeightsError
    from jaxkd.models.tokenizer import TokenizerError

    log = lambda msg: print(f"[jaxkd.generate] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        pre, messages = prepare(args, log)
    except (ConfigError, AssetError, WeightsError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    gen = Generator(pre.model, pre.tokenizer, max_seq_len=args.max_seq_len)
    t1 = time.perf_counter()
    # compile for exactly this prompt's bucket and cache length: run two steps and stop
    warm = gen.stream_chat(messages, sampling)
    for i, _ in enumerate(warm):
        if i >= 1:
            break
    warm.close()
    log(f"compiled prefill + decode in {time.perf_counter() - t1:.1f} s")

    t2 = time.perf_counter()
    first = None
    pieces = []
    for delta in gen.stream_chat(messages, sampling):
        if first is None:
            first = time.perf_counter()
        pieces.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    n_tok = len(pre.tokenizer.encode("".join(pieces), add_special_tokens=False))
    if first is not None:
        decode_s = end - first
        rate = f", {max(n_tok - 1, 0) / decode_s:.1f} tok/s" if decode_s > 0 else ""
        log(f"first token after {first - t2:.2f} s (prefill); {n_tok} tokens (re-tokenised) "
            f"in {end - t2:.1f} s{rate} decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
