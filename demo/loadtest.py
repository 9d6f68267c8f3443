"""Bounded load test on loopback: N concurrent websocket clients against a real uvicorn server.

    python -m demo.loadtest --clients 20 [--engine scripted|jaxkd] [--out evals/results/demo_load]

Every client sends one question (every ``--audio-every``-th as espeak-ng speech, ``0`` = text
only) and must end with exactly one ``done`` or ``error`` message; a socket that closes without one
counts as *lost*. /health is polled throughout. Only 127.0.0.1 is contacted. When speech is asked
for and espeak-ng cannot synthesise it, the run stops with an error (it never falls back to text);
the report states how many clients sent audio, how many of those got a transcript, and how many
sent text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUESTIONS = (
    "My Bluetooth earbuds keep disconnecting from my laptop. How do I fix it?",
    "My soundbar has no sound from the TV over HDMI ARC.",
    "My smart plug will not connect to my Wi-Fi network.",
    "Alexa does not respond to the wake word any more.",
)


@dataclass
class ClientResult:
    client: int
    kind: str                 # "text" | "audio"
    outcome: str              # "done" | error code | "lost"
    attempts: int
    seconds: float            # from first send to the final message (last attempt)
    first_token_s: float | None
    retry_after: int | None
    steps: int
    history: list[str]        # outcome of every attempt, in order
    transcript: str | None = None  # audio clients: the final transcript the server sent back


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, ws_max_size: int) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", ws_max_size=ws_max_size))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start on 127.0.0.1 within 60 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


async def _client(i: int, url: str, audio: bytes | None, retries: int) -> ClientResult:
    from websockets.asyncio.client import connect

    kind = "audio" if audio is not None else "text"
    attempts, outcome, retry_after, first, steps, took = 0, "lost", None, None, 0, 0.0
    transcript: str | None = None
    history: list[str] = []
    while True:
        attempts += 1
        t0 = time.perf_counter()
        first, outcome = None, "lost"
        try:
            async with connect(url, max_size=None, open_timeout=30) as ws:
                if audio is not None:
                    await ws.send(audio)
                else:
                    await ws.send(json.dumps({"question": QUESTIONS[i % len(QUESTIONS)]}))
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg["type"] == "transcript" and msg.get("final"):
                        transcript = msg["text"]
                    if msg["type"] == "token" and first is None:
                        first = time.perf_counter() - t0
                    if msg["type"] == "done":
                        outcome, steps = "done", int(msg["steps"])
                        break
                    if msg["type"] == "error":
                        outcome, retry_after = msg["code"], msg.get("retry_after")
                        break
        except Exception as e:  # a socket that dies without a final message is a lost request
            outcome = f"lost:{type(e).__name__}"
        took = time.perf_counter() - t0
        history.append(outcome)
        if outcome == "busy" and attempts <= retries and retry_after:
            await asyncio.sleep(retry_after)
            continue
        return ClientResult(i, kind, outcome, attempts, took, first, retry_after, steps, history,
                            transcript)


async def _poll_health(base: str, stop: asyncio.Event, out: dict[str, Any]) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = (await http.get("/health")).json()["status"] == "ok"
            except Exception:
                ok = False
            out["polls"] += 1
            out["failures"] += 0 if ok else 1
            out["max_s"] = max(out["max_s"], time.perf_counter() - t0)
            await asyncio.sleep(0.25)


async def _run_clients(port: int, clients: int, audio: bytes | None, audio_every: int,
                       retries: int, ids: int) -> tuple[list[ClientResult], dict[str, Any], float]:
    health = {"polls": 0, "failures": 0, "max_s": 0.0}
    stop = asyncio.Event()
    poller = asyncio.create_task(_poll_health(f"http://127.0.0.1:{port}", stop, health))
    t0 = time.perf_counter()
    tasks = [_client(i, f"ws://127.0.0.1:{port}/ws?client_id=c{i % ids}",
                     audio if audio is not None and audio_every and i % audio_every == 0 else None,
                     retries) for i in range(clients)]
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    stop.set()
    await poller
    return list(results), health, wall


class SpeechUnavailable(RuntimeError):
    """Audio clients were asked for but no speech can be synthesised."""


def load_test_speech(text: str = "my bluetooth earbuds keep disconnecting from my laptop") -> bytes:
    """The spoken question audio clients send, or ``SpeechUnavailable`` saying how to fix it."""
    from demo.testing import espeak_available, espeak_wav

    fix = ("install it (`make system-deps`: apt-get install espeak-ng sox), or run text-only "
           "clients with --audio-every 0")
    if not espeak_available():
        raise SpeechUnavailable(f"the load test needs espeak-ng to synthesise the audio clients' "
                                f"question and it is not installed: {fix}")
    try:
        wav = espeak_wav(text)
    except Exception as e:  # a broken espeak-ng install: say so instead of sending text
        raise SpeechUnavailable(f"espeak-ng failed to synthesise the audio clients' question "
                                f"({type(e).__name__}: {e}): {fix}") from e
    if len(wav) < 1000:
        raise SpeechUnavailable(f"espeak-ng produced only {len(wav)} bytes of audio: {fix}")
    return wav


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def run_load(*, clients: int = 20, engine: str = "scripted", audio_every: int = 4, retries: int = 0,
             client_ids: int = 8, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start the real app on loopback, run ``clients`` concurrent websocket clients, summarise."""
    from demo.app import Services, create_app
    from demo.settings import load_demo_config

    if audio_every < 0:
        raise ValueError(f"audio_every must be >= 0 (0 = text only), got {audio_every}")
    # Synthesise first: a run that asked for speech must not quietly send text instead.
    audio = load_test_speech() if audio_every else None
    cfg = load_demo_config(overrides=[f"engine.kind={engine}", "limits.client_key=ip+client_id",
                                      *overrides])
    load_before = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    svc = Services.build(cfg)
    start_s = time.perf_counter() - t0
    try:
        with LoopbackServer(create_app(svc), 2 * cfg.limits.max_body_bytes) as server:
            results, health, wall = asyncio.run(
                _run_clients(server.port, clients, audio, audio_every, retries, client_ids))
            final_health = {"status": "ok"} if health["failures"] == 0 else {"status": "failed"}
            snapshot = svc.queue.snapshot()
            load_after = round(os.getloadavg()[0], 2)
    finally:
        svc.queue.close()
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    done = [r for r in results if r.outcome == "done"]
    every = [h for r in results for h in r.history]
    lost = [r for r in results if r.outcome.startswith("lost")]
    return {
        "clients": clients, "engine": svc.engine.name, "audio_every": audio_every,
        "audio_clients": sum(r.kind == "audio" for r in results),
        "audio_transcribed": sum(r.kind == "audio" and r.transcript is not None for r in results),
        "text_clients": sum(r.kind == "text" for r in results),
        "client_ids": client_ids, "retries_allowed": retries,
        "limits": {"ask_rate": cfg.limits.ask_rate, "queue_size": cfg.limits.queue_size,
                   "max_batch": cfg.engine.max_batch,
                   "client_key": cfg.limits.client_key, "stt_max_waiting": cfg.stt.max_waiting},
        "sampling_max_new_tokens": cfg.engine.sampling.max_new_tokens,
        "engine_kind": cfg.engine.kind, "scripted_token_delay_s": cfg.engine.scripted_token_delay_s,
        "outcomes": outcomes, "answered": len(done), "lost": len(lost),
        "attempts": len(every), "busy_all_attempts": every.count("busy"),
        "rate_limited_all_attempts": every.count("rate_limited"),
        "rejected_busy": outcomes.get("busy", 0), "rejected_rate_limited": outcomes.get("rate_limited", 0),
        "latency_done_s": {"p50": _pct([r.seconds for r in done], 50), "p95": _pct([r.seconds for r in done], 95)},
        "first_token_s": {"p50": _pct([r.first_token_s for r in done if r.first_token_s], 50),
                          "p95": _pct([r.first_token_s for r in done if r.first_token_s], 95)},
        "rejection_latency_s": {"p95": _pct([r.seconds for r in results if r.outcome in ("busy", "rate_limited")], 95)},
        "retry_after_s": sorted({r.retry_after for r in results if r.retry_after}),
        "health": {**health, "max_s": round(health["max_s"], 3), **final_health},
        "queue_after": snapshot, "wall_s": round(wall, 2), "startup_s": round(start_s, 1),
        "loadavg_1m_before": load_before, "loadavg_1m_after": load_after,
        "engine_batch": dict(svc.engine.batch.stats) if hasattr(svc.engine, "batch") else None,
        "per_client": [asdict(r) for r in results],
    }


