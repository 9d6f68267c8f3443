"""The jaxkd KD step (loss + grads + clipped AdamW, embeddings frozen) matches the plain PyTorch
implementation in evals/bench_kd_step.py step for step on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from jaxkd.models.params import write_hf_dir
from test_train_fixtures import byte_tokenizer, tiny_config, tiny_decoder


def test_jax_and_torch_kd_steps_agree(tmp_path):
    d = write_hf_dir(tiny_config(), tiny_decoder(seed=5).hf_tensors(), tmp_path / "student",
                     tokenizer=byte_tokenizer())
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"name: tiny\nsource: hf\nlocation: {d}\n")
    out = {}
    for fw in ("jax", "torch"):
        proc = subprocess.run([sys.executable, "-m", "evals.bench_kd_step", "--child", fw, "--model",
                               str(preset), "--seq", "64", "--answer", "32", "--steps", "3"],
                              capture_output=True, text=True, timeout=600)
        line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
        assert line, proc.stderr[-2000:]
        out[fw] = json.loads(line[-1][len("RESULT "):])
    assert out["jax"]["trainable"] == out["torch"]["trainable"]
    # the same loss before and after three optimizer updates (lr 1e-5: updates move the loss)
    np.testing.assert_allclose(out["jax"]["losses"], out["torch"]["losses"], rtol=2e-6, atol=0)
    assert out["jax"]["losses"][0] != out["jax"]["losses"][-1]
