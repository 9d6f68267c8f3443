"""The trainer: a jitted update step built from a loss function and an optax optimizer, and a plain
``for step in range(start, steps)`` loop that runs hooks every N steps.

    step(state, batch, extra) -> (state, metrics)

state  ``{"params", "opt_state", "step", "rng"}`` (``jaxkd.train.state.init_state``): the
       trainable parameters and everything the update changes. Donated: updated in place.
batch  host arrays (numpy). The step lays them out on the mesh itself: rows split over the
       (data, fsdp) axes. With ``grad_accum`` = A > 1 every array has a leading micro-batch axis
       ``[A, B, ...]`` and the step averages the A micro-batch gradients before one update.
extra  whatever else the loss reads and never differentiates: the frozen model variables, a
       frozen reference model's params (GRPO), ... Not donated; its layout is kept.

A recipe supplies ``loss_fn(params, batch, extra, rng) -> (loss, metrics)``; ``rng`` is a fresh
key per step (and micro-batch) derived from ``state["rng"]`` and the step counter. The step
computes ONE global gradient norm, clips with it (``clip_norm`` > 0; the same rule as
``optax.clip_by_global_norm``) and reports it as ``grad_norm``; the parameter norm is a separate
jitted function (``make_param_norm``) that the metrics hook calls only on logging steps.

The loop (``run_loop``) knows nothing about KD or GRPO: a batch ``source`` (an iterator, e.g. a
grain pipeline, or a callable ``source(step, state) -> batch`` that may run rollouts with the
current params outside jit) feeds the step, and ``Hook`` objects do everything else (metrics,
checkpoints, eval, NaN stop, domain re-weighting; see ``jaxkd.train.hooks``).

A recipe (KD: ``jaxkd.distill.kd``) is a function ``(cfg, resume, command) -> exit code`` in
``jaxkd.train.__main__.RECIPES``. It loads its models (``jaxkd.serving.load_model`` also takes a
trained run as the starting point), splits trainable from frozen (``state.split_model``), builds
``tx`` (``state.make_optimizer``), ``state.init_state`` and ``make_train_step``, writes its run directory
(``run_meta.prepare_run_dir``), opens ``jaxkd.ckpt.RunCheckpointer``, and calls ``run_loop`` with
its batch source and hooks; whatever else must resume exactly (a data iterator's or a rollout
sampler's state) goes into each checkpoint as ``extras`` and comes back from ``restore``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd.train.state import state_shardings

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Mapping[str, jax.Array], Any, jax.Array], tuple[jax.Array, dict]]
BatchSource = Iterator[Batch] | Callable[[int, dict], Batch]


class NonFiniteLoss(FloatingPointError):
    """The loss, gradient norm or parameter norm became NaN or inf."""


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def clip_by_norm(grads: Any, norm: jax.Array, clip_norm: float) -> Any:
    """``optax.clip_by_global_norm`` given the norm already computed (so it is computed once)."""
    if clip_norm <= 0:
        return grads
    # One scalar factor, multiplied in. XLA duplicates a multiply into each consumer (the optimizer's
    # moment updates), whereas a per-element divide counts as expensive, so it was materialised: a
    # second full copy of the gradients live beside the first at the step's memory peak (1.3 of the
    # 2.7 GiB of temporaries of the 0.5B KD step at 2x288).
    scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


def _update(loss_fn: LossFn, tx: optax.GradientTransformation, clip_norm: float, grad_accum: int,
            state: dict, batch: Batch, extra: Any) -> tuple[dict, dict]:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(state["params"], batch, extra, key)
    else:
        def micro(carry, xs):
            i, mb = xs
            (l, m), g = grad_fn(state["params"], mb, extra, jax.random.fold_in(key, i))
            acc_g, acc_l, acc_m = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_m, m)), None

        first = jax.tree.map(lambda x: x[0], batch)
        m_shape = jax.eval_shape(lambda: grad_fn(state["params"], first, extra, key)[0][1])
        zeros = (jax.tree.map(jnp.zeros_like, state["params"]), jnp.zeros((), jnp.float32),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape))
        (grads, loss, metrics), _ = jax.lax.scan(micro, zeros, (jnp.arange(grad_accum), batch))
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        loss = loss / grad_accum
        metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
    grad_norm = optax.tree.norm(grads)
    grads = clip_by_norm(grads, grad_norm, clip_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new, {**metrics, "loss": loss, "grad_norm": grad_norm}


class TrainStep:
    """``step(state, batch, extra) -> (state, metrics)``, jitted once per input layout.

    Without a mesh it is a plain ``jax.jit`` with the state donated. With a mesh the jit gets
    explicit in/out shardings: the state's own (see ``state.init_state``), batch rows over
    (data, fsdp), ``extra`` as it lies; host batches are laid out before the call, and the call
    runs inside the mesh context so activation constraints resolve.
    """

    def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, *, clip_norm: float = 0.0,
                 grad_accum: int = 1, mesh: Any = None):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.tx, self.mesh, self.grad_accum = tx, mesh, grad_accum
        self._fn = lambda state, batch, extra: _update(loss_fn, tx, clip_norm, grad_accum, state, batch, extra)
        self._jitted: Callable | None = None

    def batch_sharding(self) -> Any:
        from jax.sharding import NamedSharding, PartitionSpec

        rows = ("data", "fsdp")
        return NamedSharding(self.mesh, PartitionSpec(None, rows) if self.grad_accum > 1 else PartitionSpec(rows))

    def place_batch(self, batch: Batch) -> dict:
        """Host arrays -> global arrays split over the batch axes (each process supplies its own
        shards of the same global batch, so this also works across processes)."""
        if self.mesh is None:
            return dict(batch)
        sh = self.batch_sharding()
        out = {}
        for k, v in batch.items():
            if isinstance(v, jax.Array) and v.sharding == sh:
                out[k] = v
                continue
            host = np.asarray(v)
            out[k] = jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx])
        return out

    def _compile(self, state: dict, extra: Any) -> Callable:
        if self.mesh is None:
            return jax.jit(self._fn, donate_argnums=(0,))
        from jax.sharding import NamedSharding, PartitionSpec

        state_sh = state_shardings(state, self.tx, self.mesh)
        extra_sh = jax.tree.map(lambda x: x.sharding, extra)
        return jax.jit(self._fn, in_shardings=(state_sh, self.batch_sharding(), extra_sh),
                       out_shardings=(state_sh, NamedSharding(self.mesh, PartitionSpec())),
                       donate_argnums=(0,))

    def __call__(self, state: dict, batch: Batch, extra: Any) -> tuple[dict, dict]:
        if self._jitted is None:
            self._jitted = self._compile(state, extra)
        with mesh_context(self.mesh):
            return self._jitted(state, self.place_batch(batch), extra)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, clip_norm: float = 0.0,
                    grad_accum: int = 1, mesh: Any = None) -> TrainStep:
    """The jitted update of ``loss_fn`` under ``tx`` (see the module docstring)."""
    return TrainStep(loss_fn, tx, clip_norm=clip_norm, grad_accum=grad_accum, mesh=mesh)


def make_param_norm() -> Callable[[Any], jax.Array]:
    """Global L2 norm of a params tree, jitted; the metrics hook calls it on logging steps only."""
    return jax.jit(optax.tree.norm)


def mesh_context(mesh: Any) -> contextlib.AbstractContextManager:
    if mesh is None:
        return contextlib.nullcontext()
    from jaxkd import sharding as shd

    return shd.mesh_context(mesh)


def make_mesh(data: int, fsdp: int, tensor: int, batch_size: int) -> Any:
    """The (data, fsdp, tensor) mesh; None for a single device."""
    if data * fsdp * tensor == 1:
        return None
    from jaxkd import sharding as shd

    if batch_size % (data * fsdp):
        raise ValueError(f"train.batch_size {batch_size} must be a multiple of mesh.data x mesh.fsdp = "
                         f"{data * fsdp}")
    return shd.make_mesh(data, fsdp, tensor)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepInfo:
    """What a hook sees. Before a step: ``step`` is the index of the step about to run (= updates
    done so far) and ``metrics`` is None. After: ``step`` is the number of updates done, and
    ``metrics`` the step's device values; ``host_metrics()`` fetches them once for all hooks."""

    step: int
    state: dict
    metrics: Mapping[str, jax.Array] | None
    started: float                  # perf_counter() when this step's iteration began
    last: int                       # the final step count of the run
    _host: dict[str, float] | None = None
    stop_reason: str | None = None  # set by request_stop

    def request_stop(self, reason: str) -> None:
        """End the run after this step (early stopping): the remaining hooks of this step run,
        then the ``at_end`` hooks that were not due, seeing this step as the last."""
        self.stop_reason = reason

    def host_metrics(self) -> dict[str, float]:
        if self._host is None:
            if self.metrics is None:
                raise ValueError("no metrics before a step has run")
            self._host = {k: float(v) for k, v in jax.device_get(dict(self.metrics)).items()}
        return self._host


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(info)`` every ``every`` steps (0: never, except ``at_end``), before or after the update.

    Before-hooks run when ``step % every == 0`` for the step about to run (so step 0 too); after-
    hooks when ``updates_done % every == 0``, and after the final step when ``at_end``.
    """

    fn: Callable[[StepInfo], None]
    every: int = 1
    before: bool = False
    at_end: bool = False
    name: str = ""

    def due(self, step: int, last: int) -> bool:
        if self.every > 0 and step % self.every == 0:
            return True
        return self.at_end and step == last


def _next_batch(source: BatchSource) -> Callable[[int, dict], Batch]:
    if isinstance(source, Iterator):
        return lambda step, state: next(source)
    if callable(source):
        return source
    raise TypeError(f"batch source must be an iterator or a callable (step, state) -> batch, got "
                    f"{type(source).__name__}")


def run_loop(step_fn: Callable[[dict, Batch, Any], tuple[dict, Any]], state: dict, *,
             source: BatchSource, extra: Any, start: int, steps: int,
             hooks: Sequence[Hook] = ()) -> dict:
    """``for step in range(start, steps)``: before-hooks, one update on the next batch,
    after-hooks (in the order given). Returns the final state; ``int(state["step"])`` tells how
    many updates ran when an after-hook called ``info.request_stop``."""
    next_batch = _next_batch(source)
    before = [h for h in hooks if h.before]
    after = [h for h in hooks if not h.before]
    for step in range(start, steps):
        t0 = time.perf_counter()
        for h in before:
            if h.due(step, steps):
                h.fn(StepInfo(step=step, state=state, metrics=None, started=t0, last=steps))
        batch = next_batch(step, state)
        state, metrics = step_fn(state, batch, extra)
        info = StepInfo(step=step + 1, state=state, metrics=metrics, started=t0, last=steps)
        for h in after:
            if h.due(step + 1, steps):
                h.fn(info)
        if info.stop_reason is not None:
            final = dataclasses.replace(info, last=step + 1)
            for h in after:
                if h.at_end and not h.due(step + 1, steps):
                    h.fn(final)
            return state
    return state


__all__ = ["Hook", "NonFiniteLoss", "StepInfo", "TrainStep", "clip_by_norm", "make_mesh", "make_param_norm",
           "make_train_step", "mesh_context", "run_loop"]
