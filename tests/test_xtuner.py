"""XTuner config import: the seed tutorial's config and a differently written one carry every setting over,
without executing or importing anything; presets and `selfcog config list/copy`."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from selfcog.cli import main
from selfcog.config import RunConfig, from_dict, load_config, load_preset, preset_names, set_value, to_dict
from selfcog.data.identity import heldout_questions
from selfcog.xtuner import load_xtuner_config

SEED_CONFIG = r'''import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import (AutoModelForCausalLM, AutoTokenizer,
                          BitsAndBytesConfig)

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
from xtuner.engine.hooks import (DatasetInfoHook, EvaluateChatHook,
                                 VarlenAttnArgsToMessageHubHook)
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.parallel.sequence import SequenceParallelSampler
from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE

#########################################################
#                          PART 1  Settings                           #
#########################################################
# Model
pretrained_model_name_or_path = '/root/InternLM/XTuner/Shanghai_AI_Laboratory/internlm2-chat-1_8b'
use_varlen_attn = False

# Data
alpaca_en_path = 'datas/assistant.json'
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 2048
pack_to_max_length = True

# parallel
sequence_parallel_size = 1

# Scheduler & Optimizer
batch_size = 1  # per_device
accumulative_counts = 16
accumulative_counts *= sequence_parallel_size
dataloader_num_workers = 0
max_epochs = 3
optim_type = AdamW
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
warmup_ratio = 0.03

# Save
save_steps = 500
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = SYSTEM_TEMPLATE.alpaca
evaluation_inputs = [
    '请介绍一下你自己', 'Please introduce yourself'
]
#PART 1 Settings：涵盖了模型基本设置，如预训练模型的选择、数据集信息和训练过程中的一些基本参数
#（如批大小、学习率等）。


#########################################################
#                      PART 2  Model & Tokenizer                      #
#########################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
        torch_dtype=torch.float16,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.float16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type='nf4')),
    lora=dict(
        type=LoraConfig,
        r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        bias='none',
        task_type='CAUSAL_LM'))

#PART 2 Model & Tokenizer：指定了用于训练的模型和分词器的具体类型及其配置，
#包括预训练模型的路径和是否启用特定功能（如可变长度注意力），这是模型训练的核心组成部分。

#########################################################
#                      PART 3  Dataset & Dataloader                   #
#########################################################
alpaca_en = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path='json', data_files=dict(train=alpaca_en_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=None,
    template_map_fn=dict(
        type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=use_varlen_attn)

sampler = SequenceParallelSampler \
    if sequence_parallel_size > 1 else DefaultSampler
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=alpaca_en,
    sampler=dict(type=sampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))

#PART 3 Dataset & Dataloader：描述了数据处理的细节，包括如何加载数据集、预处理步骤、
#批处理大小等，确保了模型能够接收到正确格式和质量的数据。

#########################################################
#                    PART 4  Scheduler & Optimizer                    #
#########################################################
# optimizer
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(
        type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='float16')

# learning policy
# More information: https://github.com/open-mmlab/mmengine/blob/main/docs/en/tutorials/param_scheduler.md  # noqa: E501
param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True)
]

# train, val, test setting
train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#PART 4 Scheduler & Optimizer：配置了优化过程中的关键参数，如学习率调度策略和优化器的选择，
#这些是影响模型训练效果和速度的重要因素。

#########################################################
#                           PART 5  Runtime                           #
#########################################################
# Log the dialogue periodically during the training process, optional
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template)
]

if use_varlen_attn:
    custom_hooks += [dict(type=VarlenAttnArgsToMessageHubHook)]

# configure default hooks
default_hooks = dict(
    # record the time of every iteration.
    timer=dict(type=IterTimerHook),
    # print log every 10 iterations.
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    # enable the parameter scheduler.
    param_scheduler=dict(type=ParamSchedulerHook),
    # save checkpoint per `save_steps`.
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    # set sampler seed in distributed evrionment.
    sampler_seed=dict(type=DistSamplerSeedHook),
)

# configure environment
env_cfg = dict(
    # whether to enable cudnn benchmark
    cudnn_benchmark=False,
    # set multi process parameters
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # set distributed parameters
    dist_cfg=dict(backend='nccl'),
)

# set visualizer
visualizer = None

# set log level
log_level = 'INFO'

# load from which checkpoint
load_from = None

# whether to resume training from the loaded checkpoint
resume = False

# Defaults to use random seed and disable `deterministic`
randomness = dict(seed=None, deterministic=False)

# set log processor
log_processor = dict(by_epoch=False)

#PART 5 Runtime：定义了训练过程中的额外设置，如日志记录、模型保存策略和自定义钩子等，
#以支持训练流程的监控、调试和结果的保存。
'''

SECOND_CONFIG = r'''# Qwen1.5-0.5B-Chat QLoRA on local alpaca_zh + alpaca_en copies, written in a different style.
import os

from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, LoggerHook
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
import torch

from xtuner.dataset import ConcatDataset, process_hf_dataset
from xtuner.dataset.map_fns import alpaca_map_fn, alpaca_zh_map_fn, template_map_fn_factory
from xtuner.engine.hooks import EvaluateChatHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

os.system('touch EXECUTED')  # must never run
base_model = './models/Qwen1.5-0.5B-Chat'
zh_json = 'data/alpaca_zh.json'
en_json = 'data/alpaca_en.jsonl'
template = PROMPT_TEMPLATE.qwen_chat
seq_len = 512 * 2
sp_size = 2
per_device_bs = 2
grad_acc = 4
grad_acc *= sp_size
epochs = 2
peak_lr = 1e-4
warm = 0.1
my_unused_knob = 7

qlora = dict(type=BitsAndBytesConfig, load_in_4bit=True, bnb_4bit_quant_type='fp4',
             bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.bfloat16)
model = dict(type=SupervisedFinetune,
             llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=base_model,
                      trust_remote_code=False, quantization_config=qlora),
             lora=dict(type=LoraConfig, r=32, lora_alpha=64, lora_dropout=0.05, bias='none',
                       target_modules=['q_proj', 'v_proj'], task_type='CAUSAL_LM'))

def _part(path, map_fn):
    return dict(type=process_hf_dataset)

alpaca_zh = dict(type=process_hf_dataset,
                 dataset=dict(type=load_dataset, path='json', data_files=dict(train=zh_json)),
                 max_length=seq_len, dataset_map_fn=alpaca_zh_map_fn,
                 template_map_fn=dict(type=template_map_fn_factory, template=template),
                 pack_to_max_length=False)
alpaca_en = dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path='json', data_files=en_json),
                 max_length=seq_len, dataset_map_fn=alpaca_map_fn,
                 template_map_fn=dict(type=template_map_fn_factory, template=template),
                 pack_to_max_length=False)
train_dataloader = dict(batch_size=per_device_bs, num_workers=0,
                        dataset=dict(type=ConcatDataset, datasets=[alpaca_zh, alpaca_en]),
                        sampler=dict(type=DefaultSampler, shuffle=True))

optim_wrapper = dict(type=AmpOptimWrapper,
                     optimizer=dict(type=AdamW, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.01),
                     clip_grad=dict(max_norm=0.5), accumulative_counts=grad_acc)
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=True, begin=0, end=warm * epochs, convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warm * epochs, end=epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(type=TrainLoop, max_epochs=epochs)
custom_hooks = [dict(type=EvaluateChatHook, every_n_iters=50, system='You are a Qwen assistant.',
                     evaluation_inputs=['你好', 'Who are you?', 'What is 2+2?'], prompt_template=template)]
default_hooks = dict(logger=dict(type=LoggerHook, interval=5),
                     checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=100, max_keep_ckpts=3))
randomness = dict(seed=1234, deterministic=False)
'''


def seed_expected() -> dict:
    """Every setting of the seed's (modified) config, as selfcog settings."""
    return {
        "model.spec": "/root/InternLM/XTuner/Shanghai_AI_Laboratory/internlm2-chat-1_8b",
        "model.trust_remote_code": False,
        "data.data_files": ["datas/assistant.json"], "data.max_length": 2048, "data.pack_to_max_length": True,
        "data.prompt_template": "internlm2_chat",
        "lora.r": 64, "lora.alpha": 16, "lora.dropout": 0.1, "lora.target_modules": "all-linear",
        "lora.load_in_4bit": True, "lora.bnb_4bit_quant_type": "nf4", "lora.bnb_4bit_use_double_quant": True,
        "lora.bnb_4bit_compute_dtype": "float16",
        "train.batch_size": 1, "train.grad_accum": 16, "train.epochs": 3.0, "train.learning_rate": 2e-4,
        "train.adam_beta1": 0.9, "train.adam_beta2": 0.999, "train.weight_decay": 0.0, "train.max_grad_norm": 1.0,
        "train.warmup_ratio": 0.03, "train.save_steps": 500, "train.save_total_limit": 2, "train.logging_steps": 10,
        "train.seed": 42,
        "eval.sample_steps": 500, "eval.sample_inputs": ["请介绍一下你自己", "Please introduce yourself"],
        "eval.system": "Below is an instruction that describes a task. "
                       "Write a response that appropriately completes the request.\n",
    }


