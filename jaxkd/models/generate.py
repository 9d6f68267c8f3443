"""KV-cache generation: jitted prefill + jitted one-token decode step, a Python loop around them.

- Prompts are right-padded to a multiple of ``prompt_bucket``; every row holds its tokens from
  cache slot 0 and has its own next slot (``KVCache.index``), so rows are independent.
- The cache is only as long as the filled window rounded up to ``window_bucket`` slots; it grows
  (``resize_cache``) when a running row reaches its end. Attention reads the filled window only,
  and a few shapes cover every call. The cache is donated to every step (updated in place).
- Finished rows stop costing compute: once at most half the rows of a batch are still running,
  the running ones are gathered (``take_rows``) into the next power-of-two batch, and the loop
  stops as soon as every row is done (EOS or its token budget).
- Sampling (``jaxkd.models.sampling``, one key per row) runs inside the jitted step; the next
  token never leaves the device to feed the next step. The host reads step t's outputs while
  step t+1 runs, so the loop does not stall on them.
- Per generated token a step can also return (``Capture``) the base log-prob, the policy log-prob
  under the sampler that drew it, and the top-k ids / log-probs at a given temperature over the
  real vocabulary: the teacher stage, rescoring checks and GRPO read them from here.
- Projection weights can be multiplied from an ``[in, out]`` copy where this CPU does that faster
  (``weight_layout``; measured once per machine by ``jaxkd.models.layout``): batch-1 decode
  steps and batched steps may each use either layout. ``batched_dtype="bfloat16"`` runs prefill
  and every step wider than one row on a bf16 copy of the weights (f32 accumulation, KV cache
  kept in the model's dtype) while one-row steps keep the model's dtype: where the CPU has fast
  bf16 dots, batched decode gains most and batch-1 decode (slower in bf16 there) loses nothing.
  The model's own weights are not changed.
- ``prefill_fn`` / ``decode_fn`` are pure functions of (params, cache, ...); with the cache
  helpers of ``jaxkd.models.kvcache`` they are the pieces a serving loop composes.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.config import SamplingConfig
from jaxkd.models.decoder import Decoder
from jaxkd.models.kvcache import KVCache, init_cache, resize_cache, take_rows
from jaxkd.models.layers import Projection, relayout_projections
from jaxkd.models.layout import LayoutChoice, choose as choose_layout
from jaxkd.models.sampling import (SamplerKind, base_logprobs, row_keys, sample_tokens, sampler_scalars,
                                   step_keys, take_token, topk_logprobs)

__all__ = ["Capture", "GenerationOutput", "Generator", "SamplerKind", "TextDeltas", "chat_ids",
           "decode_fn", "prefill_fn", "WINDOW_BUCKET"]

WINDOW_BUCKET = 256  # cache slots are allocated (and attended over) in multiples of this


@dataclasses.dataclass
class GenerationOutput:
    """New tokens per prompt (cut before EOS), what was captured along them, and timings.

    ``logprobs[i]`` (base model) has one entry per token of ``tokens[i]``. ``policy_logprobs``,
    ``topk_ids`` and ``topk_logprobs`` have ``len(tokens[i]) + 1`` rows when row i ended in EOS
    (the last row is the EOS token's, ``eos_tokens[i]``), else ``len(tokens[i])``: the teacher
    cache's layout. ``new_tokens`` counts the tokens generated over all rows, each row until it
    finished (its EOS token included), i.e. the useful decode work; ``decode_s`` excludes prefill.
    """

    tokens: list[list[int]]
    logprobs: list[np.ndarray] | None
    finish_reasons: list[str]
    prefill_s: float
    decode_s: float
    new_tokens: int
    eos_tokens: list[int | None] = dataclasses.field(default_factory=list)
    policy_logprobs: list[np.ndarray] | None = None
    topk_ids: list[np.ndarray] | None = None
    topk_logprobs: list[np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Capture:
    """What a step returns per row besides the token (static: part of the compile key)."""

    logprobs: bool = False           # base-model log-prob of the token
    policy_logprobs: bool = False    # log-prob under the sampler that drew it
    topk: int = 0                    # top-k ids / log-probs width (0: none)
    topk_vocab: int = 0              # ... over logits[:topk_vocab] (the tokenizer's real vocab)
    topk_temperature: float = 1.0    # ... of softmax(logits / topk_temperature)


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], *,
             add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat prompt (the assistant turn opened, nothing of it written).

    Tokenizers differ in what ``apply_chat_template(tokenize=True)`` returns (a list, a batch of
    one, or an encoding with ``input_ids``); this flattens all of them to a list of ints.
    """
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple, np.ndarray)):
        ids = list(ids[0])
    return [int(i) for i in ids]


