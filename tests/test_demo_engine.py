"""Which model the demo engine serves: the newest trained run under runs/ (jaxkd.serving), else the
configured model. Serving a real tiny run end to end (weights, prompt, /health) is in
tests/test_serving.py."""

from __future__ import annotations

import os
import time

from demo.engine import resolve_model
from demo.settings import EngineConfig, load_demo_config
from jaxkd.ckpt import write_run_meta


def _run(root, name, steps=(), age_s=0.0):
    d = root / name
    write_run_meta(d, {"base_model": {"spec": {}}, "model_config": {}, "trainable": "all"})
    for s in steps:
        (d / "ckpt" / str(s)).mkdir(parents=True)
        t = time.time() - age_s
        os.utime(d / "ckpt" / str(s), (t, t))
    return d


def test_engine_prefers_the_newest_trained_run(tmp_path):
    runs = tmp_path / "runs"
    cfg = EngineConfig(runs_dir=str(runs), model="some-preset")
    assert resolve_model(cfg) == "some-preset"                       # no runs/ at all
    _run(runs, "started-only")                                         # run.json, no checkpoint yet
    (runs / "teacher_cache" / "topk").mkdir(parents=True)              # not a run
    _run(runs, "partial", steps=["3.orbax-checkpoint-tmp-77"])        # only an interrupted save
    assert resolve_model(cfg) == "some-preset"
    old = _run(runs, "old", steps=[10, 20], age_s=100)
    assert resolve_model(cfg) == str(old)
    new = _run(runs, "new", steps=[5])
    assert resolve_model(cfg) == str(new)
    nested = _run(runs / "ablation", "newest", steps=[1])
    assert resolve_model(cfg) == str(nested)
    off = EngineConfig(runs_dir=str(runs), model="some-preset", prefer_trained_checkpoint=False)
    assert resolve_model(off) == "some-preset"


def test_demo_config_serves_the_models_own_prompt_by_default():
    cfg = load_demo_config()
    assert cfg.engine.system_prompt is None  # the run's prompt, else jaxkd.data.formatting.SYSTEM_PROMPT
    assert load_demo_config(overrides=["engine.system_prompt=Be brief."]).engine.system_prompt == "Be brief."
