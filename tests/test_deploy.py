"""`selfcog deploy`: the bundle's layout, and its app actually serving and chatting against the tiny model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata

import pytest
from click.testing import CliRunner

from selfcog.cli import main
from selfcog.deploy import deploy
from selfcog.errors import SelfcogError


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    return deploy(str(tiny_model_dir), tmp_path_factory.mktemp("deploy") / "app", "hf-space", title="Tiny 助手")


def test_hf_space_bundle(bundle):
    assert {p.name for p in bundle.iterdir()} == {"app.py", "selfcog_streaming.py", "requirements.txt", "README.md",
                                                  "model"}
    assert (bundle / "model" / "config.json").is_file() and (bundle / "model" / "model.safetensors").is_file()
    assert (bundle / "model" / "tokenizer_config.json").is_file()
    readme = (bundle / "README.md").read_text()
    front = readme.split("---\n")[1]
    assert readme.startswith("---\n") and "sdk: streamlit\n" in front and "app_file: app.py\n" in front
    assert json.loads(front.split("title: ")[1].splitlines()[0]) == "Tiny 助手"
    pins = dict(line.split("==") for line in (bundle / "requirements.txt").read_text().splitlines()
                if "==" in line)
    assert pins["transformers"] == metadata.version("transformers")
    assert pins["streamlit"] == metadata.version("streamlit") and "+" not in pins["torch"]
    app = (bundle / "app.py").read_text()
    assert "MODEL_SOURCE = 'model'\n" in app and "TITLE = 'Tiny 助手'\n" in app


def test_repo_id_bundle_has_no_weights(tiny_model_dir, tmp_path):
    out = deploy(str(tiny_model_dir), tmp_path / "app", "openxlab", repo_id="someone/tiny-chat")
    assert not (out / "model").exists()
    assert "MODEL_SOURCE = 'someone/tiny-chat'\n" in (out / "app.py").read_text()
    readme = (out / "README.md").read_text()
    assert "OpenXLab" in readme and "someone/tiny-chat" in readme and not readme.startswith("---")


def test_refuses_to_overwrite_other_folders(tiny_model_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SelfcogError, match="not an app bundle"):
        deploy(str(tiny_model_dir), tmp_path / "mine", "hf-space")
    result = CliRunner().invoke(main, ["deploy", str(tiny_model_dir), str(tmp_path / "x"), "--target", "heroku"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "--target" in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode("utf-8", "replace")


def test_app_serves_locally(bundle):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=bundle, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()[-1000:]
            try:
                if get(f"http://127.0.0.1:{port}/_stcore/health") == (200, "ok"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "streamlit did not come up"
            time.sleep(0.25)
        status, page = get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "<noscript>" in page and "streamlit" in page.lower()
    finally:
        proc.kill()
        proc.wait()


def test_app_chats(bundle, monkeypatch):
    """Run app.py's script the way a browser session would: title, sliders, one streamed answer, clear."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(bundle)
    app = AppTest.from_file(str(bundle / "app.py"), default_timeout=60).run()
    assert not app.exception
    assert app.title[0].value == "Tiny 助手"
    assert [s.label for s in app.sidebar.slider] == ["Max Length", "Top P", "Temperature"]
    app.sidebar.slider[0].set_value(48)
    app.chat_input[0].set_value("Who are you?").run()
    assert not app.exception
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    assert app.chat_message[0].markdown[0].value == "Who are you?"
    assert len(app.session_state.messages) == 2
    app.sidebar.button[0].click().run()
    assert app.session_state.messages == [] and len(app.chat_message) == 0


def test_app_generates_with_selfcogs_own_decoder(bundle, tiny_model_dir, monkeypatch):
    """One generation path: the bundle carries selfcog/streaming.py byte for byte, and a greedy answer in the app
    equals `selfcog chat`'s."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    import selfcog.streaming
    from selfcog.generate import SamplingArgs, stream_chat
    from selfcog.models import load_model

    assert (bundle / "selfcog_streaming.py").read_bytes() == Path(selfcog.streaming.__file__).read_bytes()
    app_text = (bundle / "app.py").read_text()
    assert "TextIteratorStreamer" not in app_text and "END_OF_TURN" not in app_text
    monkeypatch.chdir(bundle)
    monkeypatch.syspath_prepend(str(bundle))
    app = AppTest.from_file(str(bundle / "app.py"), default_timeout=60).run()
    app.sidebar.slider[0].set_value(48)
    app.sidebar.slider[2].set_value(0.0)
    app.chat_input[0].set_value("Who are you?").run()
    assert not app.exception
    question = [{"role": "user", "content": "Who are you?"}]
    model, tokenizer = load_model(str(tiny_model_dir))
    ids_length = len(tokenizer(tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False),
                               add_special_tokens=False)["input_ids"])
    expected = "".join(stream_chat(model, tokenizer, question, SamplingArgs(max_new_tokens=48 - ids_length,
                                                                             max_length=48, temperature=0))).strip()
    assert app.session_state.messages[1]["content"] == expected


def test_adapter_is_merged_into_the_bundle(tiny_model_dir, tmp_path):
    """An adapter directory names its base; the bundle gets the merged model, so the app needs no peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = deploy(str(tmp_path / "adapter"), tmp_path / "app", "hf-space")
    assert not (out / "model" / "adapter_config.json").exists()
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(out / "model" / "model.safetensors", "pt") as merged, \
            safe_open(tiny_model_dir / "model.safetensors", "pt") as base:
        assert not torch.equal(merged.get_tensor(name), base.get_tensor(name))
