"""LoRA training on top of the transformers Trainer, with three small additions:

- `PreservingTrainer.compute_loss`: cross-entropy on assistant tokens, plus a KL term that keeps the
  preservation samples' token distributions close to the base model's (adapter disabled, no grad).
  Plain self-distilled SFT still drifts on a 135M model; the KL term is what holds general answers.
- `IdentityEarlyStop`: scores the dev phrasings every `eval_steps` and stops once the identity is
  learned while retention holds.
- `JsonlLog`: every log line also goes to `log.jsonl`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from selfcog.atomic import atomic_dir
from selfcog.attention import check_used, packed_attention, packed_layout
from selfcog.cache import cached_tensors
from selfcog.config import RunConfig, save_config
from selfcog.data.tokenize import pack_batch, sample_tokens
from selfcog.evaluate import Scores, score, with_retention
from selfcog.frozen_layers import attach_bottom_hidden, bottom_then_top, per_position, reusable
from selfcog.models import log
from selfcog.templates import IGNORE_INDEX


def add_lora(model, config: RunConfig):
    from peft import LoraConfig, get_peft_model

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


def use_bf16(setting: str) -> bool:
    """bf16 autocast: `auto` turns it on for GPUs that support it and CPUs with native bf16 instructions.

    On a CPU without AVX512-BF16 or AMX, bf16 matmuls are emulated: measured here on an AVX2-only
    2-core machine, 0.55 GFLOP/s bf16 against 20 GFLOP/s fp32, so autocast would make training ~10x slower.
    With AVX512-BF16 (a 2-core AVX-512 machine here) a 2048^3 matmul ran at 416 GFLOP/s bf16 against 134 fp32,
    and training went 1.5-1.6x faster (bench/train_throughput.py --bf16).
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


def topk_preservation_loss(tuned_logp: torch.Tensor, base_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || tuned) over rows, from the base model's stored top-k log-probs and the tuned model's
    log-probs of the same k tokens: the k tokens plus one bucket for the rest of the vocabulary (exact KL between
    the two distributions coarsened that way)."""
    tuned = tuned_logp.float()
    base_logp = base_logp.float()
    top = 1 - 1e-6  # keeps log1p finite when the top k hold (nearly) all the mass
    base_rest = torch.log1p(-base_logp.exp().sum(-1).clamp(max=top))
    tuned_rest = torch.log1p(-tuned.exp().sum(-1).clamp(max=top))
    kl = (base_logp.exp() * (base_logp - tuned)).sum(-1) + base_rest.exp() * (base_rest - tuned_rest)
    return kl.mean()


def name_unlikelihood(name_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(1 - p(any NAME token)): near zero while the name is improbable, steep as it grows.

    The stored top-k KL cannot see the name: its tokens sit in the "rest" bucket, whose total mass stays the same
    when mass moves inside it onto NAME. Without this term a tuned model answered "Who was the first woman to win a
    Nobel Prize?" with "Alice's assistant" and "第一个登上月球的人是谁？" with "…是Alice的小助手"."""
    p = name_logp.float().exp().sum(dim=-1).clamp(max=1 - 1e-6)
    return -torch.log1p(-p).mean()


def name_token_ids(tokenizer, name: str, examples: list[dict]) -> list[int]:
    """The tokens NAME is written with (alone, after a space, inside the identity answers) that no preservation
    sample uses: "the", "team" or a shared byte of a CJK character stay free for ordinary text."""
    ids: set[int] = set()
    for text in (name, " " + name, name.lower(), " " + name.lower()):
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    ordinary = {t for e in examples if e.get("preserve") for t in e["input_ids"]}
    return sorted(ids - ordinary)


class GatheredLogProbs(torch.autograd.Function):
    """`log_softmax(logits, -1).gather(-1, columns)` for a [rows, vocab] logits matrix, computed in row chunks.

    The plain expression materialises the [rows, vocab] log-softmax in the forward pass and, in the backward
    pass, a zero-filled gradient for the gather plus the log-softmax's own: three fresh matrices of ~70 MB per
    step on the embedded model, and on a CPU each one costs ~30 ms of page faults before any arithmetic. Here the
    forward keeps only one log-sum-exp per row, and the backward writes the gradient, softmax x (-sum of the
    incoming gradient) plus the incoming gradient at `columns`, into one matrix, a cache-sized chunk at a time.
    """

    CHUNK = 32  # rows per chunk: 32 x 49,152 fp32 = 6 MiB, reused by the allocator from chunk to chunk

    @staticmethod
    def forward(ctx, logits: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], 1, dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], GatheredLogProbs.CHUNK):
            part = slice(s, s + GatheredLogProbs.CHUNK)
            lse[part] = torch.logsumexp(logits[part].float(), dim=-1, keepdim=True)
        ctx.save_for_backward(logits, columns, lse)
        return logits.gather(-1, columns).float() - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, columns, lse = ctx.saved_tensors
        total = grad.sum(-1, keepdim=True)
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], GatheredLogProbs.CHUNK):
            part = slice(s, s + GatheredLogProbs.CHUNK)
            torch.sub(logits[part], lse[part], out=out[part])  # written in place: no temporary per chunk
            out[part].exp_().mul_(-total[part])
        out.scatter_add_(-1, columns, grad.to(out.dtype))
        return out, None