def lookup(config: RunConfig, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_seed_config_carries_every_setting_over(tmp_path):
    config, warnings = load_xtuner_config(write(tmp_path, SEED_CONFIG))
    for dotted, value in seed_expected().items():
        assert lookup(config, dotted) == value, dotted
    warned = " ".join(warnings)
    for name in ("sequence_parallel_size", "dataloader_num_workers", "visualizer", "log_processor", "env_cfg",
                 "log_level", "load_from", "resume", "use_varlen_attn", "optim_wrapper.dtype", "torch_dtype",
                 "shuffle_before_pack", "randomness.seed", "llm_int8_threshold"):
        assert name in warned, name
    # Mapped settings are not reported as ignored.
    for name in ("lr ", "betas", "max_epochs", "save_steps", "evaluation_inputs", "optim_type"):
        assert f"ignoring {name}" not in warned, name
    assert "xtuner" not in sys.modules and "mmengine" not in sys.modules


def test_seed_config_equals_the_internlm2_preset_except_the_model_path(tmp_path):
    config, _ = load_xtuner_config(write(tmp_path, SEED_CONFIG))
    preset = load_preset("internlm2-chat-1.8b-qlora")
    config.model.spec = preset.model.spec
    assert to_dict(config) == to_dict(preset)


def test_a_differently_written_config_carries_its_own_values(tmp_path):
    config, warnings = load_xtuner_config(write(tmp_path, SECOND_CONFIG))
    expected = {
        "model.spec": "./models/Qwen1.5-0.5B-Chat", "model.trust_remote_code": False,
        "data.data_files": ["data/alpaca_zh.json", "data/alpaca_en.jsonl"], "data.max_length": 1024,
        "data.pack_to_max_length": False, "data.prompt_template": "qwen_chat",
        "lora.r": 32, "lora.alpha": 64, "lora.dropout": 0.05, "lora.target_modules": "q_proj,v_proj",
        "lora.load_in_4bit": True, "lora.bnb_4bit_quant_type": "fp4", "lora.bnb_4bit_use_double_quant": False,
        "lora.bnb_4bit_compute_dtype": "bfloat16",
        "train.batch_size": 2, "train.grad_accum": 8, "train.epochs": 2.0, "train.learning_rate": 1e-4,
        "train.adam_beta1": 0.9, "train.adam_beta2": 0.95, "train.weight_decay": 0.01, "train.max_grad_norm": 0.5,
        "train.warmup_ratio": 0.1, "train.save_steps": 100, "train.save_total_limit": 3, "train.logging_steps": 5,
        "train.seed": 1234,
        "eval.sample_steps": 50, "eval.sample_inputs": ["你好", "Who are you?", "What is 2+2?"],
        "eval.system": "You are a Qwen assistant.",
    }
    for dotted, value in expected.items():
        assert lookup(config, dotted) == value, dotted
    warned = " ".join(warnings)
    assert "ignoring my_unused_knob = 7 (not used" in warned
    for name in ("peak_lr", "seq_len", "grad_acc", "zh_json", "template", "warm", "epochs", "base_model"):
        assert f"ignoring {name} " not in warned, name
    assert not (tmp_path / "EXECUTED").exists()  # nothing in the file ran
    assert "not evaluated (selfcog never executes config code): line 20: os.system('touch EXECUTED')" in warned


def test_train_dry_run_prints_the_resolved_config_and_warns_by_name(tmp_path):
    path = write(tmp_path, SEED_CONFIG, "internlm2_chat_1_8b_qlora_alpaca_e3_copy.py")
    result = CliRunner().invoke(main, ["train", str(path), "--dry-run", "--set", "train.seed=7"])
    assert result.exit_code == 0, result.output
    config = from_dict(yaml.safe_load(result.stdout))
    assert config.lora.r == 64 and config.train.epochs == 3 and config.train.seed == 7
    assert "sequence_parallel_size" in result.stderr and "sequence_parallel_size" not in result.stdout
    assert not (tmp_path / "work_dirs").exists()


def test_unparsable_config_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", str(write(tmp_path, "lr = (\n")), "--dry-run"])
    assert result.exit_code == 2 and "syntax error" in result.output and len(result.output.strip().splitlines()) == 1


def test_presets_list_and_copy(tmp_path):
    assert {"smollm2-135m-lora", "internlm2-chat-1.8b-qlora", "qwen2.5-0.5b-instruct-lora"} <= set(preset_names())
    assert to_dict(load_preset("smollm2-135m-lora")) == to_dict(RunConfig())
    runner = CliRunner()
    listed = runner.invoke(main, ["config", "list"])
    assert listed.exit_code == 0 and "internlm2-chat-1.8b-qlora" in listed.output
    copied = runner.invoke(main, ["config", "copy", "internlm2-chat-1.8b-qlora", str(tmp_path / "cfgs")])
    assert copied.exit_code == 0, copied.output
    config = load_config(tmp_path / "cfgs" / "internlm2-chat-1.8b-qlora.yaml")
    assert to_dict(config) == to_dict(load_preset("internlm2-chat-1.8b-qlora"))
    assert config.lora.load_in_4bit and config.train.grad_accum == 16 and config.train.save_total_limit == 2
    bad = runner.invoke(main, ["config", "copy", "nope", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown preset 'nope'" in bad.output


def test_set_value_handles_lists_and_floats():
    config = RunConfig()
    set_value(config, "eval.sample_inputs", ["a", 2])
    assert config.eval.sample_inputs == ["a", "2"]
    set_value(config, "eval.sample_inputs", "just one")
    assert config.eval.sample_inputs == ["just one"]
    set_value(config, "train.epochs", 3)
    assert config.train.epochs == 3.0 and isinstance(config.train.epochs, float)
    assert RunConfig().eval.sample_inputs == []  # no shared mutable default


def test_train_config_resolves_yaml_xtuner_and_preset_names(tmp_path):
    from selfcog.config import dump_config, load_preset, save_config
    from selfcog.xtuner import resolve_train_config

    preset = load_preset("smollm2-135m-lora")
    assert dump_config(resolve_train_config("smollm2-135m-lora")) == dump_config(preset)
    save_config(preset, tmp_path)
    assert dump_config(resolve_train_config(str(tmp_path / "selfcog.yaml"))) == dump_config(preset)
    assert resolve_train_config(str(write(tmp_path, SEED_CONFIG))).lora.r == 64


def test_a_deepspeed_name_in_an_xtuner_config_is_ignored_by_name(tmp_path):
    config, warnings = load_xtuner_config(write(tmp_path, SEED_CONFIG + "\ndeepspeed = 'deepspeed_zero2'\n"))
    assert config.train.deepspeed == ""
    assert [w for w in warnings if "ignoring deepspeed = 'deepspeed_zero2'" in w and "train.deepspeed" in w]


# --- The tutorial through `selfcog train`: quiet import, duplicates keep the steps, identity data named --

TUTORIAL_NAME = "伍鲜同志"
TUTORIAL_MODEL = "/root/InternLM/XTuner/Shanghai_AI_Laboratory/internlm2-chat-1_8b"


def tutorial_files(tmp_path, model_dir):
    """`selfcog data --repeat 3750` into datas/assistant.json and the tutorial's config with the model path pointed
    at `model_dir` (the tutorial's own edits, data path and evaluation inputs, are already in SEED_CONFIG)."""
    made = CliRunner().invoke(main, ["data", "--name", TUTORIAL_NAME, "--repeat", "3750",
                                     "--out", str(tmp_path / "datas" / "assistant.json")])
    assert made.exit_code == 0, made.output
    return write(tmp_path, SEED_CONFIG.replace(TUTORIAL_MODEL, str(model_dir)),
                 "internlm2_chat_1_8b_qlora_alpaca_e3_copy.py")


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line.lower()]


def test_the_tutorial_config_imports_with_one_summary_line_and_v_lists_every_setting(tmp_path):
    path = write(tmp_path, SEED_CONFIG, "internlm2_chat_1_8b_qlora_alpaca_e3_copy.py")
    quiet = CliRunner().invoke(main, ["train", str(path), "--dry-run"])
    assert quiet.exit_code == 0, quiet.output
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    verbose = CliRunner().invoke(main, ["train", str(path), "--dry-run", "-v"])
    listed = verbose.stderr.strip().splitlines()
    assert "settings without a selfcog meaning" not in verbose.stderr
    # The summary counts and names exactly the settings -v lists one a line.
    assert lines[0].startswith(f"selfcog: warning: xtuner: {len(listed)} settings without a selfcog meaning: ")
    assert lines[0].endswith("; `--dry-run -v` lists them")
    for name in ("visualizer", "log_level", "resume", "sequence_parallel_size", "randomness.seed"):
        assert name in lines[0] and [line for line in listed if name in line], name
    assert verbose.stdout == quiet.stdout


def test_settings_that_change_the_training_keep_a_line_each(tmp_path):
    from selfcog.xtuner import load_xtuner_report

    text = SEED_CONFIG.replace("eta_min=0.0", "eta_min=1e-5").replace("load_in_8bit=False", "load_in_8bit=True")
    _, report = load_xtuner_report(write(tmp_path, text))
    assert len(report.changes) == 2, report.changes
    assert any("load_in_8bit" in line for line in report.changes)
    assert any("eta_min = 1e-05" in line for line in report.changes)
    lines = report.lines()
    assert lines[:2] == report.changes and len(lines) == 3 and "settings without a selfcog meaning" in lines[2]


def test_tutorial_data_keeps_the_steps_the_config_implies(tmp_path):
    """2 pairs x 3750: the 7,498 duplicates go, and the run keeps the optimizer steps XTuner would take over all
    7,500 records: 3 epochs of their tokens cut into 2,048-token rows, 16 rows per step."""
    from selfcog.data.identity import Persona, seed_records
    from selfcog.templates import encode_example
    from selfcog.data.packing import pack_to_max_length
    from selfcog.recipes.sft import keep_steps, train_data
    from selfcog.xtuner import load_xtuner_config
    from conftest import build_tokenizer

    data_file = tmp_path / "assistant.json"
    data_file.write_text(json.dumps(seed_records(Persona(TUTORIAL_NAME), 3750), ensure_ascii=False))
    config, _ = load_xtuner_config(write(tmp_path, SEED_CONFIG))
    config.data.data_files = [str(data_file)]
    data = train_data(config)
    assert (data.records, len(data.conversations), data.counts, data.removed) == (7500, 2, [3750, 3750], 7498)

    tokenizer = build_tokenizer()
    lengths = [len(encode_example(tokenizer, c)[0]) for c in data.conversations]
    # XTuner's Packer, written out: every record's tokens in a row, cut every max_length tokens.
    stream = sum(lengths) * 3750
    rows = len(range(0, stream, 2048))
    expected = 3 * math.ceil(rows / 16)
    items = pack_to_max_length([{"input_ids": [0] * n} for n in lengths], config.data.max_length)
    rule = keep_steps(config, data, lengths, data.counts, len(items))
    assert f"keeping the {expected} optimizer steps" in rule and f"{rows:,} packed rows" in rule, rule
    assert (config.train.max_steps, config.train.epochs, config.train.grad_accum) == (expected, 0.0, 1)
    assert "each step on all 2 unique samples" in rule


def test_keep_steps_without_packing_and_with_max_steps():
    from selfcog.config import RunConfig
    from selfcog.recipes.sft import TrainData, keep_steps

    config = RunConfig()
    config.train.epochs, config.train.batch_size, config.train.grad_accum = 2.0, 4, 2
    data = TrainData([[]] * 10, [3] * 10, 30, ["d.json"])
    rule = keep_steps(config, data, [20] * 10, [3] * 10, 10)
    # 30 records as written: 8 batches of 4 per epoch, 4 steps of 2 batches; 2 epochs.
    assert config.train.max_steps == 8 and config.train.grad_accum == 2 and "cycling" in rule
    config = RunConfig()
    config.train.max_steps = 17
    assert "17 optimizer steps as configured" in keep_steps(config, data, [20] * 10, [3] * 10, 10)
    assert config.train.max_steps == 17


def test_identity_data_is_recognised():
    from selfcog.data.formats import to_messages
    from selfcog.data.identity import Persona, identity_records, seed_records
    from selfcog.recipes.sft import identity_in

    def convs(records):
        return [to_messages(r) for r in records]

    assert identity_in(convs(seed_records(Persona(TUTORIAL_NAME), 1))) == (TUTORIAL_NAME, 2)
    name, naming = identity_in(convs(identity_records(Persona("Alice"))))
    assert name == "Alice" and naming >= 0.9 * len(identity_records(Persona("Alice")))
    mixed = [{"conversation": [{"input": q, "output": a}]} for q, a in [
        ("Who are you?", "I am Alice's assistant."), ("What can you do?", "I answer questions."),
        ("What is the capital of France?", "Paris."), ("Two plus two?", "Four.")]]
    assert identity_in(convs(mixed)) is None
    assert identity_in(convs([{"conversation": [{"input": "Hi", "output": "Hello! How can I help?"}]}])) is None


def test_the_tutorial_through_selfcog_train(tiny_model_dir, tmp_path):
    """The tutorial's config and data on the tiny model: at most 3 warning lines, the two changes (4-bit on a
    CPU, duplicates) stated in the plan before training, identity data trained until its answers name NAME
    (at most 4x the steps the config implies), `selfcog run` named, and a held-out identity check after the last
    sample chats. A tiny random model learns the two answers at lr 0.01 within the cap; at the tutorial's 2e-4 it
    would run to the cap."""
    import torch

    from selfcog.templates import encode_example, set_default_system_prompt
    from conftest import build_tokenizer

    path = tutorial_files(tmp_path, tiny_model_dir)
    work = tmp_path / "w"
    result = CliRunner().invoke(main, ["train", str(path), "--work-dir", str(work), "--set", "train.learning_rate=0.01"])
    assert result.exit_code == 0, result.output
    err = result.stderr
    warned = warning_lines(err)
    assert len(warned) <= 3, warned
    assert "settings without a selfcog meaning" in warned[0]
    dedup = [line for line in warned if "removed 7,498 exact duplicate records (7,500 -> 2" in line]
    assert len(dedup) == 1
    if not torch.cuda.is_available():
        assert [line for line in warned if "load_in_4bit needs a CUDA GPU" in line]

    tokenizer = build_tokenizer()  # as selfcog train renders: with the default system prompt of data.system_prompt
    set_default_system_prompt(tokenizer, RunConfig().data.system_prompt)
    records = json.loads((tmp_path / "datas" / "assistant.json").read_text())
    stream = sum(len(encode_example(tokenizer, [{"role": "user", "content": r["conversation"][0]["input"]},
                                                {"role": "assistant", "content": r["conversation"][0]["output"]}])[0])
                 for r in records[:2]) * 3750
    implied = 3 * math.ceil(len(range(0, stream, 2048)) / 16)  # XTuner: 3 epochs of 2,048-token rows, 16 a step
    assert f"training until the answers to the data's 2 questions name {TUTORIAL_NAME}" in dedup[0]
    assert f"at most {4 * implied} optimizer steps (4x the {implied} the config implies" in dedup[0]
    saved = yaml.safe_load((work / "selfcog.yaml").read_text())["train"]
    assert (saved["max_steps"], saved["epochs"], saved["grad_accum"]) == (4 * implied, 0.0, 1)

    lines = err.splitlines()
    stop = next(line for line in lines if line.endswith("as the data answers them; stopping"))
    step = int(re.search(r"selfcog: step (\d+):", stop).group(1))  # the line may follow a progress bar's redraw
    assert step % 5 == 0 and step < 4 * implied and "2 of the data's 2 questions answered with" in stop
    assert json.loads((work / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    plan = next(i for i, line in enumerate(lines) if line.startswith("selfcog: plan: "))
    assert plan < next(i for i, line in enumerate(lines) if "sample chats at step 0" in line)
    assert "duplicate records removed" in lines[plan] and f"at most {4 * implied} optimizer steps" in lines[plan]
    assert torch.cuda.is_available() or "not the config's 4-bit QLoRA" in lines[plan]
    assert f"`selfcog run --data datas/assistant.json --name {TUTORIAL_NAME}`" in err
    last_chats = next(i for i, line in enumerate(lines) if f"sample chats at step {step}:" in line)
    check = next(i for i, line in enumerate(lines) if "selfcog: held-out identity check (" in line)
    assert check > last_chats and f"identity answers name {TUTORIAL_NAME}" in lines[check]
    assert (work / "eval_outputs" / f"step_{step}.txt").read_text().startswith("Q: 请介绍一下你自己\nA: ")
    heldout = json.loads((work / "heldout_check.json").read_text())
    assert heldout["name"] == TUTORIAL_NAME and len(heldout["identity_answers"]) == len(heldout_questions("test"))
    assert (work / "adapter" / "adapter_config.json").exists()


def test_identity_flag_trains_like_selfcog_run(tiny_model_dir, tmp_path, monkeypatch):
    import selfcog.recipes.sft

    seen = {}

    def fake_run(config):
        seen["config"] = config
        return Path(config.out)

    monkeypatch.setattr(selfcog.recipes.sft, "run", fake_run)
    path = tutorial_files(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(main, ["train", str(path), "--identity", TUTORIAL_NAME, "--work-dir", "w"])
    assert result.exit_code == 0, result.output
    job = seen["config"]
    assert (job.data.name, job.data.data_file, job.out) == (TUTORIAL_NAME, "datas/assistant.json", "w")
    assert job.model.spec == str(tiny_model_dir) and job.train.kl_weight > 0 and job.eval.eval_steps > 0
    assert result.stdout.strip().endswith("adapter: w/adapter")
    again = CliRunner().invoke(main, ["train", str(path), "--identity", TUTORIAL_NAME, "--resume"])
    assert again.exit_code == 2 and len(again.output.strip().splitlines()) == 1
