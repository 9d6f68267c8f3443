"""The teacher stage: answer the training prompts once, keep the answers and their top-k logits.

``generate_with_topk`` is a KV-cache decode loop (the same prefill/decode structure as
``jaxkd.models.generate``, whose sampler it reuses) that also returns, at every generated
position, the top-k log-probs of the teacher distribution that produced that token. Those are
the soft targets for answer token j, captured for free while decoding: no second forward pass.

Grounding (``teacher.grounding``): ``none`` asks the teacher exactly what the student is asked;
``reference`` adds the record's ordered steps, required key terms and safety notes to the
teacher's system message (privileged information). The student's prompt never contains them.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import platform
import re
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.config import RunConfig, SamplingConfig, to_dict
from jaxkd.data.formatting import SYSTEM_PROMPT, example_id, example_meta, prompt_messages
from jaxkd.distill.cache import TeacherCache, TeacherEntry, cache_key, export_answers
from jaxkd.models.decoder import init_cache
from jaxkd.models.generate import SamplerKind, chat_ids, sample_tokens  # noqa: F401 (chat_ids re-exported)

Message = dict[str, str]

GROUNDING_HEADER = ("Reference notes for this question (verified troubleshooting steps for this kind "
                    "of device; the user cannot see these notes):")
GROUNDING_INSTRUCTION = ("Answer the user directly in numbered steps, in your own words, following "
                         "the reference steps in order and using the key terms. Do not mention the "
                         "notes.")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def grounding_text(steps: Sequence[str], required: Sequence[Sequence[str]] = (),
                   safety: Sequence[str] = ()) -> str:
    """The privileged reference block of a grounded teacher prompt."""
    lines = [GROUNDING_HEADER, "Steps, in order:"]
    lines += [f"{i}. {s}" for i, s in enumerate(steps, start=1)]
    if required:
        lines.append("Key terms to use: " + "; ".join(group[0] for group in required if group))
    if safety:
        lines.append("Safety notes: " + " ".join(safety))
    lines.append(GROUNDING_INSTRUCTION)
    return "\n".join(lines)


def record_grounding(record: Mapping[str, Any]) -> str:
    """Grounding block of a corpus record or a held-out QA item (``reference_steps``)."""
    steps = record.get("steps") or record.get("reference_steps")
    if not steps:
        raise KeyError(f"record {record.get('id')} has no steps / reference_steps to ground on")
    return grounding_text(steps, record.get("required", ()), record.get("safety", ()))


def teacher_messages(student_msgs: Sequence[Message], record: Mapping[str, Any],
                     grounding: str) -> list[Message]:
    """What the teacher is asked: the student's prompt, plus the reference block if grounded."""
    msgs = [dict(m) for m in student_msgs]
    if grounding == "none":
        return msgs
    if grounding != "reference":
        raise ValueError(f"unknown teacher.grounding {grounding!r}; allowed: ['none', 'reference']")
    block = record_grounding(record)
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = msgs[0]["content"] + "\n\n" + block
    else:
        msgs.insert(0, {"role": "system", "content": block})
    return msgs


def select_prompts(records: Sequence[Mapping[str, Any]], questions: str = "first",
                   limit: int = 0) -> list[tuple[Mapping[str, Any], int]]:
    """(record, question index) pairs, interleaved across categories so any prefix of the list
    covers every category; ``limit`` > 0 keeps that prefix."""
    by_cat: dict[str, list[tuple[Mapping[str, Any], int]]] = defaultdict(list)
    for rec in records:
        n = len(rec["questions"]) if questions == "all" else 1
        for qi in range(n):
            by_cat[rec["category"]].append((rec, qi))
    queues = [by_cat[c] for c in sorted(by_cat)]
    out: list[tuple[Mapping[str, Any], int]] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out[:limit] if limit > 0 else out


def real_vocab_size(tokenizer: Any, model_vocab: int) -> int:
    """The tokenizer's real vocabulary (rows past it in a padded embedding are never produced)."""
    return min(len(tokenizer), model_vocab)


