"""Rebuild the teacher's top-k logit store from committed text answers, without regenerating.

The committed answers (``jaxkd/data/teacher/*.jsonl``) keep the exact generated token ids. One
teacher forward pass over (teacher prompt + answer + end-of-turn) gives, at the position before
each answer token, the distribution that produced it: the same top-k the teacher stage records
while decoding (up to float rounding between a full prefill and step-by-step decoding). On a
2-core CPU that is minutes of prefill instead of most of an hour of decoding.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.distill.cache import TeacherCache, TeacherEntry, load_exported
from jaxkd.models.generate import chat_ids
from jaxkd.models.sampling import topk_logprobs


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "vocab"))
def _answer_topk(graphdef, params, ids_bt, pos_bt, seg_bt, gather_bn, temperature, *, k, vocab):
    model = nnx.merge(graphdef, params)
    h_btd, _ = model(ids_bt, pos_bt, segment_ids_bt=seg_bt, return_hidden=True)
    # Project only the positions that predict answer tokens: [B, N, D] -> [B, N, V].
    h_bnd = jnp.take_along_axis(h_btd, gather_bn[..., None], axis=1)
    # the very function the Generator captures top-k with while decoding
    return topk_logprobs(model.logits_from_hidden(h_bnd), k, vocab, temperature)


def answer_topk(model: Any, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *,
                top_k: int, vocab: int, logit_temperature: float = 1.0, pad_id: int = 0,
                bucket: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k (ids, log-probs) of the distribution before each target token, per example."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets")
    if any(len(p) == 0 for p in prompts) or any(len(t) == 0 for t in targets):
        raise ValueError("every example needs a non-empty prompt and a non-empty answer")
    b = len(prompts)
    seqs = [list(p) + list(t) for p, t in zip(prompts, targets)]
    t_len = _round_up(max(len(s) for s in seqs), bucket)
    n_len = _round_up(max(len(t) for t in targets), bucket)
    ids = np.full((b, t_len), pad_id, np.int32)
    seg = np.zeros((b, t_len), np.int32)
    pos = np.zeros((b, t_len), np.int32)
    gather = np.zeros((b, n_len), np.int32)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)], seg[i, :len(s)], pos[i, :len(s)] = s, 1, np.arange(len(s))
        n = len(s) - len(p)
        gather[i, :n] = np.arange(len(p) - 1, len(s) - 1)  # position j-1 predicts token j
    graphdef, params = nnx.split(model)
    ids_bnk, lp_bnk = _answer_topk(graphdef, params, jnp.asarray(ids), jnp.asarray(pos),
                                   jnp.asarray(seg), jnp.asarray(gather),
                                   jnp.float32(logit_temperature), k=top_k, vocab=vocab)
    ids_h, lp_h = np.asarray(ids_bnk), np.asarray(lp_bnk)
    return [(ids_h[i, :len(t)], lp_h[i, :len(t)]) for i, t in enumerate(targets)]


def rescore_exported(model: Any, tokenizer: Any, answers_path: str | Path, cache_dir: str | Path, *,
                     top_k: int, logit_temperature: float, vocab: int, preset: str, grounding: str,
                     keys: Sequence[str] | None = None, batch_size: int = 8,
                     log: Callable[[str], None] = print) -> int:
    """Put every committed answer of ``answers_path`` (or only ``keys``) that the cache lacks into
    the cache, with top-k logits from one forward pass. Returns how many were added."""
    if top_k <= 0:
        raise ValueError("rescoring needs teacher.top_k > 0")
    _, exported = load_exported(answers_path)
    cache = TeacherCache(cache_dir)
    wanted = exported.values() if keys is None else [exported[k] for k in keys if k in exported]
    todo: list[TeacherEntry] = []
    for e in wanted:
        if e.key in cache:
            continue
        if e.preset != preset or e.grounding != grounding:
            raise ValueError(f"{answers_path}: entry {e.example_id} was made by {e.preset} with "
                             f"grounding={e.grounding}, not {preset} / {grounding}")
        if not e.target_ids:
            continue  # nothing to distil from an empty answer
        todo.append(e)
    if not todo:
        return 0
    log(f"rescoring {len(todo)} committed teacher answers from {answers_path} (top-{top_k}, "
        f"one forward pass each, batches of {batch_size})")
    pad = getattr(tokenizer, "pad_token_id", None)
    t0 = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        prompts = [chat_ids(tokenizer, e.teacher_messages) for e in batch]
        outs = answer_topk(model, prompts, [e.target_ids for e in batch], top_k=top_k, vocab=vocab,
                           logit_temperature=logit_temperature, pad_id=int(pad or 0))
        for e, (ids, lp) in zip(batch, outs):
            e.logit_temperature = logit_temperature
            cache.append(e, (ids, lp))
        log(f"  {start + len(batch)}/{len(todo)} rescored, {time.perf_counter() - t0:.0f}s")
    return len(todo)
