"""The generic trainer on a toy regression: one clipped update equals optax's own clipping chain,
gradient accumulation equals the big batch, donation, hook schedules, batch sources, and the grain
KD pipeline's exact resume across a domain re-weighting."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.data.loader import kd_batch, kd_dataset
from jaxkd.distill.sampling import DomainSampler
from jaxkd.train import hooks as H
from jaxkd.train import state as ST
from jaxkd.train import trainer as TR
from jaxkd.train.metrics import MetricsLogger

RNG = np.random.default_rng(0)
X = RNG.normal(size=(8, 5)).astype(np.float32)
Y = (X @ RNG.normal(size=(5, 3)) * 40).astype(np.float32)  # large targets: gradients get clipped


def loss_fn(params, batch, extra, rng):
    del rng
    pred = batch["x"] @ params["w"] + extra["bias"]
    per_row = jnp.mean((pred - batch["y"]) ** 2, axis=-1)
    loss = jnp.mean(per_row)
    return loss, {"mse": loss}


def _params():
    return {"w": jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)}


def test_one_gradient_norm_clips_exactly_like_optax():
    tx = optax.adamw(1e-2)
    params = _params()
    extra = {"bias": jnp.ones(3)}
    step = TR.make_train_step(loss_fn, tx, clip_norm=1.0)
    state = ST.init_state(jax.tree.map(jnp.array, params), tx, seed=0)  # a copy: the step donates it
    ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    ref_p, ref_opt = params, ref_tx.init(params)
    batch = {"x": X, "y": Y}
    for _ in range(3):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(ref_p, batch, extra, None)
        upd, ref_opt = ref_tx.update(g, ref_opt, ref_p)
        ref_p = optax.apply_updates(ref_p, upd)
        state, m = step(state, batch, extra)
        assert float(m["grad_norm"]) == pytest.approx(float(optax.tree.norm(g)), rel=1e-6)
        assert float(m["grad_norm"]) > 1.0  # the clip really acted
        assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-6) and "mse" in m
    np.testing.assert_allclose(np.asarray(state["params"]["w"]), np.asarray(ref_p["w"]), rtol=1e-6, atol=1e-7)
    assert int(state["step"]) == 3
    assert np.asarray(extra["bias"]).sum() == 3  # extra is not donated: still readable


def test_gradient_accumulation_equals_the_whole_batch():
    tx = optax.sgd(1e-3)
    whole = TR.make_train_step(loss_fn, tx, clip_norm=0.0)
    accum = TR.make_train_step(loss_fn, tx, clip_norm=0.0, grad_accum=2)
    extra = {"bias": jnp.zeros(3)}
    s1 = ST.init_state(_params(), tx, 0)
    s2 = jax.tree.map(jnp.array, s1)
    s1, m1 = whole(s1, {"x": X, "y": Y}, extra)
    s2, m2 = accum(s2, {"x": X.reshape(2, 4, 5), "y": Y.reshape(2, 4, 3)}, extra)  # equal rows per micro-batch
    np.testing.assert_allclose(np.asarray(s2["params"]["w"]), np.asarray(s1["params"]["w"]), rtol=1e-5)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)


def test_loop_runs_hooks_on_schedule_and_calls_param_norm_only_when_logging(tmp_path):
    tx = optax.sgd(1e-4)
    step = TR.make_train_step(loss_fn, tx)
    seen: dict[str, list] = {"before": [], "after": [], "end": [], "source": []}
    norms: list[int] = []
    pn = TR.make_param_norm()

    def param_norm(p):
        norms.append(1)
        return pn(p)

    def source(i, state):  # a callable source sees the state the step will update (e.g. rollouts)
        seen["source"].append((i, int(state["step"])))
        return {"x": X, "y": Y}

    logger = MetricsLogger(tmp_path, tensorboard=False)
    rows: list[dict] = []
    hooks = [TR.Hook(lambda info: seen["before"].append(info.step), every=3, before=True),
             TR.Hook(lambda info: seen["after"].append(info.step), every=2),
             TR.Hook(lambda info: seen["end"].append(info.step), every=0, at_end=True),
             H.log_metrics(logger, every=3, lr=lambda s: 1e-4, param_norm=param_norm, history=rows)]
    state = TR.run_loop(step, ST.init_state(_params(), tx, 0), source=source, extra={"bias": jnp.zeros(3)},
                        start=1, steps=8, hooks=hooks)
    logger.close()
    assert int(state["step"]) == 7
    assert seen["source"] == [(i, i - 1) for i in range(1, 8)]
    assert seen["before"] == [3, 6] and seen["after"] == [2, 4, 6, 8] and seen["end"] == [8]
    assert [r["step"] for r in rows] == [3, 6, 8] and len(norms) == 3  # logging steps + the last only
    logged = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [3, 6, 8] and all(r["train/param_norm"] > 0 for r in logged)
    assert all(r["train/lr"] == 1e-4 and r["train/step_s"] >= 0 for r in logged)


def test_iterator_source_and_non_finite_stop(tmp_path):
    tx = optax.sgd(1e-3)
    step = TR.make_train_step(loss_fn, tx)
    batches = iter([{"x": X, "y": Y}, {"x": X, "y": Y * np.nan}, {"x": X, "y": Y}])
    with pytest.raises(TR.NonFiniteLoss, match=r"loss, grad_norm became nan at step 1 .*none saved yet"):
        TR.run_loop(step, ST.init_state(_params(), tx, 0), source=batches, extra={"bias": jnp.zeros(3)},
                    start=0, steps=3, hooks=[H.stop_on_non_finite(None)])
    with pytest.raises(TypeError, match="iterator or a callable"):
        TR.run_loop(step, ST.init_state(_params(), tx, 0), source=[{"x": X}], extra={}, start=0, steps=1)


def test_a_stop_request_ends_the_loop_after_the_step_and_runs_the_end_hooks_once():
    tx = optax.sgd(1e-4)
    step = TR.make_train_step(loss_fn, tx)
    seen: dict[str, list] = {"after": [], "end": [], "later": []}

    def stop_at_4(info):
        seen["after"].append(info.step)
        if info.step == 4:
            info.request_stop("val stopped improving")

    hooks = [TR.Hook(stop_at_4, every=1),
             TR.Hook(lambda info: seen["later"].append(info.step), every=1),   # the step's other hooks still run
             TR.Hook(lambda info: seen["end"].append((info.step, info.last)), every=0, at_end=True)]
    state = TR.run_loop(step, ST.init_state(_params(), tx, 0), source=lambda i, s: {"x": X, "y": Y},
                        extra={"bias": jnp.zeros(3)}, start=0, steps=10, hooks=hooks)
    assert int(state["step"]) == 4
    assert seen["after"] == seen["later"] == [1, 2, 3, 4]
    assert seen["end"] == [(4, 4)]   # the end hooks see the stop step as the last


def test_best_tracker_counts_evaluations_without_a_new_low_and_resumes_from_its_state():
    t = H.BestTracker("kl", patience=2)
    assert [t.update(s, v) for s, v in [(10, 3.0), (20, 2.5), (30, 2.5), (40, float("nan"))]] == \
        [True, True, False, False]   # equal is not better, NaN never is
    assert (t.step, t.value, t.since, t.exhausted) == (20, 2.5, 2, True)
    again = H.BestTracker("kl", patience=2)
    again.load_state(json.loads(json.dumps(t.state())))   # through a checkpoint's JSON meta
    assert (again.step, again.value, again.since) == (20, 2.5, 2)
    assert again.update(50, 2.4) and not again.exhausted
    fresh = H.BestTracker("kl")
    fresh.load_state(H.BestTracker("kl").state())   # nothing evaluated yet: +inf, so any value is a best
    assert fresh.update(5, 1e9) and not fresh.exhausted   # patience 0: never exhausted
    with pytest.raises(ValueError, match="train.keep_best='ce'"):
        H.BestTracker("ce").load_state(t.state())


@dataclasses.dataclass
class Ex:
    example_id: str
    ids: np.ndarray
    prompt_len: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


def _examples(n=12):
    out = []
    for i in range(n):
        p, a = 3 + i % 4, 2 + i % 3
        out.append(Ex(f"e{i}", np.arange(100 + i, 100 + i + p + a, dtype=np.int32) % 250, p,
                      np.full((a, 2), i, np.int32), np.full((a, 2), -1.0 - i, np.float32)))
    return out


def test_grain_kd_pipeline_resumes_exactly_across_a_reweighting():
    exs = _examples()
    domains = ["a"] * 4 + ["b"] * 4 + ["c"] * 4

    def pipeline():
        sampler = DomainSampler(domains, seed=3)
        return sampler, iter(kd_dataset(exs, sampler, batch_size=2, max_len=16, top_k=2, grad_accum=2))

    sampler, it = pipeline()
    first = [next(it) for _ in range(2)]
    assert first[0]["input_ids"].shape == (2, 2, 16) and first[0]["topk_ids"].shape == (2, 2, 16, 2)
    sampler.set_weights({"a": 0.98, "b": 0.01, "c": 0.01})  # a trainer hook re-weights mid-run
    state = json.loads(json.dumps(it.get_state()))           # JSON-able: it goes into the checkpoint
    after = [next(it) for _ in range(3)]
    # the re-weighting took effect on the very next batch (nothing was read ahead)
    drawn = np.concatenate([b["input_ids"][:, :, 0].ravel() - 100 for b in after])  # example of each row
    assert (drawn < 4).mean() > 0.8
    sampler2, it2 = pipeline()
    it2.set_state(state)
    assert sampler2.weights == pytest.approx(sampler.weights, rel=1e-12)
    for want in after:
        got = next(it2)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # rows are kd_row's: the same arrays as collating the drawn examples directly
    idx = [int(i) - 100 for i in after[0]["input_ids"][0, :, 0]]
    ref = kd_batch([exs[i] for i in idx], 16, 2)
    for k in ref:
        np.testing.assert_array_equal(after[0][k][0], ref[k])


def test_val_curve_merges_sampler_passes_names_the_best_step_and_is_plotted(tmp_path):
    from jaxkd.train.metrics import plot_training, read_metrics, val_curve, val_curve_markdown

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(0, {"reweight/val_kl": 2.3, "reweight/weights": {"a": 0.5, "b": 0.5}})
    for step in range(1, 41):
        logger.log(step, {"train/loss": 3.0 - step / 40, "train/kd": 2.0, "train/ce": 1.0})
    logger.log(15, {"reweight/val_kl": 2.2, "reweight/weights": {"a": 0.6, "b": 0.4}})
    logger.log(20, {"val/kl": 2.0, "val/ce": 2.5, "val/token_accuracy": 0.5})
    logger.log(40, {"val/kl": 2.1, "val/ce": 2.6, "val/token_accuracy": 0.52})
    logger.close()
    curve = val_curve(read_metrics(tmp_path / "metrics.jsonl"))
    assert [p["step"] for p in curve] == [0, 15, 20, 40]
    assert curve[0] == {"step": 0, "kl": 2.3} and curve[2]["ce"] == 2.5
    md = val_curve_markdown(curve)
    assert "Lowest val KL 2.000 at step 20" in md and "| 0 | 2.300 |  |  |" in md
    plot_training(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert val_curve_markdown([]) == ""


def test_packed_kd_pipeline_trains_every_draw_once_and_resumes_exactly():
    """``kd_dataset(pack=True)``: rows of max_len hold several examples each; every example the
    sampler draws lands in exactly one row (in this batch or, if it did not fit, the next one),
    each segment is the example's kd_row, and the state (sampler + waiting examples) resumes the
    exact next batch."""
    from jaxkd.data.loader import kd_row

    exs = _examples(12)                     # 5 to 10 tokens each
    domains = ["a"] * 4 + ["b"] * 4 + ["c"] * 4

    def pipeline():
        sampler = DomainSampler(domains, seed=5)
        return sampler, iter(kd_dataset(exs, sampler, batch_size=2, max_len=16, top_k=2, pack=True))

    sampler, it = pipeline()
    batches = [next(it) for _ in range(6)]
    state = json.loads(json.dumps(it.get_state()))
    after = [next(it) for _ in range(4)]
    placed = []
    for b in batches:
        assert b["input_ids"].shape == (2, 16) and b["topk_ids"].shape == (2, 16, 2)
        for r in range(2):
            seg = b["segment_ids"][r]
            assert seg.max() >= 1
            for s in range(1, seg.max() + 1):
                cols = np.flatnonzero(seg == s)
                i = int(b["input_ids"][r, cols[0]]) - 100   # _examples: ids start at 100 + i
                ref = kd_row(exs[i], max_len=len(exs[i].ids), top_k=2)
                for k in ref:
                    want = ref[k] * s if k == "segment_ids" else ref[k]
                    np.testing.assert_array_equal(b[k][r, cols], want, err_msg=k)
                placed.append(i)
    # rows are well filled: more than one example per row on average
    assert len(placed) > 2 * len(batches)
    # every draw placed once, none twice: the ones not placed yet wait in the state
    assert state["sampler"]["draws"] == len(placed) + len(state["carry"])
    sampler2, it2 = pipeline()
    it2.set_state(state)
    for want in after:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
