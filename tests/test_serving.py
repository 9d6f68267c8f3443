"""A tiny trained run reaches every consumer through the one loader (jaxkd.serving.load_model):
the CLI, the demo engine (and its /health), the eval loader and the HF export all serve the run's
trained weights (same logits) with the system prompt it was trained with."""

from __future__ import annotations

import json
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import serving
from jaxkd.ckpt import CheckpointError
from jaxkd.config import (DataConfig, DistillConfig, DomainSamplingConfig, RunConfig, SamplingConfig,
                          TeacherConfig, TrainConfig)
from jaxkd.distill import kd as K
from jaxkd.distill import teacher as T
from jaxkd.models.generate import Generator
from jaxkd.models.params import write_hf_dir
from test_train_fixtures import byte_tokenizer, poison_targets_from, tiny_config, tiny_decoder, tiny_records

# Not the default prompt: proves every consumer takes the prompt from the run, not from the code.
RUN_PROMPT = "You fix gadgets. Answer in numbered steps."
QUESTION = "my audio thing 0 fails?"
IDS = jnp.asarray([[5, 77, 31, 200, 9, 140, 66, 12]], jnp.int32)
GREEDY = SamplingConfig(max_new_tokens=6)


def logits(model) -> np.ndarray:
    out, _ = model(IDS, jnp.arange(IDS.shape[1], dtype=jnp.int32)[None])
    return np.asarray(out)


def _records() -> dict:
    records = {"train": tiny_records(2), "val": tiny_records(1)}
    for r in records["val"]:
        r["id"] = "val-" + r["id"]
    return records


def _run_cfg(root, preset, name, **train_kw) -> RunConfig:
    train = dict(steps=2, batch_size=2, max_len=448, lr=3e-3, warmup_steps=0, ckpt_every=0, seed=1)
    return RunConfig(
        name=name, runs_dir=str(root / "runs"), student=str(preset),
        teacher=TeacherConfig(preset="tiny", sampling=SamplingConfig(max_new_tokens=10), batch_size=4, top_k=4,
                              cache_dir=str(root / "runs" / "teacher_cache"), answers_dir=str(root / "answers")),
        distill=DistillConfig(alpha=0.5), domain_sampling=DomainSamplingConfig(every_steps=1),
        train=TrainConfig(**{**train, **train_kw}), data=DataConfig(system_prompt=RUN_PROMPT))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = byte_tokenizer()
    d = write_hf_dir(tiny_config(), tiny_decoder(seed=1).hf_tensors(), root / "student", tokenizer=tok)
    preset = root / "student.yaml"
    preset.write_text(f"name: tiny-student\nsource: hf\nlocation: {d}\n")
    records = _records()
    cfg = _run_cfg(root, preset, "tiny-kd")
    items = [it for s in ("train", "val") for it in T.teacher_prompts(cfg, s, records=records[s])]
    T.run_teacher(cfg, tiny_decoder(seed=11), tok, items=items, log=lambda s: None)
    result = K.run_kd(cfg, records=records, log=lambda s: None, progress=False)
    model = result.model()
    messages = [{"role": "system", "content": RUN_PROMPT}, {"role": "user", "content": QUESTION}]
    expected = Generator(model, result.tokenizer, max_seq_len=512).chat([messages], GREEDY)[0]
    default_msgs = [{"role": "system", "content": serving._default_prompt()}, messages[1]]
    with_default = Generator(model, result.tokenizer, max_seq_len=512).chat([default_msgs], GREEDY)[0]
    base = tiny_decoder(seed=1)
    return types.SimpleNamespace(root=root, run=cfg.run_dir, preset=preset, logits=logits(model),
                                 base_logits=logits(base), expected=expected, with_default=with_default,
                                 tok=tok, result=result)


def test_the_run_directory_holds_what_serving_needs(trained):
    meta = json.loads((trained.run / "run.json").read_text())
    assert meta["format"] == "jaxkd-run-v1" and meta["recipe"] == "kd" and meta["trainable"] == "no_embed"
    assert meta["system_prompt"] == RUN_PROMPT
    assert meta["chat_template"] == trained.tok.chat_template
    assert meta["base_model"]["spec"]["location"] == str((trained.root / "student").resolve())
    assert (trained.run / "config.json").is_file() and (trained.run / "ckpt" / "2").is_dir()
    assert trained.result.summary["system_prompt"] == RUN_PROMPT
    # the trained weights differ from the base: equal logits below mean the trained ones were served
    assert np.abs(trained.logits - trained.base_logits).max() > 1e-3
    # and the run's prompt changes the greedy answer, so equal answers below mean it was used
    assert trained.expected != trained.with_default


