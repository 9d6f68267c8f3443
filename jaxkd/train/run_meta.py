"""What a recipe writes into its run directory before training: ``config.json`` and ``run.json``.

``run.json`` (format in ``jaxkd.ckpt``) is what ``jaxkd.serving.load_model`` needs to serve the
run: the base model the trainable parameters go on top of (a preset's ModelSpec, or another run,
e.g. GRPO starting from a KD run), its ModelConfig, the trainable subset, and the system prompt
and chat template the student was trained with.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from jaxkd.ckpt import write_run_meta
from jaxkd.config import ModelConfig, ModelSpec, RunConfig, WeightSource, to_dict


def _portable(spec: ModelSpec) -> ModelSpec:
    """The spec with a local weights path made absolute (a hub id or asset name is kept)."""
    import dataclasses

    if spec.source in (WeightSource.GGUF, WeightSource.HF):
        local = Path(spec.location).expanduser()
        if local.exists():
            return dataclasses.replace(spec, location=str(local.resolve()))
    return spec


def base_ref(pretrained: Any, student: str) -> dict[str, Any]:
    """``{"run": dir, "step": n}`` when the student was loaded from a trained run, else
    ``{"spec": ModelSpec}`` (of ``pretrained.spec``, or of the ``student`` preset)."""
    run_dir = getattr(pretrained, "run_dir", None)
    if run_dir is not None:
        return {"run": str(Path(run_dir).resolve()), "step": int(pretrained.step)}
    spec = getattr(pretrained, "spec", None)
    if not isinstance(spec, ModelSpec):
        from jaxkd.models import resolve_spec

        spec = resolve_spec(student)
    return {"spec": to_dict(_portable(spec))}


def run_meta(*, recipe: str, name: str, base: dict[str, Any], model_cfg: ModelConfig, trainable: str,
             lora: dict[str, Any] | None, tokenizer: Any, system_prompt: str | None) -> dict[str, Any]:
    return {"recipe": recipe, "name": name, "base_model": base, "model_config": to_dict(model_cfg),
            "trainable": trainable, "lora": lora, "system_prompt": system_prompt,
            "chat_template": getattr(tokenizer, "chat_template", None), "add_generation_prompt": True,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def prepare_run_dir(cfg: RunConfig, *, recipe: str, pretrained: Any, model_cfg: ModelConfig, tokenizer: Any,
                    system_prompt: str | None, train: Any = None) -> Path:
    """Write ``config.json`` and ``run.json`` into ``cfg.run_dir`` (created if needed). ``train``:
    the recipe's TrainConfig when it is not ``cfg.train`` (GRPO's is ``cfg.grpo.train``)."""
    tc = cfg.train if train is None else train
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, sort_keys=True))
    lora = ({"rank": tc.lora_rank, "alpha": tc.lora_alpha, "seed": tc.seed, "targets": list(tc.lora_targets)}
            if tc.trainable == "lora" else None)
    write_run_meta(run_dir, run_meta(recipe=recipe, name=cfg.name, base=base_ref(pretrained, cfg.student),
                                     model_cfg=model_cfg, trainable=tc.trainable, lora=lora,
                                     tokenizer=tokenizer, system_prompt=system_prompt))
    return run_dir
