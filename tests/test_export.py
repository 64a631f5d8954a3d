"""`selfcog merge`: the maths of the merge, sharding, atomicity under SIGKILL, and CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from selfcog.cli import main
from selfcog.export import merge, parse_size
from selfcog.errors import SelfcogError

RANK, ALPHA = 4, 8
LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter (r=4, alpha=8, every linear layer) with random B, so merging changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    path = tmp_path_factory.mktemp("tiny-adapter")
    peft_model.save_pretrained(path)
    return path


def read_tensor(directory: Path, name: str) -> torch.Tensor:
    index = directory / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(directory / file, "pt") as f:
        return f.get_tensor(name)


def test_merged_weight_is_base_plus_scaled_lora(tiny_model_dir, tiny_adapter, tmp_path):
    out = merge(str(tiny_model_dir), tiny_adapter, tmp_path / "merged")
    base = read_tensor(tiny_model_dir, f"{LAYER}.weight")
    with safe_open(tiny_adapter / "adapter_model.safetensors", "pt") as f:
        a = f.get_tensor(f"base_model.model.{LAYER}.lora_A.weight")
        b = f.get_tensor(f"base_model.model.{LAYER}.lora_B.weight")
    merged = read_tensor(out, f"{LAYER}.weight")
    assert not torch.allclose(merged, base)
    torch.testing.assert_close(merged, base + (b @ a) * (ALPHA / RANK), rtol=0, atol=1e-6)
    # A stock HF directory: tokenizer, chat template and generation config travel with the weights.
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template
    assert not (out / "model.safetensors.index.json").exists()  # small enough for one file


def test_bf16_merge_casts_weights_and_config(tiny_model_dir, tiny_adapter, tmp_path):
    out = merge(str(tiny_model_dir), tiny_adapter, tmp_path / "merged", dtype="bf16")
    assert read_tensor(out, f"{LAYER}.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_merge_loads_like_the_whole_one(tiny_model_dir, tiny_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    whole = merge(str(tiny_model_dir), tiny_adapter, tmp_path / "whole")
    sharded = merge(str(tiny_model_dir), tiny_adapter, tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {path.name for path in shards}
    limit = parse_size("100KB")
    with safe_open(whole / "model.safetensors", "pt") as f:
        sizes = {name: f.get_tensor(name).nbytes for name in f.keys()}
    oversized = {name for name, size in sizes.items() if size > limit}
    assert oversized  # the tiny model's embedding (400 x 64 fp32) alone exceeds the limit
    alone = set()
    for path in shards:  # each shard within the limit; a tensor larger than the limit gets a shard to itself
        with safe_open(path, "pt") as f:
            names = list(f.keys())
        if len(names) == 1 and names[0] in oversized:
            alone.add(names[0])
        else:
            assert sum(sizes[name] for name in names) <= limit, (path.name, names)
    assert alone == oversized
    assert len(shards) < len(sizes)  # shards hold several tensors each, not one file per tensor
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
                  for path in (whole, sharded)]
    assert torch.equal(logits[0], logits[1])


def test_killed_merge_leaves_nothing_that_looks_complete(tiny_model_dir, tiny_adapter, tmp_path):
    """SIGKILL while the shards are being written: OUT never appears, only a hidden temp dir may stay."""
    out = tmp_path / "merged"
    # The real CLI, with the shard writer slowed down after its first shard so the kill lands mid-write.
    code = ("import sys, time\nimport selfcog.export as export\nwrite = export.write_safetensors\n"
            "def slow(*args, **kwargs):\n    size = write(*args, **kwargs)\n    time.sleep(120)\n    return size\n"
            "export.write_safetensors = slow\nfrom selfcog.cli import main\n"
            f"main(['merge', {str(tiny_model_dir)!r}, {str(tiny_adapter)!r}, {str(out)!r}, "
            "'--max-shard-size', '50KB'], prog_name='selfcog')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(tmp_path.glob(".merged-tmp-*/model-*.safetensors")):
            assert proc.poll() is None, f"merge ended before it was killed: {proc.stderr.read()[-500:]}"
            assert time.monotonic() < deadline, "merge never started writing"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert all(path.name.startswith(".merged-tmp-") for path in tmp_path.iterdir())


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output.strip().splitlines()


def test_cli_errors_are_one_line(tiny_model_dir, tiny_adapter, tmp_path):
    code, lines = run_cli("merge", str(tiny_model_dir), str(tmp_path / "nope"), str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1 and "not a LoRA adapter directory" in lines[0]
    code, lines = run_cli("merge", str(tiny_model_dir), str(tiny_adapter), str(tmp_path / "out"), "--dtype", "int4")
    assert code == 2 and len(lines) == 1 and "--dtype int4" in lines[0]
    code, lines = run_cli("merge", str(tiny_model_dir), str(tiny_adapter), str(tmp_path / "out"),
                          "--max-shard-size", "lots")
    assert code == 2 and len(lines) == 1 and "--max-shard-size" in lines[0]
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("100KB") == 100_000
    assert parse_size("1.5 MiB") == 1_572_864
    with pytest.raises(SelfcogError):
        parse_size("0MB")
