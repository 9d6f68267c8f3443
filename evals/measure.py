"""The parts of the evaluation that run a model: answers, perplexity, throughput.

Everything here writes into JSONL caches (``JsonlCache``) keyed by a hash of the model's weights
identity (``evals.identity``) and of what was asked, so a rerun only computes what is missing and
the report is rebuilt from the caches alone (``evals.report``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxkd.data.store import JsonlCache  # noqa: F401 (evals' caches; re-exported)

GEN_VERSION = 1  # bump when the generation procedure changes in a way the key cannot see


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def machine_info() -> dict[str, Any]:
    """What the throughput figures were measured on (the machine is shared: load average too)."""
    import jax

    from jaxkd.machine import cpu_facts

    f = cpu_facts()
    return {"node": platform.node(), "cpu": f["cpu"], "simd": f["simd"], "cores": f["cores"],
            "mem_gib": f["ram_gib"], "python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()][:4]}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def peak_rss_gib() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# Where one config's caches live: <cache_dir>/<tag>/*.jsonl (rows keyed by content, shared by
# every config that evaluates the same model) and <cache_dir>/manifest_<config name>.json (per
# tag, the cache keys of that config's last run: all its report needs to find its rows). One
# manifest per config: two configs that share a tag on different items must not overwrite each
# other's entry.

def model_dir(cfg: Any, tag: str) -> Path:
    return Path(cfg.cache_dir) / tag


def manifest_path(cfg: Any) -> Path:
    return Path(cfg.cache_dir) / f"manifest_{cfg.name}.json"


def read_manifest(cfg: Any) -> dict[str, Any]:
    path = manifest_path(cfg)
    return json.loads(path.read_text()) if path.exists() else {}


def update_manifest(cfg: Any, tag: str, entry: Mapping[str, Any]) -> None:
    path = manifest_path(cfg)
    data = read_manifest(cfg)
    data[tag] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False))
    tmp.replace(path)



# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def generate_missing(loaded: Any, requests: Sequence[tuple[str, list[int], Mapping]], sampling: Any, cache: JsonlCache,
                     *, batch_size: int, max_seq_len: int, provenance: Mapping, log: Callable[[str], None]) -> int:
    """Answer every ``(key, prompt ids, extra row fields)`` whose key is not cached; returns how many."""
    from jaxkd.models.generate import Generator

    todo = [r for r in requests if r[0] not in cache]
    if not todo:
        return 0
    gen = Generator(loaded.model, loaded.tokenizer, max_seq_len=max_seq_len, prompt_bucket=64)
    t_start = time.perf_counter()
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        t0 = time.perf_counter()
        out = gen.generate([ids for _, ids, _ in chunk], sampling)
        rows = []
        for (key, ids, extra), toks, reason in zip(chunk, out.tokens, out.finish_reasons):
            rows.append({"key": key, **extra, "answer": loaded.tokenizer.decode(toks, skip_special_tokens=True),
                         "finish_reason": reason, "new_tokens": len(toks), "prompt_tokens": len(ids),
                         "provenance": dict(provenance)})
        cache.add(rows)
        done, elapsed = min(s + batch_size, len(todo)), time.perf_counter() - t_start
        log(f"  {done}/{len(todo)} answers ({out.new_tokens} tokens in {time.perf_counter() - t0:.0f}s; "
            f"elapsed {elapsed / 60:.1f} min, about {elapsed / done * (len(todo) - done) / 60:.0f} min to go)")
    return len(todo)


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def text_token_ids(tokenizer: Any, text: str, max_tokens: int = 0) -> list[int]:
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    return ids[:max_tokens] if max_tokens > 0 else ids


def perplexity(model: Any, ids: Sequence[int], *, window: int, block: int) -> dict[str, Any]:
    """Token NLLs of ``ids`` scored in consecutive non-overlapping windows of ``window`` tokens
    (each window's first token is context only, so ``n_tokens`` = len(ids) - number of windows),
    summed per ``block`` scored tokens for the bootstrap. Perplexity = exp(nll_sum / n_tokens)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, ids_bt, seg_bt):
        m = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(ids_bt.shape[1], dtype=jnp.int32), ids_bt.shape)
        logits, _ = m(ids_bt, pos, segment_ids_bt=seg_bt)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, ids_bt[:, 1:, None], axis=-1)[..., 0]

    per_token: list[float] = []
    for s in range(0, len(ids), window):
        chunk = list(ids[s:s + window])
        if len(chunk) < 2:
            break
        arr = np.zeros((1, window), np.int32)
        seg = np.zeros((1, window), np.int32)
        arr[0, :len(chunk)], seg[0, :len(chunk)] = chunk, 1
        out = np.asarray(nll(state, jnp.asarray(arr), jnp.asarray(seg)))[0, :len(chunk) - 1]
        per_token.extend(float(x) for x in out)
    v = np.asarray(per_token, np.float64)
    blocks = [[round(float(v[i:i + block].sum()), 6), int(v[i:i + block].size)] for i in range(0, v.size, block)]
    return {"n_tokens": int(v.size), "nll_sum": float(v.sum()), "perplexity": float(np.exp(v.mean())),
            "blocks": blocks, "window": window, "block": block}


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def count_params(model: Any) -> int:
    from flax import nnx

    return int(sum(np.prod(x.shape) for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param))))


