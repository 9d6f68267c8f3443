"""demo.probe: spoken questions over /ws, timed from the end of the upload (scripted engine)."""

from __future__ import annotations

import json

import pytest

from demo import probe
from demo.testing import espeak_available


def test_only_local_websocket_urls():
    assert probe.check_local("ws://127.0.0.1:7860/ws") == "ws://127.0.0.1:7860/ws"
    for bad in ("ws://example.com/ws", "http://127.0.0.1:7860/ws", "ws://10.0.0.2:7860/ws"):
        with pytest.raises(probe.ProbeError, match="on this machine"):
            probe.check_local(bad)
    assert probe.main(["--url", "ws://example.com/ws", "--out", ""]) == 2
    assert probe.main(["--url", "ws://127.0.0.1:9/ws", "--out", ""]) == 2  # nothing listening
    with pytest.raises(SystemExit):  # an in-process engine and a URL at once
        probe.main(["--url", "ws://127.0.0.1:1/ws", "--engine", "jaxkd", "--out", ""])


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing: run `make system-deps`")
def test_probe_times_transcript_then_tokens_and_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    assert probe.main(["--questions", "1", "--reps", "4", "--out", ""]) == 2  # fewer than 5 timed
    out = tmp_path / "voice_probe"
    assert probe.main(["--questions", "1", "--reps", "5", "--warmup", "0", "--out", str(out),
                       "engine.scripted_token_delay_s=0.01", "tts.enabled=false"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    (run,) = res["runs"]
    (q,) = run["questions"]
    assert run["engine"] == "scripted" and len(q["raw"]) == 5 and res["reps"] == 5
    assert "earbuds" in q["transcript"].lower() and q["transcripts_identical"]
    assert 2.0 < q["audio_s"] < 6.0  # the ~3.6 s espeak-ng clip
    for r in q["raw"]:  # the order the server promises: transcript, tokens, done
        assert 0 < r["transcript_final_s"] <= r["first_token_s"] <= r["last_token_s"] <= r["done_s"]
    assert q["token_msgs"] > 10 and q["answer"].startswith("1. ")
    for m in probe.METRICS:
        assert q[m]["min"] <= q[m]["median"] and run["overall"][m]["n"] == 5
    md = out.with_suffix(".md").read_text()
    assert "| my bluetooth earbuds keep disconnecting from my laptop |" in md and "Machine:" in md
