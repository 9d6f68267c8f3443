"""Cheap content identity of a model's weights: what the evaluation caches are keyed by.

A cache keyed by the model *path* (``runs/kd-cpu``) silently serves stale answers after the run is
retrained in place; hashing gigabytes of weights on every call is too slow on a 2-core machine.
``weights_identity(spec)`` sits between the two, and never loads a model:

  packaged preset   the asset's recorded sha256 and size (``jaxkd.assets`` verifies the assembled
                    file against them), plus the preset's dtypes
  .gguf file        file name, size and mtime (ns), plus dtypes
  HF directory      relative path, size and mtime of every weight / config / tokenizer file
  run directory     the served step (``jaxkd.ckpt.served_checkpoint``: the best-val step or the
                    latest committed ``ckpt/<step>``), the sha256 of ``run.json``
                    (base model, system prompt, chat template), relative path, size and mtime of
                    every file of that step's ``params/`` and ``meta/`` items (files under 1 MiB
                    are hashed by content), and the identity of its base model (recursively)

Any rewrite of a weight file changes its mtime (and usually its size), so a retrained run, a new
step or a re-converted file gives a new identity; copying a run elsewhere keeps it when mtimes are
preserved (``cp -p``, ``mv``). The identity is conservative: a ``touch`` also invalidates.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

SMALL_FILE = 1 << 20   # files below this are hashed by content, larger ones by (size, mtime)
_HF_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".jinja", ".txt", ".gguf")


def _file_entry(path: Path, rel: str) -> dict[str, Any]:
    st = path.stat()
    entry: dict[str, Any] = {"path": rel, "size": st.st_size}
    if st.st_size < SMALL_FILE:
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        entry["mtime_ns"] = st.st_mtime_ns
    return entry


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _files(root: Path, keep=lambda p: True) -> list[dict[str, Any]]:
    return [_file_entry(p, str(p.relative_to(root))) for p in sorted(root.rglob("*")) if p.is_file() and keep(p)]


def _spec_identity(spec: Any) -> dict[str, Any]:
    """Identity of a ``jaxkd.config.ModelSpec`` (preset, .gguf or HF directory)."""
    from jaxkd.config import WeightSource

    dtypes = {"param_dtype": spec.param_dtype, "compute_dtype": spec.compute_dtype}
    if spec.source == WeightSource.PACKAGED:
        from jaxkd import assets

        a = assets.get_asset(spec.location)
        return {"kind": "packaged", "asset": a.name, "sha256": a.sha256, "size": a.size, **dtypes,
                "bytes": a.size}
    loc = Path(spec.location).expanduser()
    if spec.source == WeightSource.GGUF:
        if not loc.is_file():
            raise FileNotFoundError(f"model {spec.name!r}: GGUF file not found: {loc}")
        st = loc.stat()
        return {"kind": "gguf", "file": loc.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, **dtypes,
                "bytes": st.st_size}
    if loc.is_dir():
        files = _files(loc, lambda p: p.suffix in _HF_SUFFIXES or p.name.startswith("tokenizer"))
        if not any(f["path"].endswith((".safetensors", ".bin", ".gguf")) for f in files):
            raise FileNotFoundError(f"model {spec.name!r}: no weight files (*.safetensors, *.bin) in {loc}")
        return {"kind": "hf", "dir": loc.name, "files": files, **dtypes, "bytes": sum(f["size"] for f in files)}
    # a hub id that is not downloaded here: only its name identifies it (flagged as such)
    return {"kind": "hub", "id": spec.location, "unverified": True, **dtypes, "bytes": 0}


def _run_identity(run_dir: Path, step: int | None = None) -> dict[str, Any]:
    from jaxkd.ckpt import CKPT_DIR, CheckpointError, read_run_meta, served_checkpoint
    from jaxkd.config import ModelSpec, from_dict

    meta = read_run_meta(run_dir)   # fails naming the path when run.json is missing / corrupt
    try:
        subdir, step = served_checkpoint(run_dir, step)   # the step load_model serves
    except CheckpointError as e:
        raise FileNotFoundError(str(e)) from None
    sdir = Path(run_dir) / subdir / str(step)
    files = [f for item in ("params", "meta") if (sdir / item).is_dir()
             for f in _files(sdir / item) for f in [{**f, "path": f"{item}/{f['path']}"}]]
    base = meta["base_model"]
    if "run" in base:
        parent = _run_identity(Path(base["run"]), int(base["step"]))
    else:
        parent = _spec_identity(from_dict(ModelSpec, base["spec"]))
    own = sum(f["size"] for f in files)
    where = {} if subdir == CKPT_DIR else {"checkpoint": subdir}   # ckpt/: the identity of older runs
    return {"kind": "run", "run": Path(run_dir).name, "step": int(step), **where,
            "run_json_sha256": hashlib.sha256((Path(run_dir) / "run.json").read_bytes()).hexdigest(),
            "files": files, "base": parent, "own_bytes": own, "bytes": own + parent["bytes"]}


def weights_identity(model: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """``{"id": sha256 hex, "bytes": on-disk weight bytes, ...}`` for a run dir, preset, .gguf or
    HF dir, from file metadata only (see the module docstring). ``bytes`` counts what loading
    needs: a run's own checkpoint item files plus its base model's weight file(s)."""
    from jaxkd.models import resolve_spec

    path = Path(model)
    if path.is_dir() and ((path / "run.json").is_file() or (path / "ckpt").is_dir()):
        ident = _run_identity(path, step)
    else:
        if step is not None:
            raise ValueError(f"step={step} applies only to a trained run directory, not {model}")
        ident = _spec_identity(resolve_spec(model))
    return {**ident, "id": _digest(ident)}


__all__ = ["weights_identity", "SMALL_FILE"]