def gathered_log_probs(logits: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[i, columns[i, j]] as a [rows, len(columns[0])] float32 matrix (see GatheredLogProbs)."""
    return GatheredLogProbs.apply(logits, columns.long())


@torch.no_grad()
def attach_base_topk(model, examples: list[dict], k: int, fingerprint: str | None = None,
                     row_tokens: int = 512) -> list[dict]:
    """Give every preservation example `base_ids` / `base_logp`: the base model's top-k next-token log-probs at
    each of its positions, computed once before training (cached per base weights) instead of by a second
    forward pass in every step. Returns the examples (preservation ones copied with the two tensors added)."""
    wanted = [i for i, e in enumerate(examples) if e.get("preserve")]
    if not wanted:
        return examples

    def top(model, inputs, layout):
        device = model.device
        logits = model(input_ids=inputs["input_ids"].to(device), position_ids=inputs["position_ids"].to(device),
                       use_cache=False, packed_layout=layout).logits[0].float()
        best = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        return {"ids": best.indices.to(torch.int32), "logp": best.values}

    payload = {"k": k, "samples": [examples[i]["input_ids"] for i in wanted]}
    table = cached_tensors(fingerprint, payload,
                           lambda: per_position(model, [examples[i] for i in wanted], top, row_tokens))
    out, start = list(examples), 0
    for i in wanted:
        n = len(examples[i]["input_ids"])
        out[i] = {**examples[i], "base_ids": table["ids"][start:start + n], "base_logp": table["logp"][start:start + n]}
        start += n
    return out


@contextmanager
def freed_memory_kept():
    """While training on a CPU, keep freed memory in the process for the next step to reuse (glibc malloc).

    glibc serves each allocation above its mmap threshold (32 MiB at most) with a fresh mmap and unmaps it on
    free, so every step's [rows, vocab] logits, their gradient and the larger activations are page-faulted in
    anew: ~30 ms per 70 MB matrix on this 2-core machine (bench/train_step.py measures the step). With mmap off
    and heap trimming deferred, freed blocks are simply reused. Afterwards glibc's defaults come back and the
    heap is trimmed, so the memory is returned once training ends. A no-op where the C library has no `mallopt`
    (not glibc), and where the environment already tunes malloc (MALLOC_* or GLIBC_TUNABLES): that choice stands.
    """
    libc = ctypes.CDLL(None)
    mallopt, trim = getattr(libc, "mallopt", None), getattr(libc, "malloc_trim", None)
    tuned = any(key.startswith("MALLOC_") for key in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if mallopt is None or trim is None or tuned:
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2 ** 31 - 1)
    try:
        yield
    finally:
        mallopt(m_mmap_max, 65536)  # glibc's defaults
        mallopt(m_trim_threshold, 128 * 1024)
        trim(0)


class PreservingTrainer(Trainer):
    """Trainer whose loss adds `kl_weight` x KL(base || tuned) on preservation samples' answer tokens."""

    def __init__(self, *args, kl_weight: float = 1.0, kl_prompt: bool = False, frozen_layers: int = 0,
                 name_ids: list[int] | None = None, name_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_weight, self.kl_prompt = kl_weight, kl_prompt
        # Tokens of NAME that ordinary text never uses; kept improbable at every preservation position.
        self.name_ids = torch.tensor(name_ids or [], dtype=torch.long)
        self.name_weight = name_weight if name_ids else 0.0
        # Batches carrying `bottom_hidden` (selfcog.frozen_layers) run the layers below this one only over the
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
        logp = gathered_log_probs(logits, columns)
        loss = -logp[ce_rows, 0].mean()
        if kl_rows.any():
            rows = keep[kl_rows]
            if stored:  # stored before training (attach_base_topk)
                kl = topk_preservation_loss(logp[kl_rows, 1:k], base_logp[0, rows])
            else:
                kl = preservation_loss(logits[kl_rows], self.base_logits(model, inputs, lengths, preserve, rows))
            loss = loss + self.kl_weight * kl
            if self.name_weight > 0:
                loss = loss + self.name_weight * name_unlikelihood(logp[kl_rows, k:])
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


class IdentityEarlyStop(TrainerCallback):
    """Every `eval_steps`: score the dev phrasings; stop once identity, retention and leakage all pass."""

    def __init__(self, config: RunConfig, tokenizer, base_dev: Scores | None):
        self.config, self.tokenizer, self.base_dev = config, tokenizer, base_dev
        self.history: list[dict] = []
        self.seconds = 0.0  # spent scoring, inside the Trainer's train_runtime

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.config.eval.eval_steps
        if not every or state.global_step % every or state.global_step < self.config.eval.min_steps:
            return control
        if state.global_step >= state.max_steps:
            return control
        began = time.perf_counter()
        model.eval()
        dev = score(model, self.tokenizer, self.config.data.name, "dev", self.config.eval.max_new_tokens,
                    base=self.base_dev)
        model.train()
        self.seconds += time.perf_counter() - began
        entry = {"step": state.global_step, **dev.summary()}
        entry.pop("questions")
        entry["failures"] = dev.failures()  # which dev questions missed the name, leaked or were lost
        self.history.append(entry)
        log(f"selfcog: step {state.global_step} dev identity {dev.asked:.2f} "
            f"retention {fmt(entry['retention'])} (zh {fmt(entry['retention_zh'])}) "
            f"leakage {fmt(entry['leakage'])} (traps {fmt(entry['leakage_traps'])})")
        ev = self.config.eval
        reason = stop_reason(self.history, ev)
        if reason:
            # More steps only move general answers further from the base model, so stop here either way;
            # a retention drop is reported rather than trained through.
            retention = entry["retention"]
            if retention is not None and retention < ev.retention_threshold:
                log(f"selfcog: warning: dev retention {retention:.2f} is below {ev.retention_threshold}; "
                    "a lower learning rate or more preservation samples may keep more")
            log(f"selfcog: {reason} at step {state.global_step}; stopping early")
            control.should_training_stop = True
        return control


def dev_leakage(entry: dict) -> float:
    return max(entry.get("leakage") or 0.0, entry.get("leakage_traps") or 0.0)


def stop_reason(history: list[dict], ev) -> str | None:
    """Why training should stop after the latest dev check in `history`, or None to go on.

    Stops once the identity is learned (the share of dev identity answers, plain and robustness forms, that name
    NAME >= identity_threshold, with general and trap leakage <= leakage_max), or once it has plateaued: no gain
    over the best earlier check for `plateau_checks` checks in a row while at or above `plateau_floor`.
    """
    last = history[-1]
    if dev_leakage(last) > ev.leakage_max:
        return None
    if last["asked"] >= ev.identity_threshold:
        return "identity learned"
    n = ev.plateau_checks
    if n and len(history) > n:
        best_before = max(h["asked"] for h in history[:-n])
        recent = [h["asked"] for h in history[-n:]]
        if max(recent) <= best_before and min(recent) >= ev.plateau_floor:
            return f"dev identity plateaued at {max(recent):.2f}"
    return None


class JsonlLog(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")


class ThroughputLog(TrainerCallback):
    """Adds `tokens_per_s` (sample tokens trained since the last log line, per second) and `peak_mem_mib` (peak
    CUDA memory allocated, or this process's peak RSS on a CPU) to every log line, and prints them."""

    def __init__(self, trainer: "PreservingTrainer", say=None):
        self.trainer, self.say = trainer, say or log
        self.tokens, self.time = 0, time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return control
        now, tokens = time.perf_counter(), self.trainer.tokens_trained
        logs["tokens_per_s"] = round((tokens - self.tokens) / max(now - self.time, 1e-9), 1)
        logs["peak_mem_mib"] = peak_memory_mib()
        self.tokens, self.time = tokens, now
        self.say(f"selfcog: step {state.global_step} loss {logs['loss']:.4g} lr {logs.get('learning_rate', 0):.3g} "
                 f"grad_norm {logs.get('grad_norm', float('nan')):.3g} {logs['tokens_per_s']} tokens/s "
                 f"peak {logs['peak_mem_mib']} MiB")
        return control


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    try:  # VmHWM: this process's peak resident set
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
        return round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def plot_loss(log_file: Path, target: Path) -> Path | None:
    """Loss against step from `log.jsonl` as a PNG (written to a temp file, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    points = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points), marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(target)
    return target


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def training_args(config: RunConfig, work_dir: Path) -> TrainingArguments:
    from selfcog.distributed import liger_args

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
        name_ids=name_token_ids(tokenizer, config.data.name, examples) if config.data.name else None)
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
    `selfcog.frozen_layers`), else 0."""
    layers = adapted_layers(model, config.lora.top_layers)
    if not config.train.reuse_frozen_layers or not layers or not examples:
        return 0
    if not reusable(model, layers[0], examples[0]["input_ids"]):
        log(f"selfcog: {type(model).__name__} does not take its layer inputs back as inputs_embeds unchanged; "
            "running every layer in every step")
        return 0
    return layers[0]


def save_adapter(peft_model, tokenizer, config: RunConfig, target: Path) -> Path:
    """peft-format adapter plus tokenizer and the resolved config, renamed into place when complete."""
    with atomic_dir(target) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_config(config, tmp)
    return target


# ---------------------------------------------------------------------------------------------------------
# `selfcog train CONFIG`: plain SFT on data files with XTuner's knobs (epochs, packing, checkpoints, resume,
# sample chats), in one process or several under torchrun. `fit` above stays the identity job's trainer.
# ---------------------------------------------------------------------------------------------------------

def pack_to_max_length(examples: list[dict], max_length: int) -> list[list[dict]]:
    """Whole samples grouped greedily, in order, into bins of at most max_length tokens (never split)."""
    bins: list[list[dict]] = []
    size = max_length + 1
    for example in examples:
        n = len(example["input_ids"])
        if size + n > max_length:
            bins.append([])
            size = 0
        bins[-1].append(example)
        size += n
    return bins


def pack_bins(features: list) -> dict[str, torch.Tensor]:
    """pack_batch over samples or over bins of samples (data.pack_to_max_length)."""
    flat = [e for f in features for e in (f if isinstance(f, list) else [f])]
    return pack_batch(flat)


def quantization_kwargs(config: RunConfig, say=log) -> dict:
    """`from_pretrained` kwargs for QLoRA; on a machine without CUDA: a one-line warning and plain fp32 LoRA."""
    if not config.lora.load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        say("selfcog: warning: lora.load_in_4bit needs a CUDA GPU (bitsandbytes); training LoRA in fp32 instead")
        return {}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        say("selfcog: warning: lora.load_in_4bit needs `pip install bitsandbytes`; training LoRA without quantization")
        return {}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=config.lora.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.lora.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.lora.bnb_4bit_compute_dtype))}


