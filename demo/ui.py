"""The Gradio Blocks UI: mic / upload -> live transcript -> streamed numbered steps.

Handlers call the same services as the HTTP API (limiter, STT, generation queue, TTS), so the UI
gets the same limits and the same clear messages. Errors land in the status line, never as a crash.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from demo.engine import as_numbered_markdown, count_steps
from demo.errors import DemoError
from demo.limits import client_key
from demo.stt import load_audio

DEVICE_LABELS = {
    "any": "Any device", "headphones": "Headphones", "earbuds": "Earbuds", "headsets": "Headset",
    "speakers": "Speaker", "soundbars": "Soundbar", "tv_streaming": "TV / streaming",
    "smart_speakers": "Smart speaker / display", "smart_home": "Smart home", "networking":
    "Router / Wi-Fi", "wearables": "Wearable",
}

SHARE_JS = """
(question, answer) => {
  const text = `Q: ${question}\\n\\n${answer}`;
  if (navigator.share) {
    navigator.share({title: "Troubleshooting steps", text: text}).catch(() => {});
    return "Opened the share sheet.";
  }
  if (navigator.clipboard) {
    navigator.clipboard.writeText(text);
    return "Question and answer copied: paste them anywhere to share.";
  }
  return "Sharing is not available in this browser; use the copy button on the answer.";
}
"""

# The public Gradio API (gradio_client / the "Use via API" page): endpoint -> what it does.
API_NAMES = {
    "/transcribe": "audio file + device -> transcript (streamed), status line",
    "/ask": "question + device + read-aloud flag -> numbered-step answer (streamed), status, audio",
}

CSS = """
#status { min-height: 1.6em; font-size: 0.95em; }
#answer { min-height: 12em; }
"""


def _key(svc: Any, request: gr.Request | None) -> str:
    host = request.client.host if request is not None and request.client else None
    return client_key(host, None, "ip")  # the UI has no client id: per address


def _err(e: Exception) -> str:
    if isinstance(e, DemoError):
        return f"**Problem:** {e.message}"
    return f"**Problem:** something went wrong ({type(e).__name__}: {e}); try again"


def build_ui(svc: Any) -> gr.Blocks:
    cfg = svc.cfg
    devices = list(cfg.devices) or ["any"]

    def transcribe(path: str | None, device: str, request: gr.Request) -> Iterator[tuple]:
        """Recording or upload -> transcript shown segment by segment; '' on failure."""
        if not path:
            yield gr.skip(), gr.skip()
            return
        try:
            svc.limiter.check("transcribe", _key(svc, request))
            samples = load_audio(Path(path).read_bytes(), cfg.limits)
            yield "", "Transcribing…"
            parts: list[str] = []
            t0 = time.perf_counter()
            for segment in svc.stt.segments(samples, svc.check_device(device)):
                parts.append(segment)
                yield " ".join(parts), "Transcribing…"
            if not parts:
                raise DemoError("no_speech", "no speech was recognised (only noise or silence); "
                                "move closer to the microphone and ask again, or type the question")
            yield " ".join(parts), f"Heard you in {time.perf_counter() - t0:.1f} s. Thinking…"
        except Exception as e:  # every failure becomes a status message
            yield "", _err(e)

    def answer(question: str, device: str, speak: bool, request: gr.Request) -> Iterator[tuple]:
        """Question -> answer Markdown streamed token by token, then optional read-back."""
        if not (question or "").strip():
            yield gr.skip(), gr.skip(), gr.skip()  # transcription failed: keep its message
            return
        try:
            svc.limiter.check("ask", _key(svc, request))
            job = svc.queue.submit(svc.check_question(question), svc.check_device(device))
        except Exception as e:
            yield gr.skip(), _err(e), gr.skip()
            return
        ahead = svc.queue.snapshot()["waiting"] - 1
        yield "", (f"Waiting for the model ({ahead} ahead)…" if ahead > 0 else "Answering…"), None
        text = ""
        t0 = time.perf_counter()
        try:
            for delta in job:
                text += delta
                yield as_numbered_markdown(text), "Answering…", gr.skip()
        except Exception as e:
            yield as_numbered_markdown(text), _err(e), gr.skip()
            return
        finally:
            job.cancel()
        md = as_numbered_markdown(text)
        status = f"Done in {time.perf_counter() - t0:.1f} s: {count_steps(md)} steps."
        if speak and svc.tts is not None:
            yield md, status + " Preparing the spoken answer…", gr.skip()
            try:
                yield md, status, svc.tts.samples(md)
            except Exception as e:
                yield md, status + " " + _err(e), gr.skip()
        else:
            yield md, status, gr.skip()

    def typed_answer(question: str, device: str, speak: bool, request: gr.Request) -> Iterator[tuple]:
        if not (question or "").strip():
            yield gr.skip(), "**Problem:** type a question or press Record first.", gr.skip()
            return
        yield from answer(question, device, speak, request)

    with gr.Blocks(title="jaxkd: fix my gadget") as ui:
        gr.Markdown("## Fix my gadget: voice troubleshooting\nPress **Record**, describe the problem with your "
                    "headphones, speaker, TV or smart-home device, then press **Stop**. "
                    "Or type the question. Answers come as numbered steps.")
        with gr.Row():
            with gr.Column(scale=1):
                device = gr.Dropdown(choices=[(DEVICE_LABELS.get(d, d), d) for d in devices],
                                     value=devices[0], label="Device",
                                     info="Helps speech recognition with brand and part names")
                mic = gr.Audio(sources=["microphone", "upload"], type="filepath",
                               label="Your question (record or upload)", elem_id="mic")
                question = gr.Textbox(label="Transcript (edit and press Ask)", lines=2,
                                      elem_id="transcript",
                                      placeholder="e.g. my earbuds keep disconnecting from my laptop")
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="ask")
                    speak = gr.Checkbox(label="Read the answer aloud", value=False,
                                        visible=svc.tts is not None)
                gr.Examples(examples=[[q] for q in cfg.examples], inputs=[question],
                            label="Example questions")
            with gr.Column(scale=1):
                status = gr.Markdown("Ready. Engine: " + svc.engine.name, elem_id="status")
                gr.Markdown("### Answer")
                answer_md = gr.Markdown(label="Answer", show_label=True, container=True,
                                        buttons=["copy"], elem_id="answer")
                share_btn = gr.Button("Share", size="sm", elem_id="share")
                readback = gr.Audio(label="Spoken answer", autoplay=True, interactive=False,
                                    visible=svc.tts is not None, elem_id="readback")

        answer_inputs = [question, device, speak]
        answer_outputs = [answer_md, status, readback]
        # One event per purpose, each with its API name (API_NAMES): two triggers that share a
        # handler share one endpoint instead of getting "/transcribe" and "/transcribe_1".
        gr.on([mic.stop_recording, mic.upload], transcribe, [mic, device], [question, status],
              api_name="transcribe", concurrency_limit=None, show_progress="hidden").then(
            # The second half of the voice flow; API clients call /transcribe, then /ask.
            answer, answer_inputs, answer_outputs, api_visibility="private",
            concurrency_limit=None, show_progress="hidden")
        gr.on([ask_btn.click, question.submit], typed_answer, answer_inputs, answer_outputs,
              api_name="ask", concurrency_limit=None, show_progress="hidden")
        share_btn.click(None, [question, answer_md], [status], js=SHARE_JS,
                        api_visibility="private")  # runs in the browser only
    ui.queue(default_concurrency_limit=None)
    return ui
