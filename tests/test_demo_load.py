"""A small loopback load test (the committed 20-client figures come from `python -m demo.loadtest`):
every request ends in an answer or a clear refusal, /health answers throughout, speech is really
sent (or the run refuses to start), and the report says what was sent."""

from __future__ import annotations

import pytest

from demo import loadtest
from demo.loadtest import run_load, to_markdown
from demo.testing import espeak_available


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing: run `make system-deps`")
def test_small_load_rejects_excess_clearly_and_loses_nothing():
    r = run_load(clients=8, engine="scripted", audio_every=4, client_ids=6,
                 overrides=("limits.ask_rate=1/minute", "limits.queue_size=1", "engine.max_batch=2",
                            "engine.scripted_token_delay_s=0.05"))
    assert r["lost"] == 0, r["per_client"]
    assert r["health"]["failures"] == 0 and r["health"]["polls"] >= 3
    # ids c0 and c1 each have two clients and a budget of one ask per minute.
    assert r["rejected_rate_limited"] == 2, r["outcomes"]
    # Six asks reach 2 running + 1 waiting at about the same time.
    assert r["rejected_busy"] >= 1 and r["answered"] >= 3, r["outcomes"]
    assert r["answered"] + r["rejected_busy"] + r["rejected_rate_limited"] == 8, r["outcomes"]
    # Clients 0 and 4 spoke; the server transcribed both before answering or refusing.
    assert (r["audio_clients"], r["text_clients"], r["audio_transcribed"]) == (2, 6, 2)
    for c in r["per_client"]:
        if c["kind"] == "audio":
            assert "earbuds" in c["transcript"].lower(), c
        else:
            assert c["transcript"] is None
        if c["outcome"] in ("busy", "rate_limited"):
            assert c["retry_after"] >= 1
        if c["outcome"] == "done":
            assert c["steps"] == 4
    assert r["queue_after"]["worker_alive"] and r["queue_after"]["waiting"] == 0
    md = to_markdown([r], "test")
    assert "| scripted | 8 | 2 / 6 |" in md and "queue 1 waiting + 2 running at once" in md
    assert "scripted: 2 of 8 clients sent speech (every 4th client; 2 of them got a final " \
           "transcript back), 6 sent text" in md


def test_no_speech_synthesiser_fails_the_run_instead_of_sending_text(monkeypatch, capsys):
    monkeypatch.setattr("demo.testing.espeak_available", lambda: False)
    with pytest.raises(loadtest.SpeechUnavailable, match="espeak-ng.*not installed.*--audio-every 0"):
        run_load(clients=4, engine="scripted", audio_every=2)
    assert loadtest.main(["--clients", "4"]) == 2
    assert "espeak-ng" in capsys.readouterr().err
