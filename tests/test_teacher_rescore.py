"""Rescoring committed text answers rebuilds the top-k store the teacher recorded while decoding."""

from __future__ import annotations

import numpy as np
import pytest

from jaxkd.config import RunConfig, SamplingConfig, TeacherConfig
from jaxkd.distill import rescore as R
from jaxkd.distill import teacher as T
from jaxkd.distill.cache import TeacherCache
from test_train_fixtures import TOKENIZER_VOCAB, byte_tokenizer, tiny_decoder, tiny_records


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=5)


def _cfg(tmp_path, grounding="none") -> RunConfig:
    return RunConfig(teacher=TeacherConfig(
        preset="tiny-teacher", sampling=SamplingConfig(max_new_tokens=10), batch_size=4, top_k=6,
        cache_dir=str(tmp_path / "cache"), answers_dir=str(tmp_path / "answers"), splits=("train",),
        prompt_bucket=16, max_seq_len=2048, grounding=grounding))


@pytest.mark.parametrize("grounding", ["none", "reference"])
def test_rescored_topk_equals_the_decode_time_topk(model, tok, tmp_path, grounding):
    cfg = _cfg(tmp_path, grounding)
    items = T.teacher_prompts(cfg, "train", records=tiny_records(2))
    T.run_teacher(cfg, model, tok, items=items, log=lambda s: None)
    exported = T.export_stage_answers(cfg, items, T.provenance(cfg))

    fresh = tmp_path / "fresh_cache"  # a clone that has the committed text, not the .npz store
    added = R.rescore_exported(model, tok, exported, fresh, top_k=6, logit_temperature=1.0,
                               vocab=TOKENIZER_VOCAB, preset="tiny-teacher", grounding=grounding,
                               batch_size=3, log=lambda s: None)
    assert added == len(items)
    decoded, rescored = TeacherCache(cfg.teacher.cache_dir), TeacherCache(fresh)
    for it in items:
        a, b = decoded.get(it.key), rescored.get(it.key)
        assert b.target_ids == a.target_ids and b.grounding == grounding
        ids_a, lp_a = decoded.topk(a)
        ids_b, lp_b = rescored.topk(b)
        np.testing.assert_array_equal(ids_b, ids_a)
        # both stored as float16: at most one float16 step apart (prefill vs step-by-step rounding)
        np.testing.assert_allclose(lp_b, lp_a, rtol=2.0**-9, atol=1e-4)
    # a second call finds everything cached
    assert R.rescore_exported(model, tok, exported, fresh, top_k=6, logit_temperature=1.0,
                              vocab=TOKENIZER_VOCAB, preset="tiny-teacher", grounding=grounding,
                              log=lambda s: None) == 0


def test_rescore_refuses_answers_of_another_teacher_or_mode(model, tok, tmp_path):
    cfg = _cfg(tmp_path)
    items = T.teacher_prompts(cfg, "train", records=tiny_records(1))
    T.run_teacher(cfg, model, tok, items=items, log=lambda s: None)
    exported = T.export_stage_answers(cfg, items, T.provenance(cfg))
    with pytest.raises(ValueError, match="grounding=none, not tiny-teacher / reference"):
        R.rescore_exported(model, tok, exported, tmp_path / "c2", top_k=6, logit_temperature=1.0,
                           vocab=TOKENIZER_VOCAB, preset="tiny-teacher", grounding="reference",
                           log=lambda s: None)
