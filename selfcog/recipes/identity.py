"""`selfcog run`'s fine-tune: LoRA on the identity and preservation samples with the KL and name terms, early stop
on the dev sets, the adapter written to OUT/adapter. `selfcog.run` calls `fit` between scoring the base model and
merging.

Before the first step the base model's side of the KL term (its top-k next-token log-probs) and the frozen layers'
output for every preservation sample are computed once, cached per base weights; the steps then never run the base
model or, for preservation samples, the frozen layers (docs/method.md, "Training")."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

from selfcog.config import RunConfig
from selfcog.data.tokenize import pack_batch
from selfcog.distributed import liger_args
from selfcog.engine.callbacks import IdentityEarlyStop, JsonlLog
from selfcog.engine.frozen_layers import attach_bottom_hidden, reusable
from selfcog.engine.lora import adapted_layers, add_lora, save_adapter
from selfcog.engine.loss import attach_base_topk, loop_token_ids, name_token_ids
from selfcog.engine.trainer import PreservingTrainer, use_bf16
from selfcog.evaluate import Scores

logger = logging.getLogger(__name__)


def fit(config: RunConfig, model, tokenizer, examples: list[dict], out_dir: Path,
        base_dev: Scores | None = None, fingerprint: str | None = None) -> tuple[object, dict]:
    """Train LoRA on `examples`; write `out_dir/adapter` atomically. Returns (peft model, training summary).

    `fingerprint` (the base weights' id) lets the preservation samples' base top-k come from the cache."""
    out_dir = Path(out_dir)
    began = time.perf_counter()
    if config.train.kl_weight > 0 and config.train.kl_top_k > 0:
        examples = attach_base_topk(model, examples, config.train.kl_top_k, fingerprint)
    frozen = frozen_below(model, config, examples)
    if frozen:
        examples = attach_bottom_hidden(model, examples, frozen, fingerprint)
    prepare_seconds = time.perf_counter() - began
    torch.manual_seed(config.train.seed)
    peft_model = add_lora(model, config)
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".train-"))
    stopper = IdentityEarlyStop(config, tokenizer, base_dev)
    callbacks = [stopper, JsonlLog(out_dir / "log.jsonl")]
    trainer = PreservingTrainer(
        model=peft_model, args=training_args(config, work), train_dataset=examples, data_collator=pack_batch,
        callbacks=callbacks, kl_weight=config.train.kl_weight,
        kl_prompt=config.train.kl_prompt, frozen_layers=frozen, name_weight=config.train.name_weight,
        reject_weight=config.train.reject_weight, loop_weight=config.train.loop_weight,
        name_ids=name_token_ids(tokenizer, config.data.name, examples) if config.data.name else None,
        loop_ids=loop_token_ids(tokenizer, config.data.name, examples) if config.data.name else None)
    result = trainer.train()
    peft_model.eval()
    save_adapter(peft_model, tokenizer, config, out_dir / "adapter")
    shutil.rmtree(work, ignore_errors=True)
    summary = {"steps": result.global_step, "max_steps": config.train.max_steps, "train_loss": result.training_loss,
               "train_seconds": result.metrics.get("train_runtime"), "dev_history": stopper.history,
               "dev_check_seconds": round(stopper.seconds, 1), "tokens_trained": trainer.tokens_trained,
               "prepare_seconds": round(prepare_seconds, 1), "frozen_layers_run_once": frozen,
               "tokens": sum(len(e["input_ids"]) for e in examples)}
    return peft_model, summary


def frozen_below(model, config: RunConfig, examples: list[dict]) -> int:
    """The first adapted decoder layer when the frozen ones below it can be run once per sample (see
    `selfcog.engine.frozen_layers`), else 0."""
    layers = adapted_layers(model, config.lora.top_layers)
    if not config.train.reuse_frozen_layers or not layers or not examples:
        return 0
    if not reusable(model, layers[0], examples[0]["input_ids"]):
        logger.info(f"selfcog: {type(model).__name__} does not take its layer inputs back as inputs_embeds unchanged; "
                    "running every layer in every step")
        return 0
    return layers[0]


def training_args(config: RunConfig, work_dir: Path) -> TrainingArguments:
    t = config.train
    return TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(t.warmup_ratio * t.max_steps), max_steps=t.max_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps,
        save_strategy="no", report_to=[], bf16=use_bf16(t.bf16), use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, seed=t.seed, data_seed=t.seed, remove_unused_columns=False,
        **liger_args(t.liger_kernel),
    )
