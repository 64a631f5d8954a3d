"""Slow tier: the XTuner personal-assistant tutorial end to end through selfcog, on the embedded model.

`selfcog data --repeat 3750` -> the tutorial's config (examples/internlm2_chat_1_8b_qlora_alpaca_e3.py, as
`xtuner copy-cfg` writes it) edited as the tutorial says -> `selfcog train` -> `selfcog merge` ->
`selfcog chat -m 请介绍一下你自己`. Each command runs in a subprocess as a user types it; the stage times are
printed (pytest -s) and docs/tutorial.md quotes them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NAME = "伍鲜同志"
QUESTION = "请介绍一下你自己"
STOCK_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "internlm2_chat_1_8b_qlora_alpaca_e3.py"


def tutorial_edits(text: str, model_dir: str) -> str:
    """The tutorial's edits to the copied config, each made exactly once (the model path goes to `model_dir`)."""
    edits = [
        ("pretrained_model_name_or_path = 'internlm/internlm2-chat-1_8b'",
         f"pretrained_model_name_or_path = '{model_dir}'"),
        ("alpaca_en_path = 'tatsu-lab/alpaca'", "alpaca_en_path = 'datas/assistant.json'"),
        ("'请给我介绍五个上海的景点', 'Please tell me five scenic spots in Shanghai'",
         "'请介绍一下你自己', 'Please introduce yourself'"),
        ("dataset=dict(type=load_dataset, path=alpaca_en_path)",
         "dataset=dict(type=load_dataset, path='json', data_files=dict(train=alpaca_en_path))"),
        ("dataset_map_fn=alpaca_map_fn", "dataset_map_fn=None"),
    ]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def test_the_tutorial_flow_gives_an_assistant_that_says_its_name(embedded_home, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFCOG_HOME", str(embedded_home))
    from selfcog.models import embedded_model_dir

    model_dir = str(embedded_model_dir())  # fetched and converted once per machine
    env = {**os.environ, "SELFCOG_HOME": str(embedded_home)}
    seconds = {}

    def selfcog(stage: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "selfcog", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
        seconds[stage] = round(time.perf_counter() - began, 1)
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-3000:]}"
        return proc

    # 1. xtuner_generate_assistant.py
    made = selfcog("data", "data", "--name", NAME, "--repeat", "3750", "--out", "datas/assistant.json")
    assert "wrote 7500 records" in made.stdout
    # 2. xtuner copy-cfg, then the tutorial's edits
    config = tmp_path / "internlm2_chat_1_8b_qlora_alpaca_e3_copy.py"
    shutil.copy(STOCK_CONFIG, config)
    config.write_text(tutorial_edits(config.read_text(encoding="utf-8"), model_dir), encoding="utf-8")
    # 3. xtuner train
    trained = selfcog("train", "train", config.name, "--work-dir", "work_dirs/assistant", timeout=2400)
    warned = [line for line in trained.stderr.splitlines() if "warning" in line.lower()]
    assert len(warned) <= 3, warned
    # Identity data whose duplicates were removed: trained until its own questions are answered with the name.
    assert [line for line in warned if f"training until the answers to the data's 2 questions name {NAME}" in line
            and "the config implies" in line]
    assert f"selfcog run --data datas/assistant.json --name {NAME}" in trained.stderr
    work = tmp_path / "work_dirs" / "assistant"
    steps = max(json.loads(line)["step"] for line in (work / "log.jsonl").read_text().splitlines())
    heldout = json.loads((work / "heldout_check.json").read_text())
    # 4. xtuner convert pth_to_hf: not needed (the adapter is in peft format); xtuner convert merge
    selfcog("merge", "merge", model_dir, "work_dirs/assistant/adapter", "merged")
    assert (tmp_path / "merged" / "config.json").exists()
    # 5. the Streamlit demo's question, in the terminal
    answer = selfcog("chat", "chat", "merged", "-m", QUESTION, "--temperature", "0", "--max-new-tokens", "40").stdout
    print("\n".join(line for line in trained.stderr.replace("\r", "\n").splitlines()
                    if line.startswith(("selfcog:", "Q:", "A:", "  Q:"))))
    print(json.dumps({"seconds": seconds, "steps": steps, "answer": answer.strip(),
                      "heldout_identity": heldout["identity"], "heldout_leakage": heldout["leakage"],
                      "heldout_examples": dict(list(heldout["identity_answers"].items())[::6])},
                     ensure_ascii=False, indent=1))
    assert NAME in answer
