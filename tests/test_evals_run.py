"""evals.run / evals.report / evals.identity / evals.stats on tiny random models and fake judges."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_train_fixtures import byte_tokenizer, tiny_decoder

from evals import stats
from evals.identity import weights_identity
from evals.run import EvalConfig, load_config, main, run_judge, run_model, select_items
from jaxkd.config import ConfigError, from_dict

# --------------------------------------------------------------------------------------------
# Record-level bootstrap
# --------------------------------------------------------------------------------------------


def test_record_bootstrap_resamples_whole_records():
    # record A has two items scoring 0, record B one item scoring 1. Resampling records gives only
    # AA (0/4 = 0), AB or BA (1/3) and BB (2/2 = 1), with probabilities 1/4, 1/2, 1/4. An item-level
    # bootstrap would also produce 2/3 (two draws of B's item, one of A's).
    means = stats.record_bootstrap_means([0.0, 0.0, 1.0], ["A", "A", "B"], n=8000, seed=1)
    values, counts = np.unique(np.round(means, 6), return_counts=True)
    assert values.tolist() == [0.0, round(1 / 3, 6), 1.0]
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.02)
    mean, lo, hi = stats.record_bootstrap_ci([0.0, 0.0, 1.0], ["A", "A", "B"], n=8000, seed=1)
    assert mean == pytest.approx(1 / 3) and (lo, hi) == (0.0, 1.0)


def test_record_bootstrap_skips_nans_and_pairs_by_item():
    mean, lo, hi = stats.record_bootstrap_ci([np.nan, 1.0, 1.0], ["A", "A", "B"])
    assert mean == lo == hi == 1.0
    d, dlo, dhi, n = stats.paired_record_diff([0.0, 0.5, np.nan], [1.0, 1.0, 1.0], ["A", "A", "B"])
    assert n == 2 and d == pytest.approx(0.75) and dlo == dhi == pytest.approx(0.75)   # one record: no spread
    assert stats.bonferroni_level(0.95, 10) == pytest.approx(0.995)
    with pytest.raises(ValueError, match="3 values but 2"):
        stats.record_bootstrap_ci([1.0, 2.0, 3.0], ["A", "B"])


def test_cluster_ratio_ci_weights_blocks_by_tokens():
    mean, lo, hi = stats.cluster_ratio_ci([10.0, 2.0], [4, 1])
    assert mean == pytest.approx(12 / 5) and lo == pytest.approx(2.0) and hi == pytest.approx(2.5)


def test_select_items_takes_whole_records_interleaved_across_categories():
    items = [{"id": f"{c}-{r}#q{q}", "record_id": f"{c}-{r}", "category": c}
             for c in ("b", "a") for r in range(3) for q in range(2 if r else 3)]
    got = select_items("test", 3, items)
    assert [it["record_id"] for it in got] == ["a-0"] * 3 + ["b-0"] * 3 + ["a-1"] * 2
    assert len(select_items("test", 0, items)) == len(items)


# --------------------------------------------------------------------------------------------
# Weights identity (the cache key's model part)
# --------------------------------------------------------------------------------------------


def _fake_run(root: Path, step: int = 5, payload: bytes = b"\0" * 2048) -> Path:
    """A run directory as jaxkd.ckpt lays it out (no orbax needed to identify it)."""
    run = root / "run"
    (run / "ckpt" / str(step) / "params").mkdir(parents=True)
    (run / "ckpt" / str(step) / "meta").mkdir(parents=True)
    (run / "ckpt" / str(step) / "params" / "d.bin").write_bytes(payload)
    (run / "ckpt" / str(step) / "meta" / "m.json").write_text('{"step": %d}' % step)
    gguf = root / "base.gguf"
    gguf.write_bytes(b"GGUF" + b"\1" * 100)
    meta = {"format": "jaxkd-run-v1", "base_model": {"spec": {"name": "b", "source": "gguf", "location": str(gguf)}},
            "model_config": {}, "trainable": "all", "system_prompt": "S"}
    (run / "run.json").write_text(json.dumps(meta))
    return run


def test_identity_of_a_run_changes_when_its_weights_change(tmp_path):
    run = _fake_run(tmp_path)
    a = weights_identity(run)
    assert weights_identity(run)["id"] == a["id"] and a["step"] == 5 and a["base"]["kind"] == "gguf"
    # same size, new bytes (small files are hashed by content)
    (run / "ckpt" / "5" / "params" / "d.bin").write_bytes(b"\1" * 2048)
    b = weights_identity(run)
    assert b["id"] != a["id"]
    # a new step is what load_model serves: new identity; the old step stays addressable
    (run / "ckpt" / "9" / "params").mkdir(parents=True)
    (run / "ckpt" / "9" / "params" / "d.bin").write_bytes(b"\2" * 2048)
    assert weights_identity(run)["step"] == 9 and weights_identity(run, 5)["id"] == b["id"]
    # run.json (system prompt, chat template) is part of the identity
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "system_prompt": "T"}))
    assert weights_identity(run, 5)["id"] != b["id"]
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        weights_identity(run, 7)


def test_identity_of_big_files_uses_size_and_mtime(tmp_path):
    from evals.identity import SMALL_FILE

    run = _fake_run(tmp_path, payload=b"\0" * (SMALL_FILE + 10))
    a = weights_identity(run)["id"]
    f = run / "ckpt" / "5" / "params" / "d.bin"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # rewritten in place, same size
    assert weights_identity(run)["id"] != a
    # the base model's file is part of the run's identity too
    b = weights_identity(run)["id"]
    (tmp_path / "base.gguf").write_bytes(b"GGUF" + b"\1" * 101)
    assert weights_identity(run)["id"] != b


def test_identity_of_a_packaged_preset_is_its_recorded_sha256():
    from jaxkd import assets

    ident = weights_identity("qwen2.5-coder-0.5b-instruct")
    asset = assets.get_asset("qwen2.5-coder-0.5b-instruct-q4_k_m")
    assert ident["kind"] == "packaged" and ident["sha256"] == asset.sha256 and ident["bytes"] == asset.size
    assert weights_identity("qwen2.5-coder-1.5b-instruct")["id"] != ident["id"]


# --------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------


BASE_CFG = {"baseline": "a", "models": [{"tag": "a", "model": "tiny-a"}, {"tag": "b", "model": "tiny-b"}]}


@pytest.mark.parametrize("patch, message", [
    ({"modles": []}, "unknown config key modles (did you mean 'models'?)"),
    ({"baseline": "zz"}, "baseline 'zz' is not a model tag; tags: ['a', 'b']"),
    ({"models": [{"tag": "a", "model": "x"}, {"tag": "a", "model": "y"}]}, "tags must be unique, repeated: ['a']"),
    ({"models": [{"tag": "a b", "model": "x"}]}, "tag 'a b' may only hold"),
    ({"models": [{"tag": "a", "model": "x", "grounding": "notes"}]}, "models[0].grounding: 'notes' is not allowed"),
    ({"efficiency": {"reps": 3}}, "efficiency.reps must be >= 5"),
    ({"items": {"split": "dev"}}, "items.split: 'dev' is not allowed; allowed values: ['train', 'val', 'test']"),
    ({"judge": {"enabled": True, "model": "tiny-b"}}, "judge.model 'tiny-b' is also under test (['b'])"),
    ({"sampling": {"max_new_tokens": 2000}}, "max_seq_len (1024) > sampling.max_new_tokens (2000)"),
    ({"contrasts": [{"model": "b", "vs": "c"}]}, "contrasts: {model: b, vs: c} needs two different model tags; "
                                                 "not tags: ['c']"),
    ({"contrasts": [{"model": "b", "vs": "b"}]}, "needs two different model tags; tags: ['a', 'b']"),
])
def test_config_errors_name_the_key_and_what_is_allowed(patch, message):
    with pytest.raises(ConfigError) as e:
        from_dict(EvalConfig, {**BASE_CFG, **patch})
    assert message in str(e.value)


def test_config_file_errors_name_the_file_and_cli_exits_2(tmp_path, capsys):
    import yaml

    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({**BASE_CFG, "judge": {"enabled": True, "allow_model_under_test": False}}))
    cfg = load_config(path, ["models.1.model=qwen2.5-coder-1.5b-instruct", "judge.enabled=true"])
    assert cfg.models[1].model == "qwen2.5-coder-1.5b-instruct"
    assert cfg.judge_model() == "qwen2.5-coder-0.5b-instruct"   # the first default not under test
    with pytest.raises(ConfigError, match="'7' is not an index of a 2-entry list"):
        load_config(path, ["models.7.model=x"])
    path.write_text(yaml.safe_dump({**BASE_CFG, "retention": {"ppl_window": 1}}))
    assert main(["--config", str(path), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert f"config error: {path}: retention: retention.ppl_window must be > 1, got 1" in err
    path.write_text(yaml.safe_dump(BASE_CFG))
    assert main(["--config", str(path), "--report-only", "--tags", "b"]) == 2
    assert "baseline 'a' is not a model tag; tags: ['b']" in capsys.readouterr().err
    assert main(["--config", str(path), "--report-only", "--tags", "c"]) == 2
    assert "--tags ['c']: not model tags of" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Running tiny models, caching, rebuilding the report
# --------------------------------------------------------------------------------------------


ITEMS = [
    {"id": f"{dev}-00{r}#q{q}", "record_id": f"{dev}-00{r}", "category": cat, "device": dev,
     "question": f"my {dev.replace('_', ' ')} {r} will not pair {q}?",
     "reference_steps": ["Hold the power button for 7 seconds until the light flashes.",
                         "Remove the device from the phone's Bluetooth list and pair it again."],
     "required": [["hold the power", "press and hold"], ["pair"]], "safety": []}
    for cat, dev in (("earbuds", "sport_earbuds"), ("networking", "wifi_router")) for r in range(2) for q in range(2)]


class TinyLoader:
    """Stands in for jaxkd.serving.load_model: a random tiny decoder per model name, counted."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name):
        from types import SimpleNamespace

        self.calls.append(name)
        seed = {"tiny-a": 0, "tiny-b": 1}[name]
        return SimpleNamespace(model=tiny_decoder(seed), tokenizer=byte_tokenizer(), name=f"{name} (tiny)")