def throughput(loaded: Any, prompts: Sequence[Sequence[int]], *, batch_sizes: Sequence[int], reps: int,
               new_tokens: int, max_seq_len: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Prefill and decode tokens/s per batch size: one untimed warm-up (compiles), then ``reps``
    timed repetitions; min and median reported. Prompts: the first ``b`` of ``prompts``. Decode
    runs a fixed ``new_tokens`` per row (end-of-turn ignored) so every rep does the same work;
    decode tok/s = b x (new_tokens - 1) / time after the first token; prefill tok/s = real prompt
    tokens / time to the first token (the Generator's defaults: a prefix shared by every prompt of
    the batch, the system prompt, is prefilled once)."""
    from jaxkd.config import SamplingConfig
    from jaxkd.models.generate import Generator

    gen = Generator(loaded.model, loaded.tokenizer, max_seq_len=max_seq_len, prompt_bucket=64)
    gen.eos_ids = frozenset()   # fixed work per rep: never stop on end-of-turn
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    out: dict[str, Any] = {}
    for b in batch_sizes:
        if b > len(prompts):
            raise ValueError(f"efficiency batch {b} needs {b} prompts, only {len(prompts)} items")
        batch = [list(p) for p in prompts[:b]]
        real = sum(len(p) for p in batch)
        gen.generate(batch, sampling)  # warm-up: compiles prefill and decode shapes
        pre, dec, load = [], [], []
        for _ in range(reps):
            load.append(os.getloadavg()[0])
            r = gen.generate(batch, sampling)
            pre.append(real / r.prefill_s)
            dec.append((r.new_tokens - b) / r.decode_s)
        out[str(b)] = {"prompt_tokens": real, "new_tokens_per_row": new_tokens, "reps": reps,
                       "prefill_tok_s": {"min": min(pre), "median": statistics.median(pre), "all": pre},
                       "decode_tok_s": {"min": min(dec), "median": statistics.median(dec), "all": dec},
                       "loadavg_1m": {"min": min(load), "max": max(load)}}
        log(f"  batch {b}: prefill {statistics.median(pre):.1f} tok/s, decode {statistics.median(dec):.2f} tok/s "
            f"(median of {reps}; load {min(load):.1f}-{max(load):.1f})")
    return out


__all__ = ["GEN_VERSION", "JsonlCache", "cache_key", "count_params", "generate_missing", "machine_info", "model_dir",
           "manifest_path", "read_manifest", "update_manifest",
           "peak_rss_gib", "perplexity", "text_token_ids", "throughput", "now"]
