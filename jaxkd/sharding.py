"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter in ``jaxkd.models`` carries logical axis names (``("vocab", "embed")``,
``("embed", "q_heads", "head_dim")``...); activations are constrained with ``constrain``. The
mesh has three axes:

- ``data``: pure data parallelism (batch only).
- ``fsdp``: batch *and* parameter sharding (ZeRO-3 style: weights gathered per layer).
- ``tensor``: Megatron-style tensor parallelism over heads, MLP width and vocab.

Build a sharded model under ``with mesh_context(mesh):`` (``jaxkd.models.build_decoder(cfg, mesh)``
does that for a Decoder). Without a mesh everything here is a no-op, so the same model code runs
on one device. This module knows nothing about the models: they import it, never the reverse.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). The ONE table.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)
_RULES_DICT = dict(LOGICAL_RULES)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over the first data*fsdp*tensor devices."""
    n = data * fsdp * tensor
    devices = list(devices) if devices is not None else jax.devices()
    if n > len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {n} devices, only "
            f"{len(devices)} available (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            f"before importing jax)")
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:n])


def _rules() -> dict[str, Any]:
    ctx = core_spmd.get_logical_axis_rules()
    return dict(ctx) if ctx else _RULES_DICT


def logical_to_spec(logical_names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Any = None) -> PartitionSpec:
    """PartitionSpec for ``logical_names``; with ``shape`` and ``mesh``, axes that do not divide
    their dimension are dropped (replicated) instead of failing."""
    rules = _rules()
    out = []
    for i, name in enumerate(logical_names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis name {name!r} is not in jaxkd.sharding.LOGICAL_RULES; "
                             f"known names: {sorted(rules)}")
        axes = rules[name]
        if axes is not None and shape is not None and mesh is not None:
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            size = math.prod(mesh.shape[a] for a in names)
            if shape[i] % size:
                axes = None
        out.append(axes)
    return PartitionSpec(*out)


def constrain(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(logical_names) != x.ndim:
        raise ValueError(f"constrain: {len(logical_names)} names {tuple(logical_names)} for an "
                         f"array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_names, x.shape, mesh))


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[Mesh]:
    """``jax.set_mesh(mesh)`` plus ``nnx.logical_axis_rules(LOGICAL_RULES)``: build or run models in it."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def param_specs(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """``{"layers.0.self_attn.q_proj.weight": (shape, logical_names)}`` for every nnx.Param."""
    out = {}
    for path, var in _iter_params(model):
        out[path] = (tuple(var.shape), tuple(var.get_metadata().get("out_sharding") or ()))
    return out


def _iter_params(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        yield ".".join(str(p) for p in path), var


def sharding_problems(model: nnx.Module, mesh: Mesh) -> list[str]:
    """Every parameter dimension that does not divide the mesh axes its logical name maps to."""
    problems = []
    rules = _rules()
    for path, (shape, names) in param_specs(model).items():
        if len(names) != len(shape):
            problems.append(f"{path}: {len(names)} logical names {names} for shape {shape}")
            continue
        for dim, name in zip(shape, names):
            axes = rules.get(name) if name is not None else None
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                problems.append(f"{path}: dim {dim} ({name}) is not divisible by mesh axes "
                                f"{axes} of size {size}")
    return problems


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars (works on an abstract model from ``abstract_decoder``)."""
    return sum(math.prod(shape) for shape, _ in param_specs(model).values())