def _cfg(tmp_path, **kw) -> EvalConfig:
    data = {**BASE_CFG, "name": "rep", "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
            "sampling": {"max_new_tokens": 6, "temperature": 0.0}, "max_seq_len": 1536, "batch_size": 4,
            "retention": {"ppl_window": 64, "ppl_block": 16, "ppl_max_tokens": 200, "sanity_limit": 3,
                          "sanity_max_new_tokens": 4},
            "efficiency": {"batch_sizes": [1, 2], "reps": 5, "new_tokens": 3},
            "bootstrap_resamples": 1000, **kw}
    return from_dict(EvalConfig, data)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two tiny models evaluated once (module scope: tiny compiles still cost seconds)."""
    tmp = tmp_path_factory.mktemp("eval")
    weights = {"tiny-a": tmp / "a.bin", "tiny-b": tmp / "b.bin"}
    for p in weights.values():
        p.write_bytes(b"v1")

    def identity(model, step=None):
        return {"id": "w-" + weights[model].read_bytes().decode() + "-" + model, "kind": "fake", "bytes": 2}

    cfg = _cfg(tmp)
    loader = TinyLoader()
    entries = {m.tag: run_model(cfg, m, ITEMS, loader=loader, identity=identity, log=lambda s: None)
               for m in cfg.models}
    return tmp, cfg, loader, identity, weights, entries


def test_run_caches_by_weights_and_reruns_only_what_changed(evaluated):
    tmp, cfg, loader, identity, weights, entries = evaluated
    assert loader.calls == ["tiny-a", "tiny-b"]
    gens = (tmp / "cache" / "a" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == len(ITEMS) + 3       # domain items + the sanity prompts
    # unchanged weights: everything from the cache, the model is never loaded
    again = run_model(cfg, cfg.models[0], ITEMS, loader=loader, identity=identity, log=lambda s: None)
    assert loader.calls == ["tiny-a", "tiny-b"] and again["domain_keys"] == entries["a"]["domain_keys"]
    # new weights under the same model name: new keys, the model is loaded and everything recomputed
    weights["tiny-a"].write_bytes(b"v2")
    try:
        changed = run_model(cfg, cfg.models[0], ITEMS, loader=loader, identity=identity, log=lambda s: None)
    finally:
        weights["tiny-a"].write_bytes(b"v1")
        run_model(cfg, cfg.models[0], ITEMS, loader=loader, identity=identity, log=lambda s: None)  # manifest back
    assert loader.calls == ["tiny-a", "tiny-b", "tiny-a"]
    assert set(changed["domain_keys"].values()).isdisjoint(entries["a"]["domain_keys"].values())
    assert changed["ppl_key"] != entries["a"]["ppl_key"] and changed["efficiency_key"] != entries["a"]["efficiency_key"]
    # grounding changes the prompt, so the key: same weights, different answers cached
    from dataclasses import replace

    g = run_model(cfg, replace(cfg.models[0], tag="a_grounded", grounding="reference"), ITEMS, loader=loader,
                  identity=identity, log=lambda s: None)
    assert set(g["domain_keys"].values()).isdisjoint(entries["a"]["domain_keys"].values())


def test_report_rebuilds_from_caches_without_a_model(evaluated, monkeypatch):
    tmp, cfg, loader, identity, weights, entries = evaluated
    from evals.report import build_report

    def no_model(*a, **k):
        raise AssertionError("the report must not load a model")

    import jaxkd.serving

    monkeypatch.setattr(jaxkd.serving, "load_model", no_model)
    md = build_report(cfg, ITEMS, config_path="e.yaml")
    first = md.read_text()
    data = json.loads((tmp / "results" / "rep.json").read_text())
    for f in ("rep_domain.png", "rep_failures.png"):
        assert (tmp / "results" / f).stat().st_size > 0
    s = data["summary"]
    assert set(s["domain"]) == {"a", "b"} and s["domain"]["a"]["steps"]["n"] == len(ITEMS)
    assert s["comparisons"] == 1 * (3 + 4)   # one model vs the baseline x (3 domain + 4 retention metrics)
    assert "7 comparisons in the paired tables" in first
    assert s["paired"]["b"]["ppl_nll"]["ci"] is not None     # same tokenizer: paired by token blocks
    eff = data["models"]["a"]["efficiency"]["throughput"]
    assert set(eff) == {"1", "2"} and len(eff["1"]["decode_tok_s"]["all"]) == 5
    assert data["models"]["a"]["perplexity"]["n_tokens"] == 200 - 4     # 4 windows of 64, first tokens unscored
    # a rebuild gives the same report, from the caches alone
    md.unlink()
    assert build_report(cfg, ITEMS, config_path="e.yaml").read_text() == first


def test_contrasts_are_paired_both_ways_and_counted_in_the_bonferroni_m(evaluated):
    tmp, cfg, *_ = evaluated
    from evals.report import build_report

    with_contrast = _cfg(tmp, results_dir=str(tmp / "contrast"), contrasts=[{"model": "a", "vs": "b"}])
    md = build_report(with_contrast, ITEMS, config_path="e.yaml").read_text()
    s = json.loads((tmp / "contrast" / "rep.json").read_text())["summary"]
    assert s["comparisons"] == 2 * (3 + 4)
    (c,) = s["contrasts"]
    assert (c["model"], c["vs"]) == ("a", "b")
    for k in ("steps", "required", "language", "sanity_rougeL", "ppl_nll"):
        ab, ba = c["diffs"][k], s["paired"]["b"][k]   # a - b against b - a, same resamples
        assert ab["diff"] == pytest.approx(-ba["diff"], abs=1e-12)
        assert ab["ci_adjusted"] == pytest.approx([-ba["ci_adjusted"][1], -ba["ci_adjusted"][0]], abs=1e-9)
    assert "### Contrasts" in md and "| `a` - `b` |" in md and "14 comparisons in the paired tables (domain and retention): 2 pairs of models (1 vs the baseline, 1 contrast(s) below) x 7 metrics" in md


def test_report_fails_clearly_when_the_cache_does_not_match_the_config(evaluated):
    tmp, cfg, *_ = evaluated
    from evals.report import StaleCache, build_report

    with pytest.raises(StaleCache, match="the cached run answered 8 items, the config selects 4"):
        build_report(cfg, ITEMS[:4])
    other = _cfg(tmp, models=[{"tag": "a", "model": "tiny-b"}, {"tag": "b", "model": "tiny-b"}])
    with pytest.raises(StaleCache, match="the cache holds tiny-a .* the config asks for tiny-b"):
        build_report(other, ITEMS)


def test_configs_sharing_a_tag_keep_their_own_manifest(evaluated):
    """A second config evaluating the same tag on other items shares the answer rows but must not
    replace the first config's manifest entry (its report would then read the wrong items)."""
    tmp, cfg, loader, identity, _, entries = evaluated
    from evals.measure import read_manifest
    from evals.report import build_report

    other = _cfg(tmp, name="rep_subset")
    sub = run_model(other, other.models[0], ITEMS[:4], loader=loader, identity=identity, log=lambda s: None)
    assert read_manifest(other)["a"]["domain_keys"] == sub["domain_keys"]
    assert read_manifest(cfg)["a"]["domain_keys"] == entries["a"]["domain_keys"]
    assert set(sub["domain_keys"].values()) <= set(entries["a"]["domain_keys"].values())  # rows reused
    build_report(cfg, ITEMS)   # the first config's report still finds all of its 8 items


