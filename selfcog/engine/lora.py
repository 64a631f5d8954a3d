"""LoRA adapters: which layers and modules get one, wrapping the model with peft, saving the adapter."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from selfcog.atomic import atomic_dir
from selfcog.config import RunConfig, save_config


def add_lora(model, config: RunConfig):
    layers = adapted_layers(model, config.lora.top_layers)
    targets = lora_targets(config.lora.target_modules)
    if layers is not None and targets == "all-linear":
        targets = linear_names(model)  # peft takes a layer subset only with named targets
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=targets, task_type="CAUSAL_LM", layers_to_transform=layers)
    with warnings.catch_warnings():
        # peft (up to 0.21) reads transformers' deprecated `is_gradient_checkpointing` while wrapping the model;
        # the warning is about peft's code, not ours, and would print on every run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def linear_names(model) -> list[str]:
    """Names of the linear layers inside the decoder (what peft's `all-linear` means): the LM head excluded."""
    output = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not output})


def adapted_layers(model, top_layers: int) -> list[int] | None:
    """Indices of the last `top_layers` decoder layers, or None for all of them."""
    count = model.config.num_hidden_layers
    if top_layers <= 0 or top_layers >= count:
        return None
    return list(range(count - top_layers, count))


def lora_targets(setting: str) -> str | list[str]:
    """`all-linear`, or a comma-separated list of module names such as `q_proj,v_proj`."""
    return setting if setting == "all-linear" else [name.strip() for name in setting.split(",") if name.strip()]


def save_adapter(peft_model, tokenizer, config: RunConfig, target: Path) -> Path:
    """peft-format adapter plus tokenizer and the resolved config, renamed into place when complete."""
    with atomic_dir(target) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_config(config, tmp)
    return target
