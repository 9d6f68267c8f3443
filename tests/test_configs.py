"""Every YAML under configs/ parses strictly; typos and bad values fail naming the key."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from jaxkd.config import (CONFIG_DIR, ConfigError, LossKind, ModelSpec, RunConfig, Stage, load,
                          load_model_spec, read_yaml)
from jaxkd.distill.losses import Divergence

RUN_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if "stage" in read_yaml(p))
MODEL_PRESETS = sorted((CONFIG_DIR / "models").glob("*.yaml"))


def _loader_for(path: Path):
    """The strict loader a top-level YAML belongs to (run configs here, demo config in demo/)."""
    if "stage" in read_yaml(path):
        return lambda p, o=(): load(RunConfig, p, o)
    if path.name.startswith("eval"):   # python -m evals.run --config configs/eval*.yaml
        from evals.run import load_config

        return lambda p, o=(): load_config(p, o)
    if path.name == "demo.yaml":
        from demo.settings import load_demo_config

        return lambda p, o=(): load_demo_config(p, o)
    raise AssertionError(f"{path}: no known loader; teach tests/test_configs.py about it")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_top_level_yaml_parses(path):
    _loader_for(path)(path)


@pytest.mark.parametrize("path", MODEL_PRESETS, ids=lambda p: p.name)
def test_model_presets_parse(path):
    spec = load_model_spec(path)
    assert isinstance(spec, ModelSpec) and spec.name == path.stem


def test_run_configs_exist_and_name_real_presets():
    names = {p.name for p in RUN_CONFIGS}
    assert {"cpu_default.yaml", "qwen2.5-7b-to-1.5b.yaml"} <= names
    for path in RUN_CONFIGS:
        cfg = load(RunConfig, path)
        load_model_spec(cfg.student)
        load_model_spec(cfg.teacher.preset)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_typo_key_fails_naming_it(path, tmp_path):
    text = path.read_text().replace("ckpt_every:", "ckpt_evry:", 1)
    bad = tmp_path / path.name
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"train\.ckpt_evry.*did you mean 'ckpt_every'"):
        load(RunConfig, bad)


def test_cli_overrides_and_stage():
    cfg = load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["stage=teacher", "train.steps=3",
                                                            "teacher.grounding=reference"])
    assert cfg.stage is Stage.TEACHER and cfg.train.steps == 3 and cfg.teacher.grounding == "reference"
    with pytest.raises(ConfigError, match=r"stage: 'distil' is not allowed; allowed values: \['teacher', 'kd', 'grpo'\]"):
        load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["stage=distil"])


def test_unknown_loss_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        load(RunConfig, CONFIG_DIR / "cpu_default.yaml", ["distill.loss=kl_forward"])
    msg = str(e.value)
    assert "distill.loss" in msg and "kl_forward" in msg
    for d in Divergence:
        assert d.value in msg
    # the config's names and the loss module's Enum are one list
    assert set(typing.get_args(LossKind)) == {d.value for d in Divergence}


@pytest.mark.parametrize("override, match", [
    ("distill.alpha=1.5", r"distill.alpha must be in \[0, 1\]"),
    ("train.trainable=embeddings", r"train.trainable: 'embeddings' is not allowed"),
    ("domain_sampling.key=brand", r"domain_sampling.key: 'brand' is not allowed"),
    ("teacher.grounding=wiki", r"teacher.grounding: 'wiki' is not allowed"),
    ("distill.temperature=2.0", r"must equal teacher.logit_temperature"),
    ("teacher.top_k=0", r"needs teacher.top_k > 0"),
    ("train.steps=0", r"train.steps must be > 0"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load(RunConfig, CONFIG_DIR / "cpu_default.yaml", [override])
