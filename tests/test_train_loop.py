"""The KD recipe on the trainer, tiny random models: exact kill-and-resume, NaN stop, domain
re-weighting, batch alignment, sharded == single device."""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.config import (ConfigError, DistillConfig, DomainSamplingConfig, RunConfig, SamplingConfig,
                          TeacherConfig, TrainConfig)
from jaxkd.ckpt import BEST_DIR, RunCheckpointer
from jaxkd.data.loader import kd_batch, kd_eval_batches
from jaxkd.distill import kd as K
from jaxkd.distill import teacher as T
from jaxkd.distill.cache import TeacherCache
from jaxkd.distill.sampling import DomainSampler
from jaxkd.train import state as st
from jaxkd.train import trainer as TR
from test_train_fixtures import TOKENIZER_VOCAB, byte_tokenizer, poison_targets_from, tiny_decoder, tiny_records

MAX_LEN = 448


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def records():
    recs = tiny_records(3)
    val = tiny_records(1)
    for r in val:
        r["id"] = "val-" + r["id"]
        r["questions"] = [q + " (val)" for q in r["questions"]]
    return {"train": recs, "val": val}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tok, records):
    """A teacher cache filled once by a tiny random teacher (different weights than the student)."""
    d = tmp_path_factory.mktemp("teacher")
    cfg = _cfg(d, "fill")
    teacher = tiny_decoder(seed=11)
    items = [it for s in ("train", "val") for it in T.teacher_prompts(cfg, s, records=records[s])]
    T.run_teacher(cfg, teacher, tok, items=items, log=lambda s: None)
    return d


def _cfg(root, name, **train_kw) -> RunConfig:
    train = dict(steps=6, batch_size=2, max_len=MAX_LEN, lr=3e-3, warmup_steps=1, ckpt_every=2, keep=5,
                 trainable="no_embed", seed=1)
    train.update(train_kw)
    return RunConfig(
        name=name, runs_dir=str(root / "runs"),
        teacher=TeacherConfig(preset="tiny", sampling=SamplingConfig(max_new_tokens=12), batch_size=4,
                              top_k=4, cache_dir=str(root / "cache"), answers_dir=str(root / "answers"),
                              prompt_bucket=64),
        distill=DistillConfig(loss="forward_kl", alpha=0.5, temperature=1.0),
        domain_sampling=DomainSamplingConfig(every_steps=2, key="category", tau=0.5),
        train=TrainConfig(**train))


def _student(tok):
    return types.SimpleNamespace(model=tiny_decoder(seed=5), tokenizer=tok)


def _run(root, name, tok, records, **kw):
    hook = kw.pop("batch_hook", None)
    resume = kw.pop("resume", False)
    cfg = _cfg(root, name, **kw)
    return K.run_kd(cfg, pretrained=_student(tok), records=records, batch_hook=hook, resume=resume,
                    log=lambda s: None, progress=False)


