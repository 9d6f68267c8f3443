"""A small loopback load test (the committed 20-client figures come from `python -m demo.loadtest`):
every request ends in an answer or a clear refusal, /health answers throughout."""

from __future__ import annotations

from demo.loadtest import run_load, to_markdown


def test_small_load_rejects_excess_clearly_and_loses_nothing():
    r = run_load(clients=8, engine="scripted", audio_every=4, client_ids=6,
                 overrides=("limits.ask_rate=1/minute", "limits.queue_size=2",
                            "engine.scripted_token_delay_s=0.05"))
    assert r["lost"] == 0, r["per_client"]
    assert r["health"]["failures"] == 0 and r["health"]["polls"] >= 3
    # ids c0 and c1 each have two clients and a budget of one ask per minute.
    assert r["rejected_rate_limited"] == 2, r["outcomes"]
    # Six asks reach a queue of 1 running + 2 waiting at about the same time.
    assert r["rejected_busy"] >= 1 and r["answered"] >= 3, r["outcomes"]
    assert r["answered"] + r["rejected_busy"] + r["rejected_rate_limited"] == 8, r["outcomes"]
    assert r["audio_clients"] == 2
    for c in r["per_client"]:
        if c["outcome"] in ("busy", "rate_limited"):
            assert c["retry_after"] >= 1
        if c["outcome"] == "done":
            assert c["steps"] == 4
    assert r["queue_after"]["worker_alive"] and r["queue_after"]["waiting"] == 0
    assert "| scripted | 8 |" in to_markdown([r], "test")
