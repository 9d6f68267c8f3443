"""What of a model trains, and how: the trainable/frozen split, LoRA, the optimizer and schedule.

The train state (``init_state``) holds only the trainable parameters (an
``nnx.State``); everything else of the model is ``frozen``, passed to the step as a non-donated
input and never differentiated. Checkpoints (``jaxkd.ckpt``) store the train state, not the frozen
weights, which come from the base model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

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


def apply_lora(model: nnx.Module, rank: int, alpha: float, seed: int = 0,
               targets: Sequence[str] | None = None) -> nnx.Module:
    """Attach LoRA adapters (``nnx.LoRAParam``) to the ``targets`` projections (default: all
    seven attention/MLP projections), in place; see ``jaxkd.models.lora`` (and why not qwix)."""
    from jaxkd.models.lora import LORA_TARGETS
    from jaxkd.models.lora import apply_lora as _apply

    return _apply(model, rank, alpha, seed, LORA_TARGETS if targets is None else tuple(targets))


def prepare_model(model: nnx.Module, cfg: TrainConfig) -> nnx.Module:
    """The loaded model as a recipe trains it: ``train.attention`` set, LoRA adapters attached
    when ``train.trainable`` is "lora"."""
    model.set_attention(cfg.attention)
    if cfg.trainable == "lora":
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed, cfg.lora_targets)
    return model


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
    """AdamW with warmup + cosine (or constant) schedule; one update per train step.

    Global-norm clipping (``train.clip_norm``) and gradient accumulation (``train.grad_accum``)
    happen in the train step (``jaxkd.train.trainer``), which computes the gradient norm once.
    """
    b1, b2, eps = 0.9, 0.95, 1e-8
    if cfg.adam_mu_dtype == "float32":
        return optax.adamw(learning_rate(cfg), b1=b1, b2=b2, eps=eps, weight_decay=cfg.weight_decay)
    # optax.adamw(mu_dtype=...) is the same chain, but XLA's CPU scheduler kept every leaf's float32
    # first moment live before casting it (as many bytes of temporaries as the cast saved)
    return optax.chain(scale_by_adam_stored_mu(b1, b2, eps, jnp.dtype(cfg.adam_mu_dtype)),
                       optax.add_decayed_weights(cfg.weight_decay),
                       optax.scale_by_learning_rate(learning_rate(cfg)))


def scale_by_adam_stored_mu(b1: float, b2: float, eps: float, mu_dtype: Any) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with the first moment kept in ``mu_dtype``, and the update computed
    from the moment as stored (rounded), so its float32 value has a single consumer (the cast)
    and is never materialised for all leaves at once. Same state as optax's (checkpoints keep their
    structure); the second moment stays in the gradients' dtype."""
    def init(params: Any) -> optax.ScaleByAdamState:
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                                      nu=optax.tree.zeros_like(params))

    def update(grads: Any, state: optax.ScaleByAdamState, params: Any = None) -> tuple[Any, Any]:
        del params
        count = optax.safe_increment(state.count)
        c1, c2 = 1 - b1 ** count, 1 - b2 ** count
        mu = jax.tree.map(lambda g, m: (b1 * m.astype(g.dtype) + (1 - b1) * g).astype(mu_dtype), grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), grads, state.nu)
        updates = jax.tree.map(lambda g, m, v: (m.astype(g.dtype) / c1.astype(g.dtype))
                               / (jnp.sqrt(v / c2.astype(g.dtype)) + eps), grads, mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, mesh: Any = None) -> dict:
    """``{"params", "opt_state", "step", "rng"}``; on a mesh, every leaf is placed explicitly
    (optimizer moments like their parameter, scalars replicated)."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(seed))}
    if mesh is None:
        return state
    return jax.device_put(state, state_shardings(state, tx, mesh))


def state_shardings(state: Mapping[str, Any], tx: optax.GradientTransformation, mesh: Any) -> dict:
    """The layout of a train state on ``mesh``: params keep theirs (set by the model's logical
    axes), optimizer moments follow their parameter, everything else is replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())

    def own(x: Any) -> Any:
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated

    params_sh = jax.tree.map(own, state["params"])
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, state["opt_state"], params_sh,
                                   transform_non_params=lambda _: replicated)
    rest = {k: jax.tree.map(lambda _: replicated, v) for k, v in state.items()
            if k not in ("params", "opt_state")}
    return {"params": params_sh, "opt_state": opt_sh, **rest}
