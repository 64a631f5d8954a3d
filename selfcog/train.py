"""LoRA training on top of the transformers Trainer, with three small additions:

- `PreservingTrainer.compute_loss`: cross-entropy on assistant tokens, plus a KL term that keeps the
  preservation samples' token distributions close to the base model's (adapter disabled, no grad).
  Plain self-distilled SFT still drifts on a 135M model; the KL term is what holds general answers.
- `IdentityEarlyStop`: scores the dev phrasings every `eval_steps` and stops once the identity is
  learned while retention holds.
- `JsonlLog`: every log line also goes to `log.jsonl`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from selfcog.atomic import atomic_dir
from selfcog.config import RunConfig, save_config
from selfcog.data.tokenize import pack_batch
from selfcog.evaluate import Scores, score, with_retention
from selfcog.models import log
from selfcog.templates import IGNORE_INDEX


def add_lora(model, config: RunConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def use_bf16(setting: str) -> bool:
    """bf16 autocast: `auto` turns it on for GPUs that support it and CPUs with native bf16 instructions.

    On a CPU without AVX512-BF16 or AMX, bf16 matmuls are emulated: measured here on an AVX2-only
    2-core machine, 0.55 GFLOP/s bf16 against 20 GFLOP/s fp32, so autocast would make training ~10x slower.
    """
    value = str(setting).lower()
    if value in ("false", "0", "no", "off"):
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return value in ("true", "1", "yes", "on") or cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def preservation_loss(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || tuned) over the given positions (rows of logits)."""
    tuned = F.log_softmax(logits.float(), dim=-1)
    base = F.log_softmax(base_logits.float(), dim=-1)
    return F.kl_div(tuned, base, log_target=True, reduction="batchmean")


class PreservingTrainer(Trainer):
    """Trainer whose loss adds `kl_weight` x KL(base || tuned) on preservation samples' answer tokens."""

    def __init__(self, *args, kl_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_weight = kl_weight
        # Our loss is a per-token mean of the micro-batch; let the Trainer scale it for accumulation.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        preserve = inputs.pop("preserve_mask")
        # Position t predicts token t+1; only positions whose next token carries loss need logits at all,
        # so the LM head (a fifth of this model's compute) runs on those rows only.
        keep = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
        outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
        logits = outputs.logits[0]
        loss = F.cross_entropy(logits.float(), labels[0, keep + 1])
        kl_rows = preserve[0, keep]
        if self.kl_weight > 0 and kl_rows.any():
            loss = loss + self.kl_weight * preservation_loss(logits[kl_rows], self.base_logits(model, inputs, keep[kl_rows]))
        return (loss, outputs) if return_outputs else loss

    def base_logits(self, model, inputs, positions: torch.Tensor) -> torch.Tensor:
        """The base model's logits (adapter off, no grad) at `positions`.

        pack_batch puts preservation samples last, so only that suffix of the row is run again: position ids
        restart at every sample, so the suffix sees exactly the attention it had in the full row.
        """
        start = int(positions.min()) - int(inputs["position_ids"][0, positions.min()])
        base = self.accelerator.unwrap_model(model)
        with torch.no_grad(), base.disable_adapter():
            out = base(input_ids=inputs["input_ids"][:, start:], position_ids=inputs["position_ids"][:, start:],
                       use_cache=False, logits_to_keep=positions - start)
        return out.logits[0]


class IdentityEarlyStop(TrainerCallback):
    """Every `eval_steps`: score the dev phrasings; stop once identity, retention and leakage all pass."""

    def __init__(self, config: RunConfig, tokenizer, base_dev: Scores | None):
        self.config, self.tokenizer, self.base_dev = config, tokenizer, base_dev
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.config.eval.eval_steps
        if not every or state.global_step % every or state.global_step < self.config.eval.min_steps:
            return control
        if state.global_step >= state.max_steps:
            return control
        model.eval()
        dev = score(model, self.tokenizer, self.config.data.name, "dev", self.config.eval.max_new_tokens)
        model.train()
        if self.base_dev is not None:
            with_retention(dev, self.base_dev)
        entry = {"step": state.global_step, **dev.summary()}
        self.history.append(entry)
        log(f"selfcog: step {state.global_step} dev identity {dev.identity:.2f} "
            f"retention {fmt(dev.retention)} leakage {dev.leakage:.2f}")
        ev = self.config.eval
        if (dev.identity >= ev.identity_threshold and dev.leakage <= ev.leakage_max
                and (dev.retention is None or dev.retention >= ev.retention_threshold)):
            log(f"selfcog: identity learned at step {state.global_step}; stopping early")
            control.should_training_stop = True
        return control


class JsonlLog(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def training_args(config: RunConfig, work_dir: Path) -> TrainingArguments:
    t = config.train
    return TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(t.warmup_ratio * t.max_steps), max_steps=t.max_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps,
        save_strategy="no", report_to=[], bf16=use_bf16(t.bf16), use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, seed=t.seed, data_seed=t.seed, remove_unused_columns=False,
    )


def fit(config: RunConfig, model, tokenizer, examples: list[dict], out_dir: Path,
        base_dev: Scores | None = None) -> tuple[object, dict]:
    """Train LoRA on `examples`; write `out_dir/adapter` atomically. Returns (peft model, training summary)."""
    out_dir = Path(out_dir)
    torch.manual_seed(config.train.seed)
    peft_model = add_lora(model, config)
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".train-"))
    stopper = IdentityEarlyStop(config, tokenizer, base_dev)
    trainer = PreservingTrainer(
        model=peft_model, args=training_args(config, work), train_dataset=examples, data_collator=pack_batch,
        callbacks=[stopper, JsonlLog(out_dir / "log.jsonl")], kl_weight=config.train.kl_weight)
    result = trainer.train()
    peft_model.eval()
    save_adapter(peft_model, tokenizer, config, out_dir / "adapter")
    shutil.rmtree(work, ignore_errors=True)
    summary = {"steps": result.global_step, "train_loss": result.training_loss,
               "train_seconds": result.metrics.get("train_runtime"), "dev_history": stopper.history,
               "tokens": sum(len(e["input_ids"]) for e in examples)}
    return peft_model, summary


def save_adapter(peft_model, tokenizer, config: RunConfig, target: Path) -> Path:
    """peft-format adapter plus tokenizer and the resolved config, renamed into place when complete."""
    with atomic_dir(target) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_config(config, tmp)
    return target