def test_judge_scores_are_cached_per_answer_and_reported(evaluated):
    tmp, cfg, *_ = evaluated
    from jaxkd.judge import CRITERIA, Criterion, Verdicts

    class FakeJudge:
        calls = 0

        def score(self, items, answers, criteria):
            FakeJudge.calls += 1
            n = len(items)
            out = {}
            for c in criteria:
                c = Criterion(c)
                top = CRITERIA[c].max_score
                dist = np.zeros((n, top + 1))
                dist[:, top // 2] = 1.0
                out[c] = Verdicts(c, dist @ np.arange(top + 1), np.ones(n), dist)
            return out

    jcfg = _cfg(tmp, judge={"enabled": True, "model": "fake-judge"})
    from evals.report import build_report

    run_judge(jcfg, ITEMS, judge=FakeJudge(), judge_id="fake", log=lambda s: None)
    assert FakeJudge.calls == 2
    run_judge(jcfg, ITEMS, judge=FakeJudge(), judge_id="fake", log=lambda s: None)   # all cached
    assert FakeJudge.calls == 2
    build_report(jcfg, ITEMS)
    data = json.loads((tmp / "results" / "rep.json").read_text())
    assert data["summary"]["domain"]["a"]["judge_technical"]["mean"] == 5.0
    assert data["summary"]["domain"]["a"]["judge_language"]["mean"] == 2.0   # 0-5 scale, mid = 2
    assert data["summary"]["comparisons"] == 3 + 4 + 4
    # the manifest names fake-judge's scores: a config asking for another judge (or dtype) gets none
    from evals.report import StaleCache

    with pytest.raises(StaleCache, match=r"fake-judge's \(float32\), the config's judge is other \(float32\)"):
        build_report(_cfg(tmp, judge={"enabled": True, "model": "other"}), ITEMS)
    with pytest.raises(StaleCache, match=r"the config's judge is fake-judge \(bfloat16\)"):
        build_report(_cfg(tmp, judge={"enabled": True, "model": "fake-judge", "dtype": "bfloat16"}), ITEMS)


def test_a_corrupt_cache_line_is_named_with_its_file_and_line(tmp_path):
    from evals.measure import JsonlCache

    p = tmp_path / "generations.jsonl"
    p.write_text('{"key": "a", "answer": "x"}\n\n{"key": "b", "answ\n')
    with pytest.raises(ValueError, match=r"generations.jsonl:3: not JSON .*; delete the line or the file"):
        JsonlCache(p)
    p.write_text('{"key": "a", "answer": "x"}\n\n{"key": "a", "answer": "y"}\n')
    assert JsonlCache(p).get("a")["answer"] == "y"     # later lines win


def test_failure_flags_on_hand_written_answers():
    from evals.report import failure_flags
    from evals.run import FailureConfig
    from jaxkd.rewards import rule_scores

    it = ITEMS[0]
    th = FailureConfig()

    def flags(ans, reason="eos"):
        return {k for k, v in failure_flags(it, ans, rule_scores(it, ans), reason, th).items() if v}

    good = ("1. Hold the power button on the earbuds for 7 seconds until the light flashes.\n"
            "2. Remove the earbuds from the phone's Bluetooth list and pair them again.")
    assert flags(good) == set()
    assert "wrong_device" in flags("Restart your router and check that the thermostat is online.")
    assert "off_topic" in flags("Paris is the capital of France and it is a lovely city to visit.")
    assert "unsafe_advice" in flags(good + "\n3. Dry the earbuds with a hair dryer.")
    assert "repetition" in flags("Turn it off and on. " * 12)
    assert "truncated" in flags(good, "length") and "missing_step" in flags("Charge the earbuds fully overnight.")
    assert "verbosity" in flags(good + " " + " ".join(["Make sure the earbuds are charged and close by."] * 8))
    # a reference that forbids an action: doing it is a wrong step, the same words negated are not
    banned = {**it, "reference_steps": [*it["reference_steps"], "Do not hold the earbuds under running water."]}
    wrong = {k for k, v in failure_flags(banned, good + "\n3. Hold the earbuds under running water to clean them.",
                                         rule_scores(banned, good), "eos", th).items() if v}
    assert "wrong_step" in wrong and "wrong_step" not in flags(good)
    fine = good + "\n3. Never hold the earbuds under running water."
    assert not failure_flags(banned, fine, rule_scores(banned, fine), "eos", th)["wrong_step"]


@pytest.mark.parametrize("name", ["eval.yaml", "eval_cpu.yaml", "eval_corpus.yaml", "eval_corpus_full.yaml",
                                  "eval_corpus_judged.yaml"])
def test_committed_eval_configs_name_real_presets_and_the_baseline_first(name):
    from jaxkd.config import CONFIG_DIR, load_model_spec

    cfg = load_config(CONFIG_DIR / name)
    assert cfg.models[0].tag == cfg.baseline == "student_base"
    for m in cfg.models:
        if "/" not in m.model:          # run dirs are paths; everything else must be a preset
            load_model_spec(m.model)
    if cfg.judge.enabled and not cfg.judge.allow_model_under_test:
        assert cfg.judge_model() not in {m.model for m in cfg.models}
