"""LoRA adapters on the decoder's projections (``train.trainable=lora``).

Each targeted ``layers.Projection`` gets ``lora_a`` ``[r, in]`` (small random) and ``lora_b``
``[out, r]`` (zeros) as ``nnx.LoRAParam`` (the axes split like the weight's), and computes
``W x + alpha / r * B (A x)``. ``train.trainable=lora`` trains exactly the ``nnx.LoRAParam``
variables; the base weights stay frozen. Because B starts at zero, the adapted model starts
bit-identical to the base.

* ``adapters_off(model)``: the base model, by switching the adapters off (a static flag, so no
  second copy of any weight): GRPO's reference model under LoRA is ``lora_graphdef(model, False)``
  merged with the policy's own state.
* ``merge_lora(model)``: fold every adapter into its base weight and drop it (export, serving).

Why not qwix (``qwix.apply_lora_to_model``): qwix intercepts ``jnp.einsum`` / ``dot_general``
calls and attaches an adapter only when an operand *is* one of the module's parameters (found by
identity). ``Projection`` computes its contraction as one 2-D matmul on the *reshaped* (and cast)
weight, which is faster on CPU (``evals/results/bench_generate.md``), so under ``jit`` the operand
is a fresh tracer: qwix creates its adapters eagerly but never applies them in the compiled
step. Keeping the adapter inside ``Projection`` also gives merge and "adapters off" for free.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from flax import nnx

from jaxkd.models.layers import Projection

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _projections(model: nnx.Module) -> Iterator[tuple[str, Projection]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Projection):
            yield ".".join(str(p) for p in path), node


def lora_projections(model: nnx.Module) -> list[tuple[str, Projection]]:
    """(path, projection) of every projection carrying an adapter."""
    return [(p, m) for p, m in _projections(model) if m.lora_rank]


def has_lora(model: nnx.Module) -> bool:
    return bool(lora_projections(model))


def apply_lora(model: nnx.Module, rank: int, alpha: float, seed: int = 0,
               targets: Sequence[str] = LORA_TARGETS) -> nnx.Module:
    """Attach adapters (in place; returns ``model``) to every projection whose attribute name is
    in ``targets``. The adapters' initial values depend only on ``seed`` and the model's shape."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: must be a non-empty subset of {list(LORA_TARGETS)}")
    if has_lora(model):
        raise ValueError("this model already has LoRA adapters (merge_lora them first)")
    rngs = nnx.Rngs(seed)
    hit = [(p, m) for p, m in _projections(model) if p.rsplit(".", 1)[-1] in targets]
    if not hit:
        raise ValueError(f"no projection of this model is named one of {list(targets)}")
    for _, proj in hit:
        proj.add_lora(rank, alpha, rngs)
    return model


def set_lora_enabled(model: nnx.Module, enabled: bool) -> None:
    for _, proj in lora_projections(model):
        proj.lora_enabled = bool(enabled)


@contextlib.contextmanager
def adapters_off(model: nnx.Module) -> Iterator[nnx.Module]:
    """``with adapters_off(model):`` the model computes the base model (adapters kept, unused)."""
    states = [(proj, proj.lora_enabled) for _, proj in lora_projections(model)]
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for proj, was in states:
            proj.lora_enabled = was


def lora_graphdef(model: nnx.Module, enabled: bool) -> nnx.GraphDef:
    """The graphdef of ``model`` with its adapters on or off. Merged (``nnx.merge``) with the
    model's own state it gives the adapted or the base model: the state is the same, only the
    static flag differs, so jit traces each once and no weight is copied."""
    states = [(proj, proj.lora_enabled) for _, proj in lora_projections(model)]
    set_lora_enabled(model, enabled)
    try:
        return nnx.graphdef(model)
    finally:
        for proj, was in states:
            proj.lora_enabled = was


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every enabled adapter into its base weight and remove all adapters (in place)."""
    for _, proj in lora_projections(model):
        if proj.lora_enabled:
            proj.merge_lora()
        else:
            del proj.lora_a, proj.lora_b, proj.lora_scale, proj.lora_enabled
    return model


__all__ = ["LORA_TARGETS", "adapters_off", "apply_lora", "has_lora", "lora_graphdef", "lora_projections",
           "merge_lora", "set_lora_enabled"]
