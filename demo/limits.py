"""Overload protection: per-client rate limits and the bounded generation queue.

``ClientLimiter`` counts requests per client with the ``limits`` library (moving window, in
memory). ``GenerationQueue`` owns the one model: one worker thread runs one answer at a time,
at most ``queue_size`` more wait, and anything beyond that is refused at once with
"busy, retry in N s" (N from the measured answer time). Every accepted job ends with exactly one
``done`` or ``error`` item, so no request is dropped silently.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal

from limits import parse, storage, strategies

from demo.engine import AnswerEngine
from demo.errors import DemoError, busy, rate_limited
from demo.settings import LimitsConfig

Kind = Literal["ask", "transcribe"]


def client_key(host: str | None, client_id: str | None, mode: str) -> str:
    host = host or "unknown"
    if mode == "ip+client_id" and client_id:
        return f"{host}|{client_id[:64]}"
    return host


class ClientLimiter:
    def __init__(self, cfg: LimitsConfig) -> None:
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self._items = {"ask": parse(cfg.ask_rate), "transcribe": parse(cfg.transcribe_rate)}
        self._rates = {"ask": cfg.ask_rate, "transcribe": cfg.transcribe_rate}
        self.rejected = {"ask": 0, "transcribe": 0}

    def check(self, kind: Kind, key: str) -> None:
        """Count one ``kind`` request for ``key``; raise ``DemoError('rate_limited')`` if over."""
        item = self._items[kind]
        if self._limiter.hit(item, kind, key):
            return
        self.rejected[kind] += 1
        stats = self._limiter.get_window_stats(item, kind, key)
        raise rate_limited(stats.reset_time - time.time(), self._rates[kind])


_DONE = "done"
_TOKEN = "token"
_ERROR = "error"
_START = "start"


@dataclass
class Job:
    """One question in the queue; the worker feeds it, one consumer reads it."""

    id: int
    question: str
    device: str | None
    loop: asyncio.AbstractEventLoop | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    finished: float | None = None
    cancelled: bool = False
    _aq: asyncio.Queue | None = None
    _q: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        if self.loop is not None:
            self._aq = asyncio.Queue()

    def put(self, kind: str, payload: Any = None) -> None:
        item = (kind, payload)
        if self._aq is not None and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                self.cancelled = True
        else:
            self._q.put(item)

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> Iterator[str]:
        """Text deltas (blocking); raises the job's ``DemoError`` if it failed."""
        while True:
            kind, payload = self._q.get()
            if kind == _TOKEN:
                yield payload
            elif kind == _ERROR:
                raise payload
            elif kind == _DONE:
                return

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """``("start", wait_s)``, ``("token", text)``..., then ``("done", None)`` or
        ``("error", DemoError)``; for jobs submitted with a loop."""
        assert self._aq is not None, "submit(..., loop=asyncio.get_running_loop()) for async use"
        while True:
            kind, payload = await self._aq.get()
            yield kind, payload
            if kind in (_DONE, _ERROR):
                return


class GenerationQueue:
    """One worker, one model, ``queue_size`` waiting places; beyond that: busy, retry in N s."""

    def __init__(self, engine: AnswerEngine, cfg: LimitsConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: Job | None = None
        self._ids = itertools.count(1)
        self.answer_seconds = cfg.answer_seconds_estimate  # moving estimate
        self.stats = {"accepted": 0, "completed": 0, "failed": 0, "cancelled": 0, "rejected_busy": 0}
        self._worker = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._worker.start()

    def retry_after(self) -> float:
        """Seconds until a waiting place frees up: the rest of the running answer."""
        with self._lock:
            running = self._running
        elapsed = time.perf_counter() - running.started if running and running.started else 0.0
        return max(1.0, self.answer_seconds - elapsed)

    def submit(self, question: str, device: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a question or raise ``DemoError('busy')`` at once when the queue is full."""
        with self._lock:
            full = self._waiting >= self.cfg.queue_size and self._running is not None
            if full:
                self.stats["rejected_busy"] += 1
            else:
                self._waiting += 1
                self.stats["accepted"] += 1
        if full:
            raise busy(self.retry_after())
        job = Job(id=next(self._ids), question=question, device=device, loop=loop)
        self._pending.put(job)
        return job

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"waiting": self._waiting, "running": self._running is not None,
                    "capacity": self.cfg.queue_size, "answer_seconds": round(self.answer_seconds, 2),
                    "worker_alive": self._worker.is_alive(), **self.stats}

    def close(self) -> None:
        self._pending.put(None)
        self._worker.join(timeout=5)

    def _run(self) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running = job
            try:
                self._serve(job)
            finally:
                with self._lock:
                    self._running = None

    def _serve(self, job: Job) -> None:
        if job.cancelled:
            self.stats["cancelled"] += 1
            job.put(_ERROR, DemoError("cancelled", "the request was cancelled before it started"))
            return
        job.started = time.perf_counter()
        job.put(_START, job.started - job.submitted)
        stream = self.engine.stream(job.question, device=job.device)
        try:
            for delta in stream:
                if job.cancelled:
                    self.stats["cancelled"] += 1
                    job.put(_ERROR, DemoError("cancelled", "the client left; answer stopped"))
                    return
                if delta:
                    job.put(_TOKEN, delta)
        except Exception as e:  # the model failed: tell this client, keep serving others
            self.stats["failed"] += 1
            job.put(_ERROR, DemoError("model_error", f"the model failed on this question "
                                      f"({type(e).__name__}: {e}); try again or rephrase", status=500))
            return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            job.finished = time.perf_counter()
        took = job.finished - job.started
        self.answer_seconds = 0.7 * self.answer_seconds + 0.3 * took
        self.stats["completed"] += 1
        job.put(_DONE)
