"""Distillation losses: pure, masked, float32, normalised by the mask sum.

Every loss takes logits shaped [B, T, V] already aligned to the positions they predict (callers
shift: logits[:, :-1] predict tokens[:, 1:]) and a mask [B, T] that is 1 on response tokens.
Each returns ``(loss, metrics)``; a padded position (mask 0) changes nothing, whatever its logits.

Divergences (p = teacher, q = student, both at temperature tau):
  forward_kl       KL(p || q)                                   (mode covering; classic Hinton KD)
  reverse_kl       KL(q || p)                                   (mode seeking; MiniLLM)
  jsd              beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD)
  skew_forward_kl  KL(p || beta p + (1 - beta) q)                  (DistiLLM skew KL)
  skew_reverse_kl  KL(q || beta q + (1 - beta) p)
Soft terms are multiplied by tau^2 so their gradient scale does not shrink as tau grows.

Teacher distributions come either as full logits [B, T, V] or as a top-k cache
(``TopK(ids [B,T,k], logprobs [B,T,k])``, log-probs at the cached temperature); with a cache the
comparison runs over k+1 bins: the k teacher tokens and one "tail" bin holding the remaining mass
of each distribution, so no probability is silently dropped.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# log(0) stand-in that keeps 0 * log(0) finite in float32.
_TINY = 1e-30


class Divergence(str, enum.Enum):
    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"
    SKEW_FORWARD_KL = "skew_forward_kl"
    SKEW_REVERSE_KL = "skew_reverse_kl"

    @classmethod
    def parse(cls, name: "str | Divergence") -> "Divergence":
        try:
            return cls(name)
        except ValueError:
            raise ValueError(
                f"unknown distillation loss {name!r}; allowed: {[d.value for d in cls]}") from None


class TopK(NamedTuple):
    """A cached teacher distribution: the k most likely token ids and their log-probabilities."""

    ids: Array       # [B, T, k] int32
    logprobs: Array  # [B, T, k] float, log-probs under the teacher at the cached temperature


def _masked_mean(values_bt: Array, mask_bt: Array) -> tuple[Array, Array]:
    mask = mask_bt.astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    # `where` rather than multiply: a NaN/inf in a padded position must not leak into the sum.
    return jnp.where(mask > 0, values_bt, 0.0).sum() / denom, denom


def _kl(logp: Array, logq: Array) -> Array:
    """KL(p || q) over the last axis from log-probabilities; 0 where p is 0."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def _log_mix(logp: Array, logq: Array, beta: float) -> Array:
    """log(beta * p + (1 - beta) * q), computed stably."""
    beta = jnp.clip(jnp.float32(beta), _TINY, 1.0 - 1e-7)
    return jnp.logaddexp(jnp.log(beta) + logp, jnp.log1p(-beta) + logq)


def divergence(logp_teacher: Array, logq_student: Array, kind: Divergence, beta: float) -> Array:
    """Per-position divergence [B, T] between two log-distributions over the same bins."""
    if kind == Divergence.FORWARD_KL:
        return _kl(logp_teacher, logq_student)
    if kind == Divergence.REVERSE_KL:
        return _kl(logq_student, logp_teacher)
    if kind == Divergence.JSD:
        logm = _log_mix(logp_teacher, logq_student, beta)
        return beta * _kl(logp_teacher, logm) + (1.0 - beta) * _kl(logq_student, logm)
    if kind == Divergence.SKEW_FORWARD_KL:
        return _kl(logp_teacher, _log_mix(logp_teacher, logq_student, beta))
    if kind == Divergence.SKEW_REVERSE_KL:
        return _kl(logq_student, _log_mix(logq_student, logp_teacher, beta))
    raise ValueError(f"unknown divergence {kind!r}")


def cross_entropy(logits_btv: Array, targets_bt: Array, mask_bt: Array) -> tuple[Array, dict]:
    """Masked token cross-entropy (the response-KD / SFT loss)."""
    logits = logits_btv.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll_bt = logz - target_logit
    loss, ntok = _masked_mean(nll_bt, mask_bt)
    correct = (jnp.argmax(logits, axis=-1) == targets_bt).astype(jnp.float32)
    acc, _ = _masked_mean(correct, mask_bt)
    return loss, {"ce": loss, "token_accuracy": acc, "tokens": ntok}