def test_load_model_serves_the_trained_weights_and_prompt(trained):
    lm = serving.load_model(trained.run)
    assert lm.kind == "run" and lm.step == 2 and lm.system_prompt == RUN_PROMPT
    assert lm.name.startswith("tiny-kd (kd step 2, from tiny-student")
    assert lm.source == str(trained.run.absolute() / "ckpt" / "2")
    np.testing.assert_array_equal(logits(lm.model), trained.logits)
    assert serving.served_system_prompt(trained.run) == RUN_PROMPT
    # the newest run is found; the teacher cache under runs/ is not a run
    assert serving.newest_run(trained.root / "runs") == trained.run
    assert serving.default_model(trained.root / "runs")[0] == str(trained.run)
    assert serving.default_model(trained.root / "no-runs") == (serving.DEFAULT_MODEL, f"no trained run under "
                                                                f"{trained.root / 'no-runs'}/")


def test_cli_answers_from_the_run_with_its_prompt(trained, capsys, monkeypatch):
    from jaxkd import generate

    args = generate.build_parser().parse_args(["--model", str(trained.run), QUESTION])
    lm, messages = generate.prepare(args)
    assert messages == [{"role": "system", "content": RUN_PROMPT}, {"role": "user", "content": QUESTION}]
    np.testing.assert_array_equal(logits(lm.model), trained.logits)
    # no --model: the newest run under --runs-dir, and stderr says which and why
    assert generate.main(["--runs-dir", str(trained.root / "runs"), "--max-new-tokens", "6",
                          "--max-seq-len", "512", QUESTION]) == 0
    out = capsys.readouterr()
    assert out.out == trained.expected + "\n"
    assert "model: tiny-kd (kd step 2" in out.err and "trained run; the newest trained run under" in out.err
    assert "system prompt: from the run" in out.err
    # no run at all: the base preset, and stderr says so
    monkeypatch.setattr(serving, "DEFAULT_MODEL", str(trained.preset))
    assert generate.main(["--runs-dir", str(trained.root / "none"), "--max-new-tokens", "2",
                          "--max-seq-len", "512", QUESTION]) == 0
    err = capsys.readouterr().err
    assert "model: tiny-student [base preset; no trained run under" in err
    # a broken run: exit 1 with the problem named
    broken = trained.root / "broken"
    shutil.copytree(trained.run, broken)
    (broken / "run.json").write_text("{oops")
    assert generate.main(["--model", str(broken), QUESTION]) == 1
    assert f"{broken / 'run.json'} is corrupt" in capsys.readouterr().err


def test_demo_engine_serves_the_newest_run_and_health_names_it(trained):
    from fastapi.testclient import TestClient

    from demo.app import Services, create_app
    from demo.engine import JaxkdEngine
    from demo.limits import ClientLimiter, GenerationQueue
    from demo.settings import EngineConfig, load_demo_config

    engine = JaxkdEngine(EngineConfig(runs_dir=str(trained.root / "runs"), max_seq_len=512, prompt_bucket=64,
                                      sampling=GREEDY))
    assert engine.name.startswith("tiny-kd (kd step 2") and engine.source.endswith("ckpt/2")
    np.testing.assert_array_equal(logits(engine.generator.model), trained.logits)
    assert engine.messages(QUESTION, None)[0] == {"role": "system", "content": RUN_PROMPT}
    assert "".join(engine.stream(QUESTION)) == trained.expected
    cfg = load_demo_config(overrides=["tts.enabled=false"])
    svc = Services(cfg=cfg, engine=engine, queue=GenerationQueue(engine, cfg.limits),
                   limiter=ClientLimiter(cfg.limits), stt=types.SimpleNamespace(model_dir="(none)"), tts=None)
    try:
        with TestClient(create_app(svc, with_ui=False)) as client:
            body = client.get("/health").json()
    finally:
        svc.queue.close()
    assert body["status"] == "ok" and body["engine"] == engine.name and body["model_source"] == engine.source


def test_eval_loader_and_answers_use_the_run(trained, monkeypatch, tmp_path):
    from evals import domain as D

    lm, name = D._load_model(str(trained.run))
    assert name == lm.name and lm.system_prompt == RUN_PROMPT
    np.testing.assert_array_equal(logits(lm.model), trained.logits)
    real_cache = D.GenerationCache
    monkeypatch.setattr(D, "GenerationCache", lambda tag: real_cache(tag, root=tmp_path))
    item = {"id": "x#q0", "question": QUESTION, "required": [], "reference_steps": []}
    answers = D.generate_answers(str(trained.run), [item], tag="t", max_new_tokens=6, log=lambda s: None)
    assert answers == [trained.expected]


