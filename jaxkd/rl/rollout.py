"""Rollouts: K sampled completions per prompt, packed into a GRPO training batch.

All G x K rows are generated in ONE batch by ``Generator.generate`` (each prompt repeated K
times; a shared system prompt is prefilled once). Every row samples with its own key
(``row_keys(seed, row)``), so rows of one prompt differ and a seed reproduces the batch;
``identical_group_frac`` measures the former.

Log-probs: the Generator captures, per sampled token, its log-prob under the policy that drew it
(temperature, top-k / top-p and the tokenizer's real vocabulary applied: ``jaxkd.models.sampling``),
which is ``log pi_old`` as it is. The trainer computes its log-probs with the same function, so the
two agree up to float error. They are recomputed teacher-forced anyway when ``mu > 1`` (the first
update's ratio must be exactly 1), with top-k / top-p (the kept set is a threshold that float
error may move), or with ``recompute_logprobs: always``; the sampler/trainer gap is then logged
(``logprob_gap``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.config import GRPOConfig, SamplingConfig
from jaxkd.models.generate import Generator, chat_ids
from jaxkd.rl.grpo import token_logprobs


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt's token ids and its metadata (``question``, optional ``reference``, ``id``...)."""

    ids: tuple[int, ...]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], meta: Mapping[str, Any]) -> Prompt:
    """A ``Prompt`` from chat messages (assistant turn opened)."""
    return Prompt(ids=tuple(chat_ids(tokenizer, messages)), meta=dict(meta))


