"""The FastAPI app: /health, /api/transcribe, /api/ask (SSE), /api/speak, /ws, and the Gradio UI.

Websocket ``/ws[?device=earbuds&client_id=...]``, one request at a time per socket:
  client -> ``{"question": "...", "device": "earbuds"}``, a bare text frame (a question),
            ``{"audio_b64": "...", "device": ...}`` or a binary frame (any audio file's bytes)
  server -> ``transcript`` (``final`` false while segments arrive, then true; audio only),
            ``queued``, ``start``, ``token`` x N, then exactly one ``done`` (answer, markdown,
            steps, seconds) or ``error``.
Every refusal is a JSON ``{"type": "error", "code", "message"[, "retry_after"]}`` (over HTTP with
the matching status and a Retry-After header; over the websocket as a message, after which the
socket stays open for the next question).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from demo.engine import AnswerEngine, as_numbered_markdown, build_engine, count_steps
from demo.errors import DemoError
from demo.limits import ClientLimiter, GenerationQueue, client_key
from demo.settings import DemoConfig
from demo.stt import Transcriber, load_audio
from demo.tts import Speaker


@dataclass
class Services:
    """Everything a request handler needs; built once per process."""

    cfg: DemoConfig
    engine: AnswerEngine
    queue: GenerationQueue
    limiter: ClientLimiter
    stt: Transcriber
    tts: Speaker | None
    started: float = field(default_factory=time.time)
    warmup_seconds: float = 0.0

    @classmethod
    def build(cls, cfg: DemoConfig, engine: AnswerEngine | None = None,
              stt: Transcriber | None = None, tts: Speaker | None = None,
              warmup: bool | None = None) -> "Services":
        engine = engine if engine is not None else build_engine(cfg.engine)
        warm = cfg.engine.warmup if warmup is None else warmup
        warmup_seconds = engine.warmup() if warm else 0.0
        stt = stt if stt is not None else Transcriber(cfg.stt, cfg.limits)
        if tts is None and cfg.tts.enabled:
            tts = Speaker(cfg.tts)
        return cls(cfg=cfg, engine=engine, queue=GenerationQueue(engine, cfg.limits),
                   limiter=ClientLimiter(cfg.limits), stt=stt, tts=tts,
                   warmup_seconds=warmup_seconds)

    def check_question(self, question: Any) -> str:
        if not isinstance(question, str) or not question.strip():
            raise DemoError("empty_question", "the question is empty: type it or record it first")
        question = question.strip()
        if len(question) > self.cfg.limits.max_question_chars:
            raise DemoError("question_too_long", f"the question is {len(question)} characters; "
                            f"the limit is {self.cfg.limits.max_question_chars}. Ask one thing at a time.",
                            status=413)
        return question

    def check_device(self, device: Any) -> str | None:
        if device in (None, "", "any"):
            return None
        if device not in self.cfg.stt.lexicon:
            raise DemoError("unknown_device", f"unknown device {device!r}; choose one of "
                            f"{sorted(self.cfg.stt.lexicon)}")
        return device


def error_response(err: DemoError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers())


class BodyLimit:
    """ASGI middleware: refuse HTTP bodies over ``max_bytes`` with 413 before reading them all."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = DemoError("too_large", f"the request body is over the {self.max_bytes:,}-byte limit; "
                        "send a shorter recording or question", status=413)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(err)(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except _TooLarge:
            if not started:
                await error_response(err)(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _iterate_in_thread(it) -> AsyncIterator[Any]:
    """Consume a blocking iterator from async code, one item per worker-thread call."""
    sentinel = object()
    while True:
        item = await run_in_threadpool(next, it, sentinel)
        if item is sentinel:
            return
        yield item


async def answer_events(svc: Services, question: str, device: str | None,
                        ) -> AsyncIterator[dict[str, Any]]:
    """Queue a question and yield protocol messages until ``done`` or ``error`` (always one)."""
    job = svc.queue.submit(question, device, loop=asyncio.get_running_loop())  # may raise busy
    pieces: list[str] = []
    try:
        yield {"type": "queued", "job": job.id, "ahead": max(0, svc.queue.snapshot()["waiting"] - 1)}
        async for kind, payload in job.events():
            if kind == "start":
                yield {"type": "start", "queue_wait_s": round(payload, 3)}
            elif kind == "token":
                pieces.append(payload)
                yield {"type": "token", "text": payload}
            elif kind == "error":
                yield payload.to_dict()
            else:
                answer = "".join(pieces)
                took = (job.finished or time.perf_counter()) - (job.started or job.submitted)
                yield {"type": "done", "answer": answer, "markdown": as_numbered_markdown(answer),
                       "steps": count_steps(as_numbered_markdown(answer)),
                       "seconds": round(took, 3)}
    finally:
        job.cancel()  # no-op when finished; stops generation when the client left


def create_app(svc: Services, *, with_ui: bool = True) -> FastAPI:
    cfg = svc.cfg
    app = FastAPI(title="jaxkd voice demo", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.services = svc

    def key_for(host: str | None, params: Any) -> str:
        return client_key(host, params.get("client_id"), cfg.limits.client_key)

    @app.exception_handler(DemoError)
    async def _demo_error(_request: Request, err: DemoError) -> JSONResponse:
        return error_response(err)

    @app.get("/health")
    async def health() -> JSONResponse:
        queue = svc.queue.snapshot()
        ok = queue["worker_alive"]
        body = {"status": "ok" if ok else "error", "engine": svc.engine.name,
                "model_source": getattr(svc.engine, "source", None), "queue": queue,
                "rate_limited": dict(svc.limiter.rejected), "stt_model": svc.stt.model_dir,
                "tts": svc.tts is not None, "uptime_s": round(time.time() - svc.started, 1),
                "warmup_s": round(svc.warmup_seconds, 2)}
        if not ok:
            body["message"] = "the generation worker stopped; restart the demo (python -m demo)"
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/api/transcribe")
    async def transcribe(request: Request) -> dict[str, Any]:
        svc.limiter.check("transcribe", key_for(request.client and request.client.host,
                                                request.query_params))
        device = svc.check_device(request.query_params.get("device"))
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise DemoError("no_file", "send the recording as a form field named 'file'")
            data = await upload.read()
            device = svc.check_device(form.get("device") or device)
        else:
            data = await request.body()
        result = await run_in_threadpool(svc.stt.transcribe_bytes, data, device)
        return {"text": result.text, "audio_seconds": round(result.audio_seconds, 2),
                "seconds": round(result.seconds, 3)}

    @app.post("/api/ask")
    async def ask(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DemoError("bad_json", 'send JSON like {"question": "...", "device": "earbuds"}') from None
        if not isinstance(body, dict):
            raise DemoError("bad_json", 'send a JSON object like {"question": "..."}')
        question = svc.check_question(body.get("question"))
        device = svc.check_device(body.get("device"))
        svc.limiter.check("ask", key_for(request.client and request.client.host, request.query_params))
        events = answer_events(svc, question, device)
        first = await anext(events)  # raises busy here, before the 200 is sent

        async def sse() -> AsyncIterator[str]:
            try:
                yield f"event: {first['type']}\ndata: {json.dumps(first)}\n\n"
                async for msg in events:
                    yield f"event: {msg['type']}\ndata: {json.dumps(msg)}\n\n"
            finally:
                await events.aclose()  # the client left: stop its generation now

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/speak")
    async def speak(request: Request) -> Response:
        if svc.tts is None:
            raise DemoError("tts_off", "spoken read-back is turned off (tts.enabled: false)", status=404)
        body = await request.json()
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise DemoError("bad_json", 'send JSON like {"text": "1. Turn it off ..."}')
        wav = await run_in_threadpool(svc.tts.wav_bytes, text)
        return Response(wav, media_type="audio/wav")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        key = key_for(websocket.client and websocket.client.host, websocket.query_params)
        default_device = websocket.query_params.get("device")
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    await _ws_request(svc, websocket, message, key, default_device)
                except DemoError as err:
                    await websocket.send_json(err.to_dict())
        except (WebSocketDisconnect, RuntimeError):
            return  # the client went away mid-answer; its job was cancelled on the way out

    if with_ui:
        import gradio as gr

        from demo.ui import CSS, build_ui

        app = gr.mount_gradio_app(app, build_ui(svc), path=cfg.server.gradio_path,
                                  max_file_size=cfg.limits.max_body_bytes, footer_links=["api"],
                                  css=CSS)
    app.add_middleware(BodyLimit, max_bytes=cfg.limits.max_body_bytes)
    return app


async def _ws_request(svc: Services, websocket: WebSocket, message: dict, key: str,
                      default_device: str | None) -> None:
    """One websocket request: JSON text (question or base64 audio) or a binary audio frame."""
    limit = svc.cfg.limits.max_body_bytes
    audio: bytes | None = None
    question: Any = None
    device: Any = default_device
    if message.get("bytes") is not None:
        audio = message["bytes"]
    else:
        text = message.get("text") or ""
        if len(text) > limit * 4 // 3 + 1024:
            raise DemoError("too_large", f"the message is over the {limit:,}-byte limit", status=413)
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            msg = {"question": text}  # a bare text frame is a question
        if not isinstance(msg, dict):
            raise DemoError("bad_json", 'send {"question": "..."} or {"audio_b64": "..."}')
        device = msg.get("device", device)
        question = msg.get("question")
        if msg.get("audio_b64") is not None:
            try:
                audio = base64.b64decode(msg["audio_b64"], validate=True)
            except (binascii.Error, TypeError):
                raise DemoError("bad_audio_b64", "audio_b64 is not valid base64") from None
    device = svc.check_device(device)
    if audio is not None:
        if len(audio) > limit:
            raise DemoError("too_large", f"the audio is {len(audio):,} bytes; the limit is {limit:,}",
                            status=413)
        svc.limiter.check("transcribe", key)
        samples = await run_in_threadpool(load_audio, audio, svc.cfg.limits)
        parts: list[str] = []
        async for segment in _iterate_in_thread(svc.stt.segments(samples, device)):
            parts.append(segment)
            await websocket.send_json({"type": "transcript", "text": " ".join(parts), "final": False})
        question = " ".join(parts).strip()
        if not question:
            raise DemoError("no_speech", "no speech was recognised (only noise or silence); move "
                            "closer to the microphone and ask again, or type the question")
        await websocket.send_json({"type": "transcript", "text": question, "final": True})
    question = svc.check_question(question)
    svc.limiter.check("ask", key)
    async for event in answer_events(svc, question, device):
        await websocket.send_json(event)

