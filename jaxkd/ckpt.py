"""Checkpoints: orbax save / restore of any pytree of arrays plus JSON metadata, and HF export.

Layout of a checkpoint directory ``PATH``::

    PATH/state/              orbax StandardCheckpointer output (the arrays)
    PATH/jaxkd_meta.json     written last: format, step, ModelConfig, caller metadata, leaf shapes

``jaxkd_meta.json`` is the commit marker: a directory without it is an interrupted save and is
reported as such. ``save`` takes any pytree (an ``nnx.State`` / ``nnx.Module`` is stored as its
pure dict), so the trainer can save ``{"params": ..., "opt_state": ..., "step": ...}`` through the
same call, with JSON-able extras (e.g. a grain iterator state) in ``metadata``. ``restore`` takes a
target tree of arrays or ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``: the arrays come back
on exactly that layout, whatever layout they were saved from.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from jaxkd.config import ModelConfig, from_dict, to_dict

META_FILE = "jaxkd_meta.json"
STATE_DIR = "state"
FORMAT = "jaxkd-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


def _pure(tree: Any) -> Any:
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


def _leaf_summary(tree: Any) -> dict[str, list]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): [list(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))]
            for p, x in flat}


def save(path: str | os.PathLike, tree: Any, *, step: int | None = None,
         config: ModelConfig | None = None, metadata: Mapping[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Save ``tree`` (arrays; nnx State/Module allowed) and JSON metadata to ``path``."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise CheckpointError(f"checkpoint path {path} already exists; pass overwrite=True "
                                  f"or choose a new directory (e.g. one per step)")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    pure = _pure(tree)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / STATE_DIR, pure)
    ckptr.wait_until_finished()
    ckptr.close()
    meta = {
        "format": FORMAT,
        "step": step,
        "config": to_dict(config) if config is not None else None,
        "metadata": dict(metadata or {}),
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "leaves": _leaf_summary(pure),
    }
    tmp = path / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, path / META_FILE)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON metadata; raises CheckpointError naming the path when unusable."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{path} is not a complete jaxkd checkpoint: {META_FILE} is missing "
                              f"(an interrupted save, or not a checkpoint directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta_path} is corrupt (not JSON: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if not (path / STATE_DIR).is_dir():
        raise CheckpointError(f"{path}: the array directory {STATE_DIR}/ is missing")
    return meta


def read_config(path: str | os.PathLike) -> ModelConfig:
    meta = read_metadata(path)
    if meta.get("config") is None:
        raise CheckpointError(f"{path}: saved without a ModelConfig")
    return from_dict(ModelConfig, meta["config"])


def abstract_like(tree: Any, sharding: Any = None) -> Any:
    """A target of ``jax.ShapeDtypeStruct`` for ``restore``.

    ``sharding``: None (keep each array's own), one ``jax.sharding.Sharding`` for all leaves, or
    a function ``(path_str, leaf) -> Sharding``.
    """
    def one(p: Any, x: Any) -> jax.ShapeDtypeStruct:
        if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
            s = sharding(jax.tree_util.keystr(p), x)
        else:
            s = sharding if sharding is not None else getattr(x, "sharding", None)
        if s is None:  # e.g. an eval_shape leaf: put it on the default device
            s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

    return jax.tree_util.tree_map_with_path(one, _pure(tree))


def restore(path: str | os.PathLike, target: Any) -> Any:
    """Arrays of the checkpoint at ``path`` laid out as ``target`` (a tree of arrays or
    ShapeDtypeStructs with shardings; an nnx State/Module is taken as its pure dict)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_metadata(path)
    target = _pure(target)
    want, have = _leaf_summary(target), meta.get("leaves", {})
    if have and set(want) != set(have):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise CheckpointError(f"{path}: the target tree does not match the saved one: target-only "
                              f"leaves {missing[:5]}, checkpoint-only leaves {extra[:5]}")
    for k, (shape, _) in want.items():
        if have and list(have[k][0]) != list(shape):
            raise CheckpointError(f"{path}: leaf {k} was saved with shape {have[k][0]}, target has {shape}")
    target = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                          jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                          target)
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(path / STATE_DIR, target)
    except Exception as e:
        raise CheckpointError(f"could not read the arrays of checkpoint {path} "
                              f"({type(e).__name__}: {str(e)[:300]}); it is corrupt or incomplete") from e
    finally:
        ckptr.close()


# ------------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------------


def save_model(path: str | os.PathLike, model: Any, *, step: int | None = None,
               metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save a Decoder's parameters (``nnx.Param`` state) with its ModelConfig."""
    return save(path, nnx.state(model, nnx.Param), step=step, config=model.cfg, metadata=metadata,
                overwrite=overwrite)


def restore_model(path: str | os.PathLike, model: Any = None, *,
                  sharding: Any = None, param_dtype: Any = None, compute_dtype: Any = None) -> Any:
    """Restore a Decoder from ``path``.

    With ``model``: its state is replaced in place (keeping each array's sharding unless
    ``sharding`` is given, see ``abstract_like``). Without: a Decoder is built from the saved
    ModelConfig (no random init) and returned.
    """
    if model is None:
        import jax.numpy as jnp

        from jaxkd.models import abstract_decoder

        cfg = read_config(path)
        model = abstract_decoder(cfg, param_dtype=param_dtype or jnp.float32,
                                 compute_dtype=compute_dtype or jnp.float32)
    state = nnx.state(model, nnx.Param)
    restored = restore(path, abstract_like(state, sharding))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def export_hf(model: Any, cfg: ModelConfig, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Write an HF directory (config, safetensors, generation config, tokenizer) for ``model``."""
    from jaxkd.models.params import write_hf_dir

    return write_hf_dir(cfg, model.hf_tensors(), out_dir, tokenizer=tokenizer)


__all__ = ["CheckpointError", "save", "restore", "read_metadata", "read_config", "abstract_like",
           "save_model", "restore_model", "export_hf"]
