"""The real FastAPI app (Gradio mounted, real Whisper and Piper) with a model-free engine:
every bad input gets a clear error and the server stays healthy."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient

from demo.app import Services, create_app
from demo.engine import ScriptedEngine, count_steps
from demo.settings import load_demo_config
from demo.testing import espeak_available, espeak_wav, long_wav, noise_wav, silence_wav

QUESTION = "my bluetooth earbuds keep disconnecting from my laptop"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import os
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    cfg = load_demo_config(overrides=["limits.ask_rate=1000/minute",
                                      "limits.transcribe_rate=1000/minute"])
    svc = Services.build(cfg, engine=ScriptedEngine(0.0), warmup=False)
    with TestClient(create_app(svc)) as c:
        yield c
    svc.queue.close()


def assert_healthy(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["queue"]["worker_alive"]


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def test_health_and_ui_served(client):
    assert_healthy(client)
    page = client.get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()


def test_ask_streams_sse_numbered_steps(client):
    r = client.post("/api/ask", json={"question": QUESTION, "device": "earbuds"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [e["type"] for e in events][:2] == ["queued", "start"]
    assert events[-1]["type"] == "done"
    tokens = [e["text"] for e in events if e["type"] == "token"]
    assert len(tokens) > 5 and "".join(tokens) == events[-1]["answer"]
    assert events[-1]["steps"] == count_steps(events[-1]["answer"]) == 4


def test_websocket_text_question_streams_numbered_answer(client):
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"question": QUESTION, "device": "earbuds"})
        events = []
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(ws.receive_json())
        assert events[-1]["type"] == "done", events[-1]
        assert sum(e["type"] == "token" for e in events) > 5
        assert count_steps(events[-1]["answer"]) >= 3
        # The socket stays open for a second question, given as a bare text frame.
        ws.send_text("my soundbar has no sound")
        while (e := ws.receive_json())["type"] not in ("done", "error"):
            pass
        assert e["type"] == "done"


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing: run `make system-deps`")
def test_websocket_audio_streams_transcript_then_answer(client):
    with client.websocket_connect("/ws?device=earbuds") as ws:
        ws.send_bytes(espeak_wav(QUESTION))
        events = []
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(ws.receive_json())
    kinds = [e["type"] for e in events]
    final = [e for e in events if e["type"] == "transcript" and e["final"]]
    assert len(final) == 1 and kinds.index("transcript") < kinds.index("token")
    assert "earbuds keep disconnecting" in final[0]["text"].lower()
    assert kinds[-1] == "done"


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing: run `make system-deps`")
def test_transcribe_endpoint_raw_and_multipart(client):
    wav = espeak_wav(QUESTION)
    r = client.post("/api/transcribe?device=earbuds", content=wav,
                    headers={"content-type": "audio/wav"})
    assert r.status_code == 200 and "bluetooth earbuds" in r.json()["text"].lower()
    r = client.post("/api/transcribe", files={"file": ("q.wav", wav, "audio/wav")},
                    data={"device": "earbuds"})
    assert r.status_code == 200 and "laptop" in r.json()["text"].lower()


BAD_AUDIO = {
    "empty": (b"", 400, "empty_audio", "empty"),
    "silence": (silence_wav(3.0), 400, "silent_audio", "silent"),
    "noise": (noise_wav(4.0), 400, "no_speech", "no speech"),
    "ten_minutes": (long_wav(600.0), 413, "audio_too_long", "600.0 s long"),
    "not_audio": (b"<html><body>not a recording</body></html>" * 100, 415, "not_audio", "not audio"),
    "oversize": (b"\0" * 13_000_000, 413, "too_large", "limit"),
}


@pytest.mark.parametrize("name", list(BAD_AUDIO))
def test_bad_audio_over_http_gets_clear_error_and_server_stays_healthy(client, name):
    data, status, code, phrase = BAD_AUDIO[name]
    r = client.post("/api/transcribe", content=data, headers={"content-type": "audio/wav"})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["code"] == code and phrase in body["message"]
    assert_healthy(client)


@pytest.mark.parametrize("name", list(BAD_AUDIO))
def test_bad_audio_over_websocket_gets_clear_error_and_socket_survives(client, name):
    data, _status, code, phrase = BAD_AUDIO[name]
    with client.websocket_connect("/ws") as ws:
        if name == "empty":
            ws.send_json({"audio_b64": base64.b64encode(data).decode()})
        else:
            ws.send_bytes(data)
        err = ws.receive_json()
        assert err["type"] == "error" and err["code"] == code and phrase in err["message"]
        ws.send_json({"question": "my speaker will not charge"})  # the socket still works
        while (e := ws.receive_json())["type"] not in ("done", "error"):
            pass
        assert e["type"] == "done"
    assert_healthy(client)


@pytest.mark.parametrize("payload, code", [
    ({"question": "   "}, "empty_question"),
    ({"question": "x" * 601}, "question_too_long"),
    ({"question": "hi", "device": "toaster"}, "unknown_device"),
])
def test_bad_questions_are_refused(client, payload, code):
    r = client.post("/api/ask", json=payload)
    assert r.status_code in (400, 413) and r.json()["code"] == code
    with client.websocket_connect("/ws") as ws:
        ws.send_json(payload)
        assert ws.receive_json()["code"] == code


def test_bad_json_is_refused(client):
    r = client.post("/api/ask", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "bad_json"


def test_speak_returns_wav(client):
    r = client.post("/api/speak", json={"text": "1. Turn it off.\n2. Turn it on."})
    assert r.status_code == 200 and r.content[:4] == b"RIFF" and len(r.content) > 20_000


def test_rate_limit_per_client(tmp_path):
    cfg = load_demo_config(overrides=["limits.ask_rate=2/minute"])
    svc = Services.build(cfg, engine=ScriptedEngine(0.0), warmup=False)
    with TestClient(create_app(svc, with_ui=False)) as c:
        for _ in range(2):
            assert c.post("/api/ask", json={"question": "my tv has no sound"}).status_code == 200
        r = c.post("/api/ask", json={"question": "my tv has no sound"})
        assert r.status_code == 429 and r.json()["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "retry in" in r.json()["message"]
        with c.websocket_connect("/ws") as ws:
            ws.send_json({"question": "my tv has no sound"})
            assert ws.receive_json()["code"] == "rate_limited"
        assert c.get("/health").json()["rate_limited"]["ask"] == 2
    svc.queue.close()


def test_client_leaving_mid_answer_stops_its_generation():
    import time

    cfg = load_demo_config()
    svc = Services.build(cfg, engine=ScriptedEngine(0.2), warmup=False)  # ~10 s per answer
    with TestClient(create_app(svc, with_ui=False)) as c:
        with c.websocket_connect("/ws") as ws:
            ws.send_json({"question": "my speaker crackles"})
            while ws.receive_json()["type"] != "token":
                pass
        deadline = time.time() + 5
        while svc.queue.snapshot()["cancelled"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        snap = svc.queue.snapshot()
        assert snap["cancelled"] == 1 and snap["completed"] == 0 and not snap["running"]
        assert c.get("/health").json()["status"] == "ok"
    svc.queue.close()


def test_health_reports_a_dead_worker():
    cfg = load_demo_config()
    svc = Services.build(cfg, engine=ScriptedEngine(0.0), warmup=False)
    with TestClient(create_app(svc, with_ui=False)) as c:
        assert c.get("/health").status_code == 200
        svc.queue.close()  # the worker thread exits
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error" and "restart" in r.json()["message"]
