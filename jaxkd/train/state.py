"""Student train state: trainable/frozen split, optimiser, and orbax checkpoints.

The state handed to the jitted step is a plain pytree ``{"params", "opt_state", "step", "rng"}``:
``params`` are only the trainable parameters (an ``nnx.State``); everything else of the model is
``frozen`` and passed separately, never differentiated. Checkpoints hold the train state (not the
frozen weights, which come from the student preset) plus a JSON side car with the sampler / data
state, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd.config import TrainConfig

EMBED_PATHS = ("embed_tokens", "lm_head")


def trainable_filter(kind: str) -> Any:
    """The nnx filter of trainable variables for ``train.trainable``."""
    if kind == "all":
        return nnx.Param
    if kind == "no_embed":
        return nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(p)) for p in EMBED_PATHS))
    if kind == "lora":
        return nnx.LoRAParam
    raise ValueError(f"unknown train.trainable {kind!r}; allowed: ['all', 'no_embed', 'lora']")


def apply_lora(model: nnx.Module, rank: int, alpha: float, seed: int = 0) -> nnx.Module:
    """Wrap the attention/MLP projections with LoRA adapters through qwix (``nnx.LoRAParam``)."""
    try:
        import qwix
    except ImportError as e:  # pragma: no cover - qwix is an install requirement
        raise RuntimeError("train.trainable=lora needs qwix (pip install qwix)") from e
    rule = qwix.LoraRule(module_path=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*",
                         rank=rank, alpha=alpha)
    ids = jnp.zeros((1, 4), jnp.int32)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    try:
        lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]), ids, pos,
                                              rngs=nnx.Rngs(seed))
        # The train step runs the model split/merged under jit: check that path finds the adapters.
        graphdef, lora, rest = nnx.split(lora_model, nnx.LoRAParam, ...)
        jax.jit(lambda a, b: nnx.merge(graphdef, a, b)(ids, pos)[0])(lora, rest)
        return lora_model
    except Exception as e:
        raise RuntimeError(
            f"qwix could not attach LoRA adapters that work under jit to this Decoder "
            f"({type(e).__name__}: {str(e)[:200]}). qwix finds a projection's weight by the einsum "
            f"operand, and jaxkd.models.layers.Projection reshapes the weight before its einsum; use "
            f"train.trainable=no_embed or all") from e


def split_model(model: nnx.Module, trainable: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, everything else)."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(trainable), ...)
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(f"train.trainable={trainable!r} selects no parameters of this model")
    return graphdef, params, frozen


def count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``lr`` then cosine to ``lr * end_lr_ratio`` (or constant)."""
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)),
                                     optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps else cfg.lr, peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps, decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.end_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with warmup+cosine and global-norm clipping; gradient accumulation via MultiSteps.

    One optimizer update = one train step; with ``grad_accum`` = n the loop feeds n micro-batches
    per step and the schedule advances once per step.
    """
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(learning_rate(cfg), b1=0.9, b2=0.95, eps=1e-8,
                             weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _flatten(tree: Any) -> tuple[list[str], list[Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in leaves], [v for _, v in leaves]


class Checkpointer:
    """Orbax checkpoints of the train state under ``<run_dir>/ckpt/<step>`` (last ``keep`` kept).

    Arrays are stored under positional names with their pytree paths in the JSON side car, which
    is checked on restore: a changed model or trainable filter fails with a clear message.
    """

    def __init__(self, directory: str | Path, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.dir = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("arrays", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        paths, leaves = _flatten(state)
        arrays = {f"a{i:05d}": leaf for i, leaf in enumerate(leaves)}
        meta = {**meta, "paths": paths, "step": int(step)}
        self.manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()  # a checkpoint is complete before training goes on

    def restore(self, step: int, template: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``step`` onto the structure (and shardings) of ``template``."""
        ocp = self._ocp
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        paths, leaves = _flatten(template)
        if meta["paths"] != paths:
            diff = sorted(set(meta["paths"]) ^ set(paths))[:5]
            raise ValueError(f"checkpoint {self.dir}/{step} does not match this model / trainable filter "
                             f"(differing entries, e.g. {diff}); resume with the config it was made with")
        abstract = {f"a{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                       sharding=getattr(x, "sharding", None))
                    for i, x in enumerate(leaves)}
        arrays = self.manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(abstract)))["arrays"]
        treedef = jax.tree_util.tree_structure(template)
        state = jax.tree_util.tree_unflatten(treedef, [arrays[f"a{i:05d}"] for i in range(len(leaves))])
        return state, meta

    def close(self) -> None:
        self.manager.close()


def save_run_config(run_dir: Path, cfg_dict: Mapping[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg_dict, indent=1, sort_keys=True))


def load_trained_student(run_dir: str | Path, step: int | None = None) -> tuple[Any, int, dict]:
    """(Pretrained with the run's trained parameters, checkpoint step, run config dict).

    Loads the run's student preset, then overwrites its trainable parameters with those of the
    checkpoint (latest unless ``step``); the optimizer state is read abstractly and dropped.
    """
    from jaxkd.config import RunConfig, from_dict
    from jaxkd.models import load_pretrained

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: {run_dir} is not a jaxkd.train run directory")
    cfg_dict = json.loads(cfg_path.read_text())
    cfg = from_dict(RunConfig, cfg_dict)
    pt = load_pretrained(cfg.student, compute_dtype=cfg.train.compute_dtype)
    model = pt.model
    if cfg.train.trainable == "lora":
        model = apply_lora(model, cfg.train.lora_rank, cfg.train.lora_alpha, cfg.train.seed)
        pt.model = model
    _, params, _ = split_model(model, cfg.train.trainable)
    tx = make_optimizer(cfg.train)
    template = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
                "step": jax.ShapeDtypeStruct((), jnp.int32),
                "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
    ckpt = Checkpointer(run_dir / "ckpt", keep=10**6)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir / 'ckpt'}")
    restored, _ = ckpt.restore(step, template)
    ckpt.close()
    nnx.update(model, restored["params"])
    return pt, int(step), cfg_dict
