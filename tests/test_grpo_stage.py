"""`python -m jaxkd.train ... stage=grpo` end to end on a tiny HF-directory preset: 2 steps into a
standard run directory, exact resume, the served run, the published PNG / JSON / MD; and the reward
ablation switches (grpo.w_lang=0, grpo.w_tech=0, grpo.num_generations)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxkd.config import CONFIG_DIR, RunConfig, load
from jaxkd.models.params import write_hf_dir
from jaxkd.rl import recipe
from jaxkd.rl.grpo import combine_rewards
from jaxkd.train.__main__ import main
from test_train_fixtures import byte_tokenizer, tiny_config, tiny_decoder


class FakeJudge:
    """Deterministic stand-in for the LLM judge: technical / completeness = share of lower-case
    letters, language = share of spaces (so rewards differ between random completions)."""

    calls = 0

    def score(self, items, answers, criteria, *, questions=None):
        FakeJudge.calls += 1

        class V:
            def __init__(self, x):
                self.normalised, self.mass = np.asarray(x, float), np.ones(len(x))

        low = [sum(c.islower() for c in a) / max(len(a), 1) for a in answers]
        space = [a.count(" ") / max(len(a), 1) for a in answers]
        return {c: V(space if c == "language" else low) for c in criteria}


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    d = write_hf_dir(tiny_config(), tiny_decoder(seed=5).hf_tensors(), root / "student", tokenizer=byte_tokenizer())
    (root / "student.yaml").write_text(f"name: tiny-student\nsource: hf\nlocation: {d}\n")
    return root


def _args(root, name, *extra):
    return ["--config", str(CONFIG_DIR / "cpu_default.yaml"), "stage=grpo", f"student={root / 'student.yaml'}",
            f"runs_dir={root / 'runs'}", f"name={name}", f"grpo.init={root / 'runs' / 'no-kd-run'}",
            "grpo.num_generations=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=8", "grpo.train.lr=0.01",
            "grpo.train.ckpt_every=1", "grpo.train.keep=3", "grpo.train.trainable=all", *extra]


def test_grpo_stage_runs_resumes_exactly_serves_and_reports(preset, monkeypatch, capsys):
    root = preset
    monkeypatch.setenv("JAXKD_RESULTS_DIR", str(root / "results"))
    monkeypatch.setattr(recipe, "load_reward_judge", lambda cfg, policy, log: FakeJudge())
    assert main(_args(root, "full", "grpo.train.steps=2")) == 0
    out = capsys.readouterr().out
    assert "is not a trained run" in out and "starts from the base student preset" in out
    assert "reference model: none (beta=0)" in out
    run = root / "runs" / "full"
    meta = json.loads((run / "run.json").read_text())
    assert meta["recipe"] == "grpo" and meta["trainable"] == "all" and "spec" in meta["base_model"]
    rows = recipe.read_grpo_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward_mean", "reward_std", "reward/r_tech_mean", "reward/r_tech_std", "reward/r_lang_mean",
                    "reward/r_lang_std", "reward/judge_technical_mean", "reward/steps_mean", "mean_length",
                    "entropy", "clip_frac", "distinct_2", "truncation_rate", "approx_kl_old"):
            assert key in r, key
        assert r["reward_std"] > 0  # the fake judge separates the samples: a real gradient
        # the logged total is w_tech * R_tech + w_lang * R_lang of the same rows
        assert r["reward_mean"] == pytest.approx(0.6 * r["reward/r_tech_mean"] + 0.4 * r["reward/r_lang_mean"])

    # resume: 1 step, then --resume to 2, equals the uninterrupted run exactly
    assert main(_args(root, "split", "grpo.train.steps=1")) == 0
    with pytest.raises(FileExistsError, match="--resume"):
        main(_args(root, "split", "grpo.train.steps=2"))
    assert main(["--resume", *_args(root, "split", "grpo.train.steps=2")]) == 0
    assert "resumed from" in capsys.readouterr().out
    split = recipe.read_grpo_metrics(root / "runs" / "split" / "metrics.jsonl")
    for a, b in zip(rows, split):
        for k in ("reward_mean", "loss", "grad_norm", "entropy", "mean_length", "reward/r_tech_mean"):
            assert a[k] == b[k], (a["step"], k)

    from jaxkd.models import load_pretrained
    from jaxkd.serving import load_model

    full, resumed = load_model(run), load_model(root / "runs" / "split")
    base = load_pretrained(str(root / "student.yaml"))
    assert full.step == resumed.step == 2 and full.kind == "run"
    w = lambda m: np.asarray(m.layers[0].mlp.up_proj.weight[...])  # noqa: E731
    np.testing.assert_array_equal(w(full.model), w(resumed.model))
    assert not np.array_equal(w(full.model), w(base.model))  # it trained

    # the published report, and that it is rebuilt from metrics.jsonl alone
    res = root / "results"
    assert (res / "grpo_full.png").stat().st_size > 5000
    rep = json.loads((res / "grpo_full.json").read_text())
    assert rep["steps"] == 2 and rep["kl_metric"] == "approx_kl_old"
    assert rep["per_step"][1]["components"]["r_tech"]["mean"] == rows[1]["reward/r_tech_mean"]
    assert rep["diagnostics"]["metrics"]["entropy"]["last"] == rows[1]["entropy"]
    md = (res / "grpo_full.md").read_text()
    assert "| check | metric | threshold |" in md and "R_tech" in md
    again = recipe.grpo_report(run, root / "again", "full")
    assert json.loads(again["json"].read_text())["per_step"] == rep["per_step"]


def test_grpo_init_cannot_be_the_run_itself(preset):
    cfg = load(RunConfig, CONFIG_DIR / "cpu_default.yaml",
               ["stage=grpo", f"runs_dir={preset / 'runs'}", "name=me", f"grpo.init={preset / 'runs' / 'me'}"])
    with pytest.raises(Exception, match="this run's own directory"):
        recipe.load_policy(cfg, print)


@pytest.mark.parametrize("override, check", [
    ("grpo.w_lang=0", lambda total, t, l: np.allclose(total, 0.6 * t)),
    ("grpo.w_tech=0", lambda total, t, l: np.allclose(total, 0.4 * l)),
    ("grpo.num_generations=8", lambda total, t, l: np.allclose(total, 0.6 * t + 0.4 * l)),
])
def test_ablation_switches_parse_and_change_the_reward(override, check):
    from test_train_fixtures import tiny_records

    cfg = load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["stage=grpo", override])
    default = load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["stage=grpo"])
    recs = tiny_records(1)
    meta = [{"record": r, "question": r["questions"][0]} for r in recs]
    texts = ["1. Hold the audio button 2 s.\n2. Unplug it and wait 10 s.", "no idea what to do here",
             "Press and hold the button, then unplug the charger for ten seconds."]
    comps = recipe.make_reward_fn(cfg.grpo, FakeJudge())(meta, texts)
    base = combine_rewards(recipe.make_reward_fn(default.grpo, FakeJudge())(meta, texts),
                           recipe.reward_weights(default.grpo))
    total = combine_rewards(comps, recipe.reward_weights(cfg.grpo))
    assert check(total, comps["r_tech"], comps["r_lang"])
    if "num_generations" in override:
        assert cfg.grpo.rows == 16 and default.grpo.rows == 8 and np.allclose(total, base)
    else:
        assert not np.allclose(total, base)  # the switch changes the reward


def test_trainer_grpo_step_with_grad_accum_equals_the_full_batch_update():
    """grpo_loss_fn on the trainer: 2 micro-batches of a rollout batch give the full-batch loss,
    gradient norm and update (the per-token weights are normalised over the whole batch)."""
    import functools

    import jax
    import optax

    from jaxkd.config import GRPOConfig
    from jaxkd.rl import grpo as G
    from jaxkd.rl.loop import grpo_loss_fn
    from jaxkd.train import state as st
    from jaxkd.train.trainer import make_train_step

    graphdef, params, frozen = st.split_model(tiny_decoder(seed=1), "all")
    rs = np.random.RandomState(0)
    n, t = 4, 24
    ids = rs.randint(0, 256, (n, t)).astype(np.int32)
    mask = np.zeros((n, t), np.float32)
    for i, length in enumerate([16, 9, 12, 5]):
        mask[i, 7:7 + length] = 1
    cfg = GRPOConfig(max_new_tokens=16, beta=0.02, aggregation="seq_mean_token_mean")
    batch = {"input_ids": ids, "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1)),
             "segment_ids": np.ones((n, t), np.int32), "targets": np.roll(ids, -1, axis=1), "completion_mask": mask,
             "advantages": np.array([1.0, -0.5, 0.8, -1.3], np.float32),
             "loss_weights": G.loss_weights(mask, cfg.aggregation, cfg.max_new_tokens)}
    lp, _ = G.policy_logprobs(graphdef, params, frozen, {k: jax.numpy.asarray(v) for k, v in batch.items()}, 1.0,
                              vocab=259)
    batch["old_logp"] = np.asarray(lp) + np.float32(0.1) * np.sign(batch["advantages"])[:, None]  # ratio != 1
    extra = {"frozen": frozen, "ref_params": jax.tree.map(jax.numpy.copy, params)}

    def run(accum):
        tx = optax.sgd(1.0)
        step = make_train_step(functools.partial(grpo_loss_fn, graphdef=graphdef, cfg=cfg, vocab=259,
                                                 grad_accum=accum), tx, clip_norm=0.0, grad_accum=accum)
        feed = batch if accum == 1 else {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
        state = st.init_state(jax.tree.map(jax.numpy.copy, params), tx, 0)
        state, m = step(state, feed, extra)
        return state["params"], {k: float(v) for k, v in m.items()}

    p1, m1 = run(1)
    p2, m2 = run(2)
    for k in ("loss", "grad_norm", "pg_loss", "tokens"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, err_msg=k)
    moved = 0.0
    for a, b, p0 in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-7)
        moved = max(moved, float(np.abs(np.asarray(b) - np.asarray(p0)).max()))
    assert moved > 1e-4 and m1["kl_ref"] == 0.0  # the reference ran; it equals the policy before the update
