"""Config precedence (YAML, command-line options, --set) and typed settings: no spelling is silently misread."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from selfcog.cli import main
from selfcog.config import DataArgs, RunConfig, apply_overrides, load_config, set_value
from selfcog.errors import SelfcogError


@pytest.mark.parametrize("spelling, expected", [
    ("true", True), ("True", True), ("TRUE", True), ("yes", True), ("Yes", True), ("on", True), ("ON", True),
    ("1", True), ("false", False), ("False", False), ("no", False), ("NO", False), ("off", False), ("Off", False),
    ("0", False),
])
def test_set_accepts_every_boolean_spelling(spelling, expected):
    config = RunConfig()
    config.data.deduplicate = not expected
    apply_overrides(config, [f"data.deduplicate={spelling}"])
    assert config.data.deduplicate is expected


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False),
                                             ("On", True), ("oFF", False)])
def test_set_value_takes_yaml_booleans_and_one_zero(value, expected):
    config = RunConfig()
    config.data.deduplicate = not expected
    set_value(config, "data.deduplicate", value)
    assert config.data.deduplicate is expected


@pytest.mark.parametrize("spelling", ["flase", "ture", "y", "n", "2", "-1", "0.5", "none", "''", "[true]"])
def test_an_unknown_boolean_spelling_names_the_setting_and_the_value(spelling):
    config = RunConfig()
    with pytest.raises(SelfcogError) as caught:
        apply_overrides(config, [f"data.deduplicate={spelling}"])
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--set: ")
    assert "data.deduplicate" in message and repr(yaml.safe_load(spelling)) in message
    assert config.data.deduplicate is True  # untouched


def test_an_unknown_boolean_spelling_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("train:\n  kl_prompt: nope\n")
    with pytest.raises(SelfcogError, match=r"my\.yaml: 'train\.kl_prompt' needs a bool .*got 'nope'"):
        load_config(path)


def test_set_with_a_misspelled_boolean_exits_2_with_one_line():
    result = CliRunner().invoke(main, ["run", "--name", "Alice", "--set", "data.deduplicate=flase"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.deduplicate" in lines[0] and "'flase'" in lines[0]


@pytest.fixture
def job_config(monkeypatch):
    """The RunConfig `selfcog run` hands to the pipeline, captured instead of running it."""
    import selfcog.run

    seen: list[RunConfig] = []

    def fake_run(config):
        seen.append(config)
        return selfcog.run.Path(config.out)

    monkeypatch.setattr(selfcog.run, "run", fake_run)

    def invoke(*args) -> RunConfig:
        result = CliRunner().invoke(main, ["run", *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return seen.pop()
    return invoke


MY_YAML = """\
model:
  spec: ./my-model
  trust_remote_code: true
data:
  name: Bob
  assistant_name: Robo
  author: Carol
  data_file: mine.json
train:
  max_steps: 7
out: my-out
"""


def test_run_keeps_what_the_config_sets_when_options_are_not_given(job_config, tmp_path):
    (tmp_path / "my.yaml").write_text(MY_YAML)
    config = job_config("--config", tmp_path / "my.yaml")
    assert config.model.spec == "./my-model" and config.out == "my-out"
    assert config.model.trust_remote_code is True
    assert (config.data.name, config.data.assistant_name, config.data.author, config.data.data_file) == \
        ("Bob", "Robo", "Carol", "mine.json")
    assert config.data.model_desc == "" and config.train.max_steps == 7


def test_run_options_given_override_the_config_and_set_overrides_both(job_config, tmp_path):
    (tmp_path / "my.yaml").write_text(MY_YAML)
    config = job_config("--config", tmp_path / "my.yaml", "--name", "Alice", "--model", "./other", "--out", "o2",
                        "--author", "", "--set", "data.name=Dan", "--set", "train.max_steps=9")
    assert (config.data.name, config.model.spec, config.out, config.data.author) == ("Dan", "./other", "o2", "")
    assert config.data.assistant_name == "Robo" and config.train.max_steps == 9


def test_run_without_a_config_keeps_the_documented_defaults(job_config):
    config = job_config("--name", "Alice")
    assert config.model.spec == "smollm2-135m" and config.out == "out"
    assert config.model.trust_remote_code is False
    assert config.data == DataArgs(name="Alice")


def test_run_without_a_name_anywhere_exits_2_with_one_line():
    result = CliRunner().invoke(main, ["run"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--name" in lines[0]


@pytest.mark.parametrize("value", ["fp16", "bf16", "Float32", "", 32])
def test_an_unknown_model_dtype_names_the_setting_and_the_choices(value):
    config = RunConfig()
    with pytest.raises(SelfcogError) as caught:
        set_value(config, "model.dtype", value)
    message = str(caught.value)
    assert "\n" not in message and "'model.dtype'" in message and "float32, bfloat16, auto" in message
    assert repr(str(value)) in message and config.model.dtype == "float32"


def test_model_dtype_in_a_yaml_file_and_on_the_command_line(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("model:\n  dtype: bfloat16\n")
    assert load_config(path).model.dtype == "bfloat16"
    path.write_text("model:\n  dtype: half\n")
    with pytest.raises(SelfcogError, match=r"my\.yaml: 'model\.dtype' needs one of float32, bfloat16, auto"):
        load_config(path)
    result = CliRunner().invoke(main, ["run", "--name", "Alice", "--set", "model.dtype=fp16"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.dtype" in lines[0] and "'fp16'" in lines[0]


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_model_dtype_auto_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, native, expected):
    import torch

    import selfcog.engine.trainer as trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: native)
    assert trainer.base_dtype("auto") == getattr(torch, expected)
    assert trainer.base_dtype("float32") == torch.float32 and trainer.base_dtype("bfloat16") == torch.bfloat16
    assert RunConfig().model.dtype == "float32"  # the default keeps the fp32 base
    with pytest.raises(SelfcogError, match="'model.dtype' needs one of"):
        trainer.base_dtype("fp16")
