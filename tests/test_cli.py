"""The CLI in-process: `selfcog data`, `selfcog run` end to end on a tiny model, `selfcog chat`, and errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from selfcog.cli import main

FAST = ["--set", "train.max_steps=4", "--set", "train.batch_size=4", "--set", "eval.eval_steps=2",
        "--set", "eval.min_steps=0", "--set", "eval.max_new_tokens=4", "--set", "data.preserve_max_new_tokens=6",
        "--set", "data.preserve_ratio=0.2"]


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
