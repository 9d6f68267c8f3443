"""The KD recipe's loss (``kd.kd_loss``: hidden states at the loss positions -> ``fused_kd_loss``)
equals the plain reference (``kd.kd_loss_reference``: full logits -> ``kd_objective``), value,
metrics and gradients, on a tiny random decoder; the eval step equals its per-row reference.

Tolerances as in test_distill_fused.py (float32): loss and metrics rtol 1e-5, gradients rtol 1e-4
with an absolute floor of 1e-4 * max|g_ref|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.config import DistillConfig
from jaxkd.distill import kd as K
from jaxkd.distill import losses as L
from jaxkd.distill.fused import gather_positions, loss_positions
from jaxkd.train import state as st
from test_train_fixtures import MODEL_VOCAB, TOKENIZER_VOCAB, tiny_decoder

B, T, TOPK = 3, 40, 4
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def kd_like_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded rows shaped like ``loader.kd_row``: prompt, answer (loss), padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TOKENIZER_VOCAB, (B, T)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.float32)
    for b, (prompt, length) in enumerate([(9, 31), (5, 36), (12, 20)]):
        seg[b, :length] = 1
        mask[b, prompt - 1:length - 1] = 1.0
    ids = np.where(seg > 0, ids, 0)
    logits = rng.normal(size=(B, T, TOPK)).astype(np.float32) * 2
    return {"input_ids": ids, "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": seg, "targets": np.roll(ids, -1, axis=1), "loss_mask": mask,
            # garbage outside the mask, as the loader's padding would not be
            "topk_ids": rng.integers(0, TOKENIZER_VOCAB, (B, T, TOPK)).astype(np.int32),
            "topk_logprobs": (logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.3)).astype(np.float32)}


def close(got, ref, rtol, what):
    got, ref = np.asarray(got), np.asarray(ref)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()) + 1e-7, err_msg=what)


def test_loss_positions_order_padding_and_width():
    mask = np.zeros((2, 3, 10), np.float32)   # [A, B, T]: micro-batches keep their axis
    mask[0, 0, 2:7] = 1
    mask[1, 2, [0, 4, 9]] = 1
    idx = loss_positions(mask, multiple=4)
    assert idx.shape == (2, 3, 8) and idx.dtype == np.int32   # widest row 5 -> 8
    assert idx[0, 0].tolist() == [2, 3, 4, 5, 6, -1, -1, -1]
    assert idx[1, 2].tolist() == [0, 4, 9, -1, -1, -1, -1, -1]
    assert (idx[0, 1] == -1).all()
    assert loss_positions(np.ones((2, 10)), multiple=4).shape == (2, 10)  # capped at T
    assert loss_positions(np.zeros((2, 10)), multiple=4).shape == (2, 4)
    with pytest.raises(ValueError, match="multiple"):
        loss_positions(mask, multiple=0)
    x = jnp.arange(2 * 10 * 3).reshape(2, 10, 3)
    got = gather_positions(x, jnp.array([[9, 0, -1], [1, 1, 2]]))
    assert got.tolist() == [[x[0, 9].tolist(), x[0, 0].tolist(), x[0, 0].tolist()],
                            [x[1, 1].tolist(), x[1, 1].tolist(), x[1, 2].tolist()]]


@pytest.mark.parametrize("trainable,tied", [("no_embed", True), ("all", True), ("all", False)])
@pytest.mark.parametrize("dist", [DistillConfig(alpha=0.5),
                                  DistillConfig(alpha=0.3, loss="jsd", temperature=2.0, beta=0.3)],
                         ids=["fkl", "jsd_tau2"])
def test_kd_loss_matches_full_logits_reference(trainable, tied, dist):
    model = tiny_decoder(seed=3, tie_embeddings=tied)
    graphdef, params, frozen = st.split_model(model, trainable)
    batch = kd_like_batch()
    indexed = K.with_loss_index(batch, multiple=8)
    assert indexed["loss_index"].shape == (B, 32)  # widest row: 31 loss positions
    kw = dict(graphdef=graphdef, dist=dist, vocab=TOKENIZER_VOCAB)
    extra, key = {"frozen": frozen}, jax.random.key(0)

    def vg(fn, b, **more):
        return jax.jit(jax.value_and_grad(lambda p: fn(p, b, extra, key, **kw, **more), has_aux=True))(params)

    (ref_loss, ref_m), ref_g = vg(K.kd_loss_reference, batch)
    # chunk 64 over 259 real rows of 263: 5 chunks, the last overlapping
    for b, what in ((indexed, "loss_index"), (batch, "all positions")):
        (loss, m), g = vg(K.kd_loss, b, chunk_size=64)
        close(loss, ref_loss, LOSS_RTOL, f"loss ({what})")
        assert set(m) == set(ref_m)
        for k in ref_m:
            close(m[k], ref_m[k], LOSS_RTOL, f"{k} ({what})")
        for (path, gv), (_, rv) in zip(jax.tree_util.tree_leaves_with_path(g),
                                       jax.tree_util.tree_leaves_with_path(ref_g)):
            close(gv, rv, GRAD_RTOL, f"grad {jax.tree_util.keystr(path)} ({what})")
    if trainable == "all":  # the head (tied: the embedding) is trained through the fused VJP
        head = "embed_tokens" if tied else "lm_head"
        leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(ref_g)}
        assert any(head in k and float(jnp.abs(v).max()) > 0 for k, v in leaves.items())


def test_pure_response_kd_without_teacher_topk():
    model = tiny_decoder(seed=4)
    graphdef, params, frozen = st.split_model(model, "no_embed")
    batch = {k: v for k, v in kd_like_batch(1).items() if not k.startswith("topk")}
    kw = dict(graphdef=graphdef, dist=DistillConfig(alpha=1.0, use_cache=False), vocab=TOKENIZER_VOCAB)
    ref, ref_m = K.kd_loss_reference(params, batch, {"frozen": frozen}, None, **kw)
    got, m = K.kd_loss(params, K.with_loss_index(batch), {"frozen": frozen}, None, **kw)
    close(got, ref, LOSS_RTOL, "loss")
    close(m["token_accuracy"], ref_m["token_accuracy"], LOSS_RTOL, "token_accuracy")


def test_eval_step_matches_per_row_reference():
    model = tiny_decoder(seed=6)
    graphdef, params, frozen = st.split_model(model, "no_embed")
    batch = kd_like_batch(2)
    batch["topk_ids"][0, 0, 0] = MODEL_VOCAB + 5   # out of vocabulary, but at a masked position
    got = K.make_eval_step(graphdef, TOKENIZER_VOCAB, chunk_size=64)(params, frozen, batch)
    logits = K.student_logits(graphdef, params, frozen, batch, TOKENIZER_VOCAB)
    for b in range(B):
        sl = slice(b, b + 1)
        kl, _ = L.soft_kd_topk(logits[sl], L.TopK(batch["topk_ids"][sl], batch["topk_logprobs"][sl]),
                               batch["loss_mask"][sl], kind="forward_kl", temperature=1.0)
        ce, m = L.cross_entropy(logits[sl], batch["targets"][sl], batch["loss_mask"][sl])
        close(got["kl"][b], kl, LOSS_RTOL, f"kl row {b}")
        close(got["ce"][b], ce, LOSS_RTOL, f"ce row {b}")
        close(got["token_accuracy"][b], m["token_accuracy"], LOSS_RTOL, f"accuracy row {b}")


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_changes_nothing_but_memory(remat):
    model = tiny_decoder(seed=7)
    graphdef, params, frozen = st.split_model(model, "no_embed")
    batch = K.with_loss_index(kd_like_batch(3))
    kw = dict(graphdef=graphdef, dist=DistillConfig(alpha=0.5), vocab=TOKENIZER_VOCAB, chunk_size=64)

    def vg(mode):
        fn = lambda p: K.kd_loss(p, batch, {"frozen": frozen}, None, remat=mode, **kw)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (ref, _), ref_g = vg("none")
    (got, _), g = vg(remat)
    close(got, ref, LOSS_RTOL, "loss")
    for gv, rv in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
        close(gv, rv, GRAD_RTOL, "grad")
    with pytest.raises(ValueError, match="remat='some'; allowed"):
        K.kd_loss(params, batch, {"frozen": frozen}, None, remat="some", **kw)


def test_remat_lowers_the_compiled_steps_temporaries():
    """Remat must survive XLA: on CPU its common-subexpression pass merged a plain jax.checkpoint's
    recomputation with the forward pass, so every layer's activations stayed live and "full" saved
    nothing. Measured on the compiled program (XLA's buffer assignment), not on timing: a decoder
    whose activations dominate its gradients (8 layers, wide MLP)."""
    model = tiny_decoder(seed=3, num_layers=8, intermediate_size=512)
    graphdef, params, frozen = st.split_model(model, "no_embed")
    batch = K.with_loss_index(kd_like_batch(5))
    kw = dict(graphdef=graphdef, dist=DistillConfig(alpha=0.5), vocab=TOKENIZER_VOCAB, chunk_size=64)

    def temp_bytes(mode):
        fn = lambda p: K.kd_loss(p, batch, {"frozen": frozen}, None, remat=mode, **kw)  # noqa: E731
        compiled = jax.jit(jax.grad(lambda p: fn(p)[0])).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, dots, full = temp_bytes("none"), temp_bytes("dots"), temp_bytes("full")
    assert full < 0.5 * none, (none, full)
    assert dots < none, (none, dots)


def test_packed_rows_give_the_loss_and_gradients_of_the_same_examples_one_per_row():
    """Several examples packed into one row (``loader.kd_pack_row``: a segment each, positions
    restarting) train exactly as the same examples padded one per row: attention never crosses
    examples and the loss is a per-token mean over the batch either way."""
    from jaxkd.data.loader import kd_batch, kd_pack_row

    rng = np.random.default_rng(5)

    class Ex:
        def __init__(self, i, p, a):
            self.example_id, self.prompt_len = f"e{i}", p
            self.ids = rng.integers(0, TOKENIZER_VOCAB, p + a).astype(np.int32)
            lg = rng.normal(size=(a, TOPK)).astype(np.float32)
            self.topk_ids = rng.integers(0, TOKENIZER_VOCAB, (a, TOPK)).astype(np.int32)
            self.topk_logprobs = (lg - np.log(np.exp(lg).sum(-1, keepdims=True) * 1.2)).astype(np.float32)

    exs = [Ex(0, 7, 9), Ex(1, 5, 14), Ex(2, 9, 6), Ex(3, 4, 5)]   # 16 + 19 + 15 + 9 tokens
    packed = {k: np.stack([kd_pack_row(exs[:2], max_len=40, top_k=TOPK)[k],
                           kd_pack_row(exs[2:], max_len=40, top_k=TOPK)[k]]) for k in kd_batch(exs, 40, TOPK)}
    assert packed["segment_ids"][0, [0, 15, 16, 34, 35]].tolist() == [1, 1, 2, 2, 0]
    assert packed["positions"][0, [15, 16]].tolist() == [15, 0]
    single = kd_batch(exs, 20, TOPK)   # one example per row
    assert packed["loss_mask"].sum() == single["loss_mask"].sum() == 9 + 14 + 6 + 5
    model = tiny_decoder(seed=7)
    graphdef, params, frozen = st.split_model(model, "no_embed")
    kw = dict(graphdef=graphdef, dist=DistillConfig(alpha=0.5), vocab=TOKENIZER_VOCAB)

    def vg(b):
        f = lambda p: K.kd_loss(p, K.with_loss_index(b), {"frozen": frozen}, None, **kw)
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (ref, ref_m), ref_g = vg(single)
    (got, m), g = vg(packed)
    close(got, ref, LOSS_RTOL, "loss")
    for k in ref_m:
        close(m[k], ref_m[k], LOSS_RTOL, k)
    for gv, rv in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        close(gv, rv, GRAD_RTOL, "grad")
    with pytest.raises(ValueError, match="do not fill one row of 30"):
        kd_pack_row(exs[:2], max_len=30, top_k=TOPK)
