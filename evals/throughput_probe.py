"""Back-to-back decode throughput of several models in one process (a cross-check of the
efficiency table of evals/results/eval_report.md, whose rows are measured minutes apart on a
shared machine). Prints, per model, the dtype/type counts of its parameters and the batch-8
decode tok/s of 3 reps after a warm-up (32 new tokens, end-of-turn ignored, synthetic
120-token prompts).

    flock /tmp/jaxkd-bigmem.lock python -m evals.throughput_probe qwen2.5-coder-0.5b-instruct runs/kd-cpu
"""

from __future__ import annotations

import collections
import sys


def main(models: list[str]) -> None:
    import jax
    from flax import nnx

    from jaxkd.config import SamplingConfig
    from jaxkd.models.generate import Generator
    from jaxkd.serving import load_model

    for spec in models:
        lm = load_model(spec)
        leaves = jax.tree.leaves(nnx.state(lm.model))
        kinds = collections.Counter((type(x).__name__, str(x.dtype), str(getattr(x, "sharding", None)))
                                    for x in leaves)
        print(lm.name, dict(kinds))
        gen = Generator(lm.model, lm.tokenizer, max_seq_len=1024, prompt_bucket=64)
        gen.eos_ids = frozenset()   # fixed work per rep
        sampling = SamplingConfig(max_new_tokens=32, temperature=0.0)
        prompts = [[1000 + i] * 120 for i in range(8)]
        gen.generate(prompts, sampling)
        rates = []
        for _ in range(3):
            r = gen.generate(prompts, sampling)
            rates.append((r.new_tokens - len(prompts)) / r.decode_s)
        print(lm.name, "batch-8 decode tok/s", [round(x, 1) for x in rates], flush=True)
        del lm, gen


if __name__ == "__main__":
    main(sys.argv[1:] or ["qwen2.5-coder-0.5b-instruct"])
