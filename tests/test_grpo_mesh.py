"""The GRPO update step on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices equals the
single-device step: loss, metrics and updated parameters after two consecutive updates (the
second runs on the moved policy), with the KL reference params passed in ``extra``."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd import sharding as shd
from jaxkd.config import GRPOConfig
from jaxkd.models import build_decoder
from jaxkd.rl import grpo as G
from jaxkd.rl import rollout as ro
from jaxkd.train import state as st
from test_train_fixtures import tiny_config

# dims that divide the mesh: vocab and heads over tensor=2, hidden over fsdp=2
MESH_MODEL = tiny_config(vocab_size=264, hidden_size=48, intermediate_size=64, num_heads=4, num_kv_heads=2,
                         head_dim=12)
ROWS, T, PROMPT = 8, 32, 10


def _batch(cfg: GRPOConfig) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 259, (ROWS, T)).astype(np.int32)
    mask = np.zeros((ROWS, T), np.float32)
    seg = np.zeros((ROWS, T), np.int32)
    for i, L in enumerate([20, 3, 12, 7, 21, 1, 9, 15]):
        mask[i, PROMPT - 1:PROMPT - 1 + L] = 1
        seg[i, :PROMPT + L] = 1
    return {"input_ids": ids, "positions": np.tile(np.arange(T, dtype=np.int32), (ROWS, 1)), "segment_ids": seg,
            "targets": np.roll(ids, -1, axis=1), "completion_mask": mask,
            "loss_weights": G.loss_weights(mask, cfg.aggregation, cfg.max_new_tokens),
            "advantages": rs.randn(ROWS).astype(np.float32)}


def _run(mesh, cfg: GRPOConfig, batch: dict, optimizer) -> tuple[list[dict], list[np.ndarray], bool]:
    model = build_decoder(MESH_MODEL, mesh, seed=4)
    graphdef, params, frozen = st.split_model(model, "no_embed")
    tx = optimizer()
    ctx = shd.mesh_context(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        lp, _ = jax.jit(G.policy_logprobs, static_argnums=(0, 4))(graphdef, params, frozen,
                                                                   ro.to_device(batch, mesh), cfg.temperature)
        # old log-probs a little off the current policy so some tokens are clipped from the start
        off = np.random.RandomState(1).uniform(-0.4, 0.4, lp.shape).astype(np.float32)
        b = {**batch, "old_logp": np.asarray(lp) + off}
        extra = {"frozen": frozen, "ref_params": jax.tree.map(jnp.copy, params)}
        before = [v.sharding for v in jax.tree.leaves(params)]
        state = st.init_state(params, tx, 0)
        step = jax.jit(G.make_grpo_step(graphdef, tx, cfg), donate_argnums=(0,))
        metrics = []
        for _ in range(2):
            state, m = step(state, ro.to_device(b, mesh), extra)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    after = jax.tree.leaves(state["params"])
    # every updated weight keeps the layout the logical rules gave it
    same_layout = all(a.sharding.is_equivalent_to(b, a.ndim) for a, b in zip(after, before))
    split = any(not b.is_fully_replicated for b in before)
    return metrics, [np.asarray(v) for v in after], same_layout and split


def test_sharded_grpo_step_equals_single_device():
    cfg = GRPOConfig(beta=0.05, temperature=0.8, aggregation="seq_mean_token_mean", max_new_tokens=24)
    # SGD after a global-norm clip: parameters compare tightly. (With AdamW the first update is
    # ~lr * sign(g), so 1e-7 gradient noise on near-zero-gradient entries shows up as ~3e-5 after
    # two steps at lr 1e-2: a property of Adam, not of the sharding.)
    optimizer = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))  # noqa: E731
    assert len(jax.devices()) == 8
    batch = _batch(cfg)
    ref_m, ref_p, _ = _run(None, cfg, batch, optimizer)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    out_m, out_p, same_layout = _run(mesh, cfg, batch, optimizer)
    assert 0 < ref_m[0]["clip_frac"] < 0.5 and ref_m[0]["grad_norm"] > 1e-2
    assert ref_m[1]["ratio_max"] != ref_m[0]["ratio_max"]  # the second step sees the moved policy
    for a, b in zip(out_m, ref_m):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    worst = max(float(np.abs(x - y).max()) for x, y in zip(out_p, ref_p))
    assert worst < 1e-6, worst
    assert same_layout  # weights really were split over the mesh, and stay laid out the same
