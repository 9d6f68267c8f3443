"""Helpers shared by the demo's tests and load test: synthetic audio, espeak-ng speech, WER."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

# Questions spoken by espeak-ng in the STT and browser tests, with the device picked for each.
SPOKEN_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("earbuds", "my bluetooth earbuds keep disconnecting from my laptop"),
    ("soundbars", "my soundbar has no sound from the tv over hdmi arc"),
    ("headphones", "the noise cancelling on my headphones stopped working after the update"),
    ("smart_home", "my smart plug will not connect to my wifi network"),
    ("smart_speakers", "alexa does not respond to the wake word anymore"),
    ("speakers", "how do i pair two speakers for stereo sound"),
    ("networking", "my router keeps dropping the internet connection at night"),
    ("earbuds", "the left earbud does not charge in the case"),
    ("tv_streaming", "my streaming stick shows a black screen after i turn on the tv"),
    ("wearables", "my smartwatch will not sync with my phone"),
)


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """float samples in [-1, 1] (frames x channels or 1-D) -> 16-bit PCM WAV bytes."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def silence_wav(seconds: float = 3.0, rate: int = 16_000) -> bytes:
    return wav_bytes(np.zeros(int(seconds * rate), np.float32), rate)


def noise_wav(seconds: float = 4.0, rate: int = 16_000, level: float = 0.3, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return wav_bytes((rng.standard_normal(int(seconds * rate)) * level).astype(np.float32), rate)


def long_wav(seconds: float = 600.0, rate: int = 8_000) -> bytes:
    """A quiet tone ``seconds`` long at a low rate (10 min at 8 kHz is 9.6 MB, under the body cap)."""
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    return wav_bytes(0.1 * np.sin(2 * np.pi * 220 * t), rate)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_wav(text: str, path: Path | None = None, speed_wpm: int = 160) -> bytes:
    """``text`` spoken by espeak-ng (22.05 kHz mono WAV); also written to ``path`` when given."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed: run `make system-deps` "
                           "(apt-get install espeak-ng sox chromium chromium-driver)")
    out = subprocess.run(["espeak-ng", "-s", str(speed_wpm), "--stdout", text],
                         check=True, capture_output=True).stdout
    if path is not None:
        Path(path).write_bytes(out)
    return out


def normalise_words(text: str) -> list[str]:
    text = text.lower().replace("wi-fi", "wifi").replace("-", " ")
    return re.sub(r"[^a-z0-9' ]+", " ", text).split()


def word_edits(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        prev, row[0] = row[:], i
        for j in range(1, len(hyp) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ref[i - 1] != hyp[j - 1]))
    return row[len(hyp)]


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER: total word edits / total reference words, after lower-casing and punctuation."""
    edits = sum(word_edits(normalise_words(r), normalise_words(h)) for r, h in zip(refs, hyps, strict=True))
    words = sum(len(normalise_words(r)) for r in refs)
    return edits / max(words, 1)
