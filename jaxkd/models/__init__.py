"""Models: the Flax NNX decoder, generation, weights in/out, tokenizer.

``load_pretrained(name_or_spec)`` is the one entry point from a preset name (``configs/models``),
a ``ModelSpec``, a ``.gguf`` path or an HF directory to a ready model + tokenizer;
``build_decoder`` (random init, optionally sharded) and ``abstract_decoder`` (shapes only) build
a bare ``Decoder``. They live here, not in ``jaxkd.sharding``: the layers import sharding, so
sharding must not import the models back. Heavy modules (jax, transformers) are imported inside
functions so ``jaxkd.models.params`` stays light.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxkd.config import ConfigError, ModelConfig, ModelSpec, WeightSource, load_model_spec

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from jaxkd.models.decoder import Decoder

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "f32": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass
class Pretrained:
    """A loaded model: the ``Decoder``, its tokenizer (with ``generation_eos_ids``), config, spec."""

    model: "Decoder"
    tokenizer: Any
    config: ModelConfig
    spec: ModelSpec
    hf_dir: Path | None = None     # the HF directory the weights were read from
    load_s: float = 0.0            # wall seconds to resolve, read and place the weights


def resolve_spec(name_or_spec: str | os.PathLike | ModelSpec) -> ModelSpec:
    """A ModelSpec from a spec, a preset name / YAML path, a ``.gguf`` file or an HF directory."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    path = Path(name_or_spec)
    if path.suffix == ".gguf":
        if not path.exists():
            raise ConfigError(f"GGUF file not found: {path}")
        return ModelSpec(name=path.stem, source=WeightSource.GGUF, location=str(path))
    if path.is_dir():
        return ModelSpec(name=path.name, source=WeightSource.HF, location=str(path))
    return load_model_spec(name_or_spec)


def _hub_snapshot(repo_id: str) -> Path:
    """Download an HF hub model (config, safetensors, tokenizer) or fail naming the id."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = (f"or download it elsewhere (`huggingface-cli download {repo_id} --local-dir DIR`) and "
            f"point the preset's `location:` (or --model) at that local directory")
    if offline:
        raise ConfigError(f"model {repo_id!r} is not a local directory and HF_HUB_OFFLINE is set, so "
                          f"it cannot be fetched from the hub; unset HF_HUB_OFFLINE on a machine with "
                          f"access, {hint}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]))
    except Exception as e:
        raise ConfigError(f"could not fetch {repo_id!r} from the HF hub ({type(e).__name__}: {e}); "
                          f"{hint}") from e


def resolve_hf_dir(spec: ModelSpec) -> Path:
    """The HF directory holding ``spec``'s weights (assembling/converting GGUF once, cached)."""
    from jaxkd import assets
    from jaxkd.models import params

    if spec.source == WeightSource.PACKAGED:
        asset = assets.get_asset(spec.location)
        return params.gguf_to_hf_dir(assets.asset_path(asset), sha256=asset.sha256)
    if spec.source == WeightSource.GGUF:
        if not Path(spec.location).exists():
            raise ConfigError(f"model {spec.name!r}: GGUF file not found: {spec.location}")
        return params.gguf_to_hf_dir(spec.location)
    local = Path(spec.location).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or spec.location.startswith("."):
        raise ConfigError(f"model {spec.name!r}: local directory {spec.location} does not exist")
    return _hub_snapshot(spec.location)


def build_decoder(cfg: ModelConfig, mesh: "Mesh | None" = None, *, seed: int = 0,
                  param_dtype: Any = None, compute_dtype: Any = None) -> "Decoder":
    """A randomly initialised ``Decoder`` whose parameters are sharded over ``mesh`` (or local).

    ``param_dtype`` / ``compute_dtype``: jnp dtypes, float32 when None.
    """
    import jax.numpy as jnp
    from flax import nnx

    from jaxkd import sharding as shd
    from jaxkd.models.decoder import Decoder

    kw = dict(param_dtype=param_dtype or jnp.float32, compute_dtype=compute_dtype or jnp.float32)
    if mesh is None:
        return Decoder(cfg, rngs=nnx.Rngs(seed), **kw)
    with shd.mesh_context(mesh):
        return Decoder(cfg, rngs=nnx.Rngs(seed), **kw)


