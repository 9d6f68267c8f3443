"""KV-cache generation: jitted prefill + jitted one-token decode step, a Python loop around them.

- Prompts are left-padded to a multiple of ``prompt_bucket`` (segment id 0 marks padding) and
  keep their own positions 0..L-1, so a row in a batch sees exactly what it would see alone.
- The cache length is rounded up to a multiple of ``CACHE_BUCKET``, so a handful of shapes cover
  most calls; the cache is donated to every step, so it is updated in place.
- Sampling (greedy, temperature, top-k, top-p) runs inside the jitted step; the next token never
  leaves the device to feed the next step. The host reads step t's tokens while step t+1 runs
  (for EOS checks and streaming), so the loop does not stall on them.
- ``prefill_fn`` / ``decode_fn`` are pure functions of (params, cache, ...), reusable by rollouts.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.config import SamplingConfig
from jaxkd.models.decoder import Decoder, KVCache, init_cache

CACHE_BUCKET = 256


@dataclasses.dataclass
class GenerationOutput:
    """New tokens per prompt (cut before EOS), their base-model log-probs, and timings.

    ``new_tokens`` counts the tokens generated over all rows, each row until it finished (its
    EOS token included), i.e. the useful decode work; ``decode_s`` excludes prefill.
    """

    tokens: list[list[int]]
    logprobs: list[np.ndarray] | None
    finish_reasons: list[str]
    prefill_s: float
    decode_s: float
    new_tokens: int


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


@dataclasses.dataclass(frozen=True)
class SamplerKind:
    """The static (compile-time) part of a SamplingConfig."""

    greedy: bool
    top_k: int
    use_top_p: bool


def sample_tokens(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  kind: SamplerKind) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[B]`` and their log-probs under the base model (``log_softmax(logits)``)."""
    logits_bv = logits_bv.astype(jnp.float32)
    if kind.greedy:
        tok_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    else:
        scaled_bv = logits_bv / temperature
        if kind.top_k > 0:
            top_vals_bk, _ = jax.lax.top_k(scaled_bv, kind.top_k)
            sorted_bk = top_vals_bk  # descending
            scaled_bv = jnp.where(scaled_bv < top_vals_bk[:, -1:], -jnp.inf, scaled_bv)
        elif kind.use_top_p:
            sorted_bk = -jnp.sort(-scaled_bv, axis=-1)
        if kind.use_top_p:
            probs_bk = jax.nn.softmax(sorted_bk, axis=-1)
            before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk  # mass strictly above each token
            keep_bk = before_bk < top_p
            threshold_b1 = jnp.min(jnp.where(keep_bk, sorted_bk, jnp.inf), axis=-1, keepdims=True)
            scaled_bv = jnp.where(scaled_bv < threshold_b1, -jnp.inf, scaled_bv)
        tok_b = jax.random.categorical(key, scaled_bv, axis=-1).astype(jnp.int32)
    logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    logp_b = jnp.take_along_axis(logp_bv, tok_b[:, None], axis=-1)[:, 0]
    return tok_b, logp_b


def prefill_fn(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, ids_bt: jax.Array,
               pos_bt: jax.Array, seg_bt: jax.Array, key: jax.Array, temperature: jax.Array,
               top_p: jax.Array, kind: SamplerKind) -> tuple[jax.Array, jax.Array, KVCache]:
    """Run the (left-padded) prompts through the model, fill the cache, sample the first token."""
    model = nnx.merge(graphdef, params)
    h_btd, cache = model(ids_bt, pos_bt, cache=cache, segment_ids_bt=seg_bt, return_hidden=True)
    logits_bv = model.logits_from_hidden(h_btd[:, -1:])[:, 0]
    tok_b, logp_b = sample_tokens(logits_bv, jax.random.fold_in(key, 0), temperature, top_p, kind)
    return tok_b, logp_b, cache


def decode_fn(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tok_b: jax.Array,
              pos_b: jax.Array, step: jax.Array, key: jax.Array, temperature: jax.Array,
              top_p: jax.Array, kind: SamplerKind) -> tuple[jax.Array, jax.Array, KVCache]:
    """Feed one token per row (at position ``pos_b``), sample the next one."""
    model = nnx.merge(graphdef, params)
    logits_b1v, cache = model(tok_b[:, None], pos_b[:, None], cache=cache)
    tok_b, logp_b = sample_tokens(logits_b1v[:, 0], jax.random.fold_in(key, step), temperature,
                                  top_p, kind)
    return tok_b, logp_b, cache


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