# --------------------------------------------------------------------------------------------
# Decoding with top-k capture
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TeacherOutput:
    tokens: list[int]            # answer tokens, end-of-turn token excluded
    eos_id: int | None           # the end-of-turn token, None if cut at max_new_tokens
    topk_ids: np.ndarray         # [len(tokens) + (eos_id is not None), k] int32
    topk_logprobs: np.ndarray    # same shape, float32, at logit_temperature
    finish_reason: str


def _topk(logits_bv: jax.Array, k: int, vocab: int, temperature: float) -> tuple[jax.Array, jax.Array]:
    logp_bv = jax.nn.log_softmax(logits_bv[:, :vocab].astype(jnp.float32) / temperature, axis=-1)
    values_bk, ids_bk = jax.lax.top_k(logp_bv, k)
    return ids_bk.astype(jnp.int32), values_bk


@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "k", "vocab", "logit_temp"),
                   donate_argnames=("cache",))
def _prefill(graphdef, params, cache, ids_bt, pos_bt, seg_bt, key, temperature, top_p, *, kind, k,
             vocab, logit_temp):
    model = nnx.merge(graphdef, params)
    h_btd, cache = model(ids_bt, pos_bt, cache=cache, segment_ids_bt=seg_bt, return_hidden=True)
    logits_bv = model.logits_from_hidden(h_btd[:, -1:])[:, 0]
    tok_b, _ = sample_tokens(logits_bv, jax.random.fold_in(key, 0), temperature, top_p, kind)
    ids_bk, lp_bk = _topk(logits_bv, k, vocab, logit_temp)
    return tok_b, ids_bk, lp_bk, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "k", "vocab", "logit_temp"),
                   donate_argnames=("cache",))
