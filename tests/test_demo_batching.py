"""Concurrent questions share one decode batch (demo.batching) on a tiny model: every request gets
exactly the tokens it gets alone, rows join and leave a running batch, cancellation frees a row,
and a failure stays with its request. The websocket tests check the same through the app."""

from __future__ import annotations

import threading
import time
import types

import pytest
from fastapi.testclient import TestClient

from demo.app import Services, create_app
from demo.batching import BatchedStreams
from demo.engine import JaxkdEngine
from demo.settings import EngineConfig, load_demo_config
from jaxkd.config import SamplingConfig
from jaxkd.models.generate import Generator
from test_train_fixtures import byte_tokenizer, tiny_decoder

GREEDY = SamplingConfig(max_new_tokens=12)
PROMPTS = [[5, 77, 31, 200, 9], [140, 66, 12, 3, 88, 91, 17, 42, 250, 7, 19, 23, 64, 99, 101, 33, 2],
           [65, 66, 67], [120, 121, 1, 44, 45, 46, 47]]


@pytest.fixture(scope="module")
def tiny():
    tok = byte_tokenizer()
    gen = Generator(tiny_decoder(seed=3), tok, max_seq_len=64, prompt_bucket=16)
    alone = [gen.generate([p], GREEDY).tokens[0] for p in PROMPTS]
    # The test is only as good as its answers: long enough to overlap, different from each other.
    assert min(len(t) for t in alone) >= 6 and len({tuple(t) for t in alone}) == len(PROMPTS), alone
    return types.SimpleNamespace(tok=tok, gen=gen, alone=alone)


class StepGate:
    """Wraps the batch's decode step so the test decides when each step may run (and can make
    the next one fail)."""

    def __init__(self, streams: BatchedStreams) -> None:
        self.permits, self.arrived, self.fail_next = threading.Semaphore(0), 0, False
        real = streams._decode

        def gated(*args, **kw):
            self.arrived += 1
            assert self.permits.acquire(timeout=30), "test never released the step"
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("simulated device failure")
            return real(*args, **kw)

        streams._decode = gated

    def release(self, n: int = 1000) -> None:
        for _ in range(n):
            self.permits.release()


def wait_for(cond, what: str) -> None:
    deadline = time.time() + 30
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def text_of(streams, req) -> str:
    return "".join(streams.iterate(req))


def test_rows_batched_together_and_joining_later_equal_their_single_answers(tiny):
    streams = BatchedStreams(tiny.gen, GREEDY, max_batch=4)
    gate = StepGate(streams)
    try:
        with streams.paused():  # both are admitted at the same step boundary
            r0, r1 = streams.submit(PROMPTS[0]), streams.submit(PROMPTS[1])
        gate.release(3)
        wait_for(lambda: gate.arrived == 4, "three decode steps done, the fourth waiting")
        r2 = streams.submit(PROMPTS[2])  # joins the running batch after that fourth step
        gate.release()
        texts = [text_of(streams, r) for r in (r0, r1, r2)]
    finally:
        streams.close()
    assert (r0.admitted_step, r1.admitted_step, r2.admitted_step) == (0, 0, 4)
    assert streams.stats["max_rows"] == 3
    for i, (r, text) in enumerate(zip((r0, r1, r2), texts)):
        assert r.tokens == tiny.alone[i], i
        assert text == tiny.tok.decode(tiny.alone[i], skip_special_tokens=True)
        assert r.finish_reason in ("eos", "length")


def test_a_lone_request_decodes_one_row_wide_and_the_batch_widens_for_a_second_and_narrows_again(tiny):
    streams = BatchedStreams(tiny.gen, GREEDY, max_batch=4)
    gate = StepGate(streams)
    widths, gated = [], streams._decode

    def spy(leaves, cache, *args, **kw):
        widths.append(cache.batch_size)
        return gated(leaves, cache, *args, **kw)

    streams._decode = spy
    try:
        r0 = streams.submit(PROMPTS[2])
        gate.release(2)
        wait_for(lambda: gate.arrived == 3, "two one-row steps done, the third waiting")
        r1 = streams.submit(PROMPTS[1])  # joins after the third step: the batch widens
        gate.release()
        text_of(streams, r0)
        text_of(streams, r1)
    finally:
        streams.close()
    assert (r0.tokens, r1.tokens) == (tiny.alone[2], tiny.alone[1])  # exact across both copies
    assert r1.admitted_step == 3 and widths[:3] == [1, 1, 1] and widths[3] == 4
    # the one that outlives the other finishes one row wide
    assert r0.finished_step != r1.finished_step and widths[-1] == 1
    assert streams.stats["width_changes"] == 2 and streams.width == 1