def abstract_decoder(cfg: ModelConfig, *, param_dtype: Any = None,
                     compute_dtype: Any = None) -> "Decoder":
    """A ``Decoder`` whose parameters are ``jax.ShapeDtypeStruct``s: shapes without memory
    (``jaxkd.sharding.count_params`` / ``param_specs`` read it; loaders fill it in place)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxkd.models.decoder import Decoder

    kw = dict(param_dtype=param_dtype or jnp.float32, compute_dtype=compute_dtype or jnp.float32)
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), **kw))


def decoder_from_hf_tensors(cfg: ModelConfig, tensors: Any, *, param_dtype: Any,
                            compute_dtype: Any, mesh: "Mesh | None" = None) -> "Decoder":
    """A Decoder holding ``tensors`` (a dict or ``params.LazyTensors``; consumed: entries are
    popped as they are placed).

    Built abstractly (``nnx.eval_shape``) so no random initialisation is paid for and peak
    memory is the weights once plus one tensor.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxkd import sharding as shd
    from jaxkd.models import params

    params.check_tensors(cfg, tensors, "load_pretrained")
    model = abstract_decoder(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype)
    # Decoder.hf_map: HF name -> (variable, hf->jaxkd layout, jaxkd->hf layout).
    for name, (var, from_hf, _) in model.hf_map().items():
        abstract = var.get_value()
        arr = from_hf(np.asarray(tensors.pop(name)))
        if tuple(arr.shape) != tuple(abstract.shape):
            raise ValueError(f"{name}: layout {arr.shape} != parameter shape {abstract.shape}")
        value = jnp.asarray(arr, dtype=abstract.dtype)
        if mesh is not None:
            with shd.mesh_context(mesh):
                spec = shd.logical_to_spec(var.get_metadata("out_sharding", None) or
                                           (None,) * arr.ndim, arr.shape, mesh)
            value = jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
        var.set_value(value)
    tensors.clear()
    # any other state (a buffer added to the Decoder later) would still be abstract: say so
    left = [jax.tree_util.keystr(path) for path, leaf in
            jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
            if isinstance(leaf, jax.ShapeDtypeStruct)]
    if left:
        raise RuntimeError(f"decoder_from_hf_tensors: Decoder state {left[:5]} has no value after "
                           f"loading; jaxkd.models.decoder_from_hf_tensors must learn to fill it")
    return model


def load_pretrained(name_or_spec: str | os.PathLike | ModelSpec, *, param_dtype: str | None = None,
                    compute_dtype: str | None = None, mesh: "Mesh | None" = None) -> Pretrained:
    """Load a model + tokenizer from a preset name, ModelSpec, ``.gguf`` file or HF directory.

    ``param_dtype`` / ``compute_dtype`` ("float32" | "bfloat16") override the spec's; ``mesh``
    shards the parameters by their logical names (jaxkd.sharding.LOGICAL_RULES).
    """
    import jax.numpy as jnp

    from jaxkd.models import params
    from jaxkd.models.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    spec = resolve_spec(name_or_spec)
    dtypes = {}
    for key, value in (("param_dtype", param_dtype or spec.param_dtype),
                       ("compute_dtype", compute_dtype or spec.compute_dtype)):
        if value not in _DTYPES:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {sorted(_DTYPES)}")
        dtypes[key] = jnp.dtype(_DTYPES[value])
    hf_dir = resolve_hf_dir(spec)
    cfg, tensors = params.read_hf_dir(hf_dir, lazy=True)
    tokenizer = load_tokenizer(hf_dir)
    model = decoder_from_hf_tensors(cfg, tensors, mesh=mesh, **dtypes)
    return Pretrained(model=model, tokenizer=tokenizer, config=cfg, spec=spec, hf_dir=hf_dir,
                      load_s=time.perf_counter() - t0)


__all__ = ["Pretrained", "load_pretrained", "resolve_spec", "resolve_hf_dir", "decoder_from_hf_tensors",
           "build_decoder", "abstract_decoder"]