def _decode(graphdef, params, cache, tok_b, pos_b, step, key, temperature, top_p, *, kind, k, vocab,
            logit_temp):
    model = nnx.merge(graphdef, params)
    logits_b1v, cache = model(tok_b[:, None], pos_b[:, None], cache=cache)
    logits_bv = logits_b1v[:, 0]
    tok_b, _ = sample_tokens(logits_bv, jax.random.fold_in(key, step), temperature, top_p, kind)
    ids_bk, lp_bk = _topk(logits_bv, k, vocab, logit_temp)
    return tok_b, ids_bk, lp_bk, cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate_with_topk(model: Any, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                       eos_ids: Iterable[int], pad_id: int, vocab: int, top_k: int = 16,
                       logit_temperature: float = 1.0, prompt_bucket: int = 64,
                       cache_bucket: int = 256) -> tuple[list[TeacherOutput], dict[str, float]]:
    """Generate for a batch of prompts (left-padded), returning answers and per-token top-k.

    ``top_k`` = 0 still records nothing but the tokens (arrays of width 0).
    """
    eos = frozenset(int(e) for e in eos_ids)
    b = len(prompts)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError("every teacher prompt needs at least one token")
    t = _round_up(int(lengths.max()), prompt_bucket)
    ids = np.full((b, t), pad_id, np.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], seg[i, t - len(p):], pos[i, t - len(p):] = p, 1, np.arange(len(p))
    cache_len = _round_up(t + sampling.max_new_tokens, cache_bucket)
    kind = SamplerKind(greedy=sampling.temperature == 0.0, top_k=min(sampling.top_k, vocab),
                        use_top_p=sampling.top_p < 1.0)
    statics = dict(kind=kind, k=max(top_k, 1), vocab=vocab, logit_temp=float(logit_temperature))
    temperature = jnp.float32(max(sampling.temperature, 1e-6))
    top_p = jnp.float32(sampling.top_p)
    key = jax.random.key(sampling.seed)
    graphdef, params = nnx.split(model)
    cache = init_cache(model.cfg, b, cache_len, model.compute_dtype)

    t0 = time.perf_counter()
    tok, tk_ids, tk_lp, cache = _prefill(graphdef, params, cache, jnp.asarray(ids), jnp.asarray(pos),
                                         jnp.asarray(seg), key, temperature, top_p, **statics)
    tok_h = np.asarray(tok)
    prefill_s = time.perf_counter() - t0
    tokens: list[list[int]] = [[] for _ in range(b)]
    rows_ids: list[list[np.ndarray]] = [[] for _ in range(b)]
    rows_lp: list[list[np.ndarray]] = [[] for _ in range(b)]
    eos_hit: list[int | None] = [None] * b
    pos_b = jnp.asarray(lengths)
    new_tokens = 0
    for step in range(1, sampling.max_new_tokens + 1):
        ids_h, lp_h = np.asarray(tk_ids), np.asarray(tk_lp)
        for i in range(b):
            if eos_hit[i] is not None or len(tokens[i]) >= sampling.max_new_tokens:
                continue
            new_tokens += 1
            rows_ids[i].append(ids_h[i, :top_k])
            rows_lp[i].append(lp_h[i, :top_k])
            if int(tok_h[i]) in eos:
                eos_hit[i] = int(tok_h[i])
            else:
                tokens[i].append(int(tok_h[i]))
        if all(e is not None or len(tk) >= sampling.max_new_tokens for e, tk in zip(eos_hit, tokens)):
            break
        tok, tk_ids, tk_lp, cache = _decode(graphdef, params, cache, tok, pos_b, jnp.int32(step), key,
                                            temperature, top_p, **statics)
        pos_b = pos_b + 1
        tok_h = np.asarray(tok)
    decode_s = time.perf_counter() - t0 - prefill_s
    outs = []
    for i in range(b):
        n = len(rows_ids[i])
        outs.append(TeacherOutput(
            tokens=tokens[i], eos_id=eos_hit[i],
            topk_ids=np.stack(rows_ids[i]) if n else np.zeros((0, top_k), np.int32),
            topk_logprobs=np.stack(rows_lp[i]).astype(np.float32) if n else np.zeros((0, top_k), np.float32),
            finish_reason="eos" if eos_hit[i] is not None else "length"))
    return outs, {"prefill_s": prefill_s, "decode_s": decode_s, "new_tokens": new_tokens}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromptItem:
    key: str
    split: str
    record: Mapping[str, Any]
    question_index: int
    student_messages: list[Message]
    teacher_messages: list[Message]

    @property
    def example_id(self) -> str:
        return example_id(self.record["id"], self.question_index)


def teacher_prompts(cfg: RunConfig, split: str, *, limit: int | None = None,
                    records: Sequence[Mapping[str, Any]] | None = None) -> list[PromptItem]:
    """The prompts of ``split`` the teacher answers (with their cache keys)."""
    tc = cfg.teacher
    if records is None:
        from jaxkd.data.store import load_records

        records = load_records(split, built_dir=cfg.data.built_dir)
    lim = tc.limit_per_split.get(split, 0) if limit is None else limit
    system = SYSTEM_PROMPT if cfg.data.system_prompt is None else cfg.data.system_prompt
    out = []
    for rec, qi in select_prompts(records, tc.questions, lim):
        student = prompt_messages(rec, qi, system)
        teacher = teacher_messages(student, rec, tc.grounding)
        out.append(PromptItem(key=cache_key(tc.preset, teacher, tc.sampling, tc.grounding), split=split,
                              record=rec, question_index=qi, student_messages=student,
                              teacher_messages=teacher))
    return out


def provenance(cfg: RunConfig, extra: Mapping[str, Any] | None = None,
               command: str | None = None) -> dict[str, Any]:
    return {"model": cfg.teacher.preset, "teacher": to_dict(cfg.teacher),
            "command": command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
            "jax": jax.__version__, "devices": str(jax.devices()), **(extra or {})}