def _flat(res: K.KDResult) -> dict:
    return {**res.summary, "final_params": res.state["params"], "frozen": res.frozen}


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_kill_and_resume_reproduces_the_uninterrupted_losses_exactly(cache_dir, tok, records, pack):
    kw = dict(pack=True, max_len=2 * MAX_LEN) if pack else {}   # packed: room for several examples a row
    full = _flat(_run(cache_dir, f"full-{pack}", tok, records, **kw))
    assert len(full["losses"]) == 6 and np.isfinite(full["losses"]).all()
    assert full["losses"][-1] < full["losses"][0]  # it learns

    def kill_at_3(step, batch):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return batch

    with pytest.raises(KeyboardInterrupt):
        _run(cache_dir, f"killed-{pack}", tok, records, batch_hook=kill_at_3, **kw)
    resumed = _flat(_run(cache_dir, f"killed-{pack}", tok, records, resume=True, **kw))
    assert resumed["resumed_from"] == 2
    assert resumed["losses"] == full["losses"][2:]  # bit-exact, sampler + weights + optimizer restored
    assert resumed["sampler"] == full["sampler"]
    fp = jax.tree_util.tree_leaves(full["final_params"])
    rp = jax.tree_util.tree_leaves(resumed["final_params"])
    assert all(np.array_equal(a, b) for a, b in zip(fp, rp))
    # the sampler was re-weighted at steps 0, 2, 4 and that was logged
    if pack:  # rows hold more than one example each
        assert full["packed"] == resumed["packed"] and full["packed"]["per_step"] > 2
    else:
        assert "packed" not in full
    rows = [json.loads(s) for s in (cache_dir / "runs" / f"full-{pack}" / "metrics.jsonl").read_text().splitlines()]
    rw = [r for r in rows if "reweight/weights" in r]
    assert [r["step"] for r in rw] == [0, 2, 4]
    assert full["sampler"]["weights"] != {d: 1 / 3 for d in ("audio", "network", "wearable")}


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(cache_dir, tok, records):
    def poison(step, batch):
        if step == 3:
            batch = dict(batch)
            batch["topk_logprobs"] = np.where(batch["loss_mask"][..., None] > 0, np.nan,
                                              batch["topk_logprobs"]).astype(np.float32)
        return batch

    with pytest.raises(TR.NonFiniteLoss, match=r"became nan at step 3.*Last good checkpoint: .*ckpt/2"):
        _run(cache_dir, "nan", tok, records, batch_hook=poison)
    with RunCheckpointer(cache_dir / "runs" / "nan") as ck:
        assert ck.latest_step() == 2 and ck.all_steps() == [2]  # nothing saved at or after the bad step
    rows = [json.loads(s) for s in (cache_dir / "runs" / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "train/loss" in r) == 3  # the bad step was not logged either
    resumed = _run(cache_dir, "nan", tok, records, resume=True)  # the checkpoint restores and trains on
    full = _run(cache_dir, "nan-ref", tok, records)
    assert resumed.summary["losses"] == full.summary["losses"][2:]


def test_planted_lagging_subdomain_is_upweighted_by_the_trainer_hook(cache_dir, tok, records):
    cfg = _cfg(cache_dir, "rw")
    model = tiny_decoder(seed=5)
    graphdef, params, frozen = st.split_model(model, "no_embed")
    val, _, _ = K.load_kd_examples(cfg, "train", tok, need_topk=True, records=records["train"])
    eval_fn = K.make_eval_step(graphdef, TOKENIZER_VOCAB)
    # Plant: teacher == the student itself on "audio" and "wearable"; a far-off teacher on "network".
    for ex in val:
        b = kd_batch([ex], MAX_LEN, 4)
        logits = K.student_logits(graphdef, params, frozen, b, TOKENIZER_VOCAB)
        lp = jax.nn.log_softmax(logits[0], axis=-1)
        top_v, top_i = jax.lax.top_k(lp, 4)
        n = len(ex.ids) - ex.prompt_len
        rows = slice(ex.prompt_len - 1, ex.prompt_len - 1 + n)
        if ex.meta["category"] == "network":
            ex.topk_ids = np.tile(np.array([[250, 251, 252, 253]], np.int32), (n, 1))
            ex.topk_logprobs = np.tile(np.log(np.array([[0.97, 0.01, 0.01, 0.005]], np.float32)), (n, 1))
        else:
            ex.topk_ids, ex.topk_logprobs = np.asarray(top_i[rows]), np.asarray(top_v[rows])
    vb = kd_eval_batches(val, 2, MAX_LEN, 4)
    sampler = DomainSampler([ex.meta["category"] for ex in val], seed=0)
    prior = sampler.prior()
    rec = K.reweight_domains(eval_fn, params, frozen, vb, [ex.meta["category"] for ex in val], sampler, cfg)
    assert rec["gaps"]["network"] > 10 * max(rec["gaps"]["audio"], rec["gaps"]["wearable"])
    assert rec["gaps"]["audio"] < 1e-4  # teacher == student: no gap
    w = sampler.weights
    assert w["network"] > 2 * prior["network"]
    assert w["audio"] < prior["audio"] and w["wearable"] < prior["wearable"]
    assert min(w.values()) >= cfg.domain_sampling.floor * min(prior.values()) - 1e-9  # floor holds
    drawn = sampler.next_indices(600)
    share = np.mean([val[i].meta["category"] == "network" for i in drawn])
    assert share > 0.5  # the lagging subdomain is now drawn most often


def test_keep_best_keeps_the_lowest_val_step_and_early_stop_resumes_exactly(cache_dir, tok, records):
    kw = dict(steps=12, eval_every=1, keep_best="kl", early_stop=2, ckpt_every=1)
    full = _run(cache_dir, "best", tok, records, batch_hook=poison_targets_from(3), **kw).summary
    rows = [json.loads(s) for s in (cache_dir / "runs" / "best" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/kl"] for r in rows if "val/kl" in r}
    best = full["best"]["step"]
    assert full["stopped_early"]["planned_steps"] == 12 and full["steps"] < 12
    assert best == min(val, key=val.get) and full["best"]["value"] == val[best]
    assert full["steps"] == best + 2 and sorted(val) == list(range(1, full["steps"] + 1))
    # the summary describes the served (best) parameters; the last step's val is kept beside it
    assert full["val"]["kl"] == pytest.approx(val[best], rel=1e-6)
    assert full["val_last_step"]["kl"] == pytest.approx(val[full["steps"]], rel=1e-6)
    with RunCheckpointer(cache_dir / "runs" / "best", subdir=BEST_DIR) as bc:
        assert bc.all_steps() == [best] and bc.read_meta(best)["extras"] == {"metric": "kl", "value": val[best]}
    with RunCheckpointer(cache_dir / "runs" / "best") as ck:
        assert ck.latest_step() == full["steps"]    # the stop step is checkpointed (resumable)

    # killed one evaluation after the best: the resumed run must remember the best and its count
    def kill_after_best(step, batch):
        if step == best + 1:
            raise KeyboardInterrupt("simulated kill")
        return poison_targets_from(3)(step, batch)

    with pytest.raises(KeyboardInterrupt):
        _run(cache_dir, "best-killed", tok, records, batch_hook=kill_after_best, **kw)
    resumed = _run(cache_dir, "best-killed", tok, records, batch_hook=poison_targets_from(3), resume=True,
                   **kw).summary
    assert (resumed["steps"], resumed["best"], resumed["val"]) == (full["steps"], {
        **full["best"], "served_from": full["best"]["served_from"].replace("/best/", "/best-killed/")}, full["val"])
    with pytest.raises(FileExistsError, match="--resume"):
        _run(cache_dir, "best", tok, records, **kw)
    with pytest.raises(ConfigError, match="train.eval_every"):
        TrainConfig(keep_best="kl")
    with pytest.raises(ConfigError, match="train.keep_best"):
        TrainConfig(early_stop=3, eval_every=1)


def test_batch_alignment_puts_entry_j_on_the_position_predicting_answer_token_j(cache_dir, tok, records):
    cfg = _cfg(cache_dir, "align")
    ex = K.load_kd_examples(cfg, "train", tok, need_topk=True, records=records["train"])[0][0]
    cache = TeacherCache(cfg.teacher.cache_dir)
    b = kd_batch([ex], MAX_LEN, 4)
    p = ex.prompt_len
    n = len(ex.ids) - p
    assert b["loss_mask"][0].sum() == n and b["loss_mask"][0, p - 2] == 0 and b["loss_mask"][0, p - 1] == 1
    np.testing.assert_array_equal(b["targets"][0, p - 1:p - 1 + n], ex.ids[p:])
    np.testing.assert_array_equal(b["topk_ids"][0, p - 1:p - 1 + n], ex.topk_ids)
    # the teacher's greedy token j is its own top-1 at entry j
    np.testing.assert_array_equal(b["topk_ids"][0, p - 1:p - 1 + n, 0], ex.ids[p:])
    # truncation: a window that cuts the answer keeps prompt+answer prefix aligned
    short = kd_batch([ex], p + 3, 4)
    assert short["loss_mask"][0].sum() == 4  # positions p-1..p+2 predict answer tokens 0..3
    np.testing.assert_array_equal(short["topk_ids"][0, p - 1:p + 3], ex.topk_ids[:4])
    np.testing.assert_array_equal(short["targets"][0, p - 1:p + 3], ex.ids[p:p + 4])
    assert cache.entries()


def test_grounded_teacher_student_inputs_hold_no_grounding(tmp_path, tok, records):
    cfg = _cfg(tmp_path, "g")
    cfg = RunConfig(**{**cfg.__dict__, "teacher": TeacherConfig(**{**cfg.teacher.__dict__, "grounding": "reference"})})
    teacher = tiny_decoder(seed=11)
    T.run_teacher(cfg, teacher, tok,
                  items=T.teacher_prompts(cfg, "train", records=records["train"][:3]), log=lambda s: None)
    # Cross-context alignment, by hand: the teacher's logits on (grounding + question + answer) at
    # its position for answer token j land on the student's (question + answer) position for j.
    entry = next(iter(TeacherCache(cfg.teacher.cache_dir).entries().values()))
    t_prompt = T.chat_ids(tok, entry.teacher_messages)
    s_prompt = T.chat_ids(tok, entry.student_messages)
    assert len(t_prompt) > len(s_prompt) + 50  # the grounding block really is in the teacher context
    seq = jnp.asarray([t_prompt + entry.target_ids])
    t_logits, _ = teacher(seq, jnp.arange(seq.shape[1])[None])
    t_logp = jax.nn.log_softmax(t_logits[0, :, :TOKENIZER_VOCAB], axis=-1)
    ex = K.load_kd_examples(cfg, "train", tok, need_topk=True, records=records["train"][:1])[0][0]
    b = kd_batch([ex], MAX_LEN, 4)
    for j in range(len(entry.target_ids)):
        s_pos, t_pos = len(s_prompt) - 1 + j, len(t_prompt) - 1 + j
        ids = b["topk_ids"][0, s_pos]
        assert b["targets"][0, s_pos] == entry.target_ids[j] and b["loss_mask"][0, s_pos] == 1
        np.testing.assert_array_equal(ids, np.asarray(jax.lax.top_k(t_logp[t_pos], 4)[1]))
        np.testing.assert_allclose(b["topk_logprobs"][0, s_pos], np.asarray(t_logp[t_pos])[ids], atol=1e-2)
    exs, missing, _ = K.load_kd_examples(cfg, "train", tok, need_topk=True, records=records["train"][:3])
    assert len(exs) == 3 and missing == 0
    for ex, rec in zip(exs, records["train"][:3]):
        text = tok.decode(ex.ids[:ex.prompt_len])
        assert "Reference notes" not in text and rec["steps"][0] not in text
        assert rec["questions"][0] in text


def test_trainable_filters_and_optimizer():
    model = tiny_decoder(seed=0)
    _, p_all, f_all = st.split_model(model, "all")
    _, p_ne, f_ne = st.split_model(model, "no_embed")
    names = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p_ne)[0]}
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert st.count(p_ne) + 2 * 263 * 36 == st.count(p_all)
    with pytest.raises(ValueError, match="allowed"):
        st.trainable_filter("embeddings_only")
    lr = st.learning_rate(TrainConfig(steps=10, lr=1.0, warmup_steps=2, end_lr_ratio=0.1))
    assert float(lr(0)) == 0.0 and float(lr(2)) == pytest.approx(1.0) and float(lr(10)) == pytest.approx(0.1)


def test_sharded_run_matches_single_device(cache_dir, tok, records):
    """mesh fsdp=2 x data=1 (of the 8 fake CPU devices) gives the single-device losses."""
    from jaxkd.config import MeshConfig
    from jaxkd.models import build_decoder
    from test_train_fixtures import tiny_config

    single = _run(cache_dir, "mesh-ref", tok, records, steps=3, ckpt_every=0)
    cfg = _cfg(cache_dir, "mesh", steps=3, ckpt_every=0)
    cfg = RunConfig(**{**cfg.__dict__, "mesh": MeshConfig(data=1, fsdp=2, tensor=1)})
    mesh = TR.make_mesh(1, 2, 1, cfg.train.batch_size)
    model = build_decoder(tiny_config(), mesh, seed=5)
    emb = model.embed_tokens.weight[...]
    assert len(emb.sharding.device_set) == 2
    sharded = K.run_kd(cfg, pretrained=types.SimpleNamespace(model=model, tokenizer=tok), records=records,
                       log=lambda s: None, progress=False)
    np.testing.assert_allclose(sharded.summary["losses"], single.summary["losses"], rtol=2e-5)
    # the trained parameters stay laid out on the mesh (the explicit out_shardings of the step)
    q = sharded.state["params"]["layers"][0]["self_attn"]["q_proj"]["weight"][...]
    assert len(q.sharding.device_set) == 2 and not q.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(q), np.asarray(single.state["params"]["layers"][0]["self_attn"]
                                                          ["q_proj"]["weight"][...]), rtol=1e-4, atol=1e-6)


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_lora_trains_only_the_adapters_and_the_base_stays_bit_identical(cache_dir, tok, records):
    from flax import nnx

    student = _student(tok)
    base = _leaves(st.split_model(student.model, "all")[1])
    cfg = _cfg(cache_dir, "lora", steps=4, ckpt_every=0, trainable="lora", lr=1e-2, lora_rank=4)
    out = K.run_kd(cfg, pretrained=student, records=records, log=lambda s: None, progress=False)
    flat = _flat(out)
    assert flat["losses"][-1] < flat["losses"][0]
    trained = _leaves(flat["final_params"])
    assert trained and all(k.endswith(("['lora_a'].value", "['lora_b'].value")) for k in trained)
    # every attention/MLP projection of every layer got an adapter (the default lora_targets)
    assert len(trained) == 2 * 7 * 2 and out.summary["trainable_params"] < 0.2 * sum(v.size for v in base.values())
    # the adapters moved away from their initial values (A random, B zeros)
    init = _leaves(nnx.state(st.apply_lora(tiny_decoder(seed=5), 4, 16.0, cfg.train.seed), nnx.LoRAParam))
    assert init.keys() == trained.keys()
    assert all(not np.array_equal(init[k], trained[k]) for k in trained)
    assert all(np.abs(trained[k]).max() > 0 for k in trained if "lora_b" in k)
    # every base weight is in the frozen state and bit-identical to before training
    frozen = _leaves(flat["frozen"])
    assert set(base) <= set(frozen)
    assert all(np.array_equal(base[k], frozen[k]) for k in base)


