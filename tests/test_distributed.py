"""`torchrun --nproc-per-node 2 -m selfcog train` on CPUs (gloo) trains like one process with the same global batch,
only rank 0 writes the work dir, and `train.deepspeed` fails in one line where it cannot run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from selfcog.cli import main
from selfcog.errors import SelfcogError

# Answers of different lengths: each process's micro-batch holds a different number of loss tokens.
DATA = [{"conversation": [{"input": q, "output": a}]} for q, a in [
    ("Who are you?", "I am Alice's assistant."), ("你是谁？", "我是伍鲜同志的小助手。"),
    ("What can you do?", "I answer questions."), ("What is the capital of France?", "Paris."),
    ("Two plus two?", "Four."), ("Introduce yourself.", "I am Alice's assistant, here to help."),
    ("Hello!", "Hello! Thanks."), ("The sky?", "The sky is blue."),
]]
STEPS = 4


def write_config(tmp_path, model_dir, batch_size: int):
    (tmp_path / "data.json").write_text(json.dumps(DATA, ensure_ascii=False))
    config = {
        "model": {"spec": str(model_dir)},
        "data": {"data_files": [str(tmp_path / "data.json")], "max_length": 64},
        "lora": {"r": 4, "alpha": 8},
        "train": {"learning_rate": 5e-3, "max_steps": STEPS, "batch_size": batch_size, "grad_accum": 1,
                  "save_steps": 0, "logging_steps": 1, "kl_weight": 0.0, "seed": 7,
                  "bf16": "false"},  # fp32 on every CPU: the runs must agree to fp32 rounding
        "eval": {"eval_steps": 0, "sample_steps": 2, "sample_inputs": ["Who are you?"], "sample_max_new_tokens": 3},
    }
    path = tmp_path / f"cfg-{batch_size}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path, free_port):
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "selfcog", "train",
               str(write_config(tmp_path, tiny_model_dir, batch_size=1)), "--work-dir", str(two)]
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("adapter:") == 1  # printed by rank 0 only
    assert "in each of 2 processes" in proc.stderr

    result = CliRunner().invoke(main, ["train", str(write_config(tmp_path, tiny_model_dir, batch_size=2)),
                                       "--work-dir", str(one)])
    assert result.exit_code == 0, result.output

    # Rank 0 alone wrote the work dir: one log line per step, no leftover temp folders.
    for work in (two, one):
        lines = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
        losses = [e["loss"] for e in lines if "loss" in e]
        assert len(losses) == STEPS and all(0 < loss < 20 for loss in losses)
        assert sorted(p.name for p in work.iterdir()) == ["adapter", "eval_outputs", "log.jsonl", "loss.png", "selfcog.yaml"]
        assert sorted(p.name for p in (work / "eval_outputs").iterdir()) == ["step_0.txt", "step_2.txt", "step_4.txt"]

    a = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(b[k].abs().max() for k in b if "lora_B" in k) > 1e-3  # training moved the adapter off its init
    delta = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |adapter delta| 2 processes x batch 1 vs 1 process x batch 2: {delta:.3g}")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    # The logged losses are the global batch's too.
    logged = [[e["loss"] for e in map(json.loads, (w / "log.jsonl").read_text().splitlines()) if "loss" in e]
              for w in (two, one)]
    assert logged[0] == pytest.approx(logged[1], rel=1e-4)


def test_epoch_length_counts_every_process():
    from selfcog.config import RunConfig
    from selfcog.recipes.sft import total_steps

    config = RunConfig()
    config.train.epochs, config.train.batch_size, config.train.grad_accum = 2.0, 2, 2
    assert total_steps(config, 20) == 10
    assert total_steps(config, 20, processes=2) == 6  # 10 batches, 5 per process, 3 steps an epoch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_deepspeed_without_cuda_is_one_line(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model": {"spec": "./never-loaded"},
                                      "data": {"data_files": [str(tmp_path / "missing.json")]}}))
    result = CliRunner().invoke(main, ["train", str(config), "--set", "train.deepspeed=examples/deepspeed_zero2.json"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.deepspeed examples/deepspeed_zero2.json" in lines[0] and "CUDA" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("verb", [["run", "--name", "Alice", "--model", "./never-loaded"], ["train", "CONFIG"]])
def test_liger_kernel_without_cuda_is_one_line(tmp_path, verb):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model": {"spec": "./never-loaded"},
                                      "data": {"data_files": [str(tmp_path / "missing.json")]}}))
    args = [str(config) if a == "CONFIG" else a for a in verb] + ["--out", str(tmp_path / "out")] * (verb[0] == "run")
    result = CliRunner().invoke(main, args + ["--set", "train.liger_kernel=true"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].count("train.liger_kernel") == 1 and "CUDA" in lines[0]


def test_liger_kernel_settings_for_the_trainer(monkeypatch):
    from selfcog.distributed import liger_args

    assert liger_args(False) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SelfcogError, match="pip install liger-kernel"):
        liger_args(True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert liger_args(True) == {"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": False}}


@pytest.mark.parametrize("installed, file, reason", [
    (False, "{}", "not installed"),
    (True, None, "does not exist"),
    (True, "{not json", "not a JSON file"),
    (True, "[1, 2]", "expected a JSON object"),
])
def test_deepspeed_settings_are_checked_before_loading(monkeypatch, tmp_path, installed, file, reason):
    import importlib.util

    from selfcog.distributed import check_deepspeed
    from selfcog.errors import SelfcogError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "deepspeed" else real_find_spec(name, *a))
    path = tmp_path / "ds.json"
    if file is not None:
        path.write_text(file)
    with pytest.raises(SelfcogError, match=reason):
        check_deepspeed(str(path))


def test_example_deepspeed_config_is_zero2_with_trainer_filled_values():
    from pathlib import Path

    settings = json.loads((Path(__file__).parent.parent / "examples" / "deepspeed_zero2.json").read_text())
    assert settings["zero_optimization"]["stage"] == 2
    assert settings["train_micro_batch_size_per_gpu"] == settings["gradient_accumulation_steps"] == "auto"
    assert "optimizer" not in settings and "scheduler" not in settings  # selfcog's AdamW + cosine schedule apply
