"""Run-directory checkpoints (jaxkd.ckpt): save -> restore the train state exactly, parameters
alone onto another sharding, and clear errors for missing / incomplete / corrupt runs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkd import ckpt
from jaxkd import sharding as shd
from jaxkd.config import ModelConfig
from jaxkd.models import build_decoder
from jaxkd.models.decoder import Decoder
from jaxkd.train.state import init_state

CFG = ModelConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True, tie_embeddings=False, eos_token_ids=(3,))
IDS = jnp.asarray([[1, 7, 200, 31, 5, 263, 12]], jnp.int32)
TX = optax.adamw(1e-3)


def logits(model: Decoder) -> np.ndarray:
    out, _ = model(IDS, jnp.arange(IDS.shape[1], dtype=jnp.int32)[None])
    return np.asarray(out)


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _state(seed: int) -> tuple[Decoder, dict]:
    model = Decoder(CFG, rngs=nnx.Rngs(seed))
    state = init_state(nnx.state(model, nnx.Param), TX, seed)
    # one real update so the optimizer moments are not zeros
    grads = jax.tree.map(jnp.ones_like, state["params"])
    updates, state["opt_state"] = TX.update(grads, state["opt_state"], state["params"])
    state["params"] = optax.apply_updates(state["params"], updates)
    state["step"] = state["step"] + 1
    return model, state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, state = _state(0)
    run = tmp_path_factory.mktemp("ck") / "run"
    with ckpt.RunCheckpointer(run, keep=3, create=True) as ck:
        path = ck.save(7, state, {"data": {"sampler": {"draws": 42}}})
    ckpt.write_run_meta(run, {"base_model": {"spec": {}}, "model_config": {}, "trainable": "all"})
    return state, run, path


def test_train_state_and_extras_round_trip_exactly(saved):
    state, run, path = saved
    assert path == run / "ckpt" / "7" and path.is_dir()
    _, other = _state(99)
    with ckpt.RunCheckpointer(run) as ck:
        assert ck.latest_step() == 7 and ck.all_steps() == [7]
        back, extras = ck.restore(None, other)
    assert extras == {"data": {"sampler": {"draws": 42}}}
    want, got = flat(state), flat(back)
    assert want.keys() == got.keys() and any("opt_state" in k for k in want)
    for k in want:
        assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), k


def test_params_alone_restore_onto_a_model_and_give_its_logits(saved):
    state, run, _ = saved
    model = Decoder(CFG, rngs=nnx.Rngs(5))
    ref = Decoder(CFG, rngs=nnx.Rngs(5))
    nnx.update(ref, state["params"])
    assert not np.array_equal(logits(model), logits(ref))
    with ckpt.RunCheckpointer(run) as ck:
        nnx.update(model, ck.restore_params(7, nnx.state(model, nnx.Param)))
    assert np.array_equal(logits(model), logits(ref))


def test_restore_onto_other_sharding_bit_identical(saved, tmp_path):
    state, run, _ = saved
    assert len(jax.devices()) == 8
    mesh = shd.make_mesh(fsdp=4, tensor=2)
    sharded = build_decoder(CFG, mesh, seed=5)
    with ckpt.RunCheckpointer(run) as ck:
        params = ck.restore_params(None, nnx.state(sharded, nnx.Param))
    got, want = flat(params), flat(state["params"])
    q = next(k for k in got if "q_proj" in k and "weight" in k)
    assert len(got[q].sharding.device_set) == 8 and not got[q].sharding.is_fully_replicated
    for k in want:
        assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), k
    # and back: saved from the 8-device layout, restored onto one device
    with ckpt.RunCheckpointer(tmp_path / "sharded", create=True) as ck:
        ck.save(1, {"params": params})
    with ckpt.RunCheckpointer(tmp_path / "sharded") as ck:
        single = ck.restore_params(1, nnx.state(Decoder(CFG, rngs=nnx.Rngs(1)), nnx.Param))
    for k, v in flat(single).items():
        assert len(v.sharding.device_set) == 1
        assert np.array_equal(np.asarray(v), np.asarray(want[k])), k
    # an explicit target layout: everything replicated over the mesh
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with ckpt.RunCheckpointer(run) as ck:
        tree = ck.restore_params(None, ckpt.abstract_like(state["params"], rep))
    assert all(x.sharding == rep for x in jax.tree.leaves(tree))


def test_keep_drops_old_steps(tmp_path):
    _, state = _state(0)
    with ckpt.RunCheckpointer(tmp_path / "r", keep=2, create=True) as ck:
        for s in (1, 2, 3):
            ck.save(s, {"params": state["params"]})
        assert ck.all_steps() == [2, 3]


def test_missing_and_corrupt_runs_fail_naming_the_problem(saved, tmp_path):
    state, run, _ = saved
    with pytest.raises(ckpt.CheckpointError, match=f"no trained run at {tmp_path / 'nope'}"):
        ckpt.read_run_meta(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="not a jaxkd run directory: run.json is missing"):
        ckpt.read_run_meta(empty)
    (empty / "ckpt").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="older jaxkd"):
        ckpt.read_run_meta(empty)
    (empty / "run.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="run.json is corrupt"):
        ckpt.read_run_meta(empty)
    (empty / "run.json").write_text(json.dumps({"format": "jaxkd-checkpoint-v1"}))
    with pytest.raises(ckpt.CheckpointError, match="format 'jaxkd-checkpoint-v1', expected 'jaxkd-run-v1'"):
        ckpt.read_run_meta(empty)
    (empty / "run.json").write_text(json.dumps({"format": ckpt.FORMAT, "base_model": {}}))
    with pytest.raises(ckpt.CheckpointError, match="incomplete: key 'model_config' is missing"):
        ckpt.read_run_meta(empty)
    # a run that saved no step: no ckpt/ directory, or only an interrupted save in it
    with pytest.raises(ckpt.CheckpointError, match="has no checkpoints: ckpt/ is missing"):
        ckpt.RunCheckpointer(tmp_path / "fresh")
    (empty / "ckpt" / "3.orbax-checkpoint-tmp-1234").mkdir()
    with ckpt.RunCheckpointer(empty) as ck:
        assert ck.latest_step() is None
        with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint under ckpt/"):
            ck.restore_params(None, state["params"])
    with ckpt.RunCheckpointer(run) as ck:
        with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint for step 5; saved steps: \[7\]"):
            ck.restore_params(5, state["params"])
        # a different model (one layer more) does not fit
        other = nnx.state(Decoder(ModelConfig(**{**ckpt_cfg(), "num_layers": 3}), rngs=nnx.Rngs(0)), nnx.Param)
        with pytest.raises(ckpt.CheckpointError, match="does not fit this model / trainable subset"):
            ck.restore_params(7, other)


def ckpt_cfg() -> dict:
    from jaxkd.config import to_dict

    return {**to_dict(CFG), "arch": CFG.arch, "eos_token_ids": (3,)}


def test_garbage_arrays_fail_naming_the_checkpoint(tmp_path):
    _, state = _state(0)
    with ckpt.RunCheckpointer(tmp_path / "bad", create=True) as ck:
        where = ck.save(2, state)
    for f in (where / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name.upper():
            f.write_bytes(b"\x00garbage" * 3)
    with ckpt.RunCheckpointer(tmp_path / "bad") as ck:
        with pytest.raises(ckpt.CheckpointError, match=f"could not read the params arrays of checkpoint {where}"):
            ck.restore_params(2, state["params"])
    meta = next(f for f in (where / "meta").iterdir() if f.is_file() and f.name != "commit_success.txt")
    meta.write_text("{not json")
    with ckpt.RunCheckpointer(tmp_path / "bad") as ck:
        with pytest.raises(ckpt.CheckpointError, match=f"could not read the metadata of checkpoint {where}"):
            ck.restore_params(2, state["params"])
