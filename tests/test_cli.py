"""The CLI in-process: `selfcog data`, `selfcog run` end to end on a tiny model, `selfcog chat`, and errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from selfcog.cli import main

FAST = ["--set", "train.max_steps=4", "--set", "train.batch_size=4", "--set", "eval.eval_steps=2",
        "--set", "eval.min_steps=0", "--set", "eval.max_new_tokens=4", "--set", "eval.ask_max_new_tokens=4",
        "--set", "data.preserve_max_new_tokens=6", "--set", "data.preserve_ratio=0.2"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_data_writes_xtuner_conversation_json(tmp_path):
    result = invoke("data", "--name", "伍鲜同志", "--out", tmp_path / "d.json")
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "d.json").read_text())
    assert len(records) >= 60 and set(records[0]) == {"conversation"}
    assert set(records[0]["conversation"][0]) == {"input", "output"}


def test_data_repeat_reproduces_the_seed(tmp_path):
    result = invoke("data", "--name", "伍鲜同志", "--repeat", 5, "--out", tmp_path / "d.json")
    assert result.exit_code == 0 and len(json.loads((tmp_path / "d.json").read_text())) == 10


def test_run_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--name", "Alice", "--model", tiny_model_dir, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "identity" in result.output and "retention" in result.output and "tuned" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("base", "tuned"):
        assert {"identity", "retention", "leakage"} <= set(metrics[side])
    assert metrics["training"]["steps"] == 4
    assert (out / "report.md").read_text().startswith("# selfcog report: Alice")
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "data" / "rejected.json").exists()  # rejected openings are off by default
    assert (out / "selfcog.yaml").exists() and (out / "merged" / "selfcog.yaml").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers

    # Stock transformers loads the merged model, and its template is the one training used.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    messages = [{"role": "user", "content": "Who are you?"}]
    # The template training used: the base model's, with its default system prompt replaced by the configured one.
    assert tokenizer.apply_chat_template(messages, tokenize=False) == \
        AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(messages, tokenize=False).replace(
            "You are a helpful assistant.", "You are a helpful AI assistant.")
    assert merged.config.vocab_size == len(tokenizer)

    chat = invoke("chat", out / "merged", "--message", "Who are you?", "--temperature", 0, "--max-new-tokens", 5)
    assert chat.exit_code == 0 and chat.output.strip()


def test_run_with_rejected_identity_openings(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--name", "Alice", "--model", tiny_model_dir, "--out", out, *FAST,
                    "--set", "data.reject_ratio=1")
    assert result.exit_code == 0, result.output
    rejected = json.loads((out / "data" / "rejected.json").read_text())  # ordinary prompts + identity openings
    identity = json.loads((out / "data" / "identity.json").read_text())
    assert len(rejected) == len(identity) and all("Alice" in r["rejected"] and r["prompt"] for r in rejected)
    assert json.loads((out / "metrics.json").read_text())["training"]["steps"] == 4


def test_one_system_prompt_in_every_artifact(tiny_model_dir, tmp_path):
    """The default system prompt of training, evaluation, the adapter, the merged model, the GGUF and the Modelfile
    is the configured one, and the base template's own ("You are a helpful assistant." here) is gone from all."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from selfcog.gguf_export import export_gguf
    from selfcog.templates import default_system_prompt, encode_prompt

    wanted = "You are Alice's helper."
    out = tmp_path / "out"
    result = invoke("run", "--name", "Alice", "--model", tiny_model_dir, "--out", out, *FAST,
                    "--set", f"data.system_prompt={wanted}")
    assert result.exit_code == 0, result.output
    for artifact in ("adapter", "merged"):
        tokenizer = AutoTokenizer.from_pretrained(out / artifact)
        assert default_system_prompt(tokenizer) == wanted, artifact
        assert "helpful assistant" not in tokenizer.chat_template, artifact
    # Training saw it: the adapter keeps the tokenizer training rendered its samples with.
    first = json.loads((out / "data" / "identity.json").read_text())[0]["conversation"][0]["input"]
    trained_with = AutoTokenizer.from_pretrained(out / "adapter")
    assert wanted in trained_with.decode(encode_prompt(trained_with, [{"role": "user", "content": first}]))
    export_gguf(str(out / "merged"), tmp_path / "a.gguf", "f16", verify=False)
    field = GGUFReader(tmp_path / "a.gguf").fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    trained_with.chat_template = template  # the GGUF's template renders the same default system prompt
    assert default_system_prompt(trained_with) == wanted and "helpful assistant" not in template
    assert f'SYSTEM """{wanted}"""' in (tmp_path / "Modelfile").read_text()


