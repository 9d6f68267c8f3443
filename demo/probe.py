"""Voice-path latency probe: spoken questions over the websocket, timed from the end of the upload.

    python -m demo.probe [--engine scripted|jaxkd ...] [--questions 5] [--reps 5] [--warmup 1]
                         [--url ws://127.0.0.1:PORT/ws] [--out evals/results/voice_probe] [key=value ...]

Each question (``demo.testing.SPOKEN_QUESTIONS``, spoken by espeak-ng at 160 wpm) goes to ``/ws``
as one binary WAV frame, one request at a time (no queueing), on a fresh socket. Per request the
clock starts when the frame has been handed to the socket ("end of upload"; on loopback the
~100 KB frame is in the server's buffer within a millisecond) and records the arrival of:

- the final transcript (``transcript`` with ``final: true``),
- the first answer token and the last answer token (``token`` messages), then ``done``.

``--warmup`` requests per question run first and are not timed (they compile the prompt lengths the
question needs); then ``--reps`` timed requests per question. The report gives min and median per
question and over all timed requests. Without ``--url`` the real app (``demo.app.create_app``, UI
mounted) is started in this process on 127.0.0.1 with the rate limits lifted; with ``--url`` a
running demo on this machine (127.0.0.1 / localhost only) is probed as it is configured.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import statistics
import sys
import time
import wave
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
METRICS = ("transcript_final_s", "first_token_s", "last_token_s")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "evals" / "results" / "voice_probe"


class ProbeError(RuntimeError):
    """The probe cannot run (no speech synthesiser, non-local URL, a request failed)."""


def check_local(url: str) -> str:
    """``url`` when it is a ws:// URL on this machine, else ProbeError."""
    u = urlparse(url)
    if u.scheme not in ("ws", "wss") or u.hostname not in LOCAL_HOSTS:
        raise ProbeError(f"--url must be a ws:// URL on this machine ({', '.join(LOCAL_HOSTS)}), "
                         f"got {url!r}")
    return url


def one_request(url: str, wav: bytes, device: str | None, timeout_s: float = 600.0) -> dict[str, Any]:
    """Send ``wav`` as one binary frame on a fresh socket; times (s) from the end of the upload."""
    from websockets.sync.client import connect

    full = f"{url}{'&' if '?' in url else '?'}device={device}" if device else url
    out: dict[str, Any] = {"transcript": None, "answer": "", "tokens": 0}
    with connect(full, max_size=None, open_timeout=30) as ws:
        ws.send(wav)
        t0 = time.perf_counter()
        while True:
            msg = json.loads(ws.recv(timeout=timeout_s))
            now = time.perf_counter() - t0
            kind = msg.get("type")
            if kind == "transcript":
                out.setdefault("transcript_first_s", now)
                if msg.get("final"):
                    out["transcript_final_s"], out["transcript"] = now, msg["text"]
            elif kind == "token":
                out.setdefault("first_token_s", now)
                out["last_token_s"] = now
                out["tokens"] += 1
                out["answer"] += msg["text"]
            elif kind == "done":
                out["done_s"], out["steps"] = now, msg.get("steps")
                return out
            elif kind == "error":
                raise ProbeError(f"the server answered with an error: {msg.get('code')}: "
                                 f"{msg.get('message')}")


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "n": len(values)}


