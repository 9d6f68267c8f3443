"""Teacher stage: top-k capture during decoding, cache keying/resume, grounding never leaks."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd.config import RunConfig, SamplingConfig, TeacherConfig
from jaxkd.distill import teacher as T
from jaxkd.distill.cache import TeacherCache, cache_key, load_exported
from jaxkd.models.generate import Generator
from jaxkd.models.layers import Projection
from test_train_fixtures import TOKENIZER_VOCAB, byte_tokenizer, tiny_decoder, tiny_records


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=3)


def _cfg(tmp_path, **teacher_kw) -> RunConfig:
    tc = dict(preset="tiny-teacher", sampling=SamplingConfig(max_new_tokens=12), batch_size=3, top_k=5,
              cache_dir=str(tmp_path / "cache"), answers_dir=str(tmp_path / "answers"),
              splits=("train",), prompt_bucket=16, max_seq_len=2048)
    tc.update(teacher_kw)
    return RunConfig(teacher=TeacherConfig(**tc))


def test_topk_entries_are_the_distributions_that_produced_each_answer_token(model, tok):
    prompts = [T.chat_ids(tok, [{"role": "user", "content": q}]) for q in ("hello there", "why?")]
    sampling = SamplingConfig(max_new_tokens=9)
    gen = Generator(model, tok, max_seq_len=256, prompt_bucket=16)
    out = gen.generate(prompts, sampling, topk=4, topk_vocab=TOKENIZER_VOCAB)
    ref = gen.generate(prompts, sampling)
    assert out.tokens == ref.tokens  # capturing top-k does not change the answer
    for i, p in enumerate(prompts):
        targets = out.tokens[i] + ([out.eos_tokens[i]] if out.eos_tokens[i] is not None else [])
        assert out.topk_ids[i].shape == (len(targets), 4) == out.topk_logprobs[i].shape
        ids = jnp.asarray([p + targets])
        logits, _ = model(ids, jnp.arange(ids.shape[1])[None])
        logp = jax.nn.log_softmax(logits[0, :, :TOKENIZER_VOCAB], axis=-1)
        for j, target in enumerate(targets):
            row = np.asarray(logp[len(p) - 1 + j])
            assert out.topk_ids[i][j, 0] == target == row.argmax()  # greedy: top-1 is the token
            np.testing.assert_allclose(out.topk_logprobs[i][j], row[out.topk_ids[i][j]], atol=2e-5)
            assert (out.topk_ids[i][j] < TOKENIZER_VOCAB).all()  # padded vocab rows never cached


def test_teacher_stage_runs_longest_prompts_first_and_keeps_every_answer(model, tok, tmp_path):
    """Length-sorted batching changes the order of work, not the answers: each cached answer
    equals that prompt answered alone."""
    cfg = _cfg(tmp_path, batch_size=4)
    items = T.teacher_prompts(cfg, "train", records=tiny_records(3))
    order = []
    summary = T.run_teacher(cfg, model, tok, items=items, log=order.append, progress=False)
    assert summary["generated"] == len(items) == 9 and summary["new_tokens"] > 0
    assert "batch of 4 (prompts" in order[1]
    cache = TeacherCache(cfg.teacher.cache_dir)
    gen = Generator(model, tok, max_seq_len=2048, prompt_bucket=16)
    lengths = [len(T.chat_ids(tok, it.teacher_messages)) for it in items]
    assert len(set(lengths)) > 1  # the sort had something to do
    for it in items[:3]:
        alone = gen.generate([T.chat_ids(tok, it.teacher_messages)], cfg.teacher.sampling)
        e = cache.get(it.key)
        assert e.answer_ids == alone.tokens[0] and e.eos_id == alone.eos_tokens[0]


def test_cache_resumes_and_grounded_never_mixes_with_ungrounded(model, tok, tmp_path):
    records = tiny_records(2)
    cfg = _cfg(tmp_path)
    items = T.teacher_prompts(cfg, "train", records=records)
    assert len(items) == 6 and len({it.key for it in items}) == 6
    first = T.run_teacher(cfg, model, tok, items=items[:4], log=lambda s: None)
    assert first["generated"] == 4
    again = T.run_teacher(cfg, model, tok, items=items, log=lambda s: None)
    assert again["generated"] == 2  # resumed: only the two missing prompts ran

    # the same prompts grounded are different keys: nothing is reused across modes
    gcfg = _cfg(tmp_path, grounding="reference")
    gitems = T.teacher_prompts(gcfg, "train", records=records)
    assert not {it.key for it in gitems} & {it.key for it in items}
    assert T.run_teacher(gcfg, model, tok, items=gitems, log=lambda s: None)["generated"] == 6
    cache = TeacherCache(cfg.teacher.cache_dir)
    assert len(cache.entries()) == 12
    for it in gitems:
        e = cache.get(it.key)
        assert e.grounding == "reference" and "Reference notes" in e.teacher_messages[0]["content"]
        assert all("Reference notes" not in m["content"] for m in e.student_messages)
        assert all("Hold the" not in m["content"] for m in e.student_messages)
        ids, lp = cache.topk(e)
        assert ids.shape == (len(e.target_ids), 5) and ids.dtype == np.int32
    # a sampling change is a new key as well
    assert cache_key("tiny-teacher", items[0].teacher_messages, SamplingConfig(max_new_tokens=13),
                     "none") != items[0].key


def test_torn_last_line_is_ignored_and_regenerated(model, tok, tmp_path):
    cfg = _cfg(tmp_path)
    items = T.teacher_prompts(cfg, "train", records=tiny_records(1))
    T.run_teacher(cfg, model, tok, items=items, log=lambda s: None)
    path = TeacherCache(cfg.teacher.cache_dir).path
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    assert len(TeacherCache(cfg.teacher.cache_dir).entries()) == len(items) - 1
    assert T.run_teacher(cfg, model, tok, items=items, log=lambda s: None)["generated"] == 1


def test_export_is_text_with_provenance(model, tok, tmp_path):
    cfg = _cfg(tmp_path)
    items = T.teacher_prompts(cfg, "train", records=tiny_records(1))
    T.run_teacher(cfg, model, tok, items=items, log=lambda s: None)
    prov = T.provenance(cfg)
    path = T.export_stage_answers(cfg, items, prov)
    header, entries = load_exported(path)
    assert header["model"] == "tiny-teacher" and header["command"] and header["date"]
    assert set(entries) == {it.key for it in items}
    assert all(e.topk_file is None for e in entries.values())
    assert "topk_file" not in json.loads(path.read_text().splitlines()[1])


def test_select_prompts_prefix_covers_every_category():
    recs = tiny_records(4, categories=("a", "b", "c"))
    chosen = T.select_prompts(recs, "first", limit=3)
    assert sorted(r["category"] for r, _ in chosen) == ["a", "b", "c"]
    assert len(T.select_prompts(recs, "all")) == 24


def test_teacher_stage_in_the_in_out_layout_gives_the_same_cache_and_puts_the_weights_back(model, tok, tmp_path,
                                                                                          monkeypatch):
    """Where batches multiply faster from [in, out] weights the stage holds its one copy so;
    the answers and top-k are those of the stored layout, and the model ends as it started."""
    from jaxkd.models.layout import LayoutChoice

    items = T.teacher_prompts(_cfg(tmp_path), "train", records=tiny_records(2))
    ref_cfg = _cfg(tmp_path / "oi")
    T.run_teacher(ref_cfg, model, tok, items=items, log=lambda s: None)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
    monkeypatch.setattr(T, "choose_layout", lambda cfg, dtype: LayoutChoice("oi", "io", "test"))
    seen = []
    real = T.Generator

    def spy(m, *a, **kw):
        seen.append({p.layout for _, p in nnx.iter_modules(m) if isinstance(p, Projection)})
        return real(m, *a, **kw)

    monkeypatch.setattr(T, "Generator", spy)
    cfg = _cfg(tmp_path / "io")
    log = []
    T.run_teacher(cfg, model, tok, items=items, log=log.append)
    assert seen == [{"io"}] and "[in, out]" in log[0]
    ref, got = TeacherCache(ref_cfg.teacher.cache_dir), TeacherCache(cfg.teacher.cache_dir)
    for it in items:
        a, b = ref.get(it.key), got.get(it.key)
        assert a.answer_ids == b.answer_ids
        np.testing.assert_array_equal(ref.topk(a)[0], got.topk(b)[0])
        np.testing.assert_allclose(ref.topk(a)[1], got.topk(b)[1], atol=1e-5)
    assert {p.layout for _, p in nnx.iter_modules(model) if isinstance(p, Projection)} == {"oi"}
    for x, y in zip(before, jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(x, np.asarray(y))