def test_lora_config_errors_name_the_key():

    with pytest.raises(ConfigError, match="train.lora_targets"):
        TrainConfig(trainable="lora", lora_targets=("q_proj", "qkv"))
    with pytest.raises(ConfigError, match="train.lora_rank"):
        TrainConfig(trainable="lora", lora_rank=0)


def test_summary_and_final_generation_against_teacher_answers(cache_dir, tok, records):
    out = _run(cache_dir, "summ", tok, records, steps=1, ckpt_every=0)
    gen = K.final_generation(out, n=2, max_new_tokens=4)
    assert gen["n"] == 2 and 0.0 <= gen["rougeL"] <= 1.0 and gen["exact_match"] in (0.0, 0.5, 1.0)
    assert gen["samples"][0]["teacher"] == out.val_examples[0].answer
    K.write_summary(cache_dir / "runs" / "summ", out.summary)
    saved = json.loads((cache_dir / "runs" / "summ" / "summary.json").read_text())
    assert set(saved["val_per_domain"]) == {"audio", "network", "wearable"}
    assert saved["val"]["kl"] > 0 and "final_params" not in saved


def test_committed_text_answers_allow_response_kd_only(cache_dir, tok, records):
    from jaxkd.config import DistillConfig

    cfg = _cfg(cache_dir, "fill")
    items = [it for s in ("train", "val") for it in T.teacher_prompts(cfg, s, records=records[s])]
    path = T.export_stage_answers(cfg, items, T.provenance(cfg))
    empty = cache_dir / "no-cache"
    text_only = RunConfig(**{**_cfg(cache_dir, "text", steps=2, ckpt_every=0).__dict__,
                             "teacher": TeacherConfig(**{**cfg.teacher.__dict__, "cache_dir": str(empty),
                                                         "answers_dir": str(path.parent)}),
                             "distill": DistillConfig(alpha=1.0, use_cache=False)})
    out = K.run_kd(text_only, pretrained=_student(tok), records=records, log=lambda s: None, progress=False)
    assert len(out.summary["losses"]) == 2 and out.summary["train_examples"] == len(records["train"])
    soft = RunConfig(**{**text_only.__dict__, "distill": DistillConfig(alpha=0.5)})
    with pytest.raises(FileNotFoundError, match="stage=teacher"):
        K.run_kd(soft, pretrained=_student(tok), records=records, log=lambda s: None, progress=False)


