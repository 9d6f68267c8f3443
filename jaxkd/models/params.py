"""Weights in and out as HF-named NumPy dicts: HF directories (safetensors) and GGUF files.

Every reader returns ``(ModelConfig, {hf_name: np.ndarray})`` with transformers' names and
layouts (``model.layers.{i}.self_attn.q_proj.weight`` is ``[out, in]``), which is what
``Decoder.load_hf_tensors`` takes and ``Decoder.hf_tensors`` gives back.

GGUF notes: the ``gguf`` reader exposes each tensor with NumPy shape ``reversed(ggml dims)``,
which already is HF's ``[out, in]``; ``gguf.quants.dequantize`` turns Q4_K/Q5_0/Q6_K/Q8_0/... blocks
into float32. llama.cpp's converter permutes the rows of Q and K for the *llama* architecture
(interleaved RoPE pairs) and we undo that; *qwen2* GGUF files keep HF's rotate-half order
and need no un-permute (DESIGN.md). A GGUF -> HF-dir conversion is slow (parse ~11 s, dequantise
11-33 s, tokenizer ~15 s), so :func:`gguf_to_hf_dir` does it once per file (keyed by sha256)
under ``$JAXKD_CACHE/hf/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxkd.config import Arch, ConfigError, ModelConfig

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Shard size for written checkpoints: writing one (arrays + serialised bytes) stays near 2 GiB, so
# converting the 1.5B GGUF does not hold the f32 model twice; and loading maps one shard at a time
# (a single 6.2 GB file left up to 7 GB of file pages resident while the model loaded).
SHARD_BYTES = 1 << 30

# GGUF tensor name (per layer: after "blk.{i}.") -> HF name (after "model.layers.{i}.")
_GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class WeightsError(ValueError):
    """Weights on disk do not match what the architecture needs; the message names the tensor."""


def expected_hf_names(cfg: ModelConfig) -> set[str]:
    """The exact tensor names a model with ``cfg`` has in transformers."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{n}_proj.weight" for n in "qkvo"}
        names |= {f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        if cfg.qkv_bias:
            names |= {f"{p}self_attn.{n}_proj.bias" for n in "qkv"}
    return names


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, v, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_size
    nq, nk = cfg.num_heads * h, cfg.num_kv_heads * h
    per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (nq, d), "self_attn.k_proj.weight": (nk, d),
                 "self_attn.v_proj.weight": (nk, d), "self_attn.o_proj.weight": (d, nq),
                 "self_attn.q_proj.bias": (nq,), "self_attn.k_proj.bias": (nk,),
                 "self_attn.v_proj.bias": (nk,), "mlp.gate_proj.weight": (f, d),
                 "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for name in expected_hf_names(cfg):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3]]
    return {k: shapes[k] for k in expected_hf_names(cfg)}


def tensor_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape without reading a lazy mapping's data (``LazyTensors``, ``GGUFTensors``)."""
    if hasattr(tensors, "shapes"):
        return dict(tensors.shapes())
    return {k: tuple(v.shape) for k, v in tensors.items()}


def check_tensors(cfg: ModelConfig, tensors: Mapping[str, Any], where: str) -> None:
    """Raise WeightsError if names or shapes differ from what ``cfg`` needs."""
    check_shapes(cfg, tensor_shapes(tensors), where)


def check_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """``check_tensors`` on a name -> shape mapping."""
    want = expected_hf_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    if missing or extra:
        raise WeightsError(
            f"{where}: tensors do not match a {cfg.arch.value} model with {cfg.num_layers} layers "
            f"(tie_embeddings={cfg.tie_embeddings}, qkv_bias={cfg.qkv_bias}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name, shape in want.items():
        if shapes[name] != shape:
            raise WeightsError(f"{where}: {name} has shape {shapes[name]}, expected {shape}")


# ------------------------------------------------------------------------------------------
# HF directories
# ------------------------------------------------------------------------------------------


def read_hf_config(path: str | Path) -> ModelConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise WeightsError(f"{path} is not an HF model directory: no config.json there")
    return ModelConfig.from_hf(json.loads(cfg_path.read_text()))


class LazyTensors(Mapping[str, np.ndarray]):
    """Tensors of safetensors files, each read from disk only when indexed (``pop`` drops a name).

    Lets a loader hold one tensor at a time instead of the whole checkpoint twice.
    """

    def __init__(self, files: Mapping[str, Path], skip: set[str] = frozenset()):
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in dict.fromkeys(files.values()):
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if name not in skip and not name.endswith("rotary_emb.inv_freq"):
                        self._where[name] = file
                        self._shapes[name] = tuple(f.get_slice(name).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self._where[name], framework="numpy") as f:
            return f.get_tensor(name)

    def pop(self, name: str) -> np.ndarray:
        value = self[name]
        del self._where[name], self._shapes[name]
        return value

    def clear(self) -> None:
        self._where.clear()
        self._shapes.clear()

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_dir(path: str | Path, *, lazy: bool = False,
                ) -> tuple[ModelConfig, dict[str, np.ndarray] | LazyTensors]:
    """Config and tensors of an HF directory (``model.safetensors`` or a sharded index).

    ``lazy``: return a :class:`LazyTensors` that reads each tensor when indexed.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    cfg = read_hf_config(path)
    if (path / SAFETENSORS_INDEX).exists():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / SAFETENSORS_FILE).exists():
        files = [SAFETENSORS_FILE]
    else:
        found = sorted(p.name for p in path.iterdir())
        raise WeightsError(f"{path}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} found "
                           f"(files: {found[:10]}); only safetensors checkpoints are supported")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        if not (path / name).exists():
            raise WeightsError(f"{path}: shard {name} listed in {SAFETENSORS_INDEX} is missing")
        tensors.update(load_file(path / name))
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    check_tensors(cfg, tensors, str(path))
    return cfg, tensors


def _torch_dtype_name(tensors: Mapping[str, np.ndarray]) -> str:
    dt = next(iter(tensors.values())).dtype
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(dt), "float32")


def write_hf_dir(cfg: ModelConfig, tensors: Mapping[str, Any], out_dir: str | Path,
                 tokenizer: Any = None, *, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write config.json, generation_config.json, the weights (+ tokenizer files) so that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads the model.

    Weights over ``shard_bytes`` go to numbered shards with an HF index
    (``model.safetensors.index.json``), else to one ``model.safetensors``. ``tensors`` may be
    lazy (``GGUFTensors``, ``LazyTensors``): each tensor is read when its shard is written, so
    peak memory is about one shard and its serialised bytes, not the model twice.
    Written into a temporary sibling directory and renamed into place (replacing ``out_dir``).
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    shapes = tensor_shapes(tensors)
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    check_shapes(cfg, shapes, f"write_hf_dir({out_dir})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        parts: list[list[str]] = []
        dtype_name, total, shard, size = None, 0, {}, 0

        def flush() -> None:
            nonlocal shard, size
            if shard:
                save_file(shard, tmp / f"part-{len(parts)}", metadata={"format": "pt"})
                parts.append(list(shard))
                shard, size = {}, 0

        for name in shapes:
            arr = np.ascontiguousarray(np.asarray(tensors[name]))
            dtype_name = dtype_name or _torch_dtype_name({name: arr})
            if size and size + arr.nbytes > shard_bytes:
                flush()
            shard[name] = arr
            size += arr.nbytes
            total += arr.nbytes
            del arr
        flush()
        if len(parts) == 1:
            os.replace(tmp / "part-0", tmp / SAFETENSORS_FILE)
        else:
            weight_map = {}
            for i, names in enumerate(parts):
                file = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                os.replace(tmp / f"part-{i}", tmp / file)
                weight_map.update(dict.fromkeys(names, file))
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        hf = cfg.to_hf()
        hf["torch_dtype"] = hf["dtype"] = dtype_name or "float32"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        gen: dict[str, Any] = {"do_sample": False}
        if cfg.bos_token_id is not None:
            gen["bos_token_id"] = cfg.bos_token_id
        eos = list(cfg.eos_token_ids)
        if tokenizer is not None:
            eos += [i for i in getattr(tokenizer, "generation_eos_ids", ()) if i not in eos]
        if eos:
            gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _round32(x: float) -> float:
    """GGUF stores floats as float32 (1e-6 -> 9.99999997e-07); give back the decimal it came from."""
    return float(f"{x:.7g}")


def gguf_config(reader: Any, tensor_names: set[str]) -> ModelConfig:
    """ModelConfig from GGUF metadata (and tensor presence for bias/tying)."""
    arch_name = _field(reader, "general.architecture")
    try:
        arch = Arch(arch_name)
    except ValueError:
        raise ConfigError(f"unsupported GGUF architecture general.architecture={arch_name!r}; "
                          f"jaxkd reads {[a.value for a in Arch]}") from None
    a = arch.value

    def req(key: str) -> Any:
        v = _field(reader, f"{a}.{key}")
        if v is None:
            raise WeightsError(f"GGUF metadata key {a}.{key} is missing")
        return v

    if "rope_freqs.weight" in tensor_names:
        raise WeightsError("this GGUF carries rope_freqs.weight (llama3-style RoPE frequency factors), "
                           "which jaxkd's GGUF reader does not map; load the HF checkpoint instead")
    hidden, heads = int(req("embedding_length")), int(req("attention.head_count"))
    key_len = _field(reader, f"{a}.attention.key_length")
    emb = reader_tensor(reader, "token_embd.weight")
    scaling = None
    if _field(reader, f"{a}.rope.scaling.type") not in (None, "none"):
        from jaxkd.config import RopeScaling
        kind = _field(reader, f"{a}.rope.scaling.type")
        if kind != "linear":
            raise WeightsError(f"GGUF {a}.rope.scaling.type={kind!r} is not supported (only linear)")
        scaling = RopeScaling(kind="linear", factor=float(_field(reader, f"{a}.rope.scaling.factor", 1.0)))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=int(emb.shape[-1] if emb is not None else len(_field(reader, "tokenizer.ggml.tokens"))),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_layers=int(req("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{a}.attention.head_count_kv", heads)),
        head_dim=None if key_len is None or int(key_len) == hidden // heads else int(key_len),
        rope_theta=_round32(float(_field(reader, f"{a}.rope.freq_base", 10000.0))),
        rope_scaling=scaling,
        rms_norm_eps=_round32(float(req("attention.layer_norm_rms_epsilon"))),
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        tie_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(_field(reader, f"{a}.context_length", 32768)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def reader_tensor(reader: Any, name: str) -> Any:
    for t in reader.tensors:
        if t.name == name:
            return t
    return None


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, kind = name.rpartition(".")
    if base.startswith("blk."):
        _, idx, short = base.split(".", 2)
        if short in _GGUF_LAYER_NAMES:
            return f"model.layers.{idx}.{_GGUF_LAYER_NAMES[short]}.{kind}"
    elif base in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[base]}.{kind}"
    raise WeightsError(f"GGUF tensor {name!r} has no HF counterpart in jaxkd's name map")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's llama-architecture Q/K row permutation (interleaved -> rotate-half)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class GGUFTensors(Mapping[str, np.ndarray]):
    """The tensors of a GGUF file under HF names (``[out, in]``), each dequantised to ``dtype``
    when indexed: a converter holds one tensor at a time, not the whole model."""

    def __init__(self, reader: Any, cfg: ModelConfig, dtype: Any = np.float32):
        self._reader, self._cfg, self._dtype = reader, cfg, dtype
        self._tensors = {gguf_to_hf_name(t.name): t for t in reader.tensors}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(int(d) for d in reversed(t.shape)) for k, t in self._tensors.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if self._cfg.arch == Arch.LLAMA and ".self_attn.q_proj." in name:
            w = unpermute_rope_rows(w, self._cfg.num_heads)
        elif self._cfg.arch == Arch.LLAMA and ".self_attn.k_proj." in name:
            w = unpermute_rope_rows(w, self._cfg.num_kv_heads)
        return w.astype(self._dtype, copy=False)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_gguf(path: str | Path, dtype: Any = np.float32) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and dequantised tensors (HF names, ``[out, in]``) of a qwen2/llama GGUF file."""
    cfg, tensors, _ = open_gguf(path, dtype)
    return cfg, dict(tensors)


def open_gguf(path: str | Path, dtype: Any = np.float32) -> tuple[ModelConfig, GGUFTensors, bool]:
    """Config, lazily dequantised tensors (checked against the config) and whether the file
    carries tokenizer metadata."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/IndexError on truncation
        raise WeightsError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                           f"is it truncated? For packaged models run `python -m jaxkd.assets verify NAME`") from e
    cfg = gguf_config(reader, {t.name for t in reader.tensors})
    tensors = GGUFTensors(reader, cfg, dtype)
    check_tensors(cfg, tensors, str(path))
    return cfg, tensors, reader.get_field("tokenizer.ggml.model") is not None


# ------------------------------------------------------------------------------------------
# Cached GGUF -> HF directory
# ------------------------------------------------------------------------------------------


def _sha256_of(path: Path) -> str:
    """sha256 of a file, memoised in the cache by (realpath, size, mtime)."""
    from jaxkd.assets import cache_dir, sha256_file

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / "hf" / "sha_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key not in index:
        index[key] = sha256_file(path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_path)
    return index[key]


def converted_dir(gguf_path: str | Path, sha256: str | None = None) -> Path:
    """Where the HF conversion of this GGUF lives (it may not exist yet)."""
    from jaxkd.assets import cache_dir

    return cache_dir() / "hf" / (sha256 or _sha256_of(Path(gguf_path)))[:20]


def gguf_tokenizer(gguf_path: str | Path) -> Any:
    """The tokenizer of a GGUF file: from its cached HF conversion when that exists (fast), else
    built from the GGUF metadata (~15 s). Raises ``TokenizerError`` for a missing file."""
    from jaxkd.models.tokenizer import TokenizerError, load_tokenizer, tokenizer_from_gguf

    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise TokenizerError(f"GGUF file not found: {gguf_path}")
    cached = converted_dir(gguf_path)
    if (cached / "tokenizer_config.json").exists():
        return load_tokenizer(cached)
    return tokenizer_from_gguf(gguf_path)


def gguf_to_hf_dir(gguf_path: str | Path, *, sha256: str | None = None) -> Path:
    """An HF directory (f32 safetensors + tokenizer with chat template) for a GGUF, built once.

    ``sha256``: the file's digest when already known (packaged assets), else computed.
    A GGUF without tokenizer metadata gives a directory without tokenizer files.
    """
    from jaxkd.models.tokenizer import tokenizer_from_gguf

    gguf_path = Path(gguf_path)
    out = converted_dir(gguf_path, sha256)
    if (out / "jaxkd_source.json").exists():
        return out
    cfg, tensors, has_tokenizer = open_gguf(gguf_path, np.float32)
    tokenizer = tokenizer_from_gguf(gguf_path) if has_tokenizer else None
    write_hf_dir(cfg, tensors, out, tokenizer=tokenizer)
    (out / "jaxkd_source.json").write_text(json.dumps(
        {"gguf": str(gguf_path.resolve()), "sha256": sha256 or _sha256_of(gguf_path),
         "note": "dequantised to float32 by jaxkd.models.params.read_gguf"}, indent=1))
    return out
