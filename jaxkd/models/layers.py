"""Building blocks of the decoder: RMSNorm, rotary embeddings, attention, gated MLP, embedder.

Einsum / shape-suffix legend (names like ``x_btd`` say the axes of the array):

    B batch            T target (query) length     S source (key/value) length
    D model width      N query heads               K key/value heads
    G query heads per kv head (N = K * G)          H head dim
    F MLP width        V vocabulary

Weights are stored output-axis first, HF's ``[out, in]`` with the head axes split out
(``q_proj.weight`` is ``nhd``, ``o_proj.weight`` is ``dnh``, ``gate_proj.weight`` is ``fd``,
``down_proj.weight`` is ``df``; the embedding and ``lm_head`` are ``vd``): loading / exporting HF
tensors is a reshape, never a transpose. Which layout XLA's CPU matmul runs faster depends on the
CPU and the row count (``[out, in]`` on a 2-core AMX Xeon; ``[in, out]`` for 8+ rows on a 2-core
AMD EPYC), so generation may multiply from an ``[in, out]`` copy (``relayout_projections``,
chosen by measurement in ``jaxkd.models.layout``).

KV cache arrays are ``[B, K, S, H]`` (kv heads before slots): both attention contractions then
take the cache as stored, with (B, K) as batch dimensions, so a decode step never transposes it.
Every ``nnx.Param`` carries logical axis names (``out_sharding``) that
``jaxkd.sharding.LOGICAL_RULES`` maps to mesh axes. Parameters are held in ``param_dtype`` and
cast to ``compute_dtype`` for the matmuls; norms, softmax and logits are float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd

from jaxkd.config import ModelConfig, RopeScaling
from jaxkd.sharding import constrain

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked rows stay NaN-free

normal_init: Initializer = nnx.initializers.normal(0.02)
zeros_init: Initializer = nnx.initializers.zeros_init()
ones_init: Initializer = nnx.initializers.ones_init()


def make_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
               logical_names: tuple[str | None, ...], dtype: Any, kind: type[nnx.Param] = nnx.Param,
               ) -> nnx.Param:
    """An ``nnx.Param`` (or subclass ``kind``) with logical axis names; sharded at creation only
    when a mesh is set."""
    if len(logical_names) != len(shape):
        raise ValueError(f"{len(logical_names)} logical names {logical_names} for shape {tuple(shape)}")
    mesh_active = not jax.sharding.get_abstract_mesh().empty
    eager = mesh_active and nnx.using_eager_sharding()
    if eager and not core_spmd.get_logical_axis_rules():
        raise ValueError("building a jaxkd model under a mesh needs the logical axis rules too: "
                         "use `with jaxkd.sharding.mesh_context(mesh):` or jaxkd.models.build_decoder")
    value = init(rngs.params(), tuple(shape), dtype)
    return kind(value, out_sharding=logical_names, eager_sharding=eager)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as HF Qwen2/Llama)."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = make_param(rngs, ones_init, (dim,), ("norm",), param_dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        var_bt1 = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var_bt1 + self.eps)).astype(x_btd.dtype)
        return self.weight[...].astype(x_btd.dtype) * normed


class Embedder(nnx.Module):
    """Token embedding ``vd``; ``attend`` projects hidden states back onto the vocabulary."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
                 compute_dtype: Any = jnp.float32):
        self.compute_dtype = compute_dtype
        self.weight = make_param(rngs, normal_init, (vocab_size, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        x_btd = jnp.take(self.weight[...], ids_bt, axis=0).astype(self.compute_dtype)
        return constrain(x_btd, ("batch", "length", "act_embed"))

    def attend(self, x_btd: jax.Array) -> jax.Array:
        w_vd = self.weight[...].astype(self.compute_dtype)
        logits_btv = jnp.einsum("btd,vd->btv", x_btd.astype(self.compute_dtype), w_vd,
                                preferred_element_type=jnp.float32)
        return constrain(logits_btv, ("batch", "length", "act_vocab"))


class LMHead(nnx.Module):
    """Untied output projection, HF layout ``vd`` (``lm_head.weight``)."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
                 compute_dtype: Any = jnp.float32):
        self.compute_dtype = compute_dtype
        self.weight = make_param(rngs, normal_init, (vocab_size, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        w_vd = self.weight[...].astype(self.compute_dtype)
        logits_btv = jnp.einsum("btd,vd->btv", x_btd.astype(self.compute_dtype), w_vd,
                                preferred_element_type=jnp.float32)
        return constrain(logits_btv, ("batch", "length", "act_vocab"))


# ------------------------------------------------------------------------------------------
# Rotary position embedding (NeoX / HF rotate_half convention)
# ------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [H/2] as float32, following transformers' default/linear/llama3 rules."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    factor = scaling.factor
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = ((old_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, inv_freq_h2: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, H] for integer positions (float32)."""
    freqs_bth2 = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h2)
    emb_bth = jnp.concatenate([freqs_bth2, freqs_bth2], axis=-1)
    return jnp.cos(emb_bth), jnp.sin(emb_bth)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    half = x_btnh.shape[-1] // 2
    x1, x2 = x_btnh[..., :half], x_btnh[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos_bth[:, :, None, :].astype(x_btnh.dtype)
    sin = sin_bth[:, :, None, :].astype(x_btnh.dtype)
    return x_btnh * cos + rotated * sin


# ------------------------------------------------------------------------------------------
# Attention and MLP
# ------------------------------------------------------------------------------------------


class Projection(nnx.Module):
    """A dense projection with an arbitrary-rank weight, applied as one 2-D matmul.

    ``weight`` has shape ``out_shape + in_shape``: HF's ``[prod(out_shape), prod(in_shape)]``
    matrix with its axes split (``to_hf`` / ``from_hf`` are reshapes).

    Optional LoRA adapter (``add_lora``; see ``jaxkd.models.lora``): ``lora_a`` ``(r,) + in_shape``
    and ``lora_b`` ``out_shape + (r,)`` (``nnx.LoRAParam``), i.e. PEFT's ``lora_A [r, in]`` /
    ``lora_B [out, r]`` with the axes split like the weight's, and the output gains
    ``alpha / r * B (A x)``. ``lora_enabled`` (a static attribute, part of the graphdef) turns
    the adapter off without touching its values.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], names: tuple[str, ...],
                 *, use_bias: bool, rngs: nnx.Rngs, param_dtype: Any, compute_dtype: Any):
        """``names`` are the logical axis names of ``out_shape + in_shape``, in that order."""
        self.in_shape, self.out_shape = in_shape, out_shape
        self.names = tuple(names)
        self.compute_dtype = compute_dtype
        self.layout = "oi"  # "io": weight held in_shape + out_shape (see relayout_projections)
        self.weight = make_param(rngs, normal_init, out_shape + in_shape, names, param_dtype)
        self.bias = (make_param(rngs, zeros_init, out_shape, names[:len(out_shape)], param_dtype)
                     if use_bias else None)

    # -- LoRA ------------------------------------------------------------------------------

    @property
    def lora_rank(self) -> int:
        """The adapter's rank; 0 without one."""
        a = getattr(self, "lora_a", None)
        return 0 if a is None else int(a.shape[0])

    def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs) -> None:
        """Attach a rank-``rank`` adapter: A small random (std 1/sqrt(in), as a unit-scale input
        gives unit-scale A x), B zeros, so the adapted layer starts exactly equal to the base."""
        self._require_canonical("add_lora")
        if self.lora_rank:
            raise ValueError(f"this Projection already has a rank-{self.lora_rank} LoRA adapter")
        if rank <= 0 or alpha <= 0:
            raise ValueError(f"LoRA needs rank > 0 and alpha > 0, got rank={rank}, alpha={alpha}")
        dtype = self.weight[...].dtype
        n_out = len(self.out_shape)
        a_init = nnx.initializers.normal(1.0 / math.sqrt(math.prod(self.in_shape)))
        a = make_param(rngs, a_init, (rank,) + self.in_shape, (None,) + self.names[n_out:], dtype,
                       nnx.LoRAParam)
        b = make_param(rngs, zeros_init, self.out_shape + (rank,), self.names[:n_out] + (None,), dtype,
                       nnx.LoRAParam)
        sharding = getattr(self.weight[...], "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            # a model placed on a mesh outside any mesh context: lay the adapters out like it
            from jaxkd.sharding import logical_to_spec

            for var, names in ((a, (None,) + self.names[n_out:]), (b, self.names[:n_out] + (None,))):
                spec = logical_to_spec(names, var.shape, sharding.mesh)
                var[...] = jax.device_put(var[...], jax.sharding.NamedSharding(sharding.mesh, spec))
        self.lora_a, self.lora_b = a, b
        self.lora_scale = float(alpha) / rank
        self.lora_enabled = True

    def lora_delta(self) -> jax.Array:
        """``alpha / r * B A`` in the weight's ``out_shape + in_shape`` layout, float32."""
        if not self.lora_rank:
            raise ValueError("this Projection has no LoRA adapter")
        self._require_canonical("lora_delta")
        r = self.lora_rank
        a_ri = self.lora_a[...].astype(jnp.float32).reshape(r, -1)
        b_or = self.lora_b[...].astype(jnp.float32).reshape(-1, r)
        delta = jnp.matmul(b_or, a_ri, precision=jax.lax.Precision.HIGHEST) * self.lora_scale
        return delta.reshape(self.out_shape + self.in_shape)

    def merge_lora(self) -> None:
        """Fold the adapter into ``weight`` (``W + alpha/r B A``, summed in float32, stored in the
        weight's dtype) and drop it: the layer then computes what the adapted layer did (up to
        rounding) at the base layer's cost."""
        w = self.weight[...]
        self.weight[...] = (w.astype(jnp.float32) + self.lora_delta()).astype(w.dtype)
        del self.lora_a, self.lora_b, self.lora_scale, self.lora_enabled

    def flip_perm(self) -> tuple[int, ...]:
        """The axis permutation that takes the weight from the layout it is held in to the other."""
        first = len(self.out_shape) if self.layout == "oi" else len(self.in_shape)
        n = len(self.out_shape) + len(self.in_shape)
        return tuple(range(first, n)) + tuple(range(first))

    def _require_canonical(self, what: str) -> None:
        if self.layout != "oi":
            raise ValueError(f"Projection.{what} needs the weight in its stored [out, in] layout, not "
                             f"{self.layout!r}: call it on the model, not on a decode copy made by "
                             f"relayout_projections")

    # -- forward ---------------------------------------------------------------------------

    def __call__(self, x: jax.Array, spec: str) -> jax.Array:
        """``spec`` documents the contraction (e.g. ``"btnh,dnh->btd"``); it is computed as one
        2-D matmul ``[..., in] x [out, in]`` (``x [in, out]`` when ``layout`` is ``"io"``): the
        weight reshape is free (row-major), and only the small activation is ever relaid out,
        never the weight."""
        n_in = len(self.in_shape)
        lead = x.shape[: x.ndim - n_in]
        if tuple(x.shape[x.ndim - n_in:]) != self.in_shape or spec.count(",") != 1:
            raise ValueError(f"Projection {spec}: input {x.shape} does not end in {self.in_shape}")
        n_i = math.prod(self.in_shape)
        x_mi = x.astype(self.compute_dtype).reshape(*lead, n_i)
        # f32 accumulation: XLA:CPU sends bf16 x bf16 -> f32 dots to its fast (oneDNN / AMX) path,
        # while bf16 -> bf16 dots take a slow one (at M=2560 on a 2-core AMX Xeon: 1.1x slower than
        # f32 vs 3.0x faster with f32 out; evals/results/bf16_probe.md); f32 is unchanged
        if self.layout == "io":
            w_io = self.weight[...].astype(self.compute_dtype).reshape(n_i, -1)
            y_mo = jnp.einsum("...i,io->...o", x_mi, w_io, preferred_element_type=jnp.float32)
        else:
            w_oi = self.weight[...].astype(self.compute_dtype).reshape(-1, n_i)
            y_mo = jnp.einsum("...i,oi->...o", x_mi, w_oi, preferred_element_type=jnp.float32)
        y_mo = y_mo.astype(self.compute_dtype)
        if self.lora_rank and self.lora_enabled:
            r = self.lora_rank
            a_ri = self.lora_a[...].astype(self.compute_dtype).reshape(r, -1)
            b_or = self.lora_b[...].astype(self.compute_dtype).reshape(-1, r)
            h_mr = jnp.einsum("...i,ri->...r", x_mi, a_ri)
            y_mo = y_mo + jnp.einsum("...r,or->...o", h_mr, b_or) * jnp.asarray(self.lora_scale, y_mo.dtype)
        y = y_mo.reshape(*lead, *self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y

    def hf_weight_shape(self) -> tuple[int, int]:
        return (math.prod(self.out_shape), math.prod(self.in_shape))

    def from_hf(self, w_oi: np.ndarray) -> np.ndarray:
        """HF ``[out, in]`` matrix -> this layer's ``out_shape + in_shape`` layout (a reshape)."""
        self._require_canonical("from_hf")
        return np.asarray(w_oi).reshape(self.out_shape + self.in_shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        self._require_canonical("to_hf")
        return np.asarray(w).reshape(self.hf_weight_shape())


PROJECTION_LAYOUTS = ("oi", "io")


def relayout_projections(model: nnx.Module, layout: str, *, transpose: bool = True) -> int:
    """Hold every ``Projection`` weight of ``model`` in ``layout``: ``"oi"`` (``out_shape +
    in_shape``: HF's order, the one training, checkpoints, LoRA and export use) or ``"io"``
    (``in_shape + out_shape``). Which one XLA:CPU multiplies faster depends on the CPU and on the
    row count (``jaxkd.models.layout``), so a decode step may run on an ``"io"`` copy of the
    weights. ``transpose=False`` only sets the flags: for a model merged from weights that are
    already in ``layout``. Returns how many projections changed."""
    if layout not in PROJECTION_LAYOUTS:
        raise ValueError(f"unknown projection layout {layout!r}; expected one of {PROJECTION_LAYOUTS}")
    changed = 0
    for _, proj in nnx.iter_modules(model):
        if not isinstance(proj, Projection) or proj.layout == layout:
            continue
        if transpose:
            perm = proj.flip_perm()
            proj.weight.set_value(jnp.transpose(proj.weight[...], perm))
            names = proj.weight.get_metadata().get("out_sharding")
            if names is not None and len(names) == len(perm):
                proj.weight.set_metadata("out_sharding", tuple(names[i] for i in perm))
        proj.layout = layout
        changed += 1
    return changed


def write_cache(cache_bksh: jax.Array, new_btkh: jax.Array, index_b: jax.Array) -> jax.Array:
    """Write T new keys (or values) per row at that row's own slot ``index_b[b]`` (a scatter the
    compiled step does in place on the donated cache)."""
    new_bkth = jnp.swapaxes(new_btkh, 1, 2).astype(cache_bksh.dtype)
    return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (0, i, 0)))(
        cache_bksh, new_bkth, index_b)


def gqa_attention(q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array, mask_bts: jax.Array,
                  compute_dtype: Any) -> jax.Array:
    """Grouped-query attention over keys/values laid out ``[B, K, S, H]``; float32 softmax.

    The G = N / K query heads of a kv head and the T queries are merged into one axis, so both
    contractions are plain batched matmuls over (B, K) with the cache operand as stored."""
    b, t, n, h = q_btnh.shape
    k = k_bksh.shape[1]
    g = n // k
    q_bkqh = jnp.transpose(q_btnh.reshape(b, t, k, g, h), (0, 2, 3, 1, 4)).reshape(b, k, g * t, h)
    scores_bkqs = jnp.einsum("bkqh,bksh->bkqs", q_bkqh, k_bksh.astype(compute_dtype),
                             preferred_element_type=jnp.float32) * (h ** -0.5)
    mask_b1qs = jnp.broadcast_to(mask_bts[:, None, None], (b, 1, g, t, mask_bts.shape[-1])
                                 ).reshape(b, 1, g * t, -1)
    scores_bkqs = jnp.where(mask_b1qs, scores_bkqs, MASK_VALUE)
    probs_bkqs = jax.nn.softmax(scores_bkqs, axis=-1).astype(compute_dtype)
    out_bkqh = jnp.einsum("bkqs,bksh->bkqh", probs_bkqs, v_bksh.astype(compute_dtype),
                          preferred_element_type=jnp.float32).astype(compute_dtype)
    return jnp.transpose(out_bkqh.reshape(b, k, g, t, h), (0, 3, 1, 2, 4)).reshape(b, t, n, h)


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


def fused_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, mask_bts: jax.Array,
                    compute_dtype: Any, implementation: str) -> jax.Array:
    """``gqa_attention`` through ``jax.nn.dot_product_attention`` ("xla" or "cudnn": cuDNN's fused
    flash kernel on NVIDIA GPUs), for training forward passes (queries = keys, no cache).

    Padding queries (no key allowed) attend to themselves only: a fully masked row is left to the
    kernel's conventions otherwise, and a NaN there would reach the gradients through the zero
    cotangent of the padding positions. Real positions are unaffected."""
    t = q_btnh.shape[1]
    if k_btkh.shape[1] != t:
        raise ValueError(f"fused attention is for training passes (queries = keys); got {t} queries and "
                         f"{k_btkh.shape[1]} keys")
    mask_bts = mask_bts | (~jnp.any(mask_bts, axis=-1, keepdims=True) & jnp.eye(t, dtype=jnp.bool_)[None])
    out_btnh = jax.nn.dot_product_attention(
        q_btnh.astype(compute_dtype), k_btkh.astype(compute_dtype), v_btkh.astype(compute_dtype),
        mask=mask_bts[:, None], implementation=implementation)
    return out_btnh.astype(compute_dtype)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE; reads and writes a per-layer KV cache if given."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype: Any, compute_dtype: Any):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.compute_dtype = compute_dtype
        kw = dict(rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.q_proj = Projection((d,), (n, h), ("q_heads", "head_dim", "embed"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Projection((d,), (k, h), ("kv_heads", "head_dim", "embed"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Projection((d,), (k, h), ("kv_heads", "head_dim", "embed"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Projection((n, h), (d,), ("embed", "q_heads", "head_dim"), use_bias=False, **kw)
        self.implementation = "einsum"  # of training passes (no cache); Decoder.set_attention changes it

    def __call__(self, x_btd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array, mask_bts: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, write_index: jax.Array | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """``mask_bts`` is True where query t may attend key s. With ``kv`` (cache arrays
        ``[B, K, S, H]``) row b's new keys/values are written from slot ``write_index[b]`` on and
        attention runs over the cache's S slots; the updated arrays are returned."""
        q_btnh = self.q_proj(x_btd, "btd,nhd->btnh")
        k_btkh = self.k_proj(x_btd, "btd,khd->btkh")
        v_btkh = self.v_proj(x_btd, "btd,khd->btkh")
        q_btnh = constrain(apply_rope(q_btnh, cos_bth, sin_bth), ("batch", "length", "act_heads", None))
        k_btkh = constrain(apply_rope(k_btkh, cos_bth, sin_bth), ("batch", "length", "act_kv_heads", None))
        v_btkh = constrain(v_btkh, ("batch", "length", "act_kv_heads", None))

        new_kv = None
        if kv is not None:
            k_cache = write_cache(kv[0], k_btkh, write_index)
            v_cache = write_cache(kv[1], v_btkh, write_index)
            new_kv = (k_cache, v_cache)
            out_btnh = gqa_attention(q_btnh, k_cache, v_cache, mask_bts, self.compute_dtype)
        elif self.implementation == "einsum":
            out_btnh = gqa_attention(q_btnh, jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2), mask_bts,
                                     self.compute_dtype)
        else:  # jax.nn.dot_product_attention takes the keys in their projected [B, T, K, H] layout
            out_btnh = fused_attention(q_btnh, k_btkh, v_btkh, mask_bts, self.compute_dtype, self.implementation)
        out_btd = self.o_proj(out_btnh, "btnh,dnh->btd")
        return constrain(out_btd, ("batch", "length", "act_embed")), new_kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype: Any, compute_dtype: Any):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.gate_proj = Projection((d,), (f,), ("mlp", "embed"), **kw)
        self.up_proj = Projection((d,), (f,), ("mlp", "embed"), **kw)
        self.down_proj = Projection((f,), (d,), ("embed", "mlp"), **kw)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate_btf = self.gate_proj(x_btd, "btd,fd->btf")
        up_btf = self.up_proj(x_btd, "btd,fd->btf")
        h_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "act_mlp"))
        return constrain(self.down_proj(h_btf, "btf,df->btd"), ("batch", "length", "act_embed"))


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype: Any, compute_dtype: Any):
        kw = dict(rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs,
                                                param_dtype=param_dtype)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x_btd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array, mask_bts: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, write_index: jax.Array | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn_btd, new_kv = self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, mask_bts,
                                          kv, write_index)
        x_btd = x_btd + attn_btd
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        return x_btd, new_kv