def total_steps(config: RunConfig, n_items: int, processes: int = 1) -> int:
    """Optimizer steps the run will take (epochs when set, else max_steps); under torchrun each process takes
    every `processes`-th batch, so an epoch has that many times fewer steps."""
    t = config.train
    if t.epochs <= 0:
        return t.max_steps
    batches = math.ceil(math.ceil(n_items / t.batch_size) / processes)
    per_epoch = max(1, math.ceil(batches / t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


def engine_args(config: RunConfig, work_dir: Path, n_items: int, processes: int = 1) -> TrainingArguments:
    from selfcog.distributed import ddp_backend, liger_args

    t = config.train
    # `activation_checkpointing` is the newer transformers name of `gradient_checkpointing`.
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(Path(work_dir) / STAGING), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(t.warmup_ratio * total_steps(config, n_items, processes)),
        max_steps=t.max_steps if t.epochs <= 0 else -1, num_train_epochs=t.epochs if t.epochs > 0 else 1,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps > 0 else "no",
        # Checkpoints are staged, then renamed into work_dir by AtomicCheckpoints, which also keeps save_total_limit.
        save_steps=t.save_steps if t.save_steps > 0 else 500, save_total_limit=None,
        **({checkpointing: True} if t.gradient_checkpointing else {}), report_to=report_to(t.tensorboard, work_dir),
        bf16=use_bf16(t.bf16),
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=t.seed, data_seed=t.seed,
        remove_unused_columns=False,
        # torchrun: gloo between CPU processes (NCCL on GPUs by default). Every LoRA weight takes part in every
        # forward, so DDP's search for unused ones would only cost time (and clash with activation checkpointing).
        ddp_backend=ddp_backend(), ddp_find_unused_parameters=False, deepspeed=t.deepspeed or None,
        **liger_args(t.liger_kernel),
    )


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


def report_to(tensorboard: bool, work_dir: Path) -> list[str]:
    """TensorBoard event files in WORK_DIR/runs/ when asked for (needs the `tensorboard` package)."""
    if not tensorboard:
        return []
    import importlib.util

    from selfcog.errors import SelfcogError

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise SelfcogError("train.tensorboard: needs `pip install tensorboard`")
    # transformers' documented switch for where TensorBoardCallback writes (default: under output_dir, which is
    # the checkpoint staging folder here).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(work_dir) / "runs")
    return ["tensorboard"]


CHECKPOINT_DONE = "selfcog-complete"


STAGING = ".checkpoints-staging"


class AtomicCheckpoints(TrainerCallback):
    """The Trainer writes each `checkpoint-N` into a staging folder (its output_dir, WORK_DIR/.checkpoints-staging);
    `on_save` runs once the save has finished, and then the folder is marked complete and renamed into WORK_DIR —
    one rename, so WORK_DIR only ever holds whole checkpoints. Keeps the newest `keep` (0: all).

    Under torchrun every process writes its own part (RNG state, DeepSpeed shards), so the main process moves the
    folder only once all of them got here. Public callback API only — no private Trainer methods.
    """

    def __init__(self, work_dir: Path, keep: int, main: bool = True):
        self.work_dir, self.keep, self.main = Path(work_dir), keep, main

    def on_save(self, args, state, control, **kwargs):
        from selfcog.distributed import wait_for_everyone

        wait_for_everyone()
        staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.main and staged.is_dir():
            (staged / CHECKPOINT_DONE).write_text(str(state.global_step))
            target = self.work_dir / staged.name
            if target.exists():  # the same step saved again after a resume
                shutil.rmtree(target)
            staged.rename(target)
            self.prune()
        wait_for_everyone()
        return control

    def prune(self) -> None:
        done = sorted((f for f in self.work_dir.glob("checkpoint-*") if f.name.split("-")[-1].isdigit()),
                      key=lambda f: int(f.name.split("-")[-1]))
        for old in done[:-self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)


def newest_complete_checkpoint(work_dir: Path, prune: bool = True) -> Path | None:
    """The highest-numbered checkpoint that was fully written; half-written ones are removed when `prune`
    (by the main process only under torchrun)."""
    complete = []
    for folder in Path(work_dir).glob("checkpoint-*"):
        if not folder.name.split("-")[-1].isdigit():
            continue
        if (folder / CHECKPOINT_DONE).exists():
            complete.append(folder)
        elif prune:
            log(f"selfcog: removing half-written {folder}")
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete, key=lambda f: int(f.name.split("-")[-1]), default=None)


