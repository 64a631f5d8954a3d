"""`selfcog train CONFIG` on a tiny model: packing, Trainer checkpoints kept to save_total_limit, sample chats,
the 4-bit fallback on a CPU, kill -9 + --resume ending where an uninterrupted run ends, and gradient checkpointing
training the same adapter. Multi-process runs: tests/test_distributed.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from selfcog.cli import main
from selfcog.data.packing import pack_to_max_length
from selfcog.engine.checkpoints import CHECKPOINT_DONE, newest_complete_checkpoint

DATA = [{"conversation": [{"input": q, "output": a}]} for q, a in [
    ("Who are you?", "I am Alice's assistant."), ("你是谁？", "我是伍鲜同志的小助手。"),
    ("What can you do?", "I answer questions."), ("What is the capital of France?", "Paris."),
    ("Two plus two?", "Four."), ("Introduce yourself.", "I am Alice's assistant, here to help."),
]] * 3  # duplicates: removed before training


def write_config(tmp_path, model_dir, **train):
    (tmp_path / "data.json").write_text(json.dumps(DATA, ensure_ascii=False))
    config = {
        "model": {"spec": str(model_dir)},
        "data": {"data_files": [str(tmp_path / "data.json")], "max_length": 64, "pack_to_max_length": True},
        "lora": {"r": 4, "alpha": 8, "load_in_4bit": True},
        "train": {"learning_rate": 5e-3, "epochs": 0, "max_steps": 6, "batch_size": 1, "grad_accum": 1,
                  "save_steps": 2, "save_total_limit": 2, "logging_steps": 1, "kl_weight": 0.0, **train},
        "eval": {"eval_steps": 0, "sample_steps": 3, "sample_inputs": ["Who are you?"], "sample_max_new_tokens": 3},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def adapter_weights(work):
    return load_file(str(work / "adapter" / "adapter_model.safetensors"))


def test_packing_keeps_samples_whole_and_under_max_length():
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (10, 20, 35, 5, 64, 1)]
    bins = pack_to_max_length(examples, 64)
    assert [sum(len(e["input_ids"]) for e in b) for b in bins] == [30, 40, 64, 1]
    assert [e for b in bins for e in b] == examples


def test_train_writes_checkpoints_samples_and_an_adapter(tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    result = CliRunner().invoke(main, ["train", str(write_config(tmp_path, tiny_model_dir)), "--work-dir", str(work)])
    assert result.exit_code == 0, result.output
    assert "load_in_4bit needs a CUDA GPU" in result.stderr and "removed 12 exact duplicate" in result.stderr
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (work / "checkpoint-6" / "trainer_state.json").exists()
    assert (work / "checkpoint-6" / "selfcog-complete").exists()  # marked, then renamed into place
    assert not (work / ".checkpoints-staging").exists()
    assert sorted(p.name for p in (work / "eval_outputs").iterdir()) == \
        ["step_0.txt", "step_2.txt", "step_3.txt", "step_4.txt", "step_6.txt"]
    assert (work / "eval_outputs" / "step_0.txt").read_text().startswith("Q: Who are you?\nA: ")
    assert (work / "adapter" / "adapter_config.json").exists() and (work / "selfcog.yaml").exists()
    losses = [e["loss"] for e in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 6 and all(0 < loss < 20 for loss in losses)


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, max_steps=8, save_steps=2, save_total_limit=0)
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert CliRunner().invoke(main, ["train", str(config), "--work-dir", str(full)]).exit_code == 0
    # A child that trains slowly (0.4 s per step) so it can be killed right after its first checkpoint.
    child = ("import sys, time; import selfcog.engine.callbacks as t; on = t.JsonlLog.on_log\n"
             "t.JsonlLog.on_log = lambda *a, **k: (time.sleep(0.4), on(*a, **k))[1]\n"
             "from selfcog.cli import main; sys.exit(main())")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", child, "train", str(config), "--work-dir", str(broken)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (broken / "checkpoint-2" / "selfcog-complete").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (broken / "checkpoint-2").exists() and not (broken / "adapter").exists()
    resumed = CliRunner().invoke(main, ["train", str(config), "--work-dir", str(broken), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = adapter_weights(full), adapter_weights(broken)
    assert a.keys() == b.keys()
    assert max(a[k].abs().max() for k in a if "lora_B" in k) > 1e-3  # training moved the adapter off its init
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_resume_without_a_checkpoint_is_one_line(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["train", str(write_config(tmp_path, tiny_model_dir)), "--work-dir",
                                       str(tmp_path / "empty"), "--resume"])
    assert result.exit_code == 2 and "no checkpoint-N" in result.output


def test_half_written_checkpoints_are_skipped_and_removed(tmp_path):
    for step, done in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if done:
            (folder / CHECKPOINT_DONE).write_text(str(step))
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists()
    assert newest_complete_checkpoint(tmp_path / "nothing-here") is None


def test_gradient_checkpointing_trains_the_same_adapter(tiny_model_dir, tmp_path):
    """Recomputing activations in the backward pass changes memory, not maths (dropout is 0)."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=3, save_steps=0)
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert CliRunner().invoke(main, ["train", str(config), "--work-dir", str(plain)]).exit_code == 0
    result = CliRunner().invoke(main, ["train", str(config), "--work-dir", str(checkpointed),
                                       "--set", "train.gradient_checkpointing=true"])
    assert result.exit_code == 0, result.output
    losses = [e["loss"] for e in map(json.loads, (checkpointed / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    a, b = adapter_weights(plain), adapter_weights(checkpointed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_logs_carry_throughput_and_memory_and_a_loss_curve_is_drawn(tmp_path, tiny_model_dir):
    result = CliRunner().invoke(main, ["train", str(write_config(tmp_path, tiny_model_dir, save_steps=0)),
                                       "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "loss" in entry]
    assert len(steps) == 6  # logging_steps 1, max_steps 6
    for entry in steps:
        assert entry["tokens_per_s"] > 0 and entry["peak_mem_mib"] > 0
        assert {"learning_rate", "grad_norm"} <= entry.keys()
    assert (tmp_path / "work" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    result = CliRunner().invoke(main, ["train", str(write_config(tmp_path, tiny_model_dir, tensorboard=True)),
                                       "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 2
    assert "train.tensorboard: needs `pip install tensorboard`" in result.output
