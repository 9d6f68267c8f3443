"""The Gradio UI's API: each event has an explicit, unique name (no "/transcribe_1"), internal
steps are private, and the named endpoints work through gradio_client on a live server."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from demo.engine import count_steps
from demo.settings import load_demo_config
from demo.testing import espeak_available, espeak_wav
from demo.ui import API_NAMES, build_ui


@pytest.fixture(scope="module", autouse=True)
def _gradio_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    yield
    mp.undo()


def test_every_event_has_an_intended_name_or_is_private():
    svc = SimpleNamespace(cfg=load_demo_config(), engine=SimpleNamespace(name="scripted"), tts=None)
    ui = build_ui(svc)
    named = set(ui.get_api_info()["named_endpoints"])
    assert named == set(API_NAMES) == {"/transcribe", "/ask"}
    deps = ui.config["dependencies"]
    public = [d for d in deps if d.get("api_visibility") == "public"]
    assert sorted("/" + d["api_name"] for d in public) == sorted(API_NAMES)
    assert not [d["api_name"] for d in deps if re.search(r"_\d+$", str(d.get("api_name")))]
    # The two mic triggers share one endpoint; so do the Ask button and Enter in the textbox.
    triggers = {d["api_name"]: sorted(t[1] for t in d["targets"]) for d in public}
    assert triggers == {"transcribe": ["stop_recording", "upload"], "ask": ["click", "submit"]}


@pytest.fixture(scope="module")
def live_url():
    from demo.app import Services, create_app
    from demo.engine import ScriptedEngine
    from demo.loadtest import LoopbackServer

    cfg = load_demo_config(overrides=["limits.ask_rate=1000/minute", "limits.transcribe_rate=1000/minute"])
    svc = Services.build(cfg, engine=ScriptedEngine(0.0), warmup=False)
    with LoopbackServer(create_app(svc), 2 * cfg.limits.max_body_bytes) as server:
        yield f"http://127.0.0.1:{server.port}/"
    svc.queue.close()


def test_gradio_client_sees_and_calls_the_named_endpoints(live_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(live_url, verbose=False, download_files=str(tmp_path))
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == set(API_NAMES) and not api["unnamed_endpoints"]
    answer, status, _audio = client.predict("my tv remote does not work", "any", False, api_name="/ask")
    assert status.startswith("Done in") and "4 steps" in status, status
    assert count_steps(answer) == 4, answer  # the scripted engine's canned 4-step answer
    for gone in ("/answer", "/answer_1", "/transcribe_1", "/typed_answer"):
        with pytest.raises(ValueError, match="Cannot find a function"):
            client.predict("my tv remote does not work", "any", False, api_name=gone)
    if espeak_available():
        wav = tmp_path / "q.wav"
        espeak_wav("my bluetooth earbuds keep disconnecting from my laptop", wav)
        transcript, status = client.predict(handle_file(str(wav)), "earbuds", api_name="/transcribe")
        assert "earbuds" in transcript.lower() and "Heard you" in status, (transcript, status)
