"""Overload protection: per-client rate limits and the bounded generation queue.

``ClientLimiter`` counts requests per client with the ``limits`` library (moving window, in
memory). ``GenerationQueue`` owns the one model: ``engine.max_batch`` worker threads run that
many answers at once (the engine decodes them in one shared batch), at most ``queue_size`` more
wait, and anything beyond that is refused at once with "busy, retry in N s" (N from the measured
answer time). Every accepted job ends with exactly one ``done`` or ``error`` item, so no request
is dropped silently.
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
    """``engine.max_batch`` answers running, ``queue_size`` waiting places; beyond that: busy,
    retry in N s. Jobs start in arrival order as running ones finish."""

    def __init__(self, engine: AnswerEngine, cfg: LimitsConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.max_running = max(1, int(getattr(engine, "max_batch", 1)))
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: dict[int, Job] = {}  # by job id
        self._ids = itertools.count(1)
        self.answer_seconds = cfg.answer_seconds_estimate  # moving estimate
        self.stats = {"accepted": 0, "completed": 0, "failed": 0, "cancelled": 0, "rejected_busy": 0}
        self._workers = [threading.Thread(target=self._run, name=f"generation-worker-{i}", daemon=True)
                         for i in range(self.max_running)]
        for worker in self._workers:
            worker.start()

    def retry_after(self) -> float:
        """Seconds until a place frees up: the rest of the running answer closest to its end."""
        with self._lock:
            started = [j.started for j in self._running.values() if j.started]
        elapsed = time.perf_counter() - min(started) if started else 0.0
        return max(1.0, self.answer_seconds - elapsed)

    def submit(self, question: str, device: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a question or raise ``DemoError('busy')`` at once when the queue is full."""
        with self._lock:
            # Counted together: jobs accepted but not yet picked up by a worker are waiting, so a
            # burst can never get more than max_running + queue_size places.
            full = self._waiting + len(self._running) >= self.max_running + self.cfg.queue_size
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
            return {"waiting": self._waiting, "running": len(self._running),
                    "max_running": self.max_running, "capacity": self.cfg.queue_size,
                    "answer_seconds": round(self.answer_seconds, 2),
                    "worker_alive": all(w.is_alive() for w in self._workers), **self.stats}

    def close(self) -> None:
        """Stop the workers (after their current answers) and the engine's own threads."""
        for _ in self._workers:
            self._pending.put(None)
        for worker in self._workers:
            worker.join(timeout=5)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def _run(self) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running[job.id] = job
            try:
                self._serve(job)
            finally:
                with self._lock:
                    del self._running[job.id]

    def _count(self, stat: str) -> None:
        with self._lock:  # several workers finish jobs at once
            self.stats[stat] += 1

    def _serve(self, job: Job) -> None:
        if job.cancelled:
            self._count("cancelled")
            job.put(_ERROR, DemoError("cancelled", "the request was cancelled before it started"))
            return
        job.started = time.perf_counter()
        job.put(_START, job.started - job.submitted)
        stream = self.engine.stream(job.question, device=job.device)
        try:
            for delta in stream:
                if job.cancelled:
                    self._count("cancelled")
                    job.put(_ERROR, DemoError("cancelled", "the client left; answer stopped"))
                    return
                if delta:
                    job.put(_TOKEN, delta)
        except Exception as e:  # the model failed: tell this client, keep serving others
            self._count("failed")
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
        self._count("completed")
        job.put(_DONE)
