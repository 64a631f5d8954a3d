"""`selfcog chat`: one-shot --message prints only the reply; the loop keeps history, /reset, /exit."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import selfcog.chat
from selfcog.cli import main
from selfcog.generate import SamplingArgs, stream_chat
from selfcog.models import load_model

GREEDY = ["--temperature", "0", "--max-new-tokens", "12", "--repetition-penalty", "1.5"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter for the tiny model (random B, so it changes answers)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return path


def test_one_shot_message_prints_only_the_reply(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你是谁？"}]
    expected = "".join(stream_chat(model, tokenizer, messages, SamplingArgs(
        max_new_tokens=12, temperature=0, repetition_penalty=1.5))).lstrip()
    result = CliRunner().invoke(main, ["chat", str(tiny_model_dir), "-m", "你是谁？", "--system", "Be brief."] + GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_loop_keeps_history_resets_and_exits(tiny_model_dir, monkeypatch):
    seen = []

    def fake_stream(model, tokenizer, messages, args, stop=None, info=None):
        seen.append([m["content"] for m in messages])
        assert args.temperature == 0 and args.top_k == 5
        yield f"answer {len(seen)}"

    monkeypatch.setattr(selfcog.chat, "stream_chat", fake_stream)
    result = CliRunner().invoke(main, ["chat", str(tiny_model_dir), "--system", "SYS", "--top-k", "5"] + GREEDY,
                                input="hi\n\nsecond\n/reset\nthird\n/exit\nnever\n")
    assert result.exit_code == 0, result.output
    assert seen == [["SYS", "hi"], ["SYS", "hi", "answer 1", "second"], ["SYS", "third"]]
    assert "(history cleared)" in result.stdout and "answer 3" in result.stdout
    assert "/reset" in result.stdout.splitlines()[0]  # the banner says how


def test_loop_with_the_real_model_ends_at_end_of_input(tiny_model_dir):
    result = CliRunner().invoke(main, ["chat", str(tiny_model_dir)] + GREEDY, input="hello\nwho are you?\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(">>> ") == 3


def test_adapter_is_applied_without_merging(tiny_model_dir, adapter_dir):
    from peft import PeftModel

    model, tokenizer = selfcog.chat.load_chat_model(str(tiny_model_dir), adapter=str(adapter_dir))
    assert isinstance(model, PeftModel)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    result = CliRunner().invoke(main, ["chat", str(tiny_model_dir), "--adapter", str(adapter_dir), "-m", "hi"]
                                + GREEDY)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    (["--adapter", "nowhere"], "not a LoRA adapter directory"),
    (["--top-p", "0"], "out of range"),
    (["--temperature", "-1"], "out of range"),
    (["-m", "  "], "--message is empty"),
])
def test_user_errors_are_one_line_exit_2(tiny_model_dir, args, message):
    result = CliRunner().invoke(main, ["chat", str(tiny_model_dir), "-m", "hi"] + args)
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]  # above it, at most the weights loader's progress bar
    assert last.startswith("selfcog: error: ") and message in last
    assert result.stdout == ""


def test_missing_model_is_a_user_error(tmp_path):
    result = CliRunner().invoke(main, ["chat", str(tmp_path / "nope"), "-m", "hi"])
    assert result.exit_code == 2 and "does not exist" in result.stderr
