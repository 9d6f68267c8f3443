"""One loader for every model jaxkd serves: ``load_model(spec)``.

``spec`` is a trained run directory (``runs/<name>``, format in ``jaxkd.ckpt``), a preset name
(``configs/models/<name>.yaml``), a preset YAML, a ``.gguf`` file or an HF directory. The CLI
(``python -m jaxkd.generate``), the demo engine, evals and ``python -m jaxkd.export`` all load
through it, so a run is served with exactly its trained weights, the system prompt and the chat
template it was trained with. Anything that is not a run is served with the one default prompt,
``jaxkd.data.formatting.SYSTEM_PROMPT`` (an HF export of a run keeps the run's prompt in
``jaxkd_serving.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxkd.ckpt import (BEST_DIR, CKPT_DIR, CheckpointError, RunCheckpointer, committed_steps, is_run_dir,
                        read_run_meta, served_checkpoint)
from jaxkd.config import ConfigError, ModelConfig, ModelSpec, from_dict

if TYPE_CHECKING:
    from jax.sharding import Mesh

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"   # the embedded default student (base preset)
SERVING_FILE = "jaxkd_serving.json"             # next to an HF export: its run's serving settings


@dataclasses.dataclass
class LoadedModel:
    """A model ready to serve. ``name`` is for people (logs, /health); ``source`` says exactly
    where the weights came from (a run's checkpoint step directory, a preset's file, ...)."""

    model: Any
    tokenizer: Any
    config: ModelConfig
    spec: ModelSpec                 # the base weights' spec (for a run: its base preset's)
    system_prompt: str | None       # None: serve without a system turn
    name: str
    source: str
    kind: str                       # "run" | "preset" | "gguf" | "hf"
    run_dir: Path | None = None
    step: int | None = None
    load_s: float = 0.0


def _default_prompt() -> str:
    from jaxkd.data.formatting import SYSTEM_PROMPT

    return SYSTEM_PROMPT


def _as_run(spec: Any) -> Path | None:
    """The run directory ``spec`` names (a directory with run.json or a ckpt/ subdirectory)."""
    if isinstance(spec, ModelSpec):
        return None
    path = Path(spec)
    if path.is_dir() and (is_run_dir(path) or (path / CKPT_DIR).is_dir()):
        return path
    return None


def _export_settings(spec: Any) -> dict[str, Any] | None:
    if isinstance(spec, ModelSpec) or not Path(spec).is_dir():
        return None
    path = Path(spec) / SERVING_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupt (not JSON: {e})") from None


def served_system_prompt(spec: str | os.PathLike | ModelSpec) -> str | None:
    """The system prompt ``load_model(spec)`` serves with, read without loading any weights."""
    run = _as_run(spec)
    if run is not None:
        return read_run_meta(run).get("system_prompt")
    exported = _export_settings(spec)
    if exported is not None:
        return exported.get("system_prompt")
    return _default_prompt()


def newest_run(runs_dir: str | os.PathLike) -> Path | None:
    """The run under ``runs_dir`` (``<runs_dir>/<name>`` or one level deeper) whose latest
    complete checkpoint is the newest; None when there is none."""
    root = Path(runs_dir)
    if not root.is_dir():
        return None
    best: tuple[float, Path] | None = None
    for meta in [*root.glob(f"*/{'run.json'}"), *root.glob("*/*/run.json")]:
        steps = committed_steps(meta.parent)
        if steps:
            t = max((meta.parent / CKPT_DIR / str(s)).stat().st_mtime for s in steps)
            if best is None or t > best[0]:
                best = (t, meta.parent)
    return best[1] if best else None


def default_model(runs_dir: str | os.PathLike = "runs") -> tuple[str, str]:
    """(what to serve, why): the newest trained run under ``runs_dir``, else the base preset."""
    run = newest_run(runs_dir)
    if run is not None:
        return str(run), f"the newest trained run under {runs_dir}/"
    return DEFAULT_MODEL, f"no trained run under {runs_dir}/"


def _load_plain(spec: str | os.PathLike | ModelSpec, **kw: Any) -> LoadedModel:
    from jaxkd.models import load_pretrained

    pt = load_pretrained(spec, **kw)
    exported = _export_settings(spec)
    path = None if isinstance(spec, ModelSpec) else Path(spec)
    kind = ("gguf" if path is not None and path.suffix == ".gguf" else
            "hf" if path is not None and path.is_dir() else "preset")
    name = pt.spec.name
    prompt = _default_prompt()
    if exported is not None:
        prompt = exported.get("system_prompt")
        name = f"{exported.get('name', name)} (HF export)"
    source = (f"{pt.spec.source.value} weights {pt.spec.location}" if kind == "preset"
              else str(Path(pt.spec.location).absolute()))
    return LoadedModel(model=pt.model, tokenizer=pt.tokenizer, config=pt.config, spec=pt.spec,
                       system_prompt=prompt, name=name, source=source, kind=kind, load_s=pt.load_s)


def _load_run(run_dir: Path, step: int | None, **kw: Any) -> LoadedModel:
    from flax import nnx

    from jaxkd.models.lora import merge_lora
    from jaxkd.train.state import apply_lora, split_model

    meta = read_run_meta(run_dir)
    base = meta["base_model"]
    if "run" in base:
        parent = _load_run(Path(base["run"]), int(base["step"]), **kw)
    elif "spec" in base:
        parent = _load_plain(from_dict(ModelSpec, base["spec"]), **kw)
    else:
        raise CheckpointError(f"{run_dir / 'run.json'}: base_model names neither a preset spec nor a run")
    want = from_dict(ModelConfig, meta["model_config"])
    if want.to_hf() != parent.config.to_hf():
        raise CheckpointError(
            f"run {run_dir} was trained on a model with config {want}, but its base {parent.source} now "
            f"loads {parent.config}; restore the base weights it was trained from")
    model = parent.model
    lora = meta.get("lora")
    if meta["trainable"] == "lora":
        if not lora:
            raise CheckpointError(f"{run_dir / 'run.json'}: trainable is 'lora' but there are no lora settings")
        # The checkpoint holds only the adapters: rebuild them on the base, restore, then merge
        # them into the base weights so the served model runs at the base model's cost.
        model = apply_lora(model, lora["rank"], lora["alpha"], lora["seed"], lora.get("targets"))
    _, params, _ = split_model(model, meta["trainable"])
    subdir, step = served_checkpoint(run_dir, step)
    with RunCheckpointer(run_dir, subdir=subdir) as ck:
        restored = ck.restore_params(step, params)
        where = ck.step_dir(step)
        best = ck.read_meta(step).get("extras", {}) if subdir == BEST_DIR else None
    nnx.update(model, restored)
    if meta["trainable"] == "lora":
        merge_lora(model)
    tokenizer = parent.tokenizer
    if meta.get("chat_template"):
        tokenizer.chat_template = meta["chat_template"]  # serve with the template it was trained with
    return LoadedModel(
        model=model, tokenizer=tokenizer, config=parent.config, spec=parent.spec,
        system_prompt=meta.get("system_prompt"),
        name=(f"{run_dir.name} ({meta.get('recipe', 'trained')} step {step}"
              + (f", lowest val {best.get('metric')} {best.get('value', float('nan')):.4g}" if best else "")
              + f", from {parent.name})"),
        source=str(where), kind="run", run_dir=run_dir.absolute(), step=int(step))


def load_model(spec: str | os.PathLike | ModelSpec, *, step: int | None = None, param_dtype: str | None = None,
               compute_dtype: str | None = None, mesh: "Mesh | None" = None) -> LoadedModel:
    """Load ``spec`` (run dir, preset name / YAML, ``.gguf``, HF dir) for serving.

    For a run: its base model, then the trainable parameters of checkpoint ``step`` (default: the
    best-val step when the run kept one, else the latest) on top, its chat template and system
    prompt. Errors (``CheckpointError``,
    ``ConfigError``, ...) name the path and what is wrong.
    """
    t0 = time.perf_counter()
    kw = {"param_dtype": param_dtype, "compute_dtype": compute_dtype, "mesh": mesh}
    run = _as_run(spec)
    if run is not None:
        out = _load_run(run, step, **kw)
    else:
        if step is not None:
            raise ConfigError(f"step={step} applies only to a trained run directory, not {spec}")
        out = _load_plain(spec, **kw)
    out.load_s = time.perf_counter() - t0
    return out


__all__ = ["DEFAULT_MODEL", "LoadedModel", "SERVING_FILE", "default_model", "load_model", "newest_run",
           "served_system_prompt"]