class Generator:
    """Batched, streaming text generation with a KV cache for a ``Decoder``."""

    def __init__(self, model: Decoder, tokenizer: Any, *, max_seq_len: int = 2048, prompt_bucket: int = 64):
        if prompt_bucket <= 0 or max_seq_len <= 0:
            raise ValueError(f"prompt_bucket ({prompt_bucket}) and max_seq_len ({max_seq_len}) must be > 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.prompt_bucket = max_seq_len, prompt_bucket
        self.graphdef, _ = nnx.split(model)
        eos = set(int(e) for e in model.cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        eos.update(int(e) for e in (getattr(tokenizer, "generation_eos_ids", None) or ()))
        self.eos_ids = frozenset(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self._prefill = jax.jit(prefill_fn, static_argnames=("graphdef", "kind"), donate_argnames=("cache",))
        self._decode = jax.jit(decode_fn, static_argnames=("graphdef", "kind"), donate_argnames=("cache",))

    # -- core loop -----------------------------------------------------------------------------

    def _layout(self, prompts: Sequence[Sequence[int]], max_new: int) -> tuple[np.ndarray, ...]:
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token")
        t = _round_up(max(lengths), self.prompt_bucket)
        if max(lengths) >= self.max_seq_len:
            raise ValueError(f"a prompt has {max(lengths)} tokens but max_seq_len is {self.max_seq_len}; "
                             f"shorten it or build the Generator with a larger max_seq_len")
        ids = np.full((len(prompts), t), self.pad_id, np.int32)
        seg = np.zeros((len(prompts), t), np.int32)
        pos = np.zeros((len(prompts), t), np.int32)
        for i, p in enumerate(prompts):
            ids[i, t - len(p):] = np.asarray(p, np.int32)
            seg[i, t - len(p):] = 1
            pos[i, t - len(p):] = np.arange(len(p))
        return ids, seg, pos, np.asarray(lengths, np.int32)

    def _steps(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
               timings: dict[str, float]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (tokens ``[B]``, logprobs ``[B]``) per generated position until every row is done
        (EOS or ``max_new_tokens``); rows keep running after EOS, the caller cuts them."""
        ids, seg, pos, lengths = self._layout(prompts, sampling.max_new_tokens)
        b, t = ids.shape
        cache_len = min(_round_up(t + sampling.max_new_tokens, CACHE_BUCKET), _round_up(self.max_seq_len, 8))
        max_new = min(sampling.max_new_tokens, cache_len - t)
        if max_new <= 0:
            raise ValueError(f"no room to generate: padded prompt length {t} fills max_seq_len "
                             f"{self.max_seq_len}")
        kind = SamplerKind(greedy=sampling.temperature == 0.0,
                            top_k=min(sampling.top_k, self.model.cfg.vocab_size),
                            use_top_p=sampling.top_p < 1.0)
        temperature = jnp.float32(max(sampling.temperature, 1e-6))
        top_p = jnp.float32(sampling.top_p)
        key = jax.random.key(sampling.seed)
        params = nnx.state(self.model)
        cache = init_cache(self.model.cfg, b, cache_len, self.model.compute_dtype)

        t0 = time.perf_counter()
        tok, logp, cache = self._prefill(self.graphdef, params, cache, jnp.asarray(ids), jnp.asarray(pos),
                                         jnp.asarray(seg), key, temperature, top_p, kind)
        pending = (tok, logp)
        jax.block_until_ready(tok)
        timings["prefill_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pos_b = jnp.asarray(lengths)
        done = np.zeros(b, bool)
        for step in range(1, max_new + 1):
            if step < max_new:  # dispatch the next step before reading this one
                nxt = self._decode(self.graphdef, params, cache, tok, pos_b, jnp.int32(step), key,
                                   temperature, top_p, kind)
                tok, logp_next, cache = nxt
                pos_b = pos_b + 1
            tok_host, logp_host = np.asarray(pending[0]), np.asarray(pending[1])
            timings["decode_s"] = time.perf_counter() - t1
            yield tok_host, logp_host
            done |= np.isin(tok_host, list(self.eos_ids)) if self.eos_ids else False
            if done.all() or step == max_new:
                break
            pending = (tok, logp_next)
        timings["decode_s"] = time.perf_counter() - t1

    # -- public API ----------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 return_logprobs: bool = False) -> GenerationOutput:
        """Generate for a batch of token-id prompts of any lengths."""
        b = len(prompt_ids)
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        finished = [False] * b
        produced = 0
        timings: dict[str, float] = {}
        for tok_b, logp_b in self._steps(prompt_ids, sampling, timings):
            for i in range(b):
                if finished[i]:
                    continue
                produced += 1
                if int(tok_b[i]) in self.eos_ids:
                    finished[i], reasons[i] = True, "eos"
                    continue
                tokens[i].append(int(tok_b[i]))
                logps[i].append(float(logp_b[i]))
        return GenerationOutput(
            tokens=tokens,
            logprobs=[np.asarray(lp, np.float32) for lp in logps] if return_logprobs else None,
            finish_reasons=reasons, prefill_s=timings.get("prefill_s", 0.0),
            decode_s=timings.get("decode_s", 0.0), new_tokens=produced)

    def stream(self, prompt_ids: Sequence[int], sampling: SamplingConfig) -> Iterator[str]:
        """Yield text deltas for one prompt; a character split over tokens is held back until whole."""
        deltas = TextDeltas(self.tokenizer)
        for tok_b, _ in self._steps([list(prompt_ids)], sampling, {}):
            tok = int(tok_b[0])
            if tok in self.eos_ids:
                break
            delta = deltas.push(tok)
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
        """Compile prefill + decode for the default prompt bucket / cache length (and batch sizes)."""
        sampling = sampling or SamplingConfig()
        for b in batch_sizes:
            # the cache length follows sampling.max_new_tokens, so later calls reuse these compiles
            steps = self._steps([[self.pad_id]] * b, sampling, {})
            for i, _ in enumerate(steps):
                if i >= 1:
                    break
            steps.close()