@dataclasses.dataclass
class Rollout:
    """N = G x K sampled rows; row i answers ``prompts[group[i]]``.

    ``completion_ids[i]`` ends with the EOS token the sampler drew when the row finished (the stop
    decision is trained too); ``truncated[i]`` marks rows that hit ``max_new_tokens`` instead.
    ``sampler_logprobs[i]`` aligns with ``completion_ids[i]``.
    """

    prompts: list[Prompt]
    group: np.ndarray                 # [N] int
    completion_ids: list[list[int]]
    completion_text: list[str]
    truncated: np.ndarray             # [N] bool
    sampler_logprobs: list[np.ndarray]
    sampler_logprob_kind: Literal["policy", "base"]
    rewards: dict[str, np.ndarray] | None = None  # components per row, once scored

    @property
    def rows(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(c) for c in self.completion_ids], np.int32)

    @property
    def meta(self) -> list[Mapping[str, Any]]:
        return [self.prompts[g].meta for g in self.group]

    def select_groups(self, groups: Sequence[int]) -> "Rollout":
        """The rows of ``groups`` (in that order), renumbered 0..len(groups)-1."""
        rows = [i for g in groups for i in np.flatnonzero(self.group == g)]
        new_group = np.concatenate([np.full(int((self.group == g).sum()), j) for j, g in enumerate(groups)]
                                   ) if groups else np.zeros(0, np.int64)
        return Rollout(
            prompts=[self.prompts[g] for g in groups], group=new_group.astype(np.int64),
            completion_ids=[self.completion_ids[i] for i in rows],
            completion_text=[self.completion_text[i] for i in rows], truncated=self.truncated[rows],
            sampler_logprobs=[self.sampler_logprobs[i] for i in rows],
            sampler_logprob_kind=self.sampler_logprob_kind,
            rewards=None if self.rewards is None else {k: np.asarray(v)[rows] for k, v in self.rewards.items()})


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Rows of ``parts`` one after another, group ids offset so they stay distinct."""
    if not parts:
        raise ValueError("concat_rollouts needs at least one rollout")
    kinds = {p.sampler_logprob_kind for p in parts}
    if len(kinds) > 1:
        raise ValueError(f"cannot mix sampler log-prob kinds {sorted(kinds)}")
    offset, groups = 0, []
    for p in parts:
        groups.append(p.group + offset)
        offset += len(p.prompts)
    has_rewards = all(p.rewards is not None for p in parts)
    return Rollout(
        prompts=[q for p in parts for q in p.prompts], group=np.concatenate(groups),
        completion_ids=[c for p in parts for c in p.completion_ids],
        completion_text=[t for p in parts for t in p.completion_text],
        truncated=np.concatenate([p.truncated for p in parts]),
        sampler_logprobs=[lp for p in parts for lp in p.sampler_logprobs],
        sampler_logprob_kind=parts[0].sampler_logprob_kind,
        rewards={k: np.concatenate([np.asarray(p.rewards[k]) for p in parts]) for k in parts[0].rewards}
        if has_rewards else None)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def rollout_sampling(cfg: GRPOConfig, seed: int) -> SamplingConfig:
    """The sampler settings of a rollout batch; ``seed`` must differ between batches."""
    return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, seed=seed)


def needs_recompute(cfg: GRPOConfig, kind: Literal["policy", "base"]) -> bool:
    """Whether ``log pi_old`` must come from a teacher-forced pass instead of the sampler."""
    return (cfg.recompute_logprobs == "always" or kind != "policy" or cfg.mu > 1
            or cfg.top_k > 0 or cfg.top_p < 1.0)


def generate_rollouts(generator: Generator, prompts: Sequence[Prompt], cfg: GRPOConfig, *,
                      seed: int) -> Rollout:
    """K = ``cfg.num_generations`` completions for each prompt, all in one generation batch.

    Row i (prompt ``i // K``) samples with key ``fold_in(key(seed), i)``: the same ``seed`` gives
    the same rollout, and no two rows share a random stream. A row that finished keeps the EOS
    token its policy drew (the tokenizer may have several), so the stop decision is trained too.
    """
    if not prompts:
        raise ValueError("generate_rollouts needs at least one prompt")
    k = cfg.num_generations
    rows = [list(p.ids) for p in prompts for _ in range(k)]
    out = generator.generate(rows, rollout_sampling(cfg, seed), return_policy_logprobs=True,
                             row_ids=range(len(rows)))
    toks = [list(t) + ([e] if e is not None else []) for t, e in zip(out.tokens, out.eos_tokens)]
    logps = [np.asarray(lp, np.float32) for lp in out.policy_logprobs]
    for i, (t, lp) in enumerate(zip(toks, logps)):
        if len(t) != len(lp):  # the Generator's documented layout; a mismatch would misalign pi_old
            raise RuntimeError(f"rollout row {i}: {len(t)} tokens but {len(lp)} policy log-probs")
    texts = [generator.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    return Rollout(prompts=list(prompts), group=np.repeat(np.arange(len(prompts)), k),
                   completion_ids=toks, completion_text=texts,
                   truncated=np.asarray([r != "eos" for r in out.finish_reasons], bool),
                   sampler_logprobs=logps, sampler_logprob_kind="policy")


def identical_group_frac(rollout: Rollout) -> float:
    """Share of groups whose K completions are all the same token sequence (with temperature > 0
    and distinct per-row noise this should be ~0 unless the policy has collapsed)."""
    same = []
    for g in range(len(rollout.prompts)):
        rows = [tuple(rollout.completion_ids[i]) for i in np.flatnonzero(rollout.group == g)]
        same.append(len(set(rows)) == 1)
    return float(np.mean(same)) if same else 0.0


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pack_batch(rollout: Rollout, *, pad_id: int, seq_len: int | None = None, bucket: int = 64
               ) -> dict[str, np.ndarray]:
    """Rows ``prompt + completion`` right-padded to ``seq_len`` (default: the longest row rounded up
    to ``bucket``, so few shapes compile). Position t's logits predict token t+1:

    input_ids / positions / segment_ids [N, T]   (segment 0 = padding)
    targets [N, T]                 input_ids shifted left by one
    completion_mask [N, T] f32     1 where the target is a completion token
    sampler_logp [N, T] f32        the sampler's log-prob of that target (0 elsewhere)
    truncated [N] bool, group [N] int32, lengths [N] int32 (completion tokens)
    """
    n = rollout.rows
    full = [list(rollout.prompts[g].ids) + list(c) for g, c in zip(rollout.group, rollout.completion_ids)]
    longest = max(len(r) for r in full)
    t = seq_len if seq_len is not None else _round_up(longest, bucket)
    if longest > t:
        raise ValueError(f"a rollout row has {longest} tokens but seq_len is {t}")
    ids = np.full((n, t), pad_id, np.int32)
    seg = np.zeros((n, t), np.int32)
    pos = np.zeros((n, t), np.int32)
    targets = np.full((n, t), pad_id, np.int32)
    cmask = np.zeros((n, t), np.float32)
    slogp = np.zeros((n, t), np.float32)
    for i, row in enumerate(full):
        p = len(rollout.prompts[rollout.group[i]].ids)
        c = len(rollout.completion_ids[i])
        ids[i, :len(row)] = row
        seg[i, :len(row)] = 1
        pos[i, :len(row)] = np.arange(len(row))
        targets[i, :len(row) - 1] = row[1:]
        cmask[i, p - 1:p - 1 + c] = 1.0
        slogp[i, p - 1:p - 1 + c] = rollout.sampler_logprobs[i]
    return {"input_ids": ids, "positions": pos, "segment_ids": seg, "targets": targets,
            "completion_mask": cmask, "sampler_logp": slogp, "truncated": rollout.truncated.copy(),
            "group": np.asarray(rollout.group, np.int32), "lengths": rollout.lengths}


# --------------------------------------------------------------------------------------------
# Teacher-forced recomputation and the sampler/trainer gap
# --------------------------------------------------------------------------------------------


def make_logprob_fn(graphdef: Any, temperature: float, *, vocab: int = 0, top_k: int = 0,
                    top_p: float = 1.0) -> Callable:
    """Jitted ``(params, frozen, batch) -> (policy logp, base logp)``, both ``[B, T]``, from one
    forward pass: under the sampling policy (``grpo.token_logprobs`` with these settings; ``vocab``
    the tokenizer's real vocabulary, as the Generator's) and under the untempered model."""
    def fn(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        logits_btv, _ = model(batch["input_ids"], batch["positions"], segment_ids_bt=batch["segment_ids"])
        logp_t, _ = token_logprobs(logits_btv, batch["targets"], temperature, vocab=vocab, top_k=top_k,
                                   top_p=top_p)
        logp_1 = jnp.take_along_axis(jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1),
                                     batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
        return logp_t, logp_1

    return jax.jit(fn)


def recompute_logprobs(logprob_fn: Callable, params: Any, frozen: Any, batch: Mapping[str, np.ndarray],
                       micro_batch: int, put: Callable[[dict], dict] = lambda b: b
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced (policy, untempered) log-probs ``[N, T]`` in chunks of ``micro_batch`` rows."""
    keys = ("input_ids", "positions", "segment_ids", "targets")
    n = batch["input_ids"].shape[0]
    pol, base = [], []
    for s in range(0, n, micro_batch):
        chunk = put({k: batch[k][s:s + micro_batch] for k in keys})
        a, b = logprob_fn(params, frozen, chunk)
        pol.append(np.asarray(jax.device_get(a)))
        base.append(np.asarray(jax.device_get(b)))
    return np.concatenate(pol), np.concatenate(base)


def logprob_gap(sampler_bt: np.ndarray, trainer_bt: np.ndarray, mask_bt: np.ndarray) -> dict[str, float]:
    """max and mean |sampler - trainer| log-prob over completion tokens."""
    m = np.asarray(mask_bt) > 0
    if not m.any():
        return {"logprob_gap_max": 0.0, "logprob_gap_mean": 0.0}
    d = np.abs(np.asarray(sampler_bt, np.float64) - np.asarray(trainer_bt, np.float64))[m]
    return {"logprob_gap_max": float(d.max()), "logprob_gap_mean": float(d.mean())}


def to_device(batch: Mapping[str, np.ndarray], mesh: Any = None) -> dict[str, Any]:
    """Batch arrays on device, split over the (data, fsdp) mesh axes along the batch axis."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    from jax.sharding import NamedSharding, PartitionSpec

    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return {k: jax.device_put(np.asarray(v), spec) for k, v in batch.items()}
