"""The teacher stage: answer the training prompts once, keep the answers and their top-k logits.

The answers come from the shared ``jaxkd.models.generate.Generator``, which also returns, at
every generated position, the top-k log-probs of the teacher distribution that produced that
token (``generate(..., topk=...)``). Those are the soft targets for answer token j, captured for
free while decoding: no second forward pass. Prompts run longest first in large batches of
similar lengths (``teacher.batch_size``), so little of a batch is padding, and finished answers
are committed to the cache batch by batch (resumable).

Grounding (``teacher.grounding``): ``none`` asks the teacher exactly what the student is asked;
``reference`` adds the record's ordered steps, required key terms and safety notes to the
teacher's system message (privileged information). The student's prompt never contains them.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
from tqdm.auto import tqdm

from jaxkd.config import RunConfig, to_dict
from jaxkd.machine import describe
from jaxkd.data.formatting import SYSTEM_PROMPT, example_id, example_meta, prompt_messages
from jaxkd.distill.cache import TeacherCache, TeacherEntry, cache_key, export_answers
from jaxkd.models.generate import Generator, chat_ids  # noqa: F401 (chat_ids re-exported)
from jaxkd.models.layers import relayout_projections
from jaxkd.models.layout import choose as choose_layout

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
            "machine": describe(),
            "jax": jax.__version__, "devices": str(jax.devices()), **(extra or {})}


def run_teacher(cfg: RunConfig, model: Any, tokenizer: Any, *, items: Sequence[PromptItem] | None = None,
                log: Callable[[str], None] = print, progress: bool | None = None) -> dict[str, Any]:
    """Answer every prompt of ``cfg.teacher.splits`` not yet in the cache; returns a summary.

    Prompts are sorted by length (longest first) and answered ``teacher.batch_size`` at a time;
    each batch's answers are committed before the next batch starts (resumable: done keys are
    skipped). ``progress``: a tqdm bar with tok/s and an ETA (None: only on a terminal).
    """
    tc = cfg.teacher
    cache = TeacherCache(tc.cache_dir)
    if items is None:
        items = [it for s in tc.splits for it in teacher_prompts(cfg, s)]
    todo = [it for it in items if it.key not in cache]
    # One copy of the weights, held in the layout this machine multiplies batches fastest with
    # (jaxkd.models.layout): a second copy of a 1.5B teacher would not fit beside another one on a
    # 24 GiB machine. Put back as stored when the stage ends.
    layout = choose_layout(model.cfg, model.compute_dtype).many_rows
    log(f"teacher {tc.preset} (grounding={tc.grounding}): {len(items)} prompts, {len(items) - len(todo)} "
        f"cached, {len(todo)} to generate in length-sorted batches of {tc.batch_size} (weights multiplied "
        f"{'[in, out]' if layout == 'io' else '[out, in]'}: jaxkd.models.layout)")
    prompts = [chat_ids(tokenizer, it.teacher_messages) for it in todo]
    too_long = [it.example_id for it, p in zip(todo, prompts) if len(p) + tc.sampling.max_new_tokens > tc.max_seq_len]
    if too_long:
        raise ValueError(f"teacher prompts {too_long} + max_new_tokens exceed teacher.max_seq_len "
                         f"{tc.max_seq_len}; raise it or lower teacher.sampling.max_new_tokens")
    vocab = real_vocab_size(tokenizer, model.cfg.vocab_size)
    order = sorted(range(len(todo)), key=lambda i: -len(prompts[i]))
    t_start, generated, gen_s = time.perf_counter(), 0, 0.0
    bar = tqdm(total=len(todo), unit="answer", disable=(None if progress is None else not progress),
               dynamic_ncols=True)
    try:
        relayout_projections(model, layout)
        gen = Generator(model, tokenizer, max_seq_len=tc.max_seq_len, prompt_bucket=tc.prompt_bucket,
                        weight_layout="stored")
        for start in range(0, len(order), tc.batch_size):
            batch = order[start:start + tc.batch_size]
            out = gen.generate([prompts[i] for i in batch], tc.sampling, topk=tc.top_k,
                               topk_temperature=tc.logit_temperature, topk_vocab=vocab)
            gen_s += out.prefill_s + out.decode_s
            generated += out.new_tokens
            for j, i in enumerate(batch):
                it = todo[i]
                entry = TeacherEntry(
                    key=it.key, example_id=it.example_id, split=it.split,
                    meta=example_meta(it.record, it.question_index, f"teacher:{tc.preset}"),
                    preset=tc.preset, grounding=tc.grounding, sampling=to_dict(tc.sampling),
                    teacher_messages=it.teacher_messages, student_messages=it.student_messages,
                    answer=tokenizer.decode(out.tokens[j], skip_special_tokens=True),
                    answer_ids=out.tokens[j], eos_id=out.eos_tokens[j], finish_reason=out.finish_reasons[j],
                    logit_temperature=tc.logit_temperature)
                cache.append(entry, (out.topk_ids[j], out.topk_logprobs[j]) if tc.top_k > 0 else None)
            elapsed = time.perf_counter() - t_start
            bar.update(len(batch))
            bar.set_postfix_str(f"{generated / max(elapsed, 1e-9):.1f} tok/s")
            log(f"  {start + len(batch)}/{len(todo)} answers, batch of {len(batch)} (prompts "
                f"{len(prompts[batch[-1]])}-{len(prompts[batch[0]])} tokens): {out.new_tokens} tokens in "
                f"{out.prefill_s + out.decode_s:.1f}s ({out.new_tokens / max(out.prefill_s + out.decode_s, 1e-9):.2f} "
                f"tok/s), elapsed {elapsed:.0f}s")
    finally:
        bar.close()
        relayout_projections(model, "oi")
    wall = time.perf_counter() - t_start
    summary = {"prompts": len(items), "generated": len(todo), "new_tokens": generated,
               "generation_s": round(gen_s, 1), "wall_s": round(wall, 1),
               "tok_per_s": round(generated / gen_s, 3) if gen_s else None,
               "wall_tok_per_s": round(generated / wall, 3) if todo else None,
               "batch_size": tc.batch_size}
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
