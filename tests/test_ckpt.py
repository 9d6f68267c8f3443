"""Orbax checkpoints: save -> restore identical logits, across shardings, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import ckpt
from jaxkd import sharding as shd
from jaxkd.config import ModelConfig
from jaxkd.models import build_decoder, params
from jaxkd.models.decoder import Decoder

CFG = ModelConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True, tie_embeddings=False, eos_token_ids=(3,))
IDS = jnp.asarray([[1, 7, 200, 31, 5, 263, 12]], jnp.int32)


def logits(model: Decoder) -> np.ndarray:
    out, _ = model(IDS, jnp.arange(IDS.shape[1], dtype=jnp.int32)[None])
    return np.asarray(out)


def flat_params(model) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("ck") / "step_7"
    ckpt.save_model(path, model, step=7, metadata={"run": "unit", "data_iter": {"epoch": 1, "pos": 42}})
    return model, path


def test_save_restore_same_logits(saved):
    model, path = saved
    other = Decoder(CFG, rngs=nnx.Rngs(99))
    assert not np.array_equal(logits(other), logits(model))
    ckpt.restore_model(path, other)
    assert np.array_equal(logits(other), logits(model))
    fresh = ckpt.restore_model(path)  # built from the saved ModelConfig, no template model
    assert fresh.cfg == CFG
    assert np.array_equal(logits(fresh), logits(model))


def test_metadata_round_trip(saved):
    _, path = saved
    meta = ckpt.read_metadata(path)
    assert meta["step"] == 7 and meta["metadata"] == {"run": "unit", "data_iter": {"epoch": 1, "pos": 42}}
    assert ckpt.read_config(path) == CFG


def test_restore_onto_other_sharding_bit_identical(saved, tmp_path):
    model, path = saved
    assert len(jax.devices()) == 8
    mesh = shd.make_mesh(fsdp=4, tensor=2)
    sharded = build_decoder(CFG, mesh, seed=5)
    ckpt.restore_model(path, sharded)
    want, got = flat_params(model), flat_params(sharded)
    q = next(k for k in got if "q_proj" in k and "weight" in k)
    assert len(got[q].sharding.device_set) == 8 and not got[q].sharding.is_fully_replicated
    for k in want:
        assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), k
    # and back: saved from the 8-device layout, restored onto one device
    ckpt.save_model(tmp_path / "sharded", sharded)
    single = ckpt.restore_model(tmp_path / "sharded", Decoder(CFG, rngs=nnx.Rngs(1)))
    for k, v in flat_params(single).items():
        assert len(v.sharding.device_set) == 1
        assert np.array_equal(np.asarray(v), np.asarray(want[k])), k
    # an explicit target layout: everything replicated over the mesh
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = ckpt.restore(path, ckpt.abstract_like(nnx.state(model, nnx.Param), rep))
    leaves = jax.tree.leaves(tree)
    assert all(x.sharding == rep for x in leaves)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(leaves, jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))))


def test_generic_tree_with_optimizer_like_state(tmp_path):
    tree = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "opt": (jnp.ones(3), jnp.int32(5))}
    ckpt.save(tmp_path / "c", tree, step=3, metadata={"lr": 1e-4})
    back = ckpt.restore(tmp_path / "c", jax.tree.map(jnp.zeros_like, tree))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), tree, back))
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        ckpt.save(tmp_path / "c", tree)


def test_missing_and_corrupt_checkpoints(saved, tmp_path):
    model, path = saved
    with pytest.raises(ckpt.CheckpointError, match=f"no checkpoint at {tmp_path / 'nope'}"):
        ckpt.restore_model(tmp_path / "nope", model)
    bad = tmp_path / "bad"
    ckpt.save_model(bad, model)
    target = Decoder(CFG, rngs=nnx.Rngs(2))
    # interrupted save: no commit marker
    (bad / ckpt.META_FILE).rename(bad / "meta.bak")
    with pytest.raises(ckpt.CheckpointError, match=f"{bad} is not a complete jaxkd checkpoint"):
        ckpt.restore_model(bad, target)
    (bad / "meta.bak").rename(bad / ckpt.META_FILE)
    # wrong architecture for the target
    other_cfg = ModelConfig(**{**ckpt.to_dict(CFG), "arch": CFG.arch, "num_layers": 3,
                               "eos_token_ids": (3,)})
    with pytest.raises(ckpt.CheckpointError, match="does not match the saved one"):
        ckpt.restore_model(bad, Decoder(other_cfg, rngs=nnx.Rngs(0)))
    # array files overwritten with garbage
    for f in (bad / ckpt.STATE_DIR).rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(ckpt.CheckpointError, match=f"could not read the arrays of checkpoint {bad}"):
        ckpt.restore_model(bad, target)
    (bad / ckpt.META_FILE).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.read_metadata(bad)


def test_export_hf(saved, tmp_path):
    model, _ = saved
    out = ckpt.export_hf(model, CFG, None, tmp_path / "hf")
    cfg, tensors = params.read_hf_dir(out)
    assert cfg.head_dim == CFG.head_size == 16  # config.json states head_dim explicitly
    assert dataclasses.replace(cfg, head_dim=None) == CFG
    want = model.hf_tensors()
    assert set(tensors) == set(want) and all(np.array_equal(tensors[k], want[k]) for k in want)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3
