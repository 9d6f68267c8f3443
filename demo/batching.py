"""Continuous batching for the demo: concurrent questions share one decode batch.

``BatchedStreams`` owns a KV cache of ``max_batch`` rows and one scheduler thread. A request is
prefilled alone into a one-row cache, written into a free row of the running batch with
``put_row`` at the next step boundary, and then decoded together with every other running row,
one jitted step for all of them. Each request streams its own text deltas through its own queue;
a finished, failed or cancelled request frees its row at once for the next one.

Design choices (the demo serves a handful of people on a CPU, not a fleet):

- The batch cache has ``max_seq_len`` (rounded up to the prompt bucket) slots and one of two
  widths, so decode compiles twice: one row while one request runs (a lone user decodes at the
  batch-1 rate: on 2 CPU cores a 4-row step of the 0.5B costs about two and a half 1-row steps),
  ``max_batch`` rows as soon as a second request is admitted (the running row is copied into
  row 0 of the wide cache), and back to one row when one request is left. Idle rows of the wide
  batch are decoded too and their output is ignored (its cache is ~100 MB for the 0.5B against
  ~2 GB of weights read every step).
- Rows are independent (``jaxkd.models.kvcache``: right-padded rows, per-row index), and every
  request samples with the key of row 0 folded with its token position, so an answer does not
  depend on which other requests share the batch: greedy or sampled, it is the answer
  ``Generator.stream`` gives the same prompt alone (up to float rounding of different shapes).
- A newcomer's prefill runs between two decode steps, so running streams pause for one prefill.
- Prefix cache: every question is sent under the same chat-formatted system prompt, so the tokens
  up to the user's text (``prefix``) are prefilled once, on first use; a newcomer whose prompt
  starts with exactly those tokens gets a copy of that cache and prefills only the rest (its
  question), padded to a power-of-two bucket. A prompt that does not start with them (another
  system prompt, a tokenizer that merged across the boundary) takes the full prefill: the
  check is on token ids, so the shortcut never changes which tokens the model reads.
- Errors stay with their request: a prompt that does not fit, or a failing prefill, ends that
  request only; a failing decode step ends the requests in that batch, the scheduler starts a
  fresh cache and keeps serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.config import SamplingConfig
from jaxkd.models.generate import Capture, Generator, TextDeltas, common_prefix, decode_fn, prefill_fn
from jaxkd.models.kvcache import KVCache, init_cache, put_row, resize_cache, take_rows
from jaxkd.models.sampling import SamplerKind, row_keys, sampler_scalars

_TEXT, _END, _ERROR = "text", "end", "error"
SUFFIX_MIN = 32   # smallest prefill bucket of a prompt's part after the cached prefix


def suffix_bucket(n: int) -> int:
    """Prefill length for ``n`` tokens after the cached prefix: SUFFIX_MIN, then powers of two
    (few compiled shapes; a question rarely needs more than the second)."""
    t = SUFFIX_MIN
    while t < n:
        t *= 2
    return t


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt in the batch; the scheduler writes ``(kind, payload)`` items to ``out``."""

    ids: list[int]
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: bool = False
    finish_reason: str | None = None   # "eos" | "length" | "cancelled" | "error"
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated ids (EOS excluded)
    admitted_step: int | None = None   # decode steps the batch had run when this row joined
    finished_step: int | None = None

    def cancel(self) -> None:
        """Stop this request; the scheduler frees its row at the next step boundary."""
        self.cancelled = True


@dataclasses.dataclass(eq=False)
class _Row:
    req: Request
    budget: int
    deltas: TextDeltas
    produced: int = 0