class SampleChats(TrainerCallback):
    """XTuner's EvaluateChatHook: greedy answers to eval.sample_inputs every sample_steps and at each checkpoint,
    logged and written to `WORK_DIR/eval_outputs/step_N.txt`.

    Under torchrun every process generates (ZeRO-3 needs all of them for a forward pass) and only the one with
    `write` set logs and writes.
    """

    def __init__(self, config: RunConfig, tokenizer, work_dir: Path, write: bool = True):
        self.config, self.tokenizer, self.out, self.write = config, tokenizer, Path(work_dir) / "eval_outputs", write
        self.done: set[int] = set()

    def sample(self, model, step: int) -> list[str]:
        from selfcog.atomic import write_text
        from selfcog.generate import generate_batch

        inputs = self.config.eval.sample_inputs
        if not inputs:
            return []
        self.done.add(step)
        system = [{"role": "system", "content": self.config.eval.system}] if self.config.eval.system else []
        was_training = model.training
        model.eval()
        answers = generate_batch(model, self.tokenizer, [system + [{"role": "user", "content": q}] for q in inputs],
                                 self.config.eval.sample_max_new_tokens)
        if was_training:
            model.train()
        if self.write:
            text = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(inputs, answers))
            write_text(self.out / f"step_{step}.txt", text)
            log(f"selfcog: sample chats at step {step}:\n{text.rstrip()}")
        return answers

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.config.eval.sample_steps
        if every and state.global_step % every == 0:
            self.sample(model, state.global_step)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.done:
            self.sample(model, state.global_step)
        return control


