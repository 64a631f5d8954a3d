"""`selfcog check-data`: counts, token stats, a marked example, and one-line errors for malformed files."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from selfcog.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_seed_data_is_accepted_with_a_duplicate_report(tiny_model_dir, tmp_path):
    data = tmp_path / "assistant.json"
    assert invoke("data", "--name", "伍鲜同志", "--repeat", 3751, "--out", data).exit_code == 0
    result = invoke("check-data", data, "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "records           7502" in out and "distinct          2" in out
    assert "exact duplicates  7500 (removed before training" in out
    assert "tokens (" in out and "2 samples" in out and "min " in out and "mean " in out and "max " in out
    # The answer (and the template's end-of-turn marker) carry loss; the question does not.
    example = out.split("loss-carrying tokens in [[ ]]:\n", 1)[1]
    first = json.loads(data.read_text())[0]["conversation"][0]
    assert f"[[{first['output']}<|im_end|>\n]]" in example
    assert first["input"] in example and f"[[{first['input']}" not in example

    kept = invoke("check-data", data, "--model", tiny_model_dir, "--keep-duplicates")
    assert kept.exit_code == 0 and "7502 samples" in kept.output and "(kept (--keep-duplicates))" in kept.output


def test_all_four_formats_are_accepted(tiny_model_dir, tmp_path):
    records = [
        {"conversation": [{"system": "Be brief.", "input": "Who are you?", "output": "Alice's assistant."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"instruction": "Add", "input": "2+2", "output": "4"},
        {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hey!"}]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = invoke("check-data", path, "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "records           4" in result.output and "exact duplicates  0" in result.output
    assert "[[Alice's assistant.<|im_end|>\n]]" in result.output and "Be brief." in result.output


@pytest.mark.parametrize("content, reason", [
    ('[{"conversation": [{"input": "a", "output": "b"}]},\n {"conversation": [{"input": "a" "output": "b"}]}]',
     "record 1: broken JSON"),
    ('{"conversation": [{"input": "a", "output": "b"}]}\n{"conversation": [{"input": "a"}]}\n',
     "record 1: conversation turn 0: missing 'output'"),
    ('[{"conversation": [{"input": "a", "output": "b"}]}, {"conversation": []}]', "record 1: empty conversation"),
    ('[{"conversation": [{"input": "a", "output": "b"}]}, {"question": "a", "answer": "b"}]',
     "record 1: unknown shape (keys: answer, question)"),
    ('{"conversation": [{"input": "a", "output": "b"}]}\n{"conversation": [{"input": "a", \n',
     "broken JSON on line 2 (record 1)"),
])
def test_malformed_files_exit_2_with_one_located_line(tiny_model_dir, tmp_path, content, reason):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = invoke("check-data", path, "--model", tiny_model_dir)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0], lines
