"""evals.stt_wer: the WER normaliser, question choice, noise at the stated SNR, and a small run
through the demo's real STT path (resumable from its item cache)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from demo.testing import espeak_available, wav_bytes
from evals import stt_wer as W


def test_normalise_drops_fillers_apostrophes_and_unifies_numbers_and_spelling():
    assert W.normalise("Um, I don't have THREE of the noise-canceling ones?? uh") == \
        ["i", "dont", "have", "3", "of", "the", "noise", "cancelling", "ones"]
    assert W.corpus_wer(["um so its 2 buds"], ["So it's two buds."]) == 0.0
    assert W.corpus_wer(["my wifi drops"], ["my wife drops"]) == pytest.approx(1 / 3)


def test_questions_are_voice_style_cover_every_category_and_are_fixed():
    qs = W.select_questions(24)
    rows = [json.loads(line) for line in W.HELDOUT.read_text().splitlines()]
    voice_cats = {r["category"] for r in rows if r["style"] == "voice"}
    assert len({q["id"] for q in qs}) == 24 and all(q["style"] == "voice" for q in qs)
    assert {q["category"] for q in qs} == voice_cats and len(voice_cats) >= 8
    assert [q["id"] for q in W.select_questions(24)] == [q["id"] for q in qs]
    with pytest.raises(ValueError, match="only .* voice-style questions"):
        W.select_questions(10_000)


def test_noise_is_mixed_at_the_stated_snr():
    t = np.arange(22_050 * 2) / 22_050
    clean = wav_bytes(0.5 * np.sin(2 * np.pi * 300 * t), 22_050)
    for snr in (10.0, 5.0, 0.0):
        noisy, measured = W.add_noise(clean, snr, seed=3)
        assert measured == pytest.approx(snr, abs=0.1)
        x, rate = W._read_wav(noisy)
        assert rate == 22_050 and np.max(np.abs(x)) <= 0.991  # scaled, not clipped


def test_bootstrap_and_paired_delta():
    same = [(1, 10), (0, 8), (3, 12)]
    assert W.paired_delta(same, same) == (0.0, 0.0, 0.0)
    lo, hi = W.bootstrap(same)
    assert lo <= 4 / 30 <= hi
    d, lo, hi = W.paired_delta([(0, 10)] * 5, [(2, 10)] * 5)
    assert d == pytest.approx(-0.2) and lo == pytest.approx(-0.2) and hi == pytest.approx(-0.2)


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing: run `make system-deps`")
def test_small_run_transcribes_scores_and_resumes_from_its_cache(tmp_path, monkeypatch):
    cache = tmp_path / "items.jsonl"
    cond = [W.CONDITIONS[0]]
    res = W.run(n=2, conditions=cond, cache=cache, log=lambda s: None)
    assert len(res["items"]) == 6 and len(cache.read_text().splitlines()) == 6
    row = res["table"][0]
    assert set(W.LEXICON_MODES) <= set(row)
    # Clean 160-wpm espeak speech of two questions: tiny.en gets most words right.
    assert row["device"]["wer"] < 0.35, [(i["reference"], i["hypothesis"]) for i in res["items"]]

    from demo.stt import Transcriber

    def no_stt(*a, **k):
        raise AssertionError("cached items must not be transcribed again")

    monkeypatch.setattr(Transcriber, "transcribe", no_stt)
    again = W.run(n=2, conditions=cond, cache=cache, log=lambda s: None)
    assert [i["hypothesis"] for i in again["items"]] == [i["hypothesis"] for i in res["items"]]
    md = W.to_markdown(again, "test")
    assert "oracle" in md and "| en-us 160 wpm |" in md
    out = tmp_path / "stt_wer"
    out.with_suffix(".json").write_text(json.dumps({**again, "command": "test"}))
    assert W.main(["--report", "--out", str(out)]) == 0
    assert out.with_suffix(".md").read_text() == md
