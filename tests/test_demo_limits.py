"""Rate limiter and bounded generation queue, with model-free engines."""

from __future__ import annotations

import asyncio
import threading
from typing import Iterator

import pytest

from demo.engine import ScriptedEngine, as_numbered_markdown, count_steps
from demo.errors import DemoError
from demo.limits import ClientLimiter, GenerationQueue, client_key
from demo.settings import LimitsConfig, load_demo_config
from jaxkd.config import ConfigError


class GateEngine:
    """Streams one token per release of its gate, so tests decide when answers progress."""

    name = "gate"

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.started = threading.Event()

    def warmup(self) -> float:
        return 0.0

    def stream(self, question: str, *, device: str | None = None) -> Iterator[str]:
        self.started.set()
        if question == "explode":
            raise RuntimeError("kv cache overflow")
        for word in ("1. ", "Reset ", "it."):
            assert self.gate.acquire(timeout=10)
            yield word


def test_queue_rejects_beyond_capacity_with_retry_hint():
    engine = GateEngine()
    q = GenerationQueue(engine, LimitsConfig(queue_size=2, answer_seconds_estimate=30.0))
    running = q.submit("first")
    assert engine.started.wait(5)
    waiting = [q.submit("second"), q.submit("third")]
    with pytest.raises(DemoError) as err:
        q.submit("fourth")
    assert err.value.code == "busy" and err.value.status == 503
    assert 1 <= err.value.retry_after <= 30
    assert f"retry in {err.value.retry_after} s" in err.value.message
    assert q.snapshot()["rejected_busy"] == 1 and q.snapshot()["waiting"] == 2
    for _ in range(9):
        engine.gate.release()
    assert ["".join(job) for job in [running, *waiting]] == ["1. Reset it."] * 3
    assert q.snapshot()["completed"] == 3
    q.close()


def test_model_error_reaches_the_client_and_worker_survives():
    engine = GateEngine()
    q = GenerationQueue(engine, LimitsConfig(queue_size=2))
    bad = q.submit("explode")
    with pytest.raises(DemoError, match="kv cache overflow") as err:
        list(bad)
    assert err.value.code == "model_error"
    good = q.submit("fine")
    for _ in range(3):
        engine.gate.release()
    assert "".join(good) == "1. Reset it."
    assert q.snapshot()["failed"] == 1 and q.snapshot()["worker_alive"]
    q.close()


def test_cancelled_job_stops_generation_and_still_ends_with_an_event():
    engine = GateEngine()
    q = GenerationQueue(engine, LimitsConfig(queue_size=2))
    job = q.submit("first")
    engine.gate.release()
    it = iter(job)
    assert next(it) == "1. "
    job.cancel()
    engine.gate.release()
    with pytest.raises(DemoError) as err:
        list(it)
    assert err.value.code == "cancelled"
    q.close()


def test_async_events_end_with_done():
    q = GenerationQueue(ScriptedEngine(0.0), LimitsConfig())

    async def collect():
        job = q.submit("my earbuds", "earbuds", loop=asyncio.get_running_loop())
        return [e async for e in job.events()]

    events = asyncio.run(collect())
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") > 5
    text = "".join(p for k, p in events if k == "token")
    assert count_steps(text) == 4 and "earbuds" in text
    q.close()


def test_rate_limiter_is_per_client_and_says_when_to_retry():
    limiter = ClientLimiter(LimitsConfig(ask_rate="2/minute"))
    limiter.check("ask", "10.0.0.1")
    limiter.check("ask", "10.0.0.1")
    limiter.check("ask", "10.0.0.2")  # another client has its own budget
    limiter.check("transcribe", "10.0.0.1")  # and each kind its own
    with pytest.raises(DemoError) as err:
        limiter.check("ask", "10.0.0.1")
    assert err.value.status == 429 and 50 <= err.value.retry_after <= 60
    assert "2/minute" in err.value.message
    assert limiter.rejected == {"ask": 1, "transcribe": 0}


def test_client_key_modes():
    assert client_key("1.2.3.4", "abc", "ip") == "1.2.3.4"
    assert client_key("1.2.3.4", "abc", "ip+client_id") == "1.2.3.4|abc"
    assert client_key(None, None, "ip") == "unknown"


def test_numbered_markdown_fallback():
    assert as_numbered_markdown("Turn it off. Then on again!") == "1. Turn it off.\n2. Then on again!"
    kept = "1. Unplug it.\n2. Wait 10 s."
    assert as_numbered_markdown(kept) == kept and count_steps(kept) == 2


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="limits.ask_rate"):
        load_demo_config(overrides=["limits.ask_rate=lots"])
    with pytest.raises(ConfigError, match="did you mean 'queue_size'"):
        load_demo_config(overrides=["limits.queue_sise=3"])
    with pytest.raises(ConfigError, match="stt.lexicon"):
        load_demo_config(overrides=["devices=[any, toasters]"])