def test_answer_rejection_names_why_a_teacher_answer_is_dropped():
    from types import SimpleNamespace

    rec = {"id": "tws-001", "questions": ["my left earbud is silent, the right one plays fine. how do i fix it?"],
           "steps": ["Put both earbuds back in the charging case and close the lid for 15 seconds.",
                     "Press and hold the case button for 10 seconds until the light flashes amber to reset them.",
                     "Remove the earbuds from your phone's Bluetooth list and pair them again."],
           "required": [["charging case"], ["reset"]], "safety": ["Do not open the earbuds."]}
    complete = ("1. Put both earbuds back in the charging case and close the lid for about 15 seconds.\n"
                "2. Press and hold the button on the case for 10 seconds until the light flashes amber.\n"
                "3. Remove the earbuds from your phone's Bluetooth list, then pair them again.")
    vague = "1. Try restarting your phone.\n2. Contact support if it still does not work."
    unsafe = complete + "\n4. If that fails, pry open the case and check the battery contacts."
    strict = DistillConfig(drop_truncated=True, min_step_coverage=0.5, drop_unsafe=True)
    ok, cut = SimpleNamespace(answer=complete, eos_id=7), SimpleNamespace(answer=complete, eos_id=None)
    assert K.answer_rejection(ok, rec, 0, strict) is None
    assert K.answer_rejection(cut, rec, 0, strict) == "truncated"
    assert K.answer_rejection(SimpleNamespace(answer=vague, eos_id=7), rec, 0, strict) == "missing_steps"
    assert K.answer_rejection(SimpleNamespace(answer=unsafe, eos_id=7), rec, 0, strict) == "unsafe"
    leaked = complete.replace("again.", "again, as the reference steps say.")
    assert K.answer_rejection(SimpleNamespace(answer=leaked, eos_id=7), rec, 0, strict) is None
    notes = dataclasses.replace(strict, drop_leaked_notes=True)
    assert K.answer_rejection(SimpleNamespace(answer=leaked, eos_id=7), rec, 0, notes) == "leaked_notes"
    assert K.answer_rejection(ok, rec, 0, notes) is None
    # every check is off by default: the committed 80-answer run trains on what it always did
    for entry in (cut, SimpleNamespace(answer=vague, eos_id=7), SimpleNamespace(answer=unsafe, eos_id=7)):
        assert K.answer_rejection(entry, rec, 0, DistillConfig()) is None
    with pytest.raises(ConfigError, match="min_step_coverage"):
        DistillConfig(min_step_coverage=1.5)


def test_committed_answers_missing_from_the_cache_are_an_error_not_a_smaller_run(cache_dir, tok, records):
    """A cache holding only some of the committed answers (e.g. new answers generated without
    rescoring the committed ones) would train on part of the data without a word: refused, naming
    the teacher stage that rebuilds the rest."""
    import dataclasses

    from jaxkd.distill.cache import TeacherCache

    cfg = _cfg(cache_dir, "fill")
    items = [it for s in ("train", "val") for it in T.teacher_prompts(cfg, s, records=records[s])]
    T.export_stage_answers(cfg, items, T.provenance(cfg))
    full = TeacherCache(cfg.teacher.cache_dir)
    part = TeacherCache(cache_dir / "part-cache")
    train_keys = [it.key for it in items if it.split == "train"]
    for key in train_keys[:3]:
        part.append(full.get(key), full.topk(full.get(key)))
    partial = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache_dir=str(part.dir)))
    with pytest.raises(ValueError, match="committed answer .* but none in the teacher cache .*stage=teacher"):
        K.load_kd_examples(partial, "train", tok, need_topk=True, records=records["train"])
    got, missing, _ = K.load_kd_examples(cfg, "train", tok, need_topk=True, records=records["train"])
    assert got and missing == 0
