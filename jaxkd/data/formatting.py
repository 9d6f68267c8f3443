"""Chat formatting: a record plus one of its questions becomes ``{"messages", "meta"}``.

The last message of an example is the assistant answer: the record's reference steps written
out (default), or a teacher answer passed in by the KD stage.
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping

SYSTEM_PROMPT = (
    "You are a concise, careful troubleshooting assistant for consumer electronics: headphones, "
    "earbuds, headsets, speakers, soundbars, TVs and streaming devices, smart-home devices, "
    "routers and wearables. Give clear, ordered steps specific to the user's device, and never "
    "suggest anything unsafe.")

Message = dict[str, str]


def example_id(record_id: str, question_index: int) -> str:
    """The key of one (record, question) prompt, e.g. ``anc_headphones-001#q2``."""
    return f"{record_id}#q{question_index}"


def reference_answer(record: dict) -> str:
    """The record's reference steps as a short numbered answer."""
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(record["steps"], start=1))
    return f"Here is what to try, in order:\n{steps}"


def prompt_messages(record: dict, question_index: int,
                    system_prompt: str | None = SYSTEM_PROMPT) -> list[Message]:
    """System (optional) and user turns: what a teacher or student is asked."""
    questions = record["questions"]
    if not 0 <= question_index < len(questions):
        raise IndexError(f"record {record['id']} has {len(questions)} questions; "
                         f"question_index {question_index} is out of range")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": questions[question_index]})
    return messages


def record_to_messages(record: dict, question_index: int, system_prompt: str | None = SYSTEM_PROMPT,
                       *, answer: str | None = None) -> list[Message]:
    """Prompt turns plus the assistant answer (``answer`` or the record's reference steps)."""
    messages = prompt_messages(record, question_index, system_prompt)
    messages.append({"role": "assistant", "content": reference_answer(record) if answer is None else answer})
    return messages


def example_meta(record: dict, question_index: int, answer_source: str) -> dict:
    return {"id": example_id(record["id"], question_index), "record_id": record["id"],
            "question_index": question_index, "device": record["device"],
            "category": record["category"], "issue": record["issue"],
            "split": record.get("split", ""), "answer_source": answer_source}


def sft_examples(split: str | Iterable[dict], answers: Mapping[str, str] | None = None, *,
                 questions: Literal["all", "first"] = "all",
                 system_prompt: str | None = SYSTEM_PROMPT,
                 missing: Literal["skip", "error", "reference"] = "skip",
                 built_dir=None) -> list[dict]:
    """Chat examples ``{"messages", "meta"}`` for a split name (built data) or a list of records.

    ``answers`` maps ``example_id(record_id, question_index)`` to an answer text (teacher output);
    without it the reference steps are the answer. ``missing`` says what to do with a prompt that
    has no entry in ``answers``: skip it, raise, or fall back to the reference answer.
    """
    if isinstance(split, str):
        from jaxkd.data.store import load_records
        records = load_records(split, built_dir=built_dir)
    else:
        records = list(split)
    out = []
    for rec in records:
        indices = range(len(rec["questions"])) if questions == "all" else range(1)
        for qi in indices:
            key = example_id(rec["id"], qi)
            answer, source = None, "reference"
            if answers is not None:
                if key in answers:
                    answer, source = answers[key], "provided"
                elif missing == "skip":
                    continue
                elif missing == "error":
                    raise KeyError(f"no answer for prompt {key!r}; pass missing='skip' or "
                                   "'reference' to sft_examples to allow gaps")
            out.append({"messages": record_to_messages(rec, qi, system_prompt, answer=answer),
                        "meta": example_meta(rec, qi, source)})
    return out


def prompt_examples(split: str | Iterable[dict], *, questions: Literal["all", "first"] = "all",
                    system_prompt: str | None = SYSTEM_PROMPT, built_dir=None) -> list[dict]:
    """Prompts without answers (for teacher generation): ``{"messages", "meta"}``."""
    records = sft_examples(split, questions=questions, system_prompt=system_prompt, built_dir=built_dir)
    return [{"messages": ex["messages"][:-1], "meta": ex["meta"]} for ex in records]