def test_cancelled_request_frees_its_row_for_the_next_one(tiny):
    streams = BatchedStreams(tiny.gen, GREEDY, max_batch=2)
    gate = StepGate(streams)
    try:
        with streams.paused():
            r0, r1, r2 = (streams.submit(p) for p in PROMPTS[:3])
        gate.release(2)
        wait_for(lambda: gate.arrived == 3, "two decode steps done, the third waiting")
        assert streams.waiting() == 1  # r2: no free row yet
        reader = streams.iterate(r0)
        next(reader)
        reader.close()  # the client left: closing its stream cancels it
        gate.release()
        with pytest.raises(RuntimeError, match="cancelled"):
            text_of(streams, r0)
        t1, t2 = text_of(streams, r1), text_of(streams, r2)
    finally:
        streams.close()
    assert r0.finish_reason == "cancelled" and streams.stats["cancelled"] == 1
    assert r2.admitted_step == 3 < r1.finished_step  # took r0's row right after the third step
    assert (r1.tokens, r2.tokens) == (tiny.alone[1], tiny.alone[2])
    assert t2 == tiny.tok.decode(tiny.alone[2], skip_special_tokens=True) and t1


def test_failures_stay_with_their_requests_and_the_scheduler_survives(tiny):
    streams = BatchedStreams(tiny.gen, GREEDY, max_batch=4)
    gate = StepGate(streams)
    gate.release()
    try:
        with streams.paused():
            good = streams.submit(PROMPTS[0])
            too_long = streams.submit(list(range(1, 65)))  # 64 tokens, max_seq_len 64
            empty = streams.submit([])
        with pytest.raises(ValueError, match="64 tokens.*at most 63.*shorter question"):
            text_of(streams, too_long)
        with pytest.raises(ValueError, match="empty"):
            text_of(streams, empty)
        assert text_of(streams, good) == tiny.tok.decode(tiny.alone[0], skip_special_tokens=True)
        assert good.tokens == tiny.alone[0]
        # A decode step fails: the requests in that batch get the error ...
        with streams.paused():
            gate.fail_next = True
            victims = [streams.submit(PROMPTS[1]), streams.submit(PROMPTS[2])]
        for v in victims:
            with pytest.raises(RuntimeError, match="simulated device failure"):
                text_of(streams, v)
        # ... and the next request is served from a fresh cache, exactly.
        after = streams.submit(PROMPTS[3])
        assert text_of(streams, after) == tiny.tok.decode(tiny.alone[3], skip_special_tokens=True)
        assert after.tokens == tiny.alone[3]
    finally:
        streams.close()
    assert streams.stats["failed"] == 4 and streams.stats["completed"] == 2


def test_sampled_answers_do_not_depend_on_the_batch(tiny):
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    alone = [tiny.gen.generate([p], sampled).tokens[0] for p in PROMPTS[:3]]
    streams = BatchedStreams(tiny.gen, sampled, max_batch=4)
    try:
        with streams.paused():
            reqs = [streams.submit(p) for p in PROMPTS[:3]]
        for r in reqs:
            text_of(streams, r)
    finally:
        streams.close()
    assert [r.tokens for r in reqs] == alone
    assert streams.stats["max_rows"] == 3


