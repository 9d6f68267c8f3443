"""Answer engines: the model side of the demo behind one small protocol.

``AnswerEngine.stream(question, device=...)`` yields text deltas. ``JaxkdEngine`` serves the student
through jaxkd's Flax generation (KV cache, compiled once at start-up by ``warmup``);
``ScriptedEngine`` streams canned numbered steps so the web, STT and limit code can be developed
and load-tested without loading weights.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from demo.settings import EngineConfig

DEVICE_NAMES = {
    "any": "", "headphones": "headphones", "earbuds": "earbuds", "headsets": "headset",
    "speakers": "speaker", "soundbars": "soundbar", "tv_streaming": "TV or streaming device",
    "smart_speakers": "smart speaker", "smart_home": "smart-home device", "networking": "router or Wi-Fi",
    "wearables": "wearable",
}


@runtime_checkable
class AnswerEngine(Protocol):
    name: str

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
    """No model: streams a fixed numbered answer word by word (tests, UI and load work)."""

    name = "scripted"

    def __init__(self, token_delay_s: float = 0.02) -> None:
        self.token_delay_s = token_delay_s

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


def latest_checkpoint(runs_dir: str | Path) -> Path | None:
    """Newest trained model under ``runs_dir``: a jaxkd checkpoint (``jaxkd_meta.json``, written
    last by ``jaxkd.ckpt.save``) or an HF export (config.json + *.safetensors); None if none."""
    root = Path(runs_dir)
    if not root.is_dir():
        return None
    found = [p.parent for p in root.rglob(CKPT_MARKER)]
    found += [p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


CKPT_MARKER = "jaxkd_meta.json"


def resolve_model(cfg: EngineConfig) -> str:
    """What ``JaxkdEngine`` loads: the newest trained checkpoint when preferred and present,
    else ``cfg.model`` (preset name, preset YAML, or checkpoint / export directory)."""
    if cfg.prefer_trained_checkpoint:
        ckpt = latest_checkpoint(cfg.runs_dir)
        if ckpt is not None:
            return str(ckpt)
    return cfg.model


class JaxkdEngine:
    """The student served with jaxkd's KV-cache generator; one instance, one caller at a time
    (the demo's ``GenerationQueue`` guarantees that)."""

    def __init__(self, cfg: EngineConfig) -> None:
        from jaxkd.models import load_pretrained
        from jaxkd.models.generate import Generator

        self.cfg = cfg
        self.source = resolve_model(cfg)
        t0 = time.perf_counter()
        src = Path(self.source)
        if src.is_dir() and (src / CKPT_MARKER).is_file():
            model, tokenizer = _load_checkpoint(src, cfg.base_model)
            self.name = f"{src.parent.name}/{src.name} (trained from {cfg.base_model})"
        else:
            pretrained = load_pretrained(self.source)
            model, tokenizer = pretrained.model, pretrained.tokenizer
            self.name = pretrained.spec.name
        self.load_seconds = time.perf_counter() - t0
        self.generator = Generator(model, tokenizer, max_seq_len=cfg.max_seq_len,
                                   prompt_bucket=cfg.prompt_bucket)

    def messages(self, question: str, device: str | None) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.cfg.system_prompt},
                {"role": "user", "content": user_message(question, device)}]

    def warmup(self) -> float:
        """Compile prefill + decode for the prompt lengths questions actually have: a short and a
        longest-allowed question (their padded lengths fall in the first two prompt buckets)."""
        t0 = time.perf_counter()
        self.generator.warmup(self.cfg.sampling)
        for question in WARMUP_QUESTIONS:
            stream = self.stream(question)
            for i, _ in enumerate(stream):
                if i >= 1:  # prefill and one decode step ran: both are compiled
                    break
            stream.close()
        return time.perf_counter() - t0

    def stream(self, question: str, *, device: str | None = None) -> Iterator[str]:
        yield from self.generator.stream_chat(self.messages(question, device), self.cfg.sampling)


def _load_checkpoint(path: Path, base: str) -> tuple[object, object]:
    """A jaxkd orbax checkpoint (parameters + ModelConfig) with the tokenizer of ``base``, the
    preset it was trained from (a checkpoint stores no tokenizer)."""
    from jaxkd import ckpt
    from jaxkd.models import resolve_hf_dir, resolve_spec
    from jaxkd.models.tokenizer import load_tokenizer

    try:
        from jaxkd.models import abstract_decoder

        # A shape-only Decoder as the target (restore_model(path) without one trips over the
        # read-only Decoder.inv_freq property in this jaxkd version).
        model = ckpt.restore_model(path, abstract_decoder(ckpt.read_config(path)))
    except Exception as e:
        raise RuntimeError(
            f"could not restore the trained checkpoint {path} ({type(e).__name__}: {e}); serve the "
            "preset instead with engine.prefer_trained_checkpoint=false, or set engine.model to "
            "an HF export directory") from e
    return model, load_tokenizer(resolve_hf_dir(resolve_spec(base)))


WARMUP_QUESTIONS = (
    "My earbuds will not pair.",
    "My wireless headphones keep disconnecting from my laptop and my phone every few minutes, the "
    "sound cuts out, the noise cancelling switches itself off, the battery drains fast and the app "
    "says the firmware is up to date. I already tried forgetting the device. What else can I do?",
)


def build_engine(cfg: EngineConfig) -> AnswerEngine:
    if cfg.kind == "scripted":
        return ScriptedEngine(cfg.scripted_token_delay_s)
    return JaxkdEngine(cfg)