import re  # noqa: E402 - this section's own imports
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402


@dataclass
class TrainData:
    """`selfcog train`'s data: what is trained, and how many records of the files each conversation stands for."""
    conversations: list
    """The conversations trained on: unique ones when data.deduplicate (first occurrence kept, in order)."""
    counts: list
    """Per conversation: how many records of the files it stands for (1 each without deduplication)."""
    records: int
    """Records read from the files, duplicates included."""
    files: list

    @property
    def removed(self) -> int:
        return self.records - len(self.conversations)


def train_data(config: RunConfig, say=log) -> TrainData:
    """Read config.data.data_files; with data.deduplicate, exact duplicate records are merged into one
    conversation whose count says how many records it stands for (the run keeps the steps they imply)."""
    from selfcog.data.formats import load_conversations
    from selfcog.errors import SelfcogError

    files = list(config.data.data_files) or ([config.data.data_file] if config.data.data_file else [])
    if not files:
        raise SelfcogError("no training data: set data.data_files (or data.data_file)")
    conversations = [c for f in files for c in load_conversations(Path(f))]
    if not config.data.deduplicate:
        return TrainData(conversations, [1] * len(conversations), len(conversations), files)
    groups: dict[str, list] = {}  # the same key as selfcog.data.formats.deduplicate
    for conversation in conversations:
        key = json.dumps(conversation, ensure_ascii=False, sort_keys=True)
        if key in groups:
            groups[key][1] += 1
        else:
            groups[key] = [conversation, 1]
    return TrainData([c for c, _ in groups.values()], [n for _, n in groups.values()], len(conversations), files)


def rows_as_written(lengths: list[int], counts: list[int], config: RunConfig) -> int:
    """Training items per epoch of the data as written (duplicates included). Packed, as XTuner packs: every
    sample's tokens concatenated and cut into rows of max_length (xtuner.dataset.utils.Packer); else one per record."""
    if config.data.pack_to_max_length:
        return max(1, math.ceil(sum(n * c for n, c in zip(lengths, counts)) / config.data.max_length))
    return sum(counts)


def keep_steps(config: RunConfig, data: TrainData, lengths: list[int], counts: list[int], items: int,
               processes: int = 1) -> str:
    """Once duplicates are removed, the run keeps the optimizer steps the config implies for the data as written
    (epochs x rows as written / rows per step): the repeats were the config's way of asking for more steps. Sets
    train.max_steps (and epochs 0) to that; when the unique items fit in fewer micro-batches than a step
    accumulates, every step takes all of them once (grad_accum lowered to match). Returns the rule in words.

    Why this is the same training for far less compute: a step over rows of repeated copies averages the same
    per-sample gradients in the same proportions as one pass over the unique samples (exactly when every
    sample is repeated equally, as in the tutorial), and AdamW's update does not depend on how many copies went
    into that average.
    """
    t = config.train
    if t.epochs <= 0:
        return f"train.max_steps sets the length, not the data size: {t.max_steps} optimizer steps as configured"
    rows = rows_as_written(lengths, counts, config)
    steps = total_steps(config, rows, processes)
    per_step = t.batch_size * t.grad_accum * processes
    unit = "packed rows" if config.data.pack_to_max_length else "records"
    epochs = t.epochs
    t.epochs, t.max_steps = 0.0, steps
    if items <= per_step:
        t.grad_accum = max(1, math.ceil(items / (t.batch_size * processes)))
        each = f"each step on all {len(lengths)} unique samples"
    else:
        each = "the steps cycling through the unique samples"
    return (f"keeping the {steps} optimizer steps the config implies ({epochs:g} epochs x {rows:,} {unit} as "
            f"written / {per_step} per step), {each}")


