"""The transformers Trainer with selfcog's loss: cross-entropy on assistant tokens over padding-free packed rows,
plus the KL and name terms on preservation samples (`PreservingTrainer`), and its data-parallel weighting for
`selfcog train` under torchrun (`EngineTrainer`)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import Trainer

from selfcog.attention import check_used, packed_attention, packed_layout
from selfcog.config import CHOICES
from selfcog.data.tokenize import sample_tokens
from selfcog.engine.frozen_layers import bottom_then_top
from selfcog.engine.loss import (gathered_log_probs, name_unlikelihood, preservation_loss, rejected_unlikelihood,
                                 said_again, topk_preservation_loss)
from selfcog.engine.memory import freed_memory_kept
from selfcog.errors import SelfcogError
from selfcog.hardware import cpu_has_native_bf16
from selfcog.templates import IGNORE_INDEX


class PreservingTrainer(Trainer):
    """Trainer whose loss adds `kl_weight` x KL(base || tuned) on preservation samples' answer tokens."""

    def __init__(self, *args, kl_weight: float = 1.0, kl_prompt: bool = False, frozen_layers: int = 0,
                 name_ids: list[int] | None = None, name_weight: float = 0.0, reject_weight: float = 0.0,
                 loop_ids: list[int] | None = None, loop_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_weight, self.kl_prompt = kl_weight, kl_prompt
        # Tokens of NAME that ordinary text never uses; kept improbable at every preservation position.
        self.name_ids = torch.tensor(name_ids or [], dtype=torch.long)
        self.name_weight = name_weight if name_ids else 0.0
        # NAME's tokens that identity answers use nowhere else: kept improbable in an identity answer once it has said
        # NAME, wherever its target goes on with other words (selfcog.engine.loss.said_again).
        self.loop_ids = torch.tensor(loop_ids or [], dtype=torch.long)
        self.loop_weight = loop_weight if loop_ids else 0.0
        # Samples flagged `reject` (selfcog.data.reject) carry an identity opening after an ordinary prompt: its
        # probability as a whole is pushed down instead of up.
        self.reject_weight = reject_weight
        # Batches carrying `bottom_hidden` (selfcog.engine.frozen_layers) run the layers below this one only over the
        # prefix and the samples that have no stored states.
        self.frozen_layers = frozen_layers
        self.tokens_trained = 0  # sample tokens (the shared prefix counted once per sample) that went through training
        # Our loss is a per-token mean of the micro-batch; let the Trainer scale it for accumulation.
        self.model_accepts_loss_kwargs = False

    def train(self, *args, **kwargs):
        # Packed attention stays on for the whole run: gradient checkpointing re-runs layers in the backward pass.
        # Without a `packed_layout` it is plain SDPA, so generation inside callbacks is unaffected.
        with packed_attention(self.model), freed_memory_kept() if self.args.device.type == "cpu" else nullcontext():
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        preserve = inputs.pop("preserve_mask")
        lengths = inputs.pop("packed_lengths")
        base_ids, base_logp = inputs.pop("base_ids", None), inputs.pop("base_logp", None)
        bottom_hidden = inputs.pop("bottom_hidden", None)
        reject = inputs.pop("reject_mask", None)
        self.tokens_trained += sample_tokens(lengths)
        # Position t predicts token t+1; only positions whose next token carries loss (and, with kl_prompt, every
        # preservation position) need logits at all, so the LM head (a fifth of this model's compute) runs on
        # those rows only.
        targets = labels[0, 1:] != IGNORE_INDEX
        wanted = targets | preserve[0, :-1] if self.kl_prompt else targets
        keep = wanted.nonzero().squeeze(1)
        layout = packed_layout(lengths, inputs["input_ids"].device)
        if bottom_hidden is not None and self.frozen_layers and preserve.any():
            outputs = bottom_then_top(model, self.frozen_layers, inputs, bottom_hidden, preserve, lengths,
                                      logits_to_keep=keep, packed_layout=layout)
        else:
            outputs = model(**inputs, use_cache=False, logits_to_keep=keep, packed_layout=layout)
        check_used(layout, model)
        logits = outputs.logits.squeeze(0)  # a view: `[0]` would add a zero-filled [rows, vocab] gradient
        ce_rows = targets[keep]
        rejected = reject[0, keep + 1] & ce_rows if reject is not None else None
        if rejected is not None:
            ce_rows = ce_rows & ~rejected
        kl_rows = preserve[0, keep] if self.kl_weight > 0 else torch.zeros_like(ce_rows)
        stored = base_ids is not None and bool(kl_rows.any())
        # Every row's next token, and with the stored top-k also the base model's k tokens: one log-softmax
        # over the vocabulary serves both terms.
        columns = labels[0, keep + 1].clamp(min=0)[:, None]
        if stored:
            columns = torch.cat([columns, base_ids[0, keep].long()], dim=1)
        k = columns.shape[1]
        if self.name_weight > 0:
            columns = torch.cat([columns, self.name_ids.to(columns.device).expand(len(keep), -1)], dim=1)
        loop_at = columns.shape[1]
        if self.loop_weight > 0:
            columns = torch.cat([columns, self.loop_ids.to(columns.device).expand(len(keep), -1)], dim=1)
        logp = gathered_log_probs(logits, columns)
        loss = -logp[ce_rows, 0].mean()
        if self.loop_weight > 0:
            again = said_again(labels[0], lengths, self.loop_ids)[keep + 1] & ce_rows
            if again.any():
                loss = loss + self.loop_weight * name_unlikelihood(logp[again, loop_at:])
        if rejected is not None and rejected.any() and self.reject_weight > 0:
            # Which sample each rejected token belongs to: sample rests follow the shared prefix in order.
            rests = lengths[1:].to(keep.device)
            sample = torch.repeat_interleave(torch.arange(len(rests), device=keep.device), rests)
            loss = loss + self.reject_weight * rejected_unlikelihood(
                logp[rejected, 0], sample[keep[rejected] + 1 - int(lengths[0])])
        if kl_rows.any():
            rows = keep[kl_rows]
            if stored:  # stored before training (attach_base_topk)
                kl = topk_preservation_loss(logp[kl_rows, 1:k], base_logp[0, rows])
            else:
                kl = preservation_loss(logits[kl_rows], self.base_logits(model, inputs, lengths, preserve, rows))
            loss = loss + self.kl_weight * kl
            if self.name_weight > 0:
                loss = loss + self.name_weight * name_unlikelihood(logp[kl_rows, k:k + len(self.name_ids)])
        return (loss, outputs) if return_outputs else loss

    def base_logits(self, model, inputs, lengths, preserve, positions: torch.Tensor) -> torch.Tensor:
        """The base model's logits (adapter off, no grad) at `positions`.

        pack_batch puts preservation samples last, so only the shared prefix and that suffix of the row run
        again: each sample sees exactly the attention it had in the full row.
        """
        prefix, rests = int(lengths[0]), [int(n) for n in lengths[1:]]
        start = int(preserve[0].long().argmax())  # where the first preservation sample's rest begins
        ends = torch.tensor(rests).cumsum(0) + prefix
        sub_lengths = [prefix] + [n for n, end in zip(rests, ends.tolist()) if end > start]
        pick = torch.cat([torch.arange(prefix), torch.arange(start, inputs["input_ids"].shape[1])])
        layout = packed_layout(sub_lengths, inputs["input_ids"].device)
        base = self.accelerator.unwrap_model(model)
        with torch.no_grad(), base.disable_adapter():
            out = base(input_ids=inputs["input_ids"][:, pick], position_ids=inputs["position_ids"][:, pick],
                       use_cache=False, logits_to_keep=positions - start + prefix, packed_layout=layout)
        check_used(layout, base)
        return out.logits[0]


class EngineTrainer(PreservingTrainer):
    """`selfcog train`'s Trainer. Each process's loss is the per-token mean of its micro-batch and DDP (or
    DeepSpeed) averages gradients over processes, so a process holding few loss tokens would weigh as much as one
    holding many. Under torchrun each process's loss is weighted by its share of the micro-step's loss tokens
    (summed over processes), which makes N processes x batch_size b train like 1 process x batch_size N*b.
    With one process nothing changes."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        processes = self.accelerator.num_processes
        if processes == 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The targets `compute_loss` takes: every position whose next token carries loss.
        tokens = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        everyone = self.accelerator.reduce(tokens, reduction="sum")
        weight = tokens * processes / everyone
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return (result[0] * weight, result[1]) if return_outputs else result * weight


def use_bf16(setting: str) -> bool:
    """bf16 autocast: `auto` turns it on for GPUs that support it and CPUs with native bf16 instructions; elsewhere
    bf16 matmuls are emulated and training would be ~10x slower (docs/benchmarks.md)."""
    value = str(setting).lower()
    if value in ("false", "0", "no", "off"):
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return value in ("true", "1", "yes", "on") or cpu_has_native_bf16()


def base_dtype(setting: str) -> torch.dtype:
    """`model.dtype` as a torch dtype: `auto` is bf16 on a GPU that supports it and on a CPU with native bf16
    instructions, fp32 elsewhere (where bf16 matmuls are emulated)."""
    if setting not in CHOICES["model.dtype"]:
        raise SelfcogError(f"'model.dtype' needs one of {', '.join(CHOICES['model.dtype'])}, got {setting!r}")
    if setting == "auto":
        native = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, setting)