def run_teacher(cfg: RunConfig, model: Any, tokenizer: Any, *, items: Sequence[PromptItem] | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Answer every prompt of ``cfg.teacher.splits`` not yet in the cache; returns a summary.

    Resumable: done keys are skipped, each finished answer is committed before the next batch.
    """
    tc = cfg.teacher
    cache = TeacherCache(tc.cache_dir)
    if items is None:
        items = [it for s in tc.splits for it in teacher_prompts(cfg, s)]
    todo = [it for it in items if it.key not in cache]
    log(f"teacher {tc.preset} (grounding={tc.grounding}): {len(items)} prompts, {len(items) - len(todo)} "
        f"cached, {len(todo)} to generate in batches of {tc.batch_size}")
    eos_ids = set(int(e) for e in (getattr(tokenizer, "generation_eos_ids", None) or ()))
    eos_ids |= set(int(e) for e in model.cfg.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad) if pad is not None else min(eos_ids)
    vocab = real_vocab_size(tokenizer, model.cfg.vocab_size)
    t_start, generated = time.perf_counter(), 0
    decode_s = 0.0
    for start in range(0, len(todo), tc.batch_size):
        batch = todo[start:start + tc.batch_size]
        prompts = [chat_ids(tokenizer, it.teacher_messages) for it in batch]
        too_long = [it.example_id for it, p in zip(batch, prompts) if len(p) + tc.sampling.max_new_tokens > tc.max_seq_len]
        if too_long:
            raise ValueError(f"teacher prompts {too_long} + max_new_tokens exceed teacher.max_seq_len "
                             f"{tc.max_seq_len}; raise it or lower teacher.sampling.max_new_tokens")
        outs, timing = generate_with_topk(
            model, prompts, tc.sampling, eos_ids=eos_ids, pad_id=pad_id, vocab=vocab, top_k=tc.top_k,
            logit_temperature=tc.logit_temperature, prompt_bucket=tc.prompt_bucket)
        decode_s += timing["decode_s"] + timing["prefill_s"]
        generated += timing["new_tokens"]
        for it, out in zip(batch, outs):
            entry = TeacherEntry(
                key=it.key, example_id=it.example_id, split=it.split,
                meta=example_meta(it.record, it.question_index, f"teacher:{tc.preset}"),
                preset=tc.preset, grounding=tc.grounding, sampling=to_dict(tc.sampling),
                teacher_messages=it.teacher_messages, student_messages=it.student_messages,
                answer=tokenizer.decode(out.tokens, skip_special_tokens=True),
                answer_ids=out.tokens, eos_id=out.eos_id, finish_reason=out.finish_reason,
                logit_temperature=tc.logit_temperature)
            cache.append(entry, (out.topk_ids, out.topk_logprobs) if tc.top_k > 0 else None)
        done = start + len(batch)
        log(f"  {done}/{len(todo)} answers, batch {timing['new_tokens']} tokens in "
            f"{timing['prefill_s'] + timing['decode_s']:.1f}s "
            f"({timing['new_tokens'] / max(timing['decode_s'], 1e-9):.2f} tok/s decode), "
            f"elapsed {time.perf_counter() - t_start:.0f}s")
    wall = time.perf_counter() - t_start
    summary = {"prompts": len(items), "generated": len(todo), "new_tokens": generated,
               "generation_s": round(decode_s, 1), "wall_s": round(wall, 1),
               "tok_per_s": round(generated / decode_s, 3) if decode_s else None}
    return summary


def answers_export_path(cfg: RunConfig) -> Path:
    tc = cfg.teacher
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(tc.preset).name.removesuffix(".yaml"))
    return Path(tc.answers_dir) / f"{name}__{tc.grounding}.jsonl"


def export_stage_answers(cfg: RunConfig, items: Sequence[PromptItem], prov: Mapping[str, Any]) -> Path:
    """Write the committed text dataset for ``items`` (all must be cached)."""
    cache = TeacherCache(cfg.teacher.cache_dir)
    entries = [cache.get(it.key) for it in items]
    missing = [it.example_id for it, e in zip(items, entries) if e is None]
    if missing:
        raise KeyError(f"{len(missing)} prompts have no cached teacher answer (e.g. {missing[:3]})")
    path = answers_export_path(cfg)
    export_answers(entries, path, prov)
    return path
