"""Shared fixtures: a tiny random chat model built offline, caches pointed at tmp_path, free ports, and a selfcog
Streamlit page started for the browser tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Who are you? I am Alice's assistant. What can you do? I answer questions.",
    "The capital of France is Paris. Two plus two is four. The sky is blue.",
    "你是谁？我是伍鲜同志的小助手。请介绍一下你自己。你能做什么？",
    "system user assistant You are a helpful assistant. Hello! Thanks.",
] * 20


def build_tokenizer():
    """A byte-level BPE chat tokenizer trained in memory: any text encodes, ChatML template, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama chat model (2 layers, hidden 64) with a ChatML tokenizer."""
    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run ~10x faster on one torch thread than on two when anything else shares the 2 cores
    (OpenMP's spinning threads collide); the slow tier runs in subprocesses and keeps torch's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny model, loaded once per module."""
    from selfcog.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every cache and output lands in tmp_path; the real embedded model cache is reused only by the slow tier."""
    monkeypatch.setenv("SELFCOG_HOME", str(tmp_path / "selfcog-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def embedded_home() -> Path:
    """Shared cache for the slow tier, so the embedded model is fetched and converted once per machine."""
    return Path(os.environ.get("SELFCOG_TEST_HOME", Path.home() / ".cache" / "selfcog"))


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """The one free-port helper: call it (`free_port()`) for a TCP port on 127.0.0.1 that nothing listens on."""
    return find_free_port


ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"
"""Where the browser tests leave their screenshots."""
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

WATCH_FOR_CURSOR = """() => {
    window.sawCursor = false;
    new MutationObserver(() => {
        for (const m of document.querySelectorAll('[data-testid="stChatMessage"]'))
            if (m.innerText.includes('\u258c')) window.sawCursor = true;
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
"""For `page.evaluate`: from then on, `window.sawCursor` records whether a chat answer was ever shown while still
streaming (with the cursor)."""


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def streamlit_page(args: list[str], port: int, log: Path) -> Iterator[str]:
    """`python -m selfcog ARGS`, a command serving a Streamlit page on `port`, with its output in `log`; yields the
    page's URL once it is healthy. It runs in its own process group, so the end stops Streamlit too."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "selfcog", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
