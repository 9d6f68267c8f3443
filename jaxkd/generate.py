"""Ask the assistant one question and stream the answer to the terminal.

    python -m jaxkd.generate --model qwen2.5-coder-0.5b-instruct "My earbuds won't pair. What do I do?"

``--model`` takes a preset name (configs/models/*.yaml), a preset YAML path, a ``.gguf`` file or
an HF directory. The answer goes to stdout as it is generated; load / compile / decode timings go
to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

DEFAULT_SYSTEM = (
    "You are a consumer-electronics troubleshooting assistant for headphones, earbuds, speakers, "
    "soundbars and smart-home devices. Answer concisely with numbered troubleshooting steps, the "
    "most likely fix first, naming the exact button, setting or status light involved. Do not "
    "write code.")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxkd.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("question", help="the user's question")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                    help="preset name, preset YAML, .gguf file or HF directory")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt ('' for none)")
    ap.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    return ap


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

    from jaxkd.models import load_pretrained
    from jaxkd.models.generate import Generator
    from jaxkd.models.params import WeightsError

    log = lambda msg: print(f"[jaxkd.generate] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    try:
        pre = load_pretrained(args.model, param_dtype=args.param_dtype, compute_dtype=args.compute_dtype)
    except (ConfigError, AssetError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log(f"loaded {pre.spec.name} ({pre.config.arch.value}, {pre.config.num_layers} layers) "
        f"in {time.perf_counter() - t0:.1f} s from {pre.hf_dir}")

    gen = Generator(pre.model, pre.tokenizer, max_seq_len=args.max_seq_len)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.question})
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
