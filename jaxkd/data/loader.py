"""Grain loaders for chat examples: chat template -> tokens -> prompt mask -> pack or pad -> batch.

Input examples look like ``{"messages": [{"role", "content"}, ...], "meta": {...}}``; the last
message is the assistant answer. Each batch is a dict of numpy int32 arrays (the KD contract):

- ``input_ids [B, T]``
- ``loss_mask [B, T]``: 1 where token t is a response token, predicted from position t-1 (so a
  loss uses ``logits[:, :-1]`` against ``input_ids[:, 1:]`` weighted by ``loss_mask[:, 1:]``);
  covers the answer and its closing end-of-turn token (``<|im_end|>``), never prompt or padding.
- ``segment_ids [B, T]``: 0 for padding, 1..n for the documents packed into a row.
- ``positions [B, T]``: restart at 0 at each document (0 on padding).
- ``example_index [B]`` (pad mode only): index into ``loader.examples``, -1 for a padding row;
  ``loader.meta(batch)`` turns it into the examples' ``meta`` dicts.

Shuffling is a seeded grain shuffle (a new order each epoch, the same for the same seed); the
iterator from ``iter(loader)`` has ``get_state()`` / ``set_state()``, and a restored iterator yields
the same next batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Sequence

import grain
import numpy as np

from jaxkd.config import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    seq_len: int = 1024
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    pack: bool = True
    num_epochs: int | None = 1     # None: repeat forever
    drop_remainder: bool = True    # False: the last batch is filled up with padding rows
    num_packing_bins: int = 0      # 0: batch_size
    overlong: Literal["truncate", "drop"] = "truncate"
    end_of_turn: str = "<|im_end|>"

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1:
            raise ConfigError(f"data.loader needs seq_len >= 2 and batch_size >= 1, got "
                              f"seq_len={self.seq_len} batch_size={self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.loader.num_epochs must be >= 1 or null, got {self.num_epochs}")


def end_of_turn_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        tid = tokenizer.eos_token_id
    if tid is None:
        raise ValueError(f"tokenizer has no {token!r} token and no eos token; pass the chat "
                         "template's end-of-turn token as LoaderConfig.end_of_turn")
    return int(tid)


def tokenize_chat(example: dict, tokenizer, *, end_of_turn: str = "<|im_end|>") -> dict[str, np.ndarray]:
    """``input_ids`` and ``loss_mask`` (int32) of one example, before any truncation.

    The prompt (every turn but the last, plus the generation prompt) and the answer are tokenized
    separately and concatenated, exactly as at inference time: the model sees the prompt tokens and
    must produce the answer tokens and then the end-of-turn token. Anything the template adds after
    that token (Qwen adds a newline) is dropped.
    """
    messages = example["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"example {example.get('meta', {}).get('id', '?')}: the last message must "
                         "be the assistant answer")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the "
                         "answer, so the prompt mask cannot be placed; use a template whose "
                         "generation prompt is a prefix of the full conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tokenizer, end_of_turn)
    if eot not in answer_ids:
        raise ValueError(f"the chat template does not close the assistant turn with {end_of_turn!r} "
                         f"(id {eot}); set LoaderConfig.end_of_turn to the template's closing token")
    answer_ids = answer_ids[: answer_ids.index(eot) + 1]
    ids = np.asarray(prompt_ids + answer_ids, np.int32)
    mask = np.concatenate([np.zeros(len(prompt_ids), np.int32), np.ones(len(answer_ids), np.int32)])
    return {"input_ids": ids, "loss_mask": mask}


def _pad_row(ex: dict, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(ex["input_ids"])
    ids = np.full(seq_len, pad_id, np.int32)
    ids[:n] = ex["input_ids"]
    mask = np.zeros(seq_len, np.int32)
    mask[:n] = ex["loss_mask"]
    seg = np.zeros(seq_len, np.int32)
    seg[:n] = 1
    pos = np.zeros(seq_len, np.int32)
    pos[:n] = np.arange(n, dtype=np.int32)
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "positions": pos,
            "example_index": np.int32(ex["example_index"])}


class _PadBatch:
    """Fills a short final batch with padding rows so every batch is [B, T]."""

    def __init__(self, batch_size: int, pad_id: int):
        self.batch_size, self.pad_id = batch_size, pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        short = self.batch_size - batch["input_ids"].shape[0]
        if short <= 0:
            return batch
        out = {}
        for k, v in batch.items():
            fill = self.pad_id if k == "input_ids" else (-1 if k == "example_index" else 0)
            pad = np.full((short, *v.shape[1:]), fill, v.dtype)
            out[k] = np.concatenate([v, pad])
        return out


def _packing_fields(ex: dict) -> dict[str, np.ndarray]:
    return {"input_ids": ex["input_ids"], "loss_mask": ex["loss_mask"]}


def _from_packed(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"input_ids": ex["input_ids"].astype(np.int32),
            "loss_mask": ex["loss_mask"].astype(np.int32),
            "segment_ids": ex["input_ids_segment_ids"].astype(np.int32),
            "positions": ex["input_ids_positions"].astype(np.int32)}


class ChatLoader:
    """Tokenizes ``examples`` once, then serves batches through a grain pipeline.

    ``iter(loader)`` gives a grain ``DatasetIterator`` (``get_state``/``set_state``). The pipeline
    holds only module-level callables, so it pickles (grain worker processes can run it).
    """

    def __init__(self, examples: Sequence[dict], tokenizer, cfg: LoaderConfig = LoaderConfig()):
        self.examples = list(examples)
        self.cfg = cfg
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.stats = {"examples": len(self.examples), "truncated": 0, "dropped": 0, "tokens": 0,
                      "response_tokens": 0}
        rows = []
        for i, ex in enumerate(self.examples):
            tok = tokenize_chat(ex, tokenizer, end_of_turn=cfg.end_of_turn)
            if len(tok["input_ids"]) > cfg.seq_len:
                if cfg.overlong == "drop" or tok["loss_mask"][: cfg.seq_len].sum() == 0:
                    self.stats["dropped"] += 1
                    continue
                tok = {k: v[: cfg.seq_len] for k, v in tok.items()}
                self.stats["truncated"] += 1
            self.stats["tokens"] += len(tok["input_ids"])
            self.stats["response_tokens"] += int(tok["loss_mask"].sum())
            rows.append({**tok, "example_index": i})
        if not rows:
            raise ValueError(f"no example fits seq_len={cfg.seq_len} with a response token; "
                             "raise data.loader.seq_len")
        self.rows = rows
        self.dataset = self._pipeline()

    def _pipeline(self) -> grain.IterDataset:
        cfg = self.cfg
        ds = grain.MapDataset.source(self.rows)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds.repeat(cfg.num_epochs)
        if cfg.pack:
            ds = ds.map(_packing_fields)
            it = grain.experimental.FirstFitPackIterDataset(
                ds.to_iter_dataset(),
                length_struct={"input_ids": cfg.seq_len, "loss_mask": cfg.seq_len},
                num_packing_bins=cfg.num_packing_bins or cfg.batch_size, seed=cfg.seed,
                shuffle_bins=cfg.shuffle, padding_struct={"input_ids": self.pad_id, "loss_mask": 0})
            it = it.map(_from_packed)
        else:
            it = ds.map(functools.partial(_pad_row, seq_len=cfg.seq_len, pad_id=self.pad_id))
            it = it.to_iter_dataset()
        it = it.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)
        if not cfg.drop_remainder:
            it = it.map(_PadBatch(cfg.batch_size, self.pad_id))
        return it

    def __iter__(self):
        return iter(self.dataset)

    def meta(self, batch: dict[str, Any]) -> list[dict | None]:
        """Per-row ``meta`` of the examples in a pad-mode batch (None for padding rows)."""
        if "example_index" not in batch:
            raise ValueError("per-example metadata needs LoaderConfig(pack=False): packed rows hold "
                             "several examples")
        return [self.examples[i].get("meta") if i >= 0 else None
                for i in np.asarray(batch["example_index"]).tolist()]


# --------------------------------------------------------------------------------------------
# KD batches: teacher answers with their top-k distributions, drawn by the domain-aware sampler
# --------------------------------------------------------------------------------------------

# log-prob put in padded top-k slots: finite (no NaN through masked gradients), negligible mass
PAD_LOGPROB = -30.0


def kd_row(ex: Any, *, max_len: int, top_k: int = 0) -> dict[str, np.ndarray]:
    """One right-padded KD row of ``ex`` (anything with ``ids``, ``prompt_len``, ``topk_ids``,
    ``topk_logprobs``, ``example_id``: a ``jaxkd.distill.cache.KDExample``).

    Position t predicts ``targets[t]`` = ids[t + 1]. ``loss_mask`` (float32) is 1 exactly where the
    target is a teacher answer token (or its end-of-turn), and ``topk_*[t]`` is the teacher
    distribution for that target (top-k entry ``t - prompt_len + 1``). An answer longer than the
    window is cut; prompt tokens are never targets.
    """
    t = max_len
    if ex.prompt_len >= t:
        raise ValueError(f"{ex.example_id}: prompt of {ex.prompt_len} tokens fills train.max_len {t}")
    row = {"input_ids": np.zeros(t, np.int32), "positions": np.zeros(t, np.int32),
           "segment_ids": np.zeros(t, np.int32), "targets": np.zeros(t, np.int32),
           "loss_mask": np.zeros(t, np.float32)}
    n_in = min(len(ex.ids), t)
    row["input_ids"][:n_in] = ex.ids[:n_in]
    row["positions"][:n_in] = np.arange(n_in)
    row["segment_ids"][:n_in] = 1
    n_tgt = min(len(ex.ids), t + 1) - 1   # positions 0..n_tgt-1 have a next token in the window
    row["targets"][:n_tgt] = ex.ids[1:n_tgt + 1]
    first = ex.prompt_len - 1             # the position predicting answer token 0
    row["loss_mask"][first:n_tgt] = 1.0
    if top_k:
        if ex.topk_ids is None or ex.topk_ids.shape[1] < top_k:
            raise ValueError(f"{ex.example_id}: teacher cache has no top-{top_k} logits")
        row["topk_ids"] = np.zeros((t, top_k), np.int32)
        row["topk_logprobs"] = np.full((t, top_k), PAD_LOGPROB, np.float32)
        n = n_tgt - first
        row["topk_ids"][first:n_tgt] = ex.topk_ids[:n, :top_k]
        row["topk_logprobs"][first:n_tgt] = ex.topk_logprobs[:n, :top_k]
    return row


def kd_pack_row(examples: Sequence[Any], *, max_len: int, top_k: int = 0) -> dict[str, np.ndarray]:
    """Several examples in one KD row of ``max_len``, one segment each (``segment_ids`` 1..n,
    positions restarting at 0, so attention never crosses examples), each laid out as ``kd_row``
    lays it out alone (an example longer than ``max_len`` is cut the same way), then padding."""
    parts = [kd_row(ex, max_len=min(len(ex.ids), max_len), top_k=top_k) for ex in examples]
    used = sum(len(p["input_ids"]) for p in parts)
    if not parts or used > max_len:
        raise ValueError(f"{len(parts)} examples of {used} tokens do not fill one row of {max_len}")
    row = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    row["segment_ids"] = np.concatenate([p["segment_ids"] * (i + 1) for i, p in enumerate(parts)]).astype(np.int32)
    pad = max_len - used
    for k, v in row.items():
        fill = PAD_LOGPROB if k == "topk_logprobs" else 0
        row[k] = np.concatenate([v, np.full((pad, *v.shape[1:]), fill, v.dtype)])
    return row


def kd_batch(examples: Sequence[Any], max_len: int, top_k: int = 0) -> dict[str, np.ndarray]:
    """``[B, T]`` (and ``[B, T, k]``) arrays of ``kd_row`` for each example, stacked."""
    rows = [kd_row(ex, max_len=max_len, top_k=top_k) for ex in examples]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _SampledIterator(grain.DatasetIterator):
    def __init__(self, source: grain.MapDataset, sampler: Any):
        super().__init__()
        self._source, self._sampler = source, sampler

    def __next__(self) -> Any:
        return self._source[int(self._sampler.next_indices(1)[0])]

    def get_state(self) -> dict[str, Any]:
        return {"sampler": self._sampler.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._sampler.set_state(state["sampler"])


class SampledDataset(grain.IterDataset):
    """Elements of ``source`` in the order an index sampler draws them, one draw per element.

    ``sampler`` has ``next_indices(n)``, ``get_state()`` and ``set_state(state)`` (e.g.
    ``jaxkd.distill.sampling.DomainSampler``); it is shared, not copied, so a trainer hook that
    re-weights it changes every later draw. Its state (draw count and current weights) is the
    iterator's state. Nothing reads ahead (no prefetch), so a re-weighting between two batches
    takes effect from the next one. One live iterator per dataset.
    """

    def __init__(self, source: grain.MapDataset, sampler: Any):
        super().__init__(source)
        self._source, self.sampler = source, sampler

    def __iter__(self) -> grain.DatasetIterator:
        return _SampledIterator(self._source, self.sampler)

    def __str__(self) -> str:
        return f"SampledDataset(sampler={type(self.sampler).__name__})"


class _PackedIterator(grain.DatasetIterator):
    def __init__(self, ds: "PackedKDDataset"):
        super().__init__()
        self._ds, self._carry = ds, []   # drawn examples not placed yet, oldest first

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        length = lambda i: min(len(ds.examples[i].ids), ds.max_len)
        pool = [(True, i) for i in self._carry]
        # draw until the batch could be full: then no row is left empty
        while sum(length(i) for _, i in pool) < ds.batch_size * ds.max_len:
            pool.append((False, int(ds.sampler.next_indices(1)[0])))
        rows: list[list[int]] = [[] for _ in range(ds.batch_size)]
        used = [0] * ds.batch_size
        carry = []
        # first fit, examples carried over first (none waits long), then longest first
        for carried, i in sorted(pool, key=lambda ci: (not ci[0], -length(ci[1]))):
            r = next((r for r in range(ds.batch_size) if used[r] + length(i) <= ds.max_len), None)
            if r is None:
                carry.append(i)
            else:
                rows[r].append(i)
                used[r] += length(i)
        self._carry = carry
        packed = [kd_pack_row([ds.examples[i] for i in row], max_len=ds.max_len, top_k=ds.top_k) for row in rows]
        return {k: np.stack([p[k] for p in packed]) for k in packed[0]}

    def get_state(self) -> dict[str, Any]:
        return {"sampler": self._ds.sampler.get_state(), "carry": list(self._carry)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._ds.sampler.set_state(state["sampler"])
        self._carry = [int(i) for i in state["carry"]]


class PackedKDDataset(grain.IterDataset):
    """Batches of ``batch_size`` KD rows of ``max_len``, each holding as many examples (drawn by
    ``sampler``, in its order) as fit (``kd_pack_row``): with answers of a few hundred tokens,
    right-padding each example to ``max_len`` would spend much of every step on padding. Draws are
    placed first fit, longest first; what does not fit waits (first) for the next batch, so every
    drawn example is trained on. The iterator's state (sampler state, waiting examples) is JSON-able
    and resumes the exact next batch. One live iterator per dataset."""

    def __init__(self, examples: Sequence[Any], sampler: Any, *, batch_size: int, max_len: int, top_k: int = 0):
        super().__init__()
        self.examples, self.sampler = list(examples), sampler
        self.batch_size, self.max_len, self.top_k = batch_size, max_len, top_k

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedIterator(self)

    def __str__(self) -> str:
        return f"PackedKDDataset(batch_size={self.batch_size}, max_len={self.max_len})"


def kd_dataset(examples: Sequence[Any], sampler: Any, *, batch_size: int, max_len: int, top_k: int = 0,
               grad_accum: int = 1, pack: bool = False) -> grain.IterDataset:
    """The KD training pipeline: examples drawn by ``sampler`` -> ``kd_row`` -> batches of
    ``batch_size`` (-> groups of ``grad_accum`` micro-batches, ``[A, B, ...]``, when > 1).
    ``pack``: rows hold several examples each (``PackedKDDataset``) instead of one, padded.

    Endless (the sampler draws with replacement); ``iter(ds).get_state()`` is JSON-able and
    ``set_state`` resumes the exact next batch.
    """
    if pack:
        ds = PackedKDDataset(examples, sampler, batch_size=batch_size, max_len=max_len, top_k=top_k)
    else:
        rows = grain.MapDataset.source(list(examples)).map(
            functools.partial(kd_row, max_len=max_len, top_k=top_k))
        ds = SampledDataset(rows, sampler).batch(batch_size, drop_remainder=True)
    return ds.batch(grad_accum, drop_remainder=True) if grad_accum > 1 else ds


def kd_eval_batches(examples: Sequence[Any], batch_size: int, max_len: int, top_k: int = 0) -> list[dict]:
    """Fixed-size batches over ``examples`` in order; the last one is filled with copies of its
    first row that are fully masked, and ``rows`` (bool ``[B]``) marks the real ones."""
    rows = grain.MapDataset.source(list(examples)).map(
        functools.partial(kd_row, max_len=max_len, top_k=top_k)).batch(batch_size)
    out = []
    for b in rows:
        real = b["input_ids"].shape[0]
        if real < batch_size:
            b = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, axis=0)]) for k, v in b.items()}
            b["loss_mask"][real:] = 0.0
        b["rows"] = np.arange(batch_size) < real
        out.append(b)
    return out
