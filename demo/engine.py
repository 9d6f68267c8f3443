"""Answer engines: the model side of the demo behind one small protocol.

``AnswerEngine.stream(question, device=...)`` yields text deltas and may be called from up to
``max_batch`` threads at once. ``JaxkdEngine`` serves the student through jaxkd's Flax generation:
concurrent questions share one decode batch (``demo.batching``, compiled at start-up by
``warmup``); ``ScriptedEngine`` streams canned numbered steps so the web, STT and limit code can be
developed and load-tested without loading weights.
"""

from __future__ import annotations

import re
import time
from typing import Any, Iterator, Protocol, runtime_checkable

from demo.settings import EngineConfig

DEVICE_NAMES = {
    "any": "", "headphones": "headphones", "earbuds": "earbuds", "headsets": "headset",
    "speakers": "speaker", "soundbars": "soundbar", "tv_streaming": "TV or streaming device",
    "smart_speakers": "smart speaker", "smart_home": "smart-home device", "networking": "router or Wi-Fi",
    "wearables": "wearable",
}


@runtime_checkable
class AnswerEngine(Protocol):
    name: str       # the model it serves, for people
    source: str     # where that model came from
    max_batch: int  # questions it answers at once (the demo's queue runs this many streams)

    def warmup(self) -> float:
        """Compile / load everything a first question needs; returns seconds spent."""

    def stream(self, question: str, *, device: str | None = None) -> Iterator[str]:
        """Text deltas of the answer, in order."""


def user_message(question: str, device: str | None) -> str:
    label = DEVICE_NAMES.get(device or "any", device or "")
    return f"{question.strip()}\n(Device: {label})" if label else question.strip()


_STEP_RE = re.compile(r"^\s*(?:\d+[.)]|step\s+\d+[:.])\s+", re.IGNORECASE)


def count_steps(text: str) -> int:
    """Number of lines that start a numbered step ("1. ", "2) ", "Step 3: ")."""
    return sum(1 for line in text.splitlines() if _STEP_RE.match(line))


def as_numbered_markdown(text: str) -> str:
    """The answer as a Markdown numbered list: kept when the model already numbered its steps,
    otherwise one step per sentence (a fallback so the UI always shows steps)."""
    text = text.strip()
    if not text or count_steps(text) >= 1:
        return text
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
    return "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))


class ScriptedEngine:
    """No model: streams a fixed numbered answer word by word (tests, UI and load work); any
    number of streams run at once, each sleeping between its words."""

    name = "scripted"
    source = "canned answers (no model)"

    def __init__(self, token_delay_s: float = 0.02, max_batch: int = 4) -> None:
        self.token_delay_s, self.max_batch = token_delay_s, max_batch

    def warmup(self) -> float:
        return 0.0

    def stream(self, question: str, *, device: str | None = None) -> Iterator[str]:
        thing = DEVICE_NAMES.get(device or "any") or "device"
        answer = (f"1. Turn the {thing} off and on again.\n"
                  f"2. Remove the {thing} from the Bluetooth list and pair it again.\n"
                  f"3. Install the latest firmware from the maker's app.\n"
                  f"4. If it still fails, reset the {thing} to factory settings.")
        for word in re.findall(r"\S+\s*", answer):
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            yield word


def resolve_model(cfg: EngineConfig) -> str:
    """What ``JaxkdEngine`` loads: the newest trained run under ``cfg.runs_dir`` when preferred
    and present, else ``cfg.model`` (anything ``jaxkd.serving.load_model`` takes)."""
    if cfg.prefer_trained_checkpoint:
        from jaxkd.serving import newest_run

        run = newest_run(cfg.runs_dir)
        if run is not None:
            return str(run)
    return cfg.model


class JaxkdEngine:
    """The student served with jaxkd's KV cache: up to ``cfg.max_batch`` questions decode in one
    shared batch (``demo.batching.BatchedStreams``), each streaming its own answer; ``stream`` is
    safe to call from that many threads. Loaded through ``jaxkd.serving.load_model`` (or given
    ``loaded``, anything with its fields): a trained run brings its weights, chat template and the
    system prompt it was trained with."""

    def __init__(self, cfg: EngineConfig, loaded: Any = None) -> None:
        from demo.batching import BatchedStreams
        from jaxkd.models.generate import Generator, chat_ids
        from jaxkd.serving import load_model

        self._chat_ids = chat_ids

        self.cfg = cfg
        t0 = time.perf_counter()
        loaded = load_model(resolve_model(cfg)) if loaded is None else loaded
        self.load_seconds = time.perf_counter() - t0
        self.name = loaded.name          # what /health and the start-up line report
        self.source = loaded.source      # where the weights came from (a run's checkpoint step, ...)
        self.system_prompt = loaded.system_prompt if cfg.system_prompt is None else cfg.system_prompt
        self.generator = Generator(loaded.model, loaded.tokenizer, max_seq_len=cfg.max_seq_len,
                                   prompt_bucket=cfg.prompt_bucket, batched_dtype=cfg.batched_dtype)
        self.max_batch = cfg.max_batch
        self.batch = BatchedStreams(self.generator, cfg.sampling, cfg.max_batch,
                                    prefix=self.shared_prefix() if cfg.prefix_cache else ())

    def messages(self, question: str, device: str | None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": user_message(question, device)}]

    def prompt_ids(self, question: str, device: str | None) -> list[int]:
        return self._chat_ids(self.generator.tokenizer, self.messages(question, device))

    def shared_prefix(self) -> list[int]:
        """The chat-formatted tokens every question's prompt starts with (system prompt and the
        user turn's header), found as the common start of a few unlike questions' prompts; a
        request is checked against it token by token before its cache is reused."""
        from jaxkd.models.generate import common_prefix

        return common_prefix([self.prompt_ids(q, d) for q, d in PREFIX_PROBES])

    def warmup(self) -> float:
        """Compile prefill + admission for the prompt lengths questions actually have (short,
        medium and long questions: the buckets after the cached prefix, or the prompt buckets
        without one) and the decode step at both batch widths."""
        t0 = time.perf_counter()
        self.batch.warmup([self.prompt_ids(q, None) for q in WARMUP_QUESTIONS])
        return time.perf_counter() - t0

    def stream(self, question: str, *, device: str | None = None) -> Iterator[str]:
        yield from self.batch.stream_ids(self.prompt_ids(question, device))

    def close(self) -> None:
        self.batch.close()


WARMUP_QUESTIONS = (
    "My earbuds will not pair.",
    "My soundbar loses the TV sound over HDMI ARC every evening and the remote no longer changes the "
    "volume. How do I fix it?",
    "My wireless headphones keep disconnecting from my laptop and my phone every few minutes, the "
    "sound cuts out, the noise cancelling switches itself off, the battery drains fast and the app "
    "says the firmware is up to date. I already tried forgetting the device. What else can I do?",
)


# Unlike first words (a letter, a digit, punctuation, a space) and a device line: the prompts'
# common start then ends before anything a question could merge with.
PREFIX_PROBES = (("My earbuds will not pair.", None), ("1 speaker?", "speakers"), ("(x)", None),
                 (" why", "headphones"))


def build_engine(cfg: EngineConfig) -> AnswerEngine:
    if cfg.kind == "scripted":
        return ScriptedEngine(cfg.scripted_token_delay_s, cfg.max_batch)
    return JaxkdEngine(cfg)
