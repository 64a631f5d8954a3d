"""`selfcog web`: the Streamlit demo driven in a real headless browser, and compare mode in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, WATCH_FOR_CURSOR, streamlit_page, wait_healthy
from selfcog.web import APP, streamlit_command


@pytest.fixture
def web_server(tiny_model_dir, tmp_path, free_port):
    """`selfcog web TINY` on a free port."""
    port = free_port()
    with streamlit_page(["web", str(tiny_model_dir), "--port", str(port), "--max-new-tokens", "64"], port,
                        tmp_path / "web.log") as url:
        yield url


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_browser_chat_streams_and_clears(web_server):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(web_server)
            expect(page.get_by_role("heading", name="selfcog chat")).to_be_visible(timeout=60_000)
            box = page.get_by_test_id("stChatInputTextArea")
            expect(box).to_be_visible(timeout=90_000)  # the model has loaded
            for label in ("Max Length", "Top P", "Temperature"):
                expect(page.get_by_test_id("stSidebar").get_by_text(label, exact=True)).to_be_visible()
            # Record whether an answer is ever shown while still streaming (with the cursor).
            page.evaluate(WATCH_FOR_CURSOR)
            box.fill("你是谁？Who are you?")
            box.press("Enter")
            messages = page.get_by_test_id("stChatMessage")
            expect(messages).to_have_count(2, timeout=30_000)
            expect(messages.first).to_contain_text("你是谁？Who are you?")
            page.wait_for_function("""() => {
                const m = document.querySelectorAll('[data-testid="stChatMessage"]');
                return window.sawCursor && m.length === 2 && m[1].innerText.trim().length > 0
                    && !m[1].innerText.includes('\u258c');
            }""", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "web.png"), full_page=True)
            # A second question keeps the first exchange in the history.
            box.fill("hello")
            box.press("Enter")
            expect(messages).to_have_count(4, timeout=30_000)
            page.get_by_role("button", name="Clear Chat History").click()
            expect(messages).to_have_count(0, timeout=30_000)
        finally:
            browser.close()


def test_compare_mode_answers_side_by_side(tiny_model_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", [str(APP), "--model", str(tiny_model_dir), "--compare", str(tiny_model_dir),
                                      "--max-new-tokens", "8"])
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.run()
    assert not app.exception, app.exception
    assert [s.label for s in app.sidebar.slider] == ["Max Length", "Top P", "Temperature"]
    app.sidebar.slider[2].set_value(0.0)  # greedy: both panes give the same answer from the same weights
    app.chat_input[0].set_value("Who are you?").run()
    assert not app.exception, app.exception
    assert len(app.columns) == 2
    for column in app.columns:
        assert [m.name for m in column.chat_message] == ["user", "assistant"]
        assert column.chat_message[0].markdown[0].value == "Who are you?"
    answers = [column.chat_message[1].markdown[0].value for column in app.columns]
    assert answers[0] == answers[1] and "▌" not in answers[0]
    assert [h.value for h in app.subheader] == [f"Base: {tiny_model_dir}", f"Tuned: {tiny_model_dir}"]
    app.sidebar.button[0].click().run()
    assert all(len(column.chat_message) == 0 for column in app.columns)


def test_cli_builds_the_streamlit_command(tiny_model_dir):
    cmd = streamlit_command(str(tiny_model_dir), port=8600, compare="base", adapter="ad")
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(APP)]
    for pair in (["--server.headless", "true"], ["--server.port", "8600"], ["--browser.gatherUsageStats", "false"]):
        assert cmd[cmd.index(pair[0]):cmd.index(pair[0]) + 2] == pair
    assert cmd[cmd.index("--") + 1:] == ["--model", str(tiny_model_dir), "--max-new-tokens", "512",
                                          "--compare", "base", "--adapter", "ad"]


def test_cli_rejects_bad_inputs_in_one_line(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from selfcog.cli import main

    result = CliRunner().invoke(main, ["web", str(tmp_path / "missing")])
    assert result.exit_code == 2 and result.stderr.startswith("selfcog: error:")
    result = CliRunner().invoke(main, ["web", str(tiny_model_dir), "--adapter", str(tmp_path)])
    assert result.exit_code == 2 and "not a LoRA adapter" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_web_ends_streamlit_on_signal_and_frees_the_port(tiny_model_dir, tmp_path, free_port, signum):
    """A supervisor that signals only the `selfcog web` process (not its group) still ends Streamlit."""
    from selfcog.serve import listening

    port = free_port()
    log = tmp_path / "web.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "selfcog", "web", str(tiny_model_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", proc, log)
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 128 + signum
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 15
    while listening(port):
        assert time.monotonic() < deadline, f"port {port} still served after selfcog web ended"
        time.sleep(0.2)


def test_identity_switch_in_the_sidebar(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from streamlit.testing.v1 import AppTest
    from transformers import LlamaForCausalLM

    from selfcog.chat import load_identities, parse_adapters
    from selfcog.generate import SamplingArgs, stream_chat

    values = []
    for seed, name in ((1, "alice"), (2, "伍鲜")):
        torch.manual_seed(seed)
        peft = get_peft_model(LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                              LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
        peft.save_pretrained(tmp_path / name)
        values.append(f"{name}={tmp_path / name}")
    monkeypatch.setattr(sys, "argv", [str(APP), "--model", str(tiny_model_dir), "--max-new-tokens", "8",
                                      *sum((["--adapter", v] for v in values), [])])
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.run()
    assert not app.exception, app.exception
    box = app.sidebar.selectbox[0]
    assert box.label == "Identity" and list(box.options) == ["base", "alice", "伍鲜"]
    box.set_value("alice").run()
    app.sidebar.slider[2].set_value(0.0).run()
    app.chat_input[0].set_value("Who are you?").run()
    assert not app.exception, app.exception
    answer = app.chat_message[1].markdown[0].value
    model, tokenizer, identities = load_identities(str(tiny_model_dir), parse_adapters(values, "base"), "base")
    expected = "".join(stream_chat(model, tokenizer, [{"role": "user", "content": "Who are you?"}],
                                   SamplingArgs(max_new_tokens=8, temperature=0, max_length=2048, top_p=0.8),
                                   adapter=identities["alice"])).strip()
    assert answer == (expected or "_(no answer)_")