def test_cached_prefix_gives_the_tokens_of_a_full_prefill_and_is_used_only_on_an_exact_match(tiny):
    prefix = [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]  # 11 tokens: the prefix cache pads to 16
    prompts = [prefix + p for p in PROMPTS[:3]] + [PROMPTS[3], prefix[:-1] + [81] + PROMPTS[0]]
    alone = [tiny.gen.generate([p], GREEDY).tokens[0] for p in prompts]
    assert len({tuple(t) for t in alone}) == len(prompts), alone
    streams = BatchedStreams(tiny.gen, GREEDY, max_batch=4, prefix=prefix)
    try:
        with streams.paused():
            reqs = [streams.submit(p) for p in prompts]
        for r in reqs:
            text_of(streams, r)
        # the prefix alone (nothing after it) takes the full prefill too
        only = streams.submit(prefix)
        text_of(streams, only)
    finally:
        streams.close()
    assert [r.tokens for r in reqs] == alone
    assert only.tokens == tiny.gen.generate([prefix], GREEDY).tokens[0]
    assert streams.stats["prefix_hits"] == 3  # not PROMPTS[3], not the one differing in its last token


def test_prefill_from_the_prefix_cache_writes_the_keys_and_values_of_a_full_prefill(tiny):
    import numpy as np

    prefix = [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]
    ids = prefix + PROMPTS[1]
    cached = BatchedStreams(tiny.gen, GREEDY, max_batch=1, prefix=prefix)
    plain = BatchedStreams(tiny.gen, GREEDY, max_batch=1)
    try:
        with cached.paused(), plain.paused():
            (tok_c, row_c), (tok_p, row_p) = cached.prefill_row(ids), plain.prefill_row(ids)
    finally:
        cached.close()
        plain.close()
    assert cached.stats["prefix_hits"] == 1 and plain.stats["prefix_hits"] == 0
    assert tok_c == tok_p and int(row_c.index[0]) == int(row_p.index[0]) == len(ids)
    n = len(ids)  # every real slot: the prefix's and the rest's (rotary positions included)
    for a, b in zip(row_c.k + row_c.v, row_p.k + row_p.v):
        np.testing.assert_allclose(np.asarray(a)[:, :, :n], np.asarray(b)[:, :, :n], rtol=1e-5, atol=1e-5)


def ws_answer(ws) -> list[dict]:
    events = []
    while not events or events[-1]["type"] not in ("done", "error"):
        events.append(ws.receive_json())
    return events


def test_two_websocket_clients_share_the_batch_and_get_their_own_answers(tiny):
    cfg = EngineConfig(max_seq_len=256, prompt_bucket=32, max_batch=2, sampling=GREEDY)
    loaded = types.SimpleNamespace(model=tiny.gen.model, tokenizer=tiny.tok, name="tiny",
                                   source="test", system_prompt=None)
    engine = JaxkdEngine(cfg, loaded=loaded)
    questions = ["My TV remote is dead!!", "Wi-Fi?"]  # the tiny model answers these differently
    alone = [engine.generator.chat([engine.messages(q, None)], GREEDY)[0] for q in questions]
    assert alone[0] != alone[1]
    demo_cfg = load_demo_config(overrides=["tts.enabled=false"])
    svc = Services.build(demo_cfg, engine=engine, stt=types.SimpleNamespace(model_dir="(none)"),
                         warmup=False)
    try:
        with TestClient(create_app(svc, with_ui=False)) as c:
            with c.websocket_connect("/ws?client_id=a") as a, c.websocket_connect("/ws?client_id=b") as b:
                with engine.batch.paused():
                    a.send_json({"question": questions[0]})
                    b.send_json({"question": questions[1]})
                    wait_for(lambda: engine.batch.waiting() == 2, "both questions at the engine")
                ev_a, ev_b = ws_answer(a), ws_answer(b)
            health = c.get("/health").json()
    finally:
        svc.queue.close()
    assert engine.batch.stats["max_rows"] == 2  # decoded in one batch
    assert len(engine.batch.prefix) > 0 and engine.batch.stats["prefix_hits"] == 2
    for events, expected in ((ev_a, alone[0]), (ev_b, alone[1])):
        assert events[-1]["type"] == "done", events[-1]
        tokens = "".join(e["text"] for e in events if e["type"] == "token")
        assert tokens == events[-1]["answer"] == expected
    assert health["queue"]["max_running"] == 2 and health["queue"]["completed"] == 2