def _sample_and_capture(logits_bv: jax.Array, keys_b: jax.Array, positions_b: jax.Array,
                        temperature: jax.Array, top_p: jax.Array, kind: SamplerKind,
                        capture: Capture) -> tuple[jax.Array, dict[str, jax.Array]]:
    tok_b, policy_b = sample_tokens(logits_bv, step_keys(keys_b, positions_b), temperature, top_p, kind)
    out: dict[str, jax.Array] = {}
    if capture.logprobs:
        out["logprobs"] = take_token(base_logprobs(logits_bv), tok_b)
    if capture.policy_logprobs:
        out["policy_logprobs"] = policy_b
    if capture.topk:
        out["topk_ids"], out["topk_logprobs"] = topk_logprobs(
            logits_bv, capture.topk, capture.topk_vocab, capture.topk_temperature)
    return tok_b, out


BATCHED_DTYPE_ENV = "JAXKD_BATCHED_DTYPE"
BATCHED_DTYPES = ("float32", "bfloat16")


def set_compute_dtype(model: nnx.Module, dtype: Any) -> None:
    """Run ``model``'s matmuls in ``dtype`` (every module that has a ``compute_dtype``)."""
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = dtype


def _merge(graphdef: nnx.GraphDef, params: nnx.State, layout: str | None, dtype: str | None = None) -> Decoder:
    model = nnx.merge(graphdef, params)
    if layout is not None:
        relayout_projections(model, layout, transpose=False)
    if dtype is not None:  # params hold a cast copy: compute in its dtype too
        set_compute_dtype(model, jnp.dtype(dtype))
    return model


def prefill_fn(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, ids_bt: jax.Array,
               pos_bt: jax.Array, seg_bt: jax.Array, keys_b: jax.Array, temperature: jax.Array,
               top_p: jax.Array, kind: SamplerKind, capture: Capture = Capture(), layout: str | None = None,
               dtype: str | None = None) -> tuple[jax.Array, dict[str, jax.Array], KVCache]:
    """Run right-padded prompts (``seg_bt`` 1 on real tokens) into the cache from each row's
    ``cache.index`` on; sample each row's next token from its last real position. ``layout``:
    the projection layout ``params`` hold (None: the graphdef's); ``dtype``: the dtype they were
    cast to, which the matmuls then run in (None: the graphdef's compute dtype)."""
    model = _merge(graphdef, params, layout, dtype)
    h_btd, cache = model(ids_bt, pos_bt, cache=cache, segment_ids_bt=seg_bt, return_hidden=True)
    last_b = jnp.maximum(jnp.sum(seg_bt != 0, axis=1) - 1, 0)
    h_b1d = jnp.take_along_axis(h_btd, last_b[:, None, None], axis=1)
    logits_bv = model.logits_from_hidden(h_b1d)[:, 0]
    tok_b, out = _sample_and_capture(logits_bv, keys_b, cache.index, temperature, top_p, kind, capture)
    return tok_b, out, cache


def decode_fn(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tok_b: jax.Array,
              keys_b: jax.Array, temperature: jax.Array, top_p: jax.Array, kind: SamplerKind,
              capture: Capture = Capture(), layout: str | None = None, dtype: str | None = None,
              ) -> tuple[jax.Array, dict[str, jax.Array], KVCache]:
    """Feed one token per row (at that row's position ``cache.index``), sample the next one."""
    model = _merge(graphdef, params, layout, dtype)
    logits_b1v, cache = model(tok_b[:, None], cache.index[:, None], cache=cache)
    tok_b, out = _sample_and_capture(logits_b1v[:, 0], keys_b, cache.index, temperature, top_p, kind,
                                     capture)
    return tok_b, out, cache