class BatchedStreams:
    """Up to ``max_batch`` prompts decoded together; ``stream_ids`` is safe from any thread.
    ``prefix``: the tokens most prompts start with, whose cache is computed once (empty: none)."""

    def __init__(self, generator: Generator, sampling: SamplingConfig, max_batch: int,
                 prefix: Sequence[int] = ()) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if len(prefix) >= generator.max_seq_len:
            raise ValueError(f"the cached prefix has {len(prefix)} tokens; max_seq_len is "
                             f"{generator.max_seq_len}")
        self.generator, self.sampling, self.max_batch = generator, sampling, max_batch
        model = generator.model
        self.max_seq_len, self.bucket = generator.max_seq_len, generator.prompt_bucket
        # Every prompt (shorter than max_seq_len) and its whole answer fit in these slots.
        self.cache_len = -(-self.max_seq_len // self.bucket) * self.bucket
        self.kind = SamplerKind.of(sampling, generator.vocab)
        self.temperature, self.top_p = sampler_scalars(sampling)
        # Row 0's key for every request: its samples depend on its positions only, not its row.
        self.keys = row_keys(sampling.seed, np.zeros(max_batch, np.int64))
        self._key1 = self.keys[:1]
        # Parameters as a flat list, read once: the demo never updates weights while serving, and
        # flattening ~300 leaves per step would cost host time on every token.
        # The generator's choices hold here too: one-row steps and wider ones (and every prefill)
        # may each run on the weights as stored or on an [in, out] and/or bf16 copy.
        self.step_weights = generator.step_weights
        self._leaves = {w: generator.leaves_for(*w) for w in {self.step_weights(1), self.step_weights(2)}}
        treedef = jax.tree.structure(nnx.state(model))
        graphdef = nnx.split(model)[0]
        statics = dict(kind=self.kind, capture=Capture())

        def prefill(leaves, cache, ids, pos, seg, keys, temperature, top_p, weights):
            tok, _, cache = prefill_fn(graphdef, jax.tree.unflatten(treedef, leaves), cache, ids, pos, seg,
                                       keys, temperature, top_p, **statics, layout=weights[0], dtype=weights[1])
            return tok, cache

        def decode(leaves, cache, tok, keys, temperature, top_p, weights):
            tok, _, cache = decode_fn(graphdef, jax.tree.unflatten(treedef, leaves), cache, tok, keys,
                                      temperature, top_p, **statics, layout=weights[0], dtype=weights[1])
            return tok, cache

        def admit(cache, row, tok_b, slot, first):
            return put_row(cache, row, slot), tok_b.at[slot].set(first)

        self._prefill = jax.jit(prefill, donate_argnames=("cache",), static_argnames=("weights",))
        self._decode = jax.jit(decode, donate_argnames=("cache",), static_argnames=("weights",))
        self._admit = jax.jit(admit, donate_argnames=("cache",))
        self._take = jax.jit(take_rows)
        # not donated: the prefix cache is copied (grown by the newcomer's bucket) for every request
        self._extend = jax.jit(resize_cache, static_argnames=("new_len",))
        self.prefix = tuple(int(i) for i in prefix)
        self._prefix_cache: KVCache | None = None  # built on first use, in the scheduler thread
        self._new_batch()
        self._rows: list[_Row | None] = [None] * max_batch
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._gate = threading.Lock()   # held by the scheduler for one admit + step
        self._count_lock = threading.Lock()
        self._submitted = self._taken = 0
        self._closed = False
        self.stats = {"admitted": 0, "steps": 0, "max_rows": 0, "cancelled": 0, "failed": 0,
                      "completed": 0, "prefix_hits": 0, "width_changes": 0}
        self._thread = threading.Thread(target=self._loop, name="batch-decoder", daemon=True)
        self._thread.start()

    # -- public --------------------------------------------------------------------------------

    def submit(self, ids: Sequence[int]) -> Request:
        """Queue a prompt now; read it with ``iterate`` (or use ``stream_ids``)."""
        if self._closed:
            raise RuntimeError("the batch decoder is closed")
        req = Request([int(i) for i in ids])
        with self._count_lock:
            self._submitted += 1
        self._inbox.put(req)
        return req

    def iterate(self, req: Request) -> Iterator[str]:
        """Text deltas of ``req``; raises its error. Closing the iterator cancels the request."""
        try:
            while True:
                try:
                    kind, payload = req.out.get(timeout=1.0)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("the batch decoder thread stopped") from None
                    continue
                if kind == _TEXT:
                    yield payload
                elif kind == _ERROR:
                    raise payload
                else:
                    return
        finally:
            req.cancel()  # no-op once finished; frees the row when the caller stopped reading

    def stream_ids(self, ids: Sequence[int]) -> Iterator[str]:
        req = self.submit(ids)
        yield from self.iterate(req)

    def active_rows(self) -> int:
        return sum(r is not None for r in self._rows)

    def waiting(self) -> int:
        """Requests submitted and not yet given a row (or turned away)."""
        with self._count_lock:
            return self._submitted - self._taken

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the scheduler at a step boundary (requests submitted meanwhile are admitted
        together at the next one): for tests and diagnostics."""
        with self._gate:
            yield

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=10)

    def warmup(self, prompts: Sequence[Sequence[int]]) -> None:
        """Compile prefill + admission for each prompt's bucket and both decode widths (the
        prompts one at a time, then the first two together, when max_batch allows)."""
        def two_tokens(streams: Sequence[Iterator[str]]) -> None:
            for stream in streams:   # prefill, admission and one decode step each
                for i, _ in enumerate(stream):
                    if i >= 1:
                        break
            for stream in streams:
                stream.close()

        for ids in prompts:
            two_tokens([self.stream_ids(ids)])
        if self.max_batch > 1 and len(prompts) > 1:
            with self.paused():
                reqs = [self.submit(ids) for ids in prompts[:2]]
            two_tokens([self.iterate(r) for r in reqs])

    @property
    def width(self) -> int:
        """Rows in the decode batch now: 1 or max_batch."""
        return self._cache.batch_size

    # -- scheduler -----------------------------------------------------------------------------

    def _new_batch(self, width: int = 1) -> None:
        cfg = self.generator.model.cfg
        self._cache = init_cache(cfg, width, self.cache_len, self.generator.model.compute_dtype)
        self._tok = jnp.full((width,), self.generator.pad_id, jnp.int32)

    def _widen(self) -> None:
        """One row -> max_batch rows, the running row (if any) kept in row 0."""
        one, tok = self._cache, self._tok
        self._new_batch(self.max_batch)
        if self._rows[0] is not None:
            self._cache, self._tok = self._admit(self._cache, one, self._tok, jnp.int32(0), tok[0])
        self.stats["width_changes"] += 1

    def _narrow(self) -> None:
        """max_batch rows -> one, when exactly one request runs: it moves to row 0."""
        slot = next(i for i, r in enumerate(self._rows) if r is not None)
        keep = jnp.asarray([slot], jnp.int32)
        self._cache, self._tok = self._take(self._cache, keep), self._tok[keep]
        self._rows = [self._rows[slot]] + [None] * (self.max_batch - 1)
        self.stats["width_changes"] += 1

    def _loop(self) -> None:
        while not self._closed:
            head = None
            if self.active_rows() == 0:
                try:  # idle: wait for work (with a timeout, to notice close())
                    head = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
            with self._gate:
                self._free_cancelled()  # first, so a waiting request can take the row at once
                self._admit_waiting(head)
                if self.active_rows() == 1 and self.width > 1:
                    self._narrow()
                if self.active_rows():
                    self._step()
        # Closed: whoever is still waiting or decoding hears so instead of waiting forever.
        stopped = RuntimeError("the model server is shutting down; ask again after the restart")
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._finish(row.req, "error", stopped)
                self._rows[slot] = None
        while True:
            try:
                self._finish(self._inbox.get_nowait(), "error", stopped)
            except queue.Empty:
                return

    def _admit_waiting(self, head: Request | None) -> None:
        """Give free rows to waiting requests, in arrival order (``head`` first)."""
        while None in self._rows:
            if head is not None:
                req, head = head, None
            else:
                try:
                    req = self._inbox.get_nowait()
                except queue.Empty:
                    return
            with self._count_lock:
                self._taken += 1
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            try:
                slot = self._rows.index(None)
                if slot >= self.width:
                    self._widen()
                self._admit_one(req, slot)
            except Exception as e:  # this request only: others keep their rows
                self.stats["failed"] += 1
                self._finish(req, "error", e)

    def _admit_one(self, req: Request, slot: int) -> None:
        n = len(req.ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; the model serves at most "
                             f"{self.max_seq_len - 1} (engine.max_seq_len {self.max_seq_len}); "
                             "ask a shorter question")
        first, row = self.prefill_row(req.ids)
        req.admitted_step = self.stats["steps"]
        state = _Row(req, budget=min(self.sampling.max_new_tokens, self.max_seq_len - n),
                     deltas=TextDeltas(self.generator.tokenizer))
        self.stats["admitted"] += 1
        if self._emit(state, first):
            return  # answered by its first token (EOS, or a budget of one): no row needed
        self._cache, self._tok = self._admit(self._cache, row, self._tok, jnp.int32(slot),
                                             jnp.int32(first))
        self._rows[slot] = state
        self.stats["max_rows"] = max(self.stats["max_rows"], self.active_rows())

    def prefill_row(self, ids: Sequence[int]) -> tuple[int, KVCache]:
        """The first sampled token of the prompt ``ids`` and its one-row cache, from a copy of the
        prefix cache when ``ids`` starts with the prefix. Scheduler thread only (or ``paused()``)."""
        row, start, t = self._row_for(ids)
        tok, row = self._prefill_block(row, ids[start:], start, t)
        return int(np.asarray(tok)[0]), row

    def _prefill_block(self, row: KVCache, tokens: Sequence[int], start: int, t: int) -> tuple[jax.Array, KVCache]:
        """Prefill ``tokens`` (right-padded to ``t``) into ``row`` from position ``start`` on."""
        ids = np.full((1, t), self.generator.pad_id, np.int32)
        ids[0, :len(tokens)] = tokens
        seg = (np.arange(t) < len(tokens)).astype(np.int32)[None]
        pos = (start + np.arange(t, dtype=np.int32))[None]
        wide = self.step_weights(2)  # a prompt block is many rows
        return self._prefill(self._leaves[wide], row, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg),
                             self._key1, self.temperature, self.top_p, weights=wide)

    def _row_for(self, ids: Sequence[int]) -> tuple[KVCache, int, int]:
        """(one-row cache, position prefill starts at, prefill length) for the prompt ``ids``: a
        copy of the prefix cache grown by the rest's bucket when ``ids`` starts with the prefix
        (the rest is written from slot p on, and the copy has head.max_len >= p slots before
        the bucket, so it fits), else an empty cache of the whole prompt's bucket."""
        p, n = len(self.prefix), len(ids)
        if p and n > p and tuple(ids[:p]) == self.prefix:
            head, t = self._prefix_row(), suffix_bucket(n - p)
            if head.max_len + t <= self.cache_len:
                self.stats["prefix_hits"] += 1
                return self._extend(head, new_len=head.max_len + t), p, t
        t = -(-n // self.bucket) * self.bucket
        return init_cache(self.generator.model.cfg, 1, t, self.generator.model.compute_dtype), 0, t

    def _prefix_row(self) -> KVCache:
        if self._prefix_cache is None:
            t = -(-len(self.prefix) // 8) * 8
            row = init_cache(self.generator.model.cfg, 1, t, self.generator.model.compute_dtype)
            _, self._prefix_cache = self._prefill_block(row, self.prefix, 0, t)
        return self._prefix_cache

    def _free_cancelled(self) -> None:
        """Rows whose reader left (client gone, stream closed) stop here."""
        for slot, row in enumerate(self._rows):
            if row is not None and row.req.cancelled:
                self.stats["cancelled"] += 1
                self._finish(row.req, "cancelled")
                self._rows[slot] = None

    def _step(self) -> None:
        try:
            keys = self.keys if self.width == self.max_batch else self._key1
            weights = self.step_weights(self.width)
            self._tok, self._cache = self._decode(self._leaves[weights], self._cache, self._tok, keys,
                                                  self.temperature, self.top_p, weights=weights)
            toks = np.asarray(self._tok)
        except Exception as e:  # the batch's cache is gone: end its requests, start afresh
            for slot, row in enumerate(self._rows):
                if row is not None:
                    self.stats["failed"] += 1
                    self._finish(row.req, "error", e)
                    self._rows[slot] = None
            self._new_batch()
            return
        self.stats["steps"] += 1
        for slot, row in enumerate(self._rows):
            if row is not None and self._emit(row, int(toks[slot])):
                self._rows[slot] = None

    def _emit(self, row: _Row, token: int) -> bool:
        """Stream one sampled token of ``row``; True when the request is finished."""
        row.produced += 1
        if token in self.generator.eos_ids:
            self._flush(row)
            self.stats["completed"] += 1
            self._finish(row.req, "eos")
            return True
        row.req.tokens.append(token)
        delta = row.deltas.push(token)
        if delta:
            row.req.out.put((_TEXT, delta))
        if row.produced >= row.budget:
            self._flush(row)
            self.stats["completed"] += 1
            self._finish(row.req, "length")
            return True
        return False

    @staticmethod
    def _flush(row: _Row) -> None:
        tail = row.deltas.flush()
        if tail:
            row.req.out.put((_TEXT, tail))

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        req.finish_reason, req.finished_step = reason, self.stats["steps"]
        if error is not None:
            req.out.put((_ERROR, error))
        elif reason == "cancelled":
            req.out.put((_ERROR, RuntimeError("the request was cancelled")))
        else:
            req.out.put((_END, None))