class WordsEngine:
    """Model-free: answers each question with its own words, one per gate release, so a test
    sees whether two answers run at once and whether their words ever cross."""

    name, source, max_batch = "words", "test", 2

    def __init__(self) -> None:
        self.gate, self.entered = threading.Semaphore(0), threading.Semaphore(0)

    def warmup(self) -> float:
        return 0.0

    def stream(self, question: str, *, device: str | None = None):
        self.entered.release()
        for word in question.split():
            assert self.gate.acquire(timeout=30)
            yield word + " "


def test_scripted_busy_and_rate_limits_still_apply_with_a_batch():
    engine = WordsEngine()
    cfg = load_demo_config(overrides=["tts.enabled=false", "limits.queue_size=1",
                                      "limits.ask_rate=3/minute", "limits.client_key=ip+client_id"])
    svc = Services.build(cfg, engine=engine, stt=types.SimpleNamespace(model_dir="(none)"), warmup=False)
    q1, q2 = "alpha bravo charlie delta", "one two three four five"
    try:
        with TestClient(create_app(svc, with_ui=False)) as c:
            with c.websocket_connect("/ws?client_id=a") as a, c.websocket_connect("/ws?client_id=b") as b, \
                    c.websocket_connect("/ws?client_id=c") as w, c.websocket_connect("/ws?client_id=d") as d:
                a.send_json({"question": q1})
                b.send_json({"question": q2})
                for _ in range(2):  # both streams started before any word was released: a batch
                    assert engine.entered.acquire(timeout=30)
                w.send_json({"question": "waits its turn"})
                wait_for(lambda: svc.queue.snapshot()["waiting"] == 1, "the third question queued")
                d.send_json({"question": "one too many"})
                refused = d.receive_json()
                assert refused["code"] == "busy" and refused["retry_after"] >= 1
                assert "retry in" in refused["message"]
                engine.gate.release(100)
                ev_a, ev_b, ev_w = ws_answer(a), ws_answer(b), ws_answer(w)
                for _ in range(2):
                    a.send_json({"question": "again"})
                    ws_answer(a)
                a.send_json({"question": "and again"})
                limited = a.receive_json()
    finally:
        svc.queue.close()
    assert ev_a[-1]["answer"] == q1 + " " and ev_b[-1]["answer"] == q2 + " "
    assert ev_w[-1]["answer"] == "waits its turn "
    assert limited["code"] == "rate_limited"


def test_batched_bf16_generator_runs_wide_steps_in_bf16_and_lone_rows_in_f32(tiny):
    """With ``batched_dtype="bfloat16"`` the demo's wide steps (and prompt prefill) use the bf16
    copy and one-row steps the f32 weights, as the Generator's own loop does: a lone request gets
    the Generator's answer exactly."""
    gen = Generator(tiny.gen.model, tiny.tok, max_seq_len=64, prompt_bucket=16, batched_dtype="bfloat16")
    streams = BatchedStreams(gen, GREEDY, max_batch=4)
    gate = StepGate(streams)
    seen, gated = [], streams._decode

    def spy(leaves, cache, *args, weights, **kw):
        seen.append((cache.batch_size, weights[1], str(leaves[0].dtype)))
        return gated(leaves, cache, *args, weights=weights, **kw)

    streams._decode = spy
    try:
        r0 = streams.submit(PROMPTS[2])
        gate.release(2)
        wait_for(lambda: gate.arrived == 3, "two one-row steps done, the third waiting")
        r1 = streams.submit(PROMPTS[1])
        gate.release()
        text_of(streams, r0)
        text_of(streams, r1)
    finally:
        streams.close()
    assert r0.tokens[:3] == gen.generate([PROMPTS[2]], GREEDY).tokens[0][:3]
    assert seen[0] == (1, None, "float32") and (4, "bfloat16", "bfloat16") in seen
    assert {s for s in seen if s[0] == 1} == {(1, None, "float32")}
    assert {s for s in seen if s[0] > 1} == {(4, "bfloat16", "bfloat16")}
