"""Merge a LoRA adapter into its base model and write a standard HF model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from selfcog.atomic import atomic_dir
from selfcog.config import RunConfig, save_config
from selfcog.errors import SelfcogError
from selfcog.models import load_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def save_merged(peft_model, tokenizer, target: Path, config: RunConfig | None = None,
                max_shard_size: str = "2GB", dtype: str = "fp32") -> Path:
    """Fold the adapter into the base weights (W + B·A·alpha/r) and write `target` atomically.

    The result loads with stock `AutoModelForCausalLM` / `AutoTokenizer`; the tokenizer (and its chat
    template) is the one training used.
    """
    merged = peft_model.merge_and_unload()
    merged.to(DTYPES[dtype])
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if config is not None:
            save_config(config, tmp)
    return target


def merge(base: str, adapter: Path, out: Path, max_shard_size: str = "2GB", dtype: str = "fp32") -> Path:
    """`selfcog merge`: load BASE, apply ADAPTER, write the merged model to OUT."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SelfcogError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    if dtype not in DTYPES:
        raise SelfcogError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    model, tokenizer = load_model(base, dtype=torch.float32, device="cpu")
    peft_model = PeftModel.from_pretrained(model, adapter)
    return save_merged(peft_model, tokenizer, Path(out), max_shard_size=max_shard_size, dtype=dtype)
