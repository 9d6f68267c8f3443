"""Browser checks of the Gradio UI that need no model (scripted engine): upload errors land in
the status line, typed questions stream steps, read-back produces audio, share reports back.
The real-model mic test lives in test_demo_e2e.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from demo.app import Services, create_app
from demo.loadtest import LoopbackServer
from demo.settings import load_demo_config
from demo.testing import espeak_available, espeak_wav, silence_wav

pytestmark = [pytest.mark.browser, pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists() or not shutil.which("espeak-ng"),
    reason="chromium or espeak-ng missing: run `make system-deps`")]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    import os

    from playwright.sync_api import sync_playwright

    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    cfg = load_demo_config(overrides=["engine.kind=scripted", "engine.scripted_token_delay_s=0.03"])
    svc = Services.build(cfg)
    with LoopbackServer(create_app(svc), 2 * cfg.limits.max_body_bytes) as server, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                     args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/", wait_until="networkidle")
        yield page
        browser.close()
    svc.queue.close()


def upload(page, path: Path) -> None:
    page.locator("#mic button[aria-label='Upload file']").click()
    page.locator("#mic input[type=file]").set_input_files(str(path))


def test_typed_question_streams_steps_and_reads_back(page):
    from playwright.sync_api import expect

    page.get_by_label("Read the answer aloud").check()
    page.locator("#transcript textarea").fill("my tv remote does not work")
    page.locator("#ask").click()
    expect(page.locator("#status")).to_contain_text("Done in", timeout=30_000)
    expect(page.locator("#answer ol li")).to_have_count(4)
    expect(page.locator("#readback audio[src]")).to_have_count(1, timeout=30_000)
    page.get_by_label("Read the answer aloud").uncheck()


def test_share_button_reports_in_status(page):
    from playwright.sync_api import expect

    page.locator("#share").click()
    expect(page.locator("#status")).to_contain_text(re.compile("copied|share", re.I))


def test_uploaded_silence_gets_clear_status_then_speech_works(page, tmp_path):
    from playwright.sync_api import expect

    silent = tmp_path / "silent.wav"
    silent.write_bytes(silence_wav())
    upload(page, silent)
    expect(page.locator("#status")).to_contain_text("silent", timeout=30_000)
    expect(page.locator("#transcript textarea")).to_have_value("")
    page.locator("#mic button[aria-label='Clear']").first.click()
    spoken = tmp_path / "spoken.wav"
    espeak_wav("my bluetooth earbuds keep disconnecting from my laptop", spoken)
    upload(page, spoken)
    expect(page.locator("#transcript textarea")).to_have_value(re.compile("earbuds", re.I),
                                                                timeout=30_000)
    expect(page.locator("#status")).to_contain_text("Done in", timeout=30_000)
