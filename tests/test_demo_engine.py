"""JaxkdEngine serving a trained jaxkd checkpoint found under runs/ (tiny random weights, the
packaged student's tokenizer). Slow: resolves the packaged 0.5B tokenizer (GGUF conversion when
not cached)."""

from __future__ import annotations

import numpy as np
import pytest

from demo.engine import JaxkdEngine, latest_checkpoint
from demo.settings import EngineConfig
from jaxkd.config import ModelConfig, SamplingConfig

pytestmark = pytest.mark.slow


def test_engine_serves_newest_trained_checkpoint(tmp_path):
    from flax import nnx

    from jaxkd import ckpt
    from jaxkd.models import resolve_hf_dir, resolve_spec
    from jaxkd.models.decoder import Decoder
    from jaxkd.models.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_hf_dir(resolve_spec("qwen2.5-coder-0.5b-instruct")))
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_layers=1,
                      num_heads=2, num_kv_heads=1, qkv_bias=True, eos_token_ids=(151645,))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ckpt.save_model(tmp_path / "runs" / "kd-tiny" / "step_10", model, step=10)
    assert latest_checkpoint(tmp_path / "runs") == tmp_path / "runs" / "kd-tiny" / "step_10"

    engine = JaxkdEngine(EngineConfig(runs_dir=str(tmp_path / "runs"), max_seq_len=512,
                                      sampling=SamplingConfig(max_new_tokens=6)))
    assert "kd-tiny/step_10" in engine.name and "trained" in engine.name
    served = engine.generator.model
    np.testing.assert_array_equal(np.asarray(served.embed_tokens.weight[...]),
                                  np.asarray(model.embed_tokens.weight[...]))
    assert engine.warmup() > 0
    ids = engine.generator._chat_ids(engine.messages("my earbuds will not pair", "earbuds"))
    assert "(Device: earbuds)" in tok.decode(ids)
    text = "".join(engine.stream("my earbuds will not pair", device="earbuds"))
    # The streamed deltas add up to the greedy generation of the restored weights.
    out = engine.generator.generate([ids], engine.cfg.sampling)
    assert text == tok.decode(out.tokens[0], skip_special_tokens=True)
    assert 1 <= out.new_tokens <= 6
