"""General replay (jaxkd.distill.replay): the sampler's fixed share, the prompt file's checks, the
committed prompts kept apart from the retention sets, and stage=teacher + stage=kd end to end."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from jaxkd.config import CONFIG_DIR, ConfigError, ReplayConfig, RunConfig, load
from jaxkd.distill.replay import REPLAY_DOMAIN, load_replay_prompts
from jaxkd.distill.sampling import DomainSampler
from jaxkd.train.__main__ import main
from test_train_fixtures import byte_tokenizer, write_tiny_presets


def test_a_fixed_share_is_drawn_at_its_rate_whatever_the_other_weights_and_resumes_exactly():
    doms = ["a"] * 30 + ["b"] * 10 + [REPLAY_DOMAIN] * 5
    s = DomainSampler(doms, seed=3, fixed={REPLAY_DOMAIN: 0.25})
    assert s.prior() == pytest.approx({"a": 0.75, "b": 0.25})     # by count, over the free domains
    assert s.weights == pytest.approx({"a": 0.5625, "b": 0.1875, REPLAY_DOMAIN: 0.25})
    s.set_weights({"a": 1.0, "b": 3.0, REPLAY_DOMAIN: 0.9})         # a fixed domain's entry is ignored
    assert s.weights == pytest.approx({"a": 0.1875, "b": 0.5625, REPLAY_DOMAIN: 0.25})
    idx = s.next_indices(4000)
    assert abs(np.mean(idx >= 40) - 0.25) < 0.03                      # 4.4 binomial sd
    assert abs(np.mean((idx >= 30) & (idx < 40)) - 0.5625) < 0.035
    t = DomainSampler(doms, seed=3, fixed={REPLAY_DOMAIN: 0.25})
    t.set_state(s.get_state())
    assert np.array_equal(s.next_indices(64), t.next_indices(64))
    for bad in ({"zz": 0.2}, {REPLAY_DOMAIN: 1.0}, {REPLAY_DOMAIN: 0.0}):
        with pytest.raises(ValueError, match="fixed shares"):
            DomainSampler(doms, seed=0, fixed=bad)
    with pytest.raises(ValueError, match="at least one other domain"):
        DomainSampler([REPLAY_DOMAIN] * 3, seed=0, fixed={REPLAY_DOMAIN: 0.5})


def test_bad_prompt_files_and_settings_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="replay.prompts: .*nope.jsonl does not exist"):
        load_replay_prompts(tmp_path / "nope.jsonl")
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "r1", "category": "fact", "prompt": "Why is the sea salty?"}\n{"id": "r2"\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not JSON"):
        load_replay_prompts(p)
    p.write_text('{"id": "r1", "category": "fact", "prompt": "  "}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: needs non-empty string fields"):
        load_replay_prompts(p)
    p.write_text('{"id": "r1", "category": "fact", "prompt": "A?"}\n{"id": "r1", "category": "fact", "prompt": "B?"}\n')
    with pytest.raises(ValueError, match="id 'r1' repeated"):
        load_replay_prompts(p)
    for kw in ({"fraction": 0.0}, {"fraction": 1.0}, {"limit": -1}):
        with pytest.raises(ConfigError, match="replay."):
            ReplayConfig(**kw)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def test_committed_replay_prompts_are_general_and_apart_from_the_retention_sets():
    from jaxkd.data.general import load_general_text, load_sanity_qa

    rows = load_replay_prompts(ReplayConfig().prompts)
    assert len(rows) >= 100 and len({r["category"] for r in rows}) >= 6
    sanity = [q["prompt"] for q in load_sanity_qa()]
    text = load_general_text().lower()
    domain = re.compile(r"\b(bluetooth|wi-?fi|headphones?|earbuds?|speakers?|soundbars?|routers?|apps?|"
                        r"batter(y|ies)|charg(er|ing)|firmware|devices?|troubleshoot\w*|reset|pairing)\b", re.I)
    for r in rows:
        assert not domain.search(r["prompt"]), r            # training data for *general* behaviour
        assert r["prompt"].lower() not in text, r
        w = _words(r["prompt"])
        closest = max(len(w & _words(q)) / len(w | _words(q)) for q in sanity)
        assert closest < 0.5, (r, closest)                   # not a paraphrase of an evaluation prompt


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "category": "chat", "prompt": p}) + "\n" for i, p in
                               enumerate(["Why do cats purr?", "Name a sour fruit.", "What rhymes with moon?"])))
    return root, write_tiny_presets(root), prompts


def _args(root, p, prompts, *extra):
    return [f"student={p['student']}", f"teacher.preset={p['teacher']}", f"teacher.cache_dir={root / 'cache'}",
            f"teacher.answers_dir={root / 'answers'}", f"runs_dir={root / 'runs'}", "name=replay",
            "teacher.limit_per_split={train: 4, val: 2}", "teacher.sampling.max_new_tokens=6",
            "teacher.batch_size=4", "train.max_len=512", "train.ckpt_every=0", "train.final_generate=0",
            "domain_sampling.every_steps=1", "train.warmup_steps=0", "replay.enabled=true",
            f"replay.prompts={prompts}", "replay.fraction=0.5", "replay.max_new_tokens=5",
            "replay.batch_size=2", f"replay.cache_dir={root / 'rcache'}", f"replay.answers_dir={root / 'ranswers'}",
            "replay.val=1", "train.eval_every=2", *extra]


def test_teacher_stage_answers_replay_prompts_with_the_student_and_kd_draws_them(presets, capsys):
    root, p, prompts = presets
    cfg_path = str(CONFIG_DIR / "cpu_default.yaml")
    assert main(["--config", cfg_path, *_args(root, p, prompts, "stage=teacher")]) == 0
    out = capsys.readouterr().out
    assert "replay: the student" in out and "answers 3 general prompts" in out
    files = list((root / "ranswers").glob("*.jsonl"))
    assert [f.name for f in files] == ["student__none.jsonl"]          # the student preset answered
    lines = files[0].read_text().splitlines()
    assert json.loads(lines[0])["provenance"]["splits"] == {"replay": 3} and len(lines) == 4
    rows = [json.loads(x) for x in lines[1:]]
    assert {r["student_messages"][-1]["content"] for r in rows} == {
        "Why do cats purr?", "Name a sour fruit.", "What rhymes with moon?"}
    assert all(r["student_messages"] == r["teacher_messages"] for r in rows)   # ungrounded, same system prompt
    # a fresh clone: the replay top-k store is rebuilt from the committed answers, not regenerated
    shutil.rmtree(root / "rcache")
    assert main(["--config", cfg_path, *_args(root, p, prompts, "stage=teacher")]) == 0
    out = capsys.readouterr().out.split("replay: the student")[-1]
    assert "rescoring 3 committed" in out and "replay answers: all 3 prompts already in" in out
    # teacher.splits=[]: the replay answers alone, no teacher file touched
    shutil.rmtree(root / "rcache")
    teacher_files = sorted((root / "cache").iterdir())
    assert main(["--config", cfg_path, *_args(root, p, prompts, "stage=teacher", "teacher.splits=[]")]) == 0
    out = capsys.readouterr().out
    assert "teacher answers:" not in out and "loaded teacher" not in out and (root / "rcache").is_dir()
    assert sorted((root / "cache").iterdir()) == teacher_files

    from jaxkd.distill import kd as K

    cfg = load(RunConfig, cfg_path, _args(root, p, prompts, "stage=kd", "train.steps=4", "name=replay-kd"))
    seen: list[str] = []
    tok = byte_tokenizer()

    def capture(step, batch):
        seen.extend(tok.decode(r.tolist(), skip_special_tokens=True) for r in np.asarray(batch["input_ids"]))
        return batch

    res = K.run_kd(cfg, batch_hook=capture, log=lambda s: None, progress=False)
    rep = res.summary["replay"]
    assert (rep["examples"], rep["val_examples"], rep["fraction"]) == (2, 1, 0.5)
    assert res.summary["sampler"]["weights"][REPLAY_DOMAIN] == pytest.approx(0.5)   # re-weighting kept it
    replayed = sum(any(q in s for q in ("cats purr", "sour fruit")) for s in seen)
    assert len(seen) == 8 and 0 < replayed < 8
    assert not any("rhymes with moon" in s for s in seen)      # the held-out replay prompt is never trained on
    # its KL to the base is measured with the domain val (at step 2) and for the final parameters
    from jaxkd.train.metrics import read_metrics, val_curve

    curve = val_curve(read_metrics(cfg.run_dir / "metrics.jsonl"))
    assert [p["step"] for p in curve if "replay_kl" in p] == [2]
    assert np.isfinite(rep["val"]["kl"]) and rep["val"]["kl"] >= -1e-6
    with pytest.raises(ValueError, match="replay.val=3 holds out every one of the 3"):
        K.run_kd(load(RunConfig, cfg_path, _args(root, p, prompts, "stage=kd", "train.steps=1", "replay.val=3",
                                                 "name=replay-kd2")), log=lambda s: None, progress=False)