def machine() -> str:
    from jaxkd.machine import cpu_facts

    f = cpu_facts()
    return f"{f['cores']} x {f['cpu']}, {f['ram_gib']:.0f} GiB RAM, Python {platform.python_version()}"


def to_markdown(runs: list[dict[str, Any]], command: str) -> str:
    lines = ["# Voice demo: loopback load test", "",
             f"- Machine: {machine()}", f"- Command: `{command}`",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "- Each client opens `/ws` on 127.0.0.1 and asks one question, as espeak-ng speech "
             "(a WAV frame, so STT runs) or as text; a request is *lost* if its socket ends without "
             "`done` or `error`.",
             "- Sent: " + "; ".join(_sent_sentence(r) for r in runs) + ".",
             "", "| engine | clients | sent audio / text | answered | busy | rate-limited | "
             "other errors | lost | p50 s | p95 s | first token p50 s | /health polls (failed, max s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        other = r["clients"] - r["answered"] - r["rejected_busy"] - r["rejected_rate_limited"] - r["lost"]
        lines.append(
            f"| {r['engine']} | {r['clients']} | {r['audio_clients']} / {r['text_clients']} | "
            f"{r['answered']} | {r['rejected_busy']} | "
            f"{r['rejected_rate_limited']} | {other} | {r['lost']} | {r['latency_done_s']['p50']} | "
            f"{r['latency_done_s']['p95']} | {r['first_token_s']['p50']} | "
            f"{r['health']['polls']} ({r['health']['failures']}, {r['health']['max_s']}) |")
    lines += ["", "Settings per run: " + "; ".join(
        f"{r['engine']}: ask_rate {r['limits']['ask_rate']} per client id ({r['client_ids']} ids), "
        f"queue {r['limits']['queue_size']} waiting + {r['limits'].get('max_batch', 1)} running"
        + (" in one decode batch, " if r.get("engine_kind") != "scripted" else " at once, ")
        + (f"canned 4-step answer at {r['scripted_token_delay_s']} s per word (web layer only)"
           if r.get("engine_kind") == "scripted" else
           f"greedy, max_new_tokens {r['sampling_max_new_tokens']}")
        + f", busy clients retry {r['retries_allowed']}x after Retry-After"
        for r in runs), "",
        "Final outcome per client: " + "; ".join(f"{r['engine']}: {r['outcomes']}" for r in runs),
        "", "All attempts (retries included): " + "; ".join(
            f"{r['engine']}: {r['attempts']} attempts, {r['busy_all_attempts']} busy, "
            f"{r['rate_limited_all_attempts']} rate-limited" for r in runs),
        "", "1-minute load average before / after each run (the machine is shared; other jobs may "
        "have been running): " + "; ".join(
            f"{r['engine']}: {r['loadavg_1m_before']} / {r.get('loadavg_1m_after')}" for r in runs),
        *[line for r in runs if r.get("engine_batch") for line in (
            "", f"Shared decode batch ({r['engine']}): {r['engine_batch']['admitted']} questions "
            f"admitted (warm-up included), {r['engine_batch']['steps']} batched decode steps, at most "
            f"{r['engine_batch']['max_rows']} of {r['limits']['max_batch']} rows decoding at once.")],
        "", "p50/p95: seconds from sending the question to the final `done` (answered requests, "
        "queue wait and STT included); first token: to the first streamed token.", ""]
    return "\n".join(lines)


def _sent_sentence(r: dict[str, Any]) -> str:
    """What a run actually sent, from its per-client records."""
    every = r.get("audio_every")
    nth = {1: "", 2: "2nd ", 3: "3rd "}.get(every, f"{every}th ")
    how = f"every {nth}client" if every else "text only"
    return (f"{r['engine']}: {r['audio_clients']} of {r['clients']} clients sent speech ({how}; "
            f"{r['audio_transcribed']} of them got a final transcript back), "
            f"{r['text_clients']} sent text")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--engine", action="append", choices=["scripted", "jaxkd"],
                   help="repeat to run several (default: scripted)")
    p.add_argument("--audio-every", type=int, default=4,
                   help="every k-th client sends espeak-ng speech (0 = all text)")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--client-ids", type=int, default=8)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. limits.queue_size=2")
    args = p.parse_args(argv)
    try:
        runs = [run_load(clients=args.clients, engine=e, audio_every=args.audio_every,
                         retries=args.retries, client_ids=args.client_ids,
                         overrides=tuple(args.overrides))
                for e in (args.engine or ["scripted"])]
    except SpeechUnavailable as e:
        print(f"demo.loadtest: {e}", file=sys.stderr)
        return 2
    command = "python -m demo.loadtest " + " ".join(argv if argv is not None else sys.argv[1:])
    md = to_markdown(runs, command)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(
            {"machine": machine(), "command": command, "runs": runs}, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
    return 0 if all(r["lost"] == 0 and r["health"]["failures"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
