"""`python -m jaxkd.train` end to end on tiny HF-directory presets: teacher stage, KD, --resume."""

from __future__ import annotations

import json

import pytest

from jaxkd.config import CONFIG_DIR
from jaxkd.train.__main__ import main
from test_train_fixtures import write_tiny_presets


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, write_tiny_presets(root)


def _args(root, presets, *extra):
    return ["--config", str(CONFIG_DIR / "cpu_default.yaml"), f"student={presets['student']}",
            f"teacher.preset={presets['teacher']}", f"teacher.cache_dir={root / 'cache'}",
            f"teacher.answers_dir={root / 'answers'}", f"runs_dir={root / 'runs'}", "name=cli",
            "teacher.limit_per_split={train: 4, val: 2}", "teacher.sampling.max_new_tokens=6",
            "teacher.batch_size=4", "train.max_len=512", "train.ckpt_every=0", "train.final_generate=2",
            "domain_sampling.every_steps=1", "train.warmup_steps=0", *extra]


def test_teacher_then_kd_then_resume(presets, capsys, monkeypatch):
    root, p = presets
    monkeypatch.setenv("JAXKD_RESULTS_DIR", str(root / "results"))
    assert main(_args(root, p, "stage=teacher")) == 0
    files = list((root / "answers").rglob("*.jsonl"))
    assert [f.name for f in files] == ["teacher__none.jsonl"]
    lines = files[0].read_text().splitlines()
    header = json.loads(lines[0])["provenance"]
    assert header["splits"] == {"train": 4, "val": 2} and "stage=teacher" in header["command"]
    assert len(lines) == 1 + 6
    # second call: everything cached, nothing regenerated
    assert main(_args(root, p, "stage=teacher")) == 0
    assert "generated" not in capsys.readouterr().out.split("teacher answers:")[-1]
    # a fresh clone has the committed text answers but no top-k store: rescored, not regenerated
    import shutil

    shutil.rmtree(root / "cache")
    before = files[0].read_bytes()
    assert main(_args(root, p, "stage=teacher")) == 0
    out = capsys.readouterr().out
    assert "rescoring 6 committed teacher answers" in out and '"generated": 0' in out
    # ...and the committed file keeps the provenance of the run that generated the answers
    assert "left unchanged" in out and files[0].read_bytes() == before

    assert main(_args(root, p, "stage=kd", "train.steps=2")) == 0
    summary = json.loads((root / "runs" / "cli" / "summary.json").read_text())
    assert len(summary["losses"]) == 2 and summary["val_generation"]["n"] == 2
    assert (root / "runs" / "cli" / "tb").is_dir()
    assert (root / "results" / "kd_cli.png").stat().st_size > 1000
    assert json.loads((root / "results" / "kd_cli.json").read_text())["losses"] == summary["losses"]
    with pytest.raises(FileExistsError, match="--resume"):
        main(_args(root, p, "stage=kd", "train.steps=2"))
    assert main(["--resume", *_args(root, p, "stage=kd", "train.steps=3")]) == 0
    summary = json.loads((root / "runs" / "cli" / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and len(summary["losses"]) == 1

    # the one loader serves the run: the preset with the checkpoint's trained parameters on top
    import numpy as np

    from jaxkd.models import load_pretrained
    from jaxkd.serving import load_model

    trained = load_model(root / "runs" / "cli")
    base = load_pretrained(str(p["student"]))
    cfg_dict = json.loads((root / "runs" / "cli" / "config.json").read_text())
    assert trained.step == 3 and cfg_dict["train"]["steps"] == 3
    w = lambda m: np.asarray(m.layers[0].mlp.up_proj.weight[...])  # noqa: E731
    e = lambda m: np.asarray(m.embed_tokens.weight[...])  # noqa: E731
    assert not np.array_equal(w(trained.model), w(base.model))   # trained
    assert np.array_equal(e(trained.model), e(base.model))       # frozen under no_embed


def test_config_error_exits_2(presets, capsys):
    root, p = presets
    assert main(_args(root, p, "distill.loss=kl")) == 2
    assert "allowed values" in capsys.readouterr().err