class TextDeltas:
    """Incremental detokenizer: ``push(token)`` returns the new text, holding back a trailing
    incomplete UTF-8 character (decoded as U+FFFD) until the tokens that complete it arrive."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Whatever is left at the end (a genuinely invalid byte sequence stays U+FFFD)."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True)) if self.ids else ""

    def _advance(self, text: str) -> str:
        # Text only grows for byte-level BPE / SentencePiece; if a tokenizer's clean-up rules
        # rewrite earlier characters, the already-shown prefix is kept and only new tail emitted.
        if len(text) <= len(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix all ``seqs`` share."""
    if not seqs:
        return []
    n, first = min(len(s) for s in seqs), seqs[0]
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return list(first[:n])


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Generator:
    """Batched, streaming text generation with a KV cache for a ``Decoder``.

    ``max_seq_len`` bounds prompt + new tokens per row; ``window_bucket`` is the cache growth
    step (attention cost vs. number of compiled shapes); ``compact`` gathers the running rows
    into a smaller batch once at most half are left. When every prompt of a batch starts with the
    same ``min_shared_prefix`` or more tokens (a system prompt, or one prompt sampled K times),
    that prefix is prefilled once and copied to every row (0: never). ``weight_layout``: "auto"
    (default: per machine, measured; see ``jaxkd.models.layout``), "oi" / "io" (every step in
    that layout) or "stored" (every step on the weights as the model holds them: no copy, for
    memory); a layout the model does not hold is a transposed copy. ``self.layouts`` says what
    was chosen. ``batched_dtype``: the dtype prefill and steps wider than one row compute in
    ("float32" / "bfloat16"; None: ``$JAXKD_BATCHED_DTYPE``, else the model's own), from a cast
    copy of the weights; one-row steps always use the model's dtype.
    """

    def __init__(self, model: Decoder, tokenizer: Any, *, max_seq_len: int = 2048, prompt_bucket: int = 64,
                 window_bucket: int = WINDOW_BUCKET, compact: bool = True, min_shared_prefix: int = 32,
                 weight_layout: str = "auto", batched_dtype: str | None = None):
        if prompt_bucket <= 0 or max_seq_len <= 0 or window_bucket <= 0:
            raise ValueError(f"prompt_bucket ({prompt_bucket}), max_seq_len ({max_seq_len}) and "
                             f"window_bucket ({window_bucket}) must be > 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.prompt_bucket = max_seq_len, prompt_bucket
        self.window_bucket, self.compact, self.min_shared_prefix = window_bucket, compact, min_shared_prefix
        self.graphdef, _ = nnx.split(model)
        eos = set(int(e) for e in model.cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        eos.update(int(e) for e in (getattr(tokenizer, "generation_eos_ids", None) or ()))
        self.eos_ids = frozenset(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        try:
            self.vocab = min(len(tokenizer), model.cfg.vocab_size)  # rows past it are never produced
        except TypeError:
            self.vocab = model.cfg.vocab_size
        # Per-step dispatch must be cheap (on 2 cores the Python thread competes with XLA's): the
        # graphdef is bound here instead of being hashed as a static argument on every call, and
        # parameters travel as a flat list of arrays (nnx.State flattens in Python, ~300 leaves).
        self._treedef = jax.tree.structure(nnx.state(model))
        graphdef, treedef = self.graphdef, self._treedef

        def prefill(leaves, cache, *args, kind, capture, layout, dtype):
            return prefill_fn(graphdef, jax.tree.unflatten(treedef, leaves), cache, *args, kind=kind,
                              capture=capture, layout=layout, dtype=dtype)

        def decode(leaves, cache, *args, kind, capture, layout, dtype):
            return decode_fn(graphdef, jax.tree.unflatten(treedef, leaves), cache, *args, kind=kind,
                             capture=capture, layout=layout, dtype=dtype)

        statics = ("kind", "capture", "layout", "dtype")
        self._prefill = jax.jit(prefill, static_argnames=statics, donate_argnames=("cache",))
        self._decode = jax.jit(decode, static_argnames=statics, donate_argnames=("cache",))
        self._init_layouts(weight_layout, batched_dtype)
        self._take = jax.jit(take_rows)
        self._resize = jax.jit(resize_cache, static_argnames=("new_len",))

    # -- weight layouts ------------------------------------------------------------------------

    def _init_layouts(self, mode: str, batched_dtype: str | None) -> None:
        own = jnp.dtype(self.model.compute_dtype).name
        if batched_dtype is None:
            batched_dtype = os.environ.get(BATCHED_DTYPE_ENV) or own
        if batched_dtype not in BATCHED_DTYPES:
            raise ValueError(f"batched_dtype {batched_dtype!r} (argument or ${BATCHED_DTYPE_ENV}) must be "
                             f"one of {BATCHED_DTYPES}")
        # None: the weights as the model holds them; otherwise cast copies compute in it
        self.batched_dtype = None if batched_dtype == own else batched_dtype
        projs = [m for _, m in nnx.iter_modules(self.model) if isinstance(m, Projection)]
        held = {p.layout for p in projs}
        if len(held) > 1:
            raise ValueError(f"the model's projections are held in mixed layouts {sorted(held)}; relayout "
                             f"them all (jaxkd.models.layers.relayout_projections) first")
        self.stored = held.pop() if held else "oi"
        if mode == "stored":  # never copy: every step multiplies the weights as the model holds them
            self.layouts = LayoutChoice(self.stored, self.stored, "stored")
        else:
            self.layouts = choose_layout(self.model.cfg, self.model.compute_dtype, mode)
            if self.batched_dtype is not None:  # the wide steps' layout is the one measured in their dtype
                wide = choose_layout(self.model.cfg, jnp.dtype(self.batched_dtype), mode)
                self.layouts = dataclasses.replace(self.layouts, many_rows=wide.many_rows,
                                                   source=f"{self.layouts.source}; {self.batched_dtype}: {wide.source}")
        self._other = "io" if self.stored == "oi" else "oi"
        by_id = {id(p.weight.get_value()): p for p in projs}
        leaves = jax.tree.leaves(nnx.state(self.model))
        # permutation from the stored layout to the other, per leaf (None: not a projection weight)
        self._perms = [by_id[id(x)].flip_perm() if id(x) in by_id else None for x in leaves]
        self._floating = [bool(jnp.issubdtype(x.dtype, jnp.floating)) for x in leaves]
        self._convert = jax.jit(
            lambda xs, perms, dtype: [(x if p is None else jnp.transpose(x, p)).astype(dtype or x.dtype)
                                      for x, p in zip(xs, perms)], static_argnames=("perms", "dtype"))
        self._copies: dict[tuple[str, str | None], tuple[list, list[jax.Array]]] = {}

    def step_weights(self, rows: int) -> tuple[str, str | None]:
        """(projection layout, cast dtype or None) a step over ``rows`` rows multiplies."""
        return (self.layouts.one_row, None) if rows <= 1 else (self.layouts.many_rows, self.batched_dtype)

    def leaves_for(self, layout: str, dtype: str | None = None) -> list[jax.Array]:
        """The step's parameter leaves in ``layout`` (cast to ``dtype`` unless None): the model's
        own when it holds them so, else a transposed and/or cast copy, made when first needed and
        again only when the model's weights are replaced (e.g. by a training step)."""
        leaves = self._param_leaves()
        if layout not in (self.stored, self._other):
            raise ValueError(f"unknown projection layout {layout!r}")
        if layout == self.stored and dtype is None:
            return leaves
        key = (layout, dtype)
        held = self._copies.get(key)
        if held is not None and all(r() is x for r, x in zip(held[0], leaves)):
            return held[1]
        # drop stale copies (the model's weights were replaced) before making the next one
        self._copies = {k: v for k, v in self._copies.items()
                        if all(r() is x for r, x in zip(v[0], leaves))}
        flip = layout != self.stored
        # only the leaves that change are copied (the others are shared with the model)
        idx = [i for i, (p, f) in enumerate(zip(self._perms, self._floating))
               if (flip and p is not None) or (dtype is not None and f)]
        moved = self._convert([leaves[i] for i in idx], perms=tuple(self._perms[i] if flip else None for i in idx),
                              dtype=dtype)
        copy = list(leaves)
        for i, x in zip(idx, moved):
            copy[i] = x
        self._copies[key] = ([weakref.ref(x) for x in leaves], copy)
        return copy

    # -- core loop -----------------------------------------------------------------------------

    def _window(self, slots: int) -> int:
        """Cache length for ``slots`` filled slots: a multiple of window_bucket, capped near max_seq_len."""
        return max(slots, min(_round_up(slots, self.window_bucket), _round_up(self.max_seq_len, 8)))

    def _param_leaves(self) -> list[jax.Array]:
        """The model's current state as the flat list the jitted steps take (read per call, so
        weights updated in place since construction are used)."""
        leaves, treedef = jax.tree.flatten(nnx.state(self.model))
        if treedef != self._treedef:
            raise ValueError("the model's state changed structure since this Generator was built; "
                             "build a new Generator")
        return leaves

    def _check(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token")
        if max(lengths) >= self.max_seq_len:
            raise ValueError(f"a prompt has {max(lengths)} tokens but max_seq_len is {self.max_seq_len}; "
                             f"shorten it or build the Generator with a larger max_seq_len")
        return np.asarray(lengths, np.int32)

    def _layout(self, prompts: Sequence[Sequence[int]], offset: int = 0) -> tuple[jax.Array, ...]:
        """Right-padded ids, positions (``offset`` + slot) and segment ids of a prompt block: the
        order ``prefill_fn`` takes them in."""
        t = _round_up(max(len(p) for p in prompts), self.prompt_bucket)
        ids = np.full((len(prompts), t), self.pad_id, np.int32)
        seg = np.zeros((len(prompts), t), np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = np.asarray(p, np.int32)
            seg[i, :len(p)] = 1
        pos = np.broadcast_to(offset + np.arange(t, dtype=np.int32), (len(prompts), t))
        return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)

    def _shared_prefix(self, prompts: Sequence[Sequence[int]]) -> int:
        """Length of the prefix every prompt shares (leaving each at least one token), or 0."""
        if len(prompts) < 2 or self.min_shared_prefix <= 0:
            return 0
        n = len(common_prefix([p[:-1] for p in prompts]))
        return n if n >= self.min_shared_prefix else 0

    def _events(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, capture: Capture,
                timings: dict[str, float], row_ids: Sequence[int] | None = None,
                ) -> Iterator[list[tuple[int, int, dict[str, np.ndarray]]]]:
        """Yield, per decode step, ``(row, token, captured values)`` for every row still running;
        a row's last event is its EOS token or the token that used up its budget."""
        lengths = self._check(prompts)
        n = len(prompts)
        budget = np.minimum(sampling.max_new_tokens, self.max_seq_len - lengths)
        kind = SamplerKind.of(sampling, self.vocab)
        statics = dict(kind=kind, capture=capture)
        temperature, top_p = sampler_scalars(sampling)
        if row_ids is not None and len(row_ids) != n:
            raise ValueError(f"{len(row_ids)} row_ids for {n} prompts")
        keys = row_keys(sampling.seed, np.arange(n) if row_ids is None else np.asarray(row_ids))
        wide = self.step_weights(2)  # prefill: every prompt's rows at once
        params = {w: self.leaves_for(*w) for w in {wide, self.step_weights(n)}}
        if self.compact and n > 1:  # compaction can bring the batch down to one row
            params.setdefault(self.step_weights(1), self.leaves_for(*self.step_weights(1)))
        shared = self._shared_prefix(prompts)
        ids, pos, seg = self._layout([p[shared:] for p in prompts], offset=shared)
        size = max(shared + ids.shape[1], self._window(int(lengths.max()) + 1))

        t0 = time.perf_counter()
        if shared:  # prefill the common prefix once, copy it to every row, then the rest per row
            one = init_cache(self.model.cfg, 1, size, self.model.compute_dtype)
            _, _, one = self._prefill(params[wide], one, *self._layout([prompts[0][:shared]]), keys[:1],
                                      temperature, top_p, kind=kind, capture=Capture(), layout=wide[0],
                                      dtype=wide[1])
            cache = self._take(one, np.zeros(n, np.int32))
        else:
            cache = init_cache(self.model.cfg, n, size, self.model.compute_dtype)
        tok, out, cache = self._prefill(params[wide], cache, ids, pos, seg, keys, temperature, top_p, **statics,
                                        layout=wide[0], dtype=wide[1])
        slot_rows = np.arange(n)          # the prompt row each batch slot holds (-1: filler)
        index = lengths.astype(np.int64)  # per slot: the position (= cache slot) fed next
        produced, done = np.zeros(n, np.int64), np.zeros(n, bool)
        pending = (tok, out, slot_rows)
        t1 = None
        while True:
            nxt = None
            live = [s for s, r in enumerate(slot_rows) if r >= 0 and not done[r]]
            if any(produced[slot_rows[s]] + 1 < budget[slot_rows[s]] for s in live):
                if self.compact and len(live) <= len(slot_rows) // 2:
                    size = _next_pow2(len(live))
                    gather = np.asarray(live + [live[0]] * (size - len(live)), np.int32)
                    cache, tok, keys = self._take(cache, gather), tok[gather], keys[gather]
                    slot_rows = np.concatenate([slot_rows[live], np.full(size - len(live), -1)])
                    index = index[gather]
                    live = list(range(len(live)))
                    if self._window(int(index[live].max()) + 1) < cache.max_len:
                        cache = self._resize(cache, new_len=self._window(int(index[live].max()) + 1))
                need = int(index[live].max()) + 1
                if need > cache.max_len:
                    cache = self._resize(cache, new_len=self._window(need))
                step = self.step_weights(len(slot_rows))
                tok, out, cache = self._decode(params[step], cache, tok, keys, temperature, top_p, **statics,
                                               layout=step[0], dtype=step[1])
                index = index + 1
                nxt = (tok, out, slot_rows)
            p_tok, p_out, p_rows = pending
            tok_h = np.asarray(p_tok)
            out_h = {k: np.asarray(v) for k, v in p_out.items()}
            if t1 is None:
                timings["prefill_s"] = time.perf_counter() - t0
                t1 = time.perf_counter()
            events = []
            for s, r in enumerate(p_rows):
                if r < 0 or done[r]:
                    continue
                token = int(tok_h[s])
                produced[r] += 1
                events.append((int(r), token, {k: v[s] for k, v in out_h.items()}))
                done[r] = token in self.eos_ids or produced[r] >= budget[r]
            timings["decode_s"] = time.perf_counter() - t1
            yield events
            if done.all():
                break
            if nxt is None:
                raise RuntimeError("generation loop: rows are still running but no step was dispatched")
            pending = nxt
        timings["decode_s"] = time.perf_counter() - t1

    # -- public API ----------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 return_logprobs: bool = False, return_policy_logprobs: bool = False, topk: int = 0,
                 topk_temperature: float = 1.0, topk_vocab: int | None = None,
                 row_ids: Sequence[int] | None = None) -> GenerationOutput:
        """Generate for a batch of token-id prompts of any lengths.

        ``return_logprobs``: base-model log-prob per token; ``return_policy_logprobs``: log-prob
        under the sampler that drew it; ``topk`` > 0: top-k ids and log-probs of
        ``softmax(logits[:topk_vocab] / topk_temperature)`` per token (``topk_vocab`` defaults to
        the tokenizer's real vocabulary). ``row_ids`` name each row's random stream (default its
        index): a row gets the same samples in any batch that gives it the same id.
        """
        if topk < 0 or topk_temperature <= 0:
            raise ValueError(f"topk must be >= 0 and topk_temperature > 0, got {topk}, {topk_temperature}")
        vocab = self.vocab if topk_vocab is None else min(int(topk_vocab), self.model.cfg.vocab_size)
        if topk > vocab:
            raise ValueError(f"topk={topk} exceeds the vocabulary ({vocab})")
        capture = Capture(logprobs=return_logprobs, policy_logprobs=return_policy_logprobs, topk=topk,
                          topk_vocab=vocab if topk else 0,
                          topk_temperature=float(topk_temperature) if topk else 1.0)
        b = len(prompt_ids)
        tokens: list[list[int]] = [[] for _ in range(b)]
        rows: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in range(b)] for k in
                                                  ("logprobs", "policy_logprobs", "topk_ids", "topk_logprobs")}
        eos_tokens: list[int | None] = [None] * b
        produced = 0
        timings: dict[str, float] = {}
        for events in self._events(prompt_ids, sampling, capture, timings, row_ids):
            for r, token, got in events:
                produced += 1
                is_eos = token in self.eos_ids
                if is_eos:
                    eos_tokens[r] = token
                else:
                    tokens[r].append(token)
                for name, value in got.items():
                    if not (is_eos and name == "logprobs"):
                        rows[name][r].append(value)

        def stack(name: str, dtype: Any, width: tuple[int, ...] = ()) -> list[np.ndarray]:
            return [np.asarray(v, dtype) if v else np.zeros((0, *width), dtype) for v in rows[name]]

        return GenerationOutput(
            tokens=tokens, logprobs=stack("logprobs", np.float32) if return_logprobs else None,
            finish_reasons=["eos" if e is not None else "length" for e in eos_tokens],
            prefill_s=timings.get("prefill_s", 0.0), decode_s=timings.get("decode_s", 0.0),
            new_tokens=produced, eos_tokens=eos_tokens,
            policy_logprobs=stack("policy_logprobs", np.float32) if return_policy_logprobs else None,
            topk_ids=stack("topk_ids", np.int32, (topk,)) if topk else None,
            topk_logprobs=stack("topk_logprobs", np.float32, (topk,)) if topk else None)

    def stream(self, prompt_ids: Sequence[int], sampling: SamplingConfig) -> Iterator[str]:
        """Yield text deltas for one prompt; a character split over tokens is held back until whole."""
        deltas = TextDeltas(self.tokenizer)
        for events in self._events([list(prompt_ids)], sampling, Capture(), {}):
            for _, token, _ in events:
                if token in self.eos_ids:
                    break
                delta = deltas.push(token)
                if delta:
                    yield delta
        tail = deltas.flush()
        if tail:
            yield tail

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tokenizer, messages)

    def chat(self, messages_batch: Sequence[list[dict]], sampling: SamplingConfig) -> list[str]:
        """Answer a batch of conversations (each a list of {"role", "content"} messages)."""
        out = self.generate([self._chat_ids(m) for m in messages_batch], sampling)
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]

    def stream_chat(self, messages: list[dict], sampling: SamplingConfig) -> Iterator[str]:
        return self.stream(self._chat_ids(messages), sampling)

    def warmup(self, sampling: SamplingConfig | None = None, batch_sizes: Sequence[int] = (1,)) -> None:
        """Compile prefill (first prompt bucket) and decode at every cache window a prompt of that
        bucket can reach with ``sampling.max_new_tokens``, for each batch size."""
        sampling = sampling or SamplingConfig()
        kind = SamplerKind.of(sampling, self.vocab)
        temperature, top_p = sampler_scalars(sampling)
        for b in batch_sizes:
            layout, dtype = self.step_weights(b)
            params = self.leaves_for(layout, dtype)
            events = self._events([[self.pad_id]] * b, sampling, Capture(), {})
            for i, _ in enumerate(events):
                if i >= 1:
                    break
            events.close()
            reach = min(self.prompt_bucket + sampling.max_new_tokens, self.max_seq_len)
            sizes = {self._window(s) for s in [*range(1, reach + 1, self.window_bucket), reach]}
            keys = row_keys(sampling.seed, np.arange(b))
            for size in sorted(sizes - {self._window(2)}):  # the loop above compiled the first
                cache = init_cache(self.model.cfg, b, size, self.model.compute_dtype)
                tok = jnp.full((b,), self.pad_id, jnp.int32)
                jax.block_until_ready(self._decode(params, cache, tok, keys, temperature, top_p, kind=kind,
                                                   capture=Capture(), layout=layout, dtype=dtype)[0])