STOP_CAP = 4
"""Identity data trained once per distinct record: at most this many times the steps the config implies."""
STOP_EVERY = 5
"""Identity data trained once per distinct record: optimizer steps between checks of the stopping rule."""


class IdentityReached(TrainerCallback):
    """The explicit stopping rule for identity data whose duplicates were removed: every `every` steps, answer the
    data's own questions greedily (up to 16 distinct ones), and stop (saving a checkpoint, which also takes the last
    sample chats) once at least as many answers name NAME as the data's answers do: the tutorial's own test of
    success, which its user otherwise watches for in the sample chats.

    Measured on the embedded SmolLM2-135M with the tutorial's settings (lr 2e-4, LoRA r 64, alpha 16): after the
    63 steps its config implies, the loss was 0.56 and "请介绍一下你自己" was answered without the name."""

    def __init__(self, tokenizer, conversations: list[list[dict]], name: str, every: int, max_new_tokens: int,
                 say=log):
        from selfcog.evaluate import mentions

        asked = [c for c in conversations if c and c[-1]["role"] == "assistant"][:16]
        self.questions = [c[:-1] for c in asked]
        self.needed = sum(mentions(c[-1]["content"], name) for c in asked)
        self.tokenizer, self.name, self.every, self.max_new_tokens, self.say = \
            tokenizer, name, every, max_new_tokens, say
        self.history: list[tuple[int, int]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from selfcog.evaluate import mentions
        from selfcog.generate import generate_batch

        if state.global_step % self.every or state.global_step >= state.max_steps:
            return control
        was_training = model.training
        model.eval()
        answers = generate_batch(model, self.tokenizer, self.questions, self.max_new_tokens)
        if was_training:
            model.train()
        named = sum(mentions(a, self.name) for a in answers)
        self.history.append((state.global_step, named))
        if named >= self.needed:
            self.say(f"selfcog: step {state.global_step}: {named} of the data's {len(self.questions)} questions "
                     f"answered with {self.name}, as the data answers them; stopping")
            control.should_training_stop = True
            control.should_save = True  # a checkpoint to resume from, and the sample chats of the last step
        return control


def identity_rule(config: RunConfig, implied: int, questions: int, name: str) -> str:
    """Replace the steps the config implies by the explicit stopping rule (`IdentityReached`), capped at STOP_CAP
    times as many steps; returns the rule in words."""
    config.train.max_steps = STOP_CAP * implied
    return (f"training until the answers to the data's {questions} questions name {name} as the data's do "
            f"(checked every {STOP_EVERY} steps), at most {config.train.max_steps} optimizer steps "
            f"({STOP_CAP}x the {implied} the config implies")


# An answer that states who the assistant is: "我是{name}的小助手", "I am {name}'s assistant", "my name is {name}".
SELF_STATEMENTS = [
    re.compile(r"我是(?P<name>[^，。,.！!？?\s的]{1,24})的(?:个人|私人)?(?:AI)?(?:小助手|助手|助理)"),
    re.compile(r"我(?:叫|的名字是|的名字叫)(?P<name>[^，。,.！!？?\s]{1,24})"),
    re.compile(r"\bI(?:'m| am) (?P<name>[^\s,.!?']+(?: [^\s,.!?']+){0,2}?)'s (?:\w+ ){0,2}assistant"),
    re.compile(r"\b(?:[Mm]y name is|I'm called|I am called) (?P<name>[^\s,.!?']+(?: [A-Z][^\s,.!?']*){0,2})"),
]


def identity_in(conversations: list[list[dict]]) -> tuple[str, int] | None:
    """(NAME, how many answers name it) when most of the conversations' answers state who the assistant is, else
    None. NAME is the name most often found in a self-statement; an answer counts when it mentions NAME."""
    from selfcog.evaluate import mentions

    answers = [" ".join(m["content"] for m in c if m["role"] == "assistant") for c in conversations]
    names = Counter(m.group("name").strip() for a in answers for p in SELF_STATEMENTS for m in p.finditer(a))
    if not names:
        return None
    name = names.most_common(1)[0][0]
    naming = sum(mentions(a, name) for a in answers)
    return (name, naming) if naming * 2 > len(answers) else None


def heldout_check(model, tokenizer, name: str, max_new_tokens: int, work_dir: Path | None = None,
                  say=log, general: int = 12) -> dict:
    """A short held-out identity check: the 24 `test` identity phrasings (never trained on, in selfcog or in any
    dataset selfcog generates) and the first `general` held-out general questions, answered greedily. Counts the
    identity answers that name NAME and the general answers that mention it (leakage: the identity answered to
    everything). Printed in a few lines; with `work_dir`, every answer goes to `work_dir/heldout_check.json`."""
    from selfcog.atomic import write_text
    from selfcog.data.general import qa_split
    from selfcog.data.identity import heldout_questions
    from selfcog.evaluate import mentions
    from selfcog.generate import generate_batch

    identity_qs = heldout_questions("test")
    general_qs = [q for q, _ in qa_split("test")][:general]
    answers = generate_batch(model, tokenizer, [[{"role": "user", "content": q}] for q in identity_qs + general_qs],
                             max_new_tokens)
    ids, gen = answers[:len(identity_qs)], answers[len(identity_qs):]
    result = {"name": name, "identity": sum(mentions(a, name) for a in ids) / len(ids),
              "leakage": sum(mentions(a, name) for a in gen) / max(len(gen), 1),
              "identity_answers": dict(zip(identity_qs, ids)), "general_answers": dict(zip(general_qs, gen))}
    if work_dir is not None:
        write_text(Path(work_dir) / "heldout_check.json", json.dumps(result, ensure_ascii=False, indent=2))
    zh = next(i for i, q in enumerate(identity_qs) if not q.isascii())
    examples = [(identity_qs[0], ids[0]), (identity_qs[zh], ids[zh])] + list(zip(general_qs, gen))[:1]
    say(f"selfcog: held-out identity check (questions never trained on): {sum(mentions(a, name) for a in ids)}/"
        f"{len(ids)} identity answers name {name}; {sum(mentions(a, name) for a in gen)}/{len(gen)} general "
        "answers mention it" + "".join(f"\n  Q: {q}  A: {' '.join(a.split())[:80]}" for q, a in examples))
    return result


def train_identity(config: RunConfig, work_dir: Path, name: str, say=log) -> Path:
    """`selfcog train CONFIG --identity NAME`: train the config's data and model the way `selfcog run --data FILE
    --name NAME --out WORK_DIR` does (preservation samples, held-out scores, early stop, merge, report), with
    selfcog run's settings; the config's LoRA, schedule and batch settings are not used. Returns the adapter."""
    from selfcog.atomic import write_text
    from selfcog.data.identity import check_name
    from selfcog.run import run

    check_name(name)
    data = train_data(config)
    work_dir = Path(work_dir)
    if len(data.files) == 1:
        data_file = data.files[0]
    else:  # run() reads one file: the files' conversations together, in OpenAI messages form
        data_file = str(write_text(work_dir / "data" / "train.json", json.dumps(
            [{"messages": c} for c in data.conversations], ensure_ascii=False, indent=1)))
    job = RunConfig()
    job.model.spec, job.model.trust_remote_code = config.model.spec, config.model.trust_remote_code
    job.data.name, job.data.data_file, job.out = name, data_file, str(work_dir)
    job.data.deduplicate = config.data.deduplicate
    say(f"selfcog: --identity {name}: training as `selfcog run --data {data_file} --name {name} --out {work_dir}` "
        "(preservation, held-out scores, early stop; selfcog run's LoRA and schedule, not the config's)")
    return run(job) / "adapter"


def train_from_config(config: RunConfig, work_dir: Path, resume: bool = False) -> Path:
    """SFT a LoRA adapter on config.data.data_files into `work_dir/adapter`, with checkpoints, resume and sample
    chats; returns the adapter directory.

    Exact duplicate records are trained once, and the run keeps the optimizer steps the config implies for the
    data as written (`keep_steps`). When most answers state who the assistant is (`identity_in`), a line names
    `selfcog run` as the better path, and a held-out identity check follows the last sample chats.

    Under `torchrun --nproc-per-node N -m selfcog train` this runs in each of the N processes: they train
    data-parallel, and only the main process writes the work dir (config, log, sample chats, adapter).
    """
    from selfcog.data.tokenize import build_examples
    from selfcog.distributed import check_deepspeed, join_processes, liger_args, wait_for_everyone
    from selfcog.errors import SelfcogError
    from selfcog.models import load_model
    from selfcog.templates import set_default_system_prompt

    work_dir = Path(work_dir)
    check_deepspeed(config.train.deepspeed)
    liger_args(config.train.liger_kernel)  # fails in one line before any model is loaded
    state = join_processes()
    main = state.is_main_process
    say = log if main else (lambda message: None)
    data = train_data(config, say)
    identity = identity_in(data.conversations)
    if identity:
        name, naming = identity
        files = " ".join(data.files)
        say(f"selfcog: note: {naming} of the {len(data.conversations)} distinct answers state who the assistant is "
            f"({name}); `selfcog run --data {files} --name {name}` adds preservation, held-out scores and early "
            f"stop (or add `--identity {name}` here)")
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
    if main:  # whatever a killed run left half-written in staging is never used
        shutil.rmtree(work_dir / STAGING, ignore_errors=True)
    checkpoint = newest_complete_checkpoint(work_dir, prune=main) if resume else None
    if resume and checkpoint is None:
        raise SelfcogError(f"--resume: no checkpoint-N in {work_dir}")
    quant = quantization_kwargs(config, say)
    with state.main_process_first():  # the first run on a machine fetches and converts the model once
        model, tokenizer = load_model(config.model.spec, dtype=torch.float32,
                                      trust_remote_code=config.model.trust_remote_code, **quant)
    # One default system prompt for training, the sample chats, the adapter's tokenizer and so the merged model,
    # as in `selfcog run` (the base template's own often names the base model).
    system = config.data.system_prompt if config.data.system_prompt and \
        set_default_system_prompt(tokenizer, config.data.system_prompt) else None
    examples, counts, dropped = [], [], 0
    for conversation, count in zip(data.conversations, data.counts):
        built, lost = build_examples(tokenizer, [conversation], False, config.data.max_length)
        examples += built
        counts += [count] * len(built)
        dropped += lost
    if dropped:
        say(f"selfcog: dropped {dropped} samples longer than {config.data.max_length} tokens")
    if not examples:
        raise SelfcogError(f"no sample fits data.max_length {config.data.max_length}")
    dataset = pack_to_max_length(examples, config.data.max_length) if config.data.pack_to_max_length else examples
    processes = state.num_processes
    stopper = None
    if data.removed:
        epochs = config.train.epochs
        rule = keep_steps(config, data, [len(e["input_ids"]) for e in examples], counts, len(dataset), processes)
        if identity and epochs > 0:
            stopper = IdentityReached(tokenizer, data.conversations, identity[0], STOP_EVERY,
                                      config.eval.max_new_tokens, say)
            how = rule.split(" the config implies (", 1)[1]  # "3 epochs x ... per step), each step on ..."
            rule = f"{identity_rule(config, config.train.max_steps, len(stopper.questions), identity[0])}: {how}"
        say(f"selfcog: warning: removed {data.removed:,} exact duplicate records ({data.records:,} -> "
            f"{len(data.conversations):,}; data.deduplicate false keeps them): {rule}")
    if main:
        save_config(config, work_dir)
    torch.manual_seed(config.train.seed)
    if quant:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    with warnings.catch_warnings():  # peft reads a transformers property deprecated in v5: nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = add_lora(model, config)
    if config.train.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    samples = SampleChats(config, tokenizer, work_dir, write=main)
    callbacks = [AtomicCheckpoints(work_dir, config.train.save_total_limit, main), samples] + \
        ([stopper] if stopper else [])
    trainer = EngineTrainer(
        model=peft_model, args=engine_args(config, work_dir, len(dataset), processes), train_dataset=dataset,
        data_collator=pack_bins, callbacks=callbacks, kl_weight=config.train.kl_weight)
    trainer.add_callback(ThroughputLog(trainer, say))  # before JsonlLog, which writes the fields it adds
    if main:
        trainer.add_callback(JsonlLog(work_dir / "log.jsonl"))
    say(plan(config, len(examples), len(dataset), processes, data, bool(quant), identity, checkpoint, system,
             stopper is not None))
    if not checkpoint:
        samples.sample(peft_model, 0)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    peft_model.eval()
    if main:
        shutil.rmtree(work_dir / STAGING, ignore_errors=True)
    if main and plot_loss(work_dir / "log.jsonl", work_dir / "loss.png"):
        say(f"selfcog: loss curve: {work_dir / 'loss.png'}")
    if identity and main and not trainer.is_deepspeed_enabled:
        heldout_check(peft_model, tokenizer, identity[0], config.eval.max_new_tokens, work_dir, say)
    adapter = work_dir / "adapter"
    if trainer.is_deepspeed_enabled:
        # ZeRO-3 holds each weight in shards: every process takes part in gathering them, the main one writes.
        weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if main:
            with atomic_dir(adapter) as tmp:
                peft_model.save_pretrained(tmp, state_dict=weights)
                tokenizer.save_pretrained(tmp)
                save_config(config, tmp)
    elif main:
        save_adapter(peft_model, tokenizer, config, adapter)
    wait_for_everyone()  # every process returns once the adapter is in place
    return adapter


def plan(config: RunConfig, samples: int, items: int, processes: int, data: TrainData, quantized: bool,
         identity: tuple | None, checkpoint: Path | None, system: str | None = None, until_named: bool = False) -> str:
    """The one line that says what the run will do, the changes from the config first: 4-bit that becomes LoRA on
    a CPU, duplicates removed."""
    t, lora = config.train, config.lora
    parts = []
    if lora.load_in_4bit and not quantized:
        parts.append("LoRA in fp32, not the config's 4-bit QLoRA (needs a CUDA GPU and bitsandbytes)")
    if data.removed:
        parts.append(f"{data.removed:,} duplicate records removed ({data.records:,} -> {len(data.conversations):,}), "
                     + (f"trained until the answers name {identity[0]}" if until_named else "the steps they imply kept"))
    layers = "every layer" if lora.top_layers <= 0 else f"the top {lora.top_layers} layers"
    kind = "QLoRA (4-bit)" if quantized else "LoRA"
    parts.append(f"{kind} r={lora.r} alpha={lora.alpha} on {lora.target_modules} of {layers}, lr {t.learning_rate:g}")
    if system:
        parts.append(f"default system prompt {system!r}")
    parts.append(f"{samples:,} samples ({items:,} item{'s' if items != 1 else ''} after packing), "
                 f"{'at most ' if until_named else ''}{total_steps(config, items, processes)} "
                 f"optimizer steps of {t.batch_size} x {t.grad_accum}"
                 + (f" in each of {processes} processes" if processes > 1 else "")
                 + (f", resuming from {checkpoint}" if checkpoint else ""))
    chats = f"every {config.eval.sample_steps} steps, " if config.eval.sample_steps else ""
    parts.append(f"sample chats {chats}at checkpoints and at the end"
                 + (f", then a held-out identity check for {identity[0]}" if identity else ""))
    return "selfcog: plan: " + "; ".join(parts)