def test_export_reloads_in_transformers_with_the_same_logits(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxkd.export import main

    out = tmp_path / "hf"
    assert main([str(trained.run), "--to", "hf", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.from_numpy(np.asarray(IDS, np.int64))).logits.numpy()
    np.testing.assert_allclose(got, trained.logits, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == trained.tok.chat_template
    # jaxkd serves the export like the run: same weights, the run's prompt
    lm = serving.load_model(out)
    assert lm.kind == "hf" and lm.system_prompt == RUN_PROMPT and "tiny-kd" in lm.name
    np.testing.assert_array_equal(logits(lm.model), trained.logits)


def test_a_lora_run_serves_and_exports_its_adapters_merged(trained, tmp_path):
    """The checkpoint of a LoRA run holds only the adapters; the loader rebuilds them on the base,
    restores them and merges them, so serving and the HF export see the adapted model."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxkd.export import main
    from jaxkd.models.lora import has_lora

    cfg = _run_cfg(trained.root, trained.preset, "tiny-lora", trainable="lora", lora_rank=4, lr=3e-2,
                   lora_targets=("q_proj", "v_proj", "down_proj"))
    cfg = RunConfig(**{**cfg.__dict__, "runs_dir": str(tmp_path / "runs")})  # not the fixture's newest run
    result = K.run_kd(cfg, records=_records(), log=lambda s: None, progress=False)
    adapted = logits(result.model())
    assert has_lora(result.model()) and np.abs(adapted - trained.base_logits).max() > 1e-3
    meta = json.loads((cfg.run_dir / "run.json").read_text())
    assert meta["lora"] == {"rank": 4, "alpha": 16.0, "seed": 1, "targets": ["q_proj", "v_proj", "down_proj"]}
    lm = serving.load_model(cfg.run_dir)
    assert lm.kind == "run" and not has_lora(lm.model)
    # merged (W + alpha/r B A in float32) vs adapter forward: float32 rounding only
    np.testing.assert_allclose(logits(lm.model), adapted, atol=1e-5, rtol=1e-5)

    out = tmp_path / "hf-lora"
    assert main([str(cfg.run_dir), "--to", "hf", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.from_numpy(np.asarray(IDS, np.int64))).logits.numpy()
    np.testing.assert_allclose(got, adapted, atol=1e-4, rtol=0)  # the HF export tolerance above
    np.testing.assert_array_equal(logits(serving.load_model(out).model), logits(lm.model))


def test_a_keep_best_run_serves_its_lowest_val_step_and_keeps_the_last_addressable(trained, tmp_path):
    from evals.identity import weights_identity

    cfg = _run_cfg(trained.root, trained.preset, "tiny-best", steps=6, eval_every=1, keep_best="kl")
    cfg = RunConfig(**{**cfg.__dict__, "runs_dir": str(tmp_path / "runs")})
    result = K.run_kd(cfg, records=_records(), batch_hook=poison_targets_from(2), log=lambda s: None,
                      progress=False)
    best = result.summary["best"]["step"]
    assert best < 6   # the poisoned steps moved the student away from the teacher
    lm = serving.load_model(cfg.run_dir)
    assert lm.step == best and lm.source == str(cfg.run_dir.absolute() / "best" / str(best))
    assert lm.name.startswith(f"tiny-best (kd step {best}, lowest val kl ")
    np.testing.assert_array_equal(logits(lm.model), logits(result.model()))   # result holds the best too
    last = serving.load_model(cfg.run_dir, step=6)
    assert last.step == 6 and np.abs(logits(last.model) - logits(lm.model)).max() > 1e-4
    ident = weights_identity(cfg.run_dir)
    assert ident["step"] == best and ident["checkpoint"] == "best"
    assert weights_identity(cfg.run_dir, 6)["id"] != ident["id"] and "checkpoint" not in weights_identity(cfg.run_dir, 6)


def test_loader_errors_name_the_problem(trained, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(trained.run, moved)
    meta = json.loads((moved / "run.json").read_text())
    meta["model_config"]["num_layers"] = 3
    (moved / "run.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="was trained on a model with config"):
        serving.load_model(moved)
    shutil.rmtree(moved / "ckpt")
    (moved / "run.json").write_text(json.dumps({**meta, "model_config": json.loads(
        (trained.run / "run.json").read_text())["model_config"]}))
    with pytest.raises(CheckpointError, match="has no checkpoints: ckpt/ is missing"):
        serving.load_model(moved)
    with pytest.raises(CheckpointError, match="no checkpoint for step 9; saved steps: \\[2\\]"):
        serving.load_model(trained.run, step=9)