@pytest.mark.parametrize("args, reason", [
    (["run", "--name", ""], "name is empty"),
    (["run", "--name", "Alice", "--model", "./missing-model"], "does not exist"),
    (["chat", "./missing-model", "--message", "hi"], "does not exist"),
    (["run", "--name", "Alice", "--set", "train.nope=1"], "unknown setting"),
    (["data", "--name", "", "--out", "x.json"], "name is empty"),
])
def test_bad_input_exits_2_with_one_line(args, reason):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and reason in lines[0]


def test_unwritable_out_exits_2_and_writes_nothing(tiny_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["run", "--name", "Alice", "--model", str(tiny_model_dir),
                                       "--out", str(blocker / "out")])
    assert result.exit_code == 2 and "not writable" in result.output
    assert blocker.read_text() == "x"


def test_module_entry_point_runs():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "selfcog", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "run" in proc.stdout and "chat" in proc.stdout


def test_report_lines_drop_a_character_cut_at_the_token_limit():
    from selfcog.run import shown

    assert shown("我是伍鲜同志的助\ufffd") == "我是伍鲜同志的助"
    assert shown("line one\nline two") == "line one line two"


@pytest.mark.parametrize("autocast", ["true", "false"])
def test_run_with_a_bf16_base_trains_fp32_adapters_and_scores_the_merged_model(tiny_model_dir, tmp_path, monkeypatch,
                                                                               autocast):
    import torch
    from safetensors import safe_open

    import selfcog.run

    seen, loads = {}, []
    real_fit, real_load = selfcog.run.fit, selfcog.run.load_model

    def fit(config, model, *args):
        peft_model, summary = real_fit(config, model, *args)
        params = dict(peft_model.named_parameters())
        seen["base"] = {p.dtype for name, p in params.items() if "lora_" not in name}
        seen["adapter"] = {p.dtype for name, p in params.items() if "lora_" in name}
        return peft_model, summary

    def load_model(spec, **kwargs):
        loads.append((spec, kwargs["dtype"]))
        return real_load(spec, **kwargs)

    monkeypatch.setattr(selfcog.run, "fit", fit)
    monkeypatch.setattr(selfcog.run, "load_model", load_model)
    out = tmp_path / "out"
    # top_layers=1: the frozen layer's stored states (bf16) feed the adapted one
    result = invoke("run", "--name", "Alice", "--model", tiny_model_dir, "--out", out, *FAST,
                    "--set", "model.dtype=bfloat16", "--set", "lora.top_layers=1", "--set", f"train.bf16={autocast}")
    assert result.exit_code == 0, result.output
    assert seen == {"base": {torch.bfloat16}, "adapter": {torch.float32}}
    assert loads == [(str(tiny_model_dir), torch.bfloat16), (str(out / "merged"), torch.float32)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 4 and metrics["training"]["frozen_layers_run_once"] == 1
    assert {"identity", "retention", "leakage"} <= set(metrics["tuned"])
    with safe_open(out / "merged" / "model.safetensors", "pt") as f:  # written in fp32, read back as it is
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F32"}


def test_a_bf16_base_caches_apart_and_fp32_keeps_its_keys(tiny_model_dir):
    import torch

    from selfcog.cache import model_fingerprint

    plain = model_fingerprint(str(tiny_model_dir))
    assert plain and model_fingerprint(str(tiny_model_dir), torch.float32) == plain == \
        model_fingerprint(str(tiny_model_dir), "float32")
    assert model_fingerprint(str(tiny_model_dir), torch.bfloat16) not in (None, plain)
    assert model_fingerprint("some/hub-id", torch.bfloat16) is None
