"""XTuner config import: the seed tutorial's config and a differently written one carry every setting over,
without executing or importing anything; presets and `selfcog config list/copy`."""

from __future__ import annotations

import sys

import yaml
from click.testing import CliRunner

from selfcog.cli import main
from selfcog.config import RunConfig, from_dict, load_config, load_preset, preset_names, set_value, to_dict
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
    from selfcog.config import dump_config, load_preset, resolve_train_config, save_config

    preset = load_preset("smollm2-135m-lora")
    assert dump_config(resolve_train_config("smollm2-135m-lora")) == dump_config(preset)
    save_config(preset, tmp_path)
    assert dump_config(resolve_train_config(str(tmp_path / "selfcog.yaml"))) == dump_config(preset)
    assert resolve_train_config(str(write(tmp_path, SEED_CONFIG))).lora.r == 64


def test_a_deepspeed_name_in_an_xtuner_config_is_ignored_by_name(tmp_path):
    config, warnings = load_xtuner_config(write(tmp_path, SEED_CONFIG + "\ndeepspeed = 'deepspeed_zero2'\n"))
    assert config.train.deepspeed == ""
    assert [w for w in warnings if "ignoring deepspeed = 'deepspeed_zero2'" in w and "train.deepspeed" in w]