def probe(url: str, questions: Sequence[tuple[str, str]], reps: int, warmup: int,
          log=print) -> dict[str, Any]:
    """Warm-up + timed requests per question; per-question and overall min / median."""
    from demo.testing import espeak_available, espeak_wav, word_error_rate

    if not espeak_available():
        raise ProbeError("the probe speaks its questions with espeak-ng, which is not installed: "
                         "`make system-deps` (apt-get install espeak-ng sox)")
    if reps < 5:
        raise ProbeError(f"--reps must be >= 5 (a timing is the min and median of at least 5), got {reps}")
    per_q = []
    for device, text in questions:
        wav = espeak_wav(text)
        for _ in range(warmup):
            one_request(url, wav, device)
        runs = [one_request(url, wav, device) for _ in range(reps)]
        for r in runs:
            if "first_token_s" not in r or r.get("transcript_final_s") is None:
                raise ProbeError(f"a request for {text!r} ended without a final transcript or tokens: {r}")
        with wave.open(io.BytesIO(wav)) as w:  # espeak-ng's streamed header has no frame count:
            frame = w.getsampwidth() * w.getnchannels()  # count the frames actually there
            audio_s = len(w.readframes(w.getnframes())) / frame / w.getframerate()
        row = {"device": device, "question": text, "wav_bytes": len(wav), "audio_s": round(audio_s, 2),
               "transcript": runs[-1]["transcript"],
               "transcript_wer": round(word_error_rate([text], [runs[-1]["transcript"]]), 3),
               "transcripts_identical": len({r["transcript"] for r in runs}) == 1,
               "token_msgs": runs[-1]["tokens"], "answer_chars": len(runs[-1]["answer"]),
               "answer": runs[-1]["answer"],
               **{m: _summary([r[m] for r in runs]) for m in METRICS},
               "raw": [{m: round(r[m], 4) for m in (*METRICS, "done_s")} for r in runs]}
        per_q.append(row)
        log(f"[probe] {text[:50]!r}: " + ", ".join(
            f"{m} min {row[m]['min']} median {row[m]['median']}" for m in METRICS))
    every = {m: [x[m] for q in per_q for x in q["raw"]] for m in METRICS}
    return {"questions": per_q, "overall": {m: _summary(v) for m, v in every.items()}}


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("jax", "jaxlib", "flax", "faster-whisper", "ctranslate2", "gradio", "fastapi", "uvicorn",
                "websockets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def to_markdown(res: dict[str, Any]) -> str:
    lines = ["# Voice path probe: spoken question -> transcript -> answer tokens", "",
             f"- Command: `{res['command']}`", f"- Machine: {res['machine']}", f"- Date: {res['date']}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
             f"- Method: each question is one espeak-ng WAV (160 wpm) sent as a binary frame to `/ws`, "
             f"one request at a time on a fresh socket; times run from the moment the frame was handed "
             f"to the socket (end of upload). Per question {res['warmup']} untimed warm-up request(s), "
             f"then {res['reps']} timed ones. Cells: min / median seconds. `token msgs`: streamed "
             "`token` messages of the last timed answer (each carries one or more tokens' text).",
             "- Rerun: the command above; `--url ws://127.0.0.1:PORT/ws` probes a running "
             "`python -m demo` instead of an in-process app.", ""]
    cell = lambda s: f"{s['min']} / {s['median']}"  # noqa: E731
    for run in res["runs"]:
        o = run["overall"]
        lines += [f"## Engine: {run['engine']}", "",
                  f"- Server: {run['server']}; STT: {run['stt_model']}", f"- Settings: {run['settings']}",
                  f"- 1-minute load average before this run: {run['loadavg_1m_before']} (shared machine).",
                  "", "| question | audio s | -> final transcript | -> first token | -> last token | "
                  "token msgs | transcript (WER) |", "|---|---|---|---|---|---|---|"]
        for q in run["questions"]:
            lines.append(f"| {q['question']} | {q['audio_s']} | {cell(q['transcript_final_s'])} | "
                         f"{cell(q['first_token_s'])} | {cell(q['last_token_s'])} | {q['token_msgs']} | "
                         f"{q['transcript']} ({q['transcript_wer']}) |")
        lines += [f"| **all {o['first_token_s']['n']} timed requests** | | "
                  f"**{cell(o['transcript_final_s'])}** | **{cell(o['first_token_s'])}** | "
                  f"**{cell(o['last_token_s'])}** | | |", ""]
    return "\n".join(lines)


def _in_process(engine: str, overrides: Sequence[str], stack: ExitStack, log) -> dict[str, Any]:
    """Start the real app for ``engine`` on 127.0.0.1; its URL and a description of the run."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from demo.app import Services, create_app
    from demo.loadtest import LoopbackServer
    from demo.settings import load_demo_config

    cfg = load_demo_config(overrides=[f"engine.kind={engine}", "limits.ask_rate=100000/minute",
                                      "limits.transcribe_rate=100000/minute", *overrides])
    t0 = time.perf_counter()
    svc = Services.build(cfg)
    stack.callback(svc.queue.close)
    built = time.perf_counter() - t0
    log(f"[probe] app built in {built:.1f} s (engine {svc.engine.name}, warm-up {svc.warmup_seconds:.1f} s)")
    srv = stack.enter_context(LoopbackServer(create_app(svc), 2 * cfg.limits.max_body_bytes))
    s = cfg.engine.sampling
    settings = (f"engine.kind={cfg.engine.kind}, max_new_tokens {s.max_new_tokens}, temperature "
                f"{s.temperature}"
                + (f", scripted delay {cfg.engine.scripted_token_delay_s} s/word"
                   if cfg.engine.kind == "scripted" else
                   f", prompt_bucket {cfg.engine.prompt_bucket}, prefix cache "
                   + (f"{len(svc.engine.batch.prefix)} tokens" if cfg.engine.prefix_cache else "off"))
                + f"; STT beam {cfg.stt.beam_size}, {cfg.stt.compute_type}, initial prompt "
                f"{cfg.stt.use_initial_prompt}, hotwords {cfg.stt.use_hotwords}; rate limits lifted; "
                f"overrides {list(overrides) or 'none'}; app start {built:.1f} s (warm-up "
                f"{svc.warmup_seconds:.1f} s)")
    return {"url": f"ws://127.0.0.1:{srv.port}/ws", "engine": svc.engine.name, "stt_model": cfg.stt.model,
            "settings": settings,
            "server": "in-process app (`demo.app.create_app`, Gradio UI mounted) on 127.0.0.1"}


def _running(url: str) -> dict[str, Any]:
    import httpx

    u = urlparse(check_local(url))
    try:
        health = httpx.get(f"http://{u.hostname}:{u.port}/health", timeout=10).json()
    except (httpx.HTTPError, ValueError) as e:
        raise ProbeError(f"no demo answers /health at {u.hostname}:{u.port} ({type(e).__name__}); "
                         f"start one with `python -m demo` or drop --url") from None
    return {"url": url, "engine": health.get("engine"), "stt_model": health.get("stt_model"),
            "settings": "as the running demo is configured", "server": f"a running demo at {url}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", choices=["scripted", "jaxkd"],
                   help="in-process app; repeat to probe several in turn (default: scripted, no weights)")
    p.add_argument("--url", default=None, help="probe a running demo on this machine instead")
    p.add_argument("--questions", type=int, default=5, help="how many of demo.testing.SPOKEN_QUESTIONS")
    p.add_argument("--reps", type=int, default=5, help="timed requests per question (>= 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per question first")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT.json and OUT.md ('' = print only)")
    p.add_argument("overrides", nargs="*", help="demo config overrides (in-process app only)")
    args = p.parse_args(argv)

    import os

    from demo.loadtest import machine
    from demo.testing import SPOKEN_QUESTIONS

    if not 1 <= args.questions <= len(SPOKEN_QUESTIONS):
        p.error(f"--questions must be 1..{len(SPOKEN_QUESTIONS)}")
    if args.url and (args.overrides or args.engine):
        p.error("--engine and config overrides apply to the in-process app, not to --url")
    questions = [(d, q) for d, q in SPOKEN_QUESTIONS[: args.questions]]
    command = ("python -m demo.probe " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    runs = []
    try:
        for engine in ([None] if args.url else (args.engine or ["scripted"])):
            load_before = round(os.getloadavg()[0], 2)
            with ExitStack() as stack:
                where = _running(args.url) if args.url else _in_process(engine, args.overrides, stack, log)
                res = probe(where.pop("url"), questions, args.reps, args.warmup, log=log)
            runs.append({**where, "loadavg_1m_before": load_before, **res})
    except ProbeError as e:
        print(f"demo.probe: {e}", file=sys.stderr)
        return 2
    out_res = {"command": command, "machine": machine(), "versions": _versions(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "reps": args.reps, "warmup": args.warmup, "runs": runs}
    md = to_markdown(out_res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(out_res, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