def soft_kd(student_logits_btv: Array, teacher_logits_btv: Array, mask_bt: Array, *,
            kind: Divergence | str = Divergence.FORWARD_KL, temperature: float = 1.0,
            beta: float = 0.5) -> tuple[Array, dict]:
    """Soft-logit KD against full teacher logits, scaled by temperature^2."""
    kind = Divergence.parse(kind)
    if student_logits_btv.shape[-1] != teacher_logits_btv.shape[-1]:
        raise ValueError(
            f"student vocab {student_logits_btv.shape[-1]} != teacher vocab "
            f"{teacher_logits_btv.shape[-1]}; slice both with align_vocab() first")
    logq = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32) / temperature, axis=-1)
    logp = jax.nn.log_softmax(teacher_logits_btv.astype(jnp.float32) / temperature, axis=-1)
    div_bt = divergence(logp, logq, kind, beta)
    raw, ntok = _masked_mean(div_bt, mask_bt)
    loss = raw * temperature**2
    return loss, {f"kd_{kind.value}": raw, "kd": loss, "tokens": ntok}


def topk_from_logits(teacher_logits_btv: Array, k: int, temperature: float = 1.0) -> TopK:
    """The cache format: top-k ids and log-probs of the tempered teacher distribution."""
    logp = jax.nn.log_softmax(teacher_logits_btv.astype(jnp.float32) / temperature, axis=-1)
    values, ids = jax.lax.top_k(logp, k)
    return TopK(ids=ids.astype(jnp.int32), logprobs=values)


def _with_tail(logp_k: Array) -> Array:
    """Append the log of the remaining mass 1 - sum(exp(logp_k)) as bin k+1."""
    head = jnp.exp(jax.nn.logsumexp(logp_k, axis=-1, keepdims=True))
    tail = jnp.log(jnp.clip(1.0 - head, _TINY, 1.0))
    return jnp.concatenate([logp_k, tail], axis=-1)


def soft_kd_topk(student_logits_btv: Array, teacher: TopK, mask_bt: Array, *,
                 kind: Divergence | str = Divergence.FORWARD_KL, temperature: float = 1.0,
                 beta: float = 0.5) -> tuple[Array, dict]:
    """Soft-logit KD against a top-k teacher cache, over k+1 bins (k tokens + tail mass).

    ``teacher.logprobs`` must have been computed at the same ``temperature``.
    """
    kind = Divergence.parse(kind)
    logq_full = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32) / temperature, axis=-1)
    logq_k = jnp.take_along_axis(logq_full, teacher.ids.astype(jnp.int32), axis=-1)
    logq = _with_tail(logq_k)
    logp = _with_tail(teacher.logprobs.astype(jnp.float32))
    div_bt = divergence(logp, logq, kind, beta)
    raw, ntok = _masked_mean(div_bt, mask_bt)
    head_mass, _ = _masked_mean(jnp.exp(jax.nn.logsumexp(teacher.logprobs, axis=-1)), mask_bt)
    loss = raw * temperature**2
    return loss, {f"kd_{kind.value}": raw, "kd": loss, "teacher_topk_mass": head_mass,
                  "tokens": ntok}


def align_vocab(logits_btv: Array, vocab_size: int) -> Array:
    """Keep the first ``vocab_size`` logits: the tokenizer's real vocabulary.

    Checkpoints pad their embedding tables to different multiples (Qwen2.5-7B: 152064 rows,
    1.5B: 151936) while sharing one tokenizer of 151665 tokens; rows past the tokenizer are never
    produced by it, so both distributions are compared over the shared real vocabulary.
    """
    if logits_btv.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits_btv.shape[-1]} entries, fewer than the tokenizer's "
                         f"vocabulary of {vocab_size}")
    return logits_btv[..., :vocab_size]


def kd_objective(student_logits_btv: Array, targets_bt: Array, mask_bt: Array, *,
                 teacher_logits_btv: Array | None = None, teacher_topk: TopK | None = None,
                 alpha: float = 0.5, kind: Divergence | str = Divergence.FORWARD_KL,
                 temperature: float = 1.0, beta: float = 0.5) -> tuple[Array, dict]:
    """alpha * CE(targets) + (1 - alpha) * tau^2 * D(teacher || student).

    alpha = 1 is pure response KD (SFT on the teacher's answers); with neither teacher logits nor a
    top-k cache the objective must be pure CE.
    """
    ce, metrics = cross_entropy(student_logits_btv, targets_bt, mask_bt)
    if teacher_logits_btv is None and teacher_topk is None:
        if alpha != 1.0:
            raise ValueError("alpha < 1 needs teacher logits or a top-k teacher cache")
        return ce, {**metrics, "loss": ce}
    if teacher_logits_btv is not None and teacher_topk is not None:
        raise ValueError("pass teacher_logits_btv or teacher_topk, not both")
    if teacher_logits_btv is not None:
        kd, kd_metrics = soft_kd(student_logits_btv, teacher_logits_btv, mask_bt, kind=kind,
                                 temperature=temperature, beta=beta)
    else:
        kd, kd_metrics = soft_kd_topk(student_logits_btv, teacher_topk, mask_bt, kind=kind,
                                      temperature=temperature, beta=beta)
    loss = alpha * ce + (1.0 - alpha) * kd
    return loss, {**metrics, **kd_metrics, "loss": loss}
